"""Optimizers for metaopt, learned and hand-designed, behind one registry.

from metaopt import optimizers
optimizers.names()                       # ['adam', 'small_fc']
opt = optimizers.make("small_fc", hidden=32)
"""

from metaopt.optimizers.adam import Adam
from metaopt.optimizers.base import Optimizer
from metaopt.optimizers.registry import make, names, register
from metaopt.optimizers.small_fc import SmallFC, SmallFCState

register("adam", Adam)
register("small_fc", SmallFC)

__all__ = ["Adam", "Optimizer", "SmallFC", "SmallFCState", "make", "names", "register"]
