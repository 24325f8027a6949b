"""The task zoo: families of inner training problems for meta-training learned optimizers.

>>> import jax
>>> from metaopt import task_zoo
>>> fam = task_zoo.family("quadratic", dims=(8,))
>>> spec = fam.sample(jax.random.key(0))       # a TaskSpec: JSON-serialisable
>>> t = task_zoo.task(spec)                     # a Task: a jittable pytree
>>> params = t.init(jax.random.key(1))
>>> loss = t.loss(params, jax.random.key(2), t.batch(jax.random.key(3), task_zoo.TRAIN))

It needs `pip install 'metaopt[eval]'` (flax, scikit-learn, ...); without it, importing it says so.
"""

from metaopt.extras import require

require("eval", "metaopt.task_zoo")

from metaopt.task_zoo.augment import Augmentation
from metaopt.task_zoo.autoencoder import AutoencoderFamily
from metaopt.task_zoo.base import SPLITS, TEST, TRAIN, Task, TaskCost, TaskFamily, TaskSpec, batches
from metaopt.task_zoo.cnn import CNNFamily
from metaopt.task_zoo.epinet import EpinetFamily
from metaopt.task_zoo.least_squares import LeastSquaresFamily
from metaopt.task_zoo.logistic import LogisticFamily
from metaopt.task_zoo.lstm_lm import LSTMLMFamily
from metaopt.task_zoo.mixture import Mixture
from metaopt.task_zoo.mlp import MLPFamily
from metaopt.task_zoo.quadratic import QuadraticFamily
from metaopt.task_zoo.registry import check_family, cost, families, family, register, task
from metaopt.task_zoo.sparse import SparseCNNFamily, SparseMLPFamily
from metaopt.task_zoo.transformer_lm import TransformerLMFamily

register(QuadraticFamily.name, QuadraticFamily)
register(MLPFamily.name, MLPFamily)
register(CNNFamily.name, CNNFamily)
register(AutoencoderFamily.name, AutoencoderFamily)
register(LogisticFamily.name, LogisticFamily)
register(LeastSquaresFamily.name, LeastSquaresFamily)
register(TransformerLMFamily.name, TransformerLMFamily)
register(LSTMLMFamily.name, LSTMLMFamily)
register(EpinetFamily.name, EpinetFamily)
register(SparseMLPFamily.name, SparseMLPFamily)
register(SparseCNNFamily.name, SparseCNNFamily)

__all__ = [
    "Augmentation",
    "Mixture",
    "check_family",
    "cost",
    "SPLITS",
    "TEST",
    "TRAIN",
    "LSTMLMFamily",
    "MLPFamily",
    "CNNFamily",
    "EpinetFamily",
    "AutoencoderFamily",
    "LogisticFamily",
    "LeastSquaresFamily",
    "TransformerLMFamily",
    "QuadraticFamily",
    "SparseCNNFamily",
    "SparseMLPFamily",
    "Task",
    "TaskCost",
    "TaskFamily",
    "TaskSpec",
    "batches",
    "families",
    "family",
    "register",
    "task",
]
