"""metaopt: meta-train learned optimizers, and use the trained ones as optax optimizers.

    import metaopt
    tx = metaopt.load("quickstart", registry="runs/registry").as_optax(num_steps=1000)
"""

from metaopt import optimizers
from metaopt.registry import TrainedOptimizer, load

__all__ = ["TrainedOptimizer", "load", "optimizers"]
