"""`in_context_learner`: a Transformer meta-trained to learn classification in context (GPICL).

Kirsch et al. (2022) meta-train a black-box sequence model across many generated tasks: a base
data set's inputs under a random linear projection and its labels under a random permutation.
Read left to right, a sequence of (input, label) examples of one task is a training set; the
model predicts each label from the examples before it, so a model that lowers this loss on tasks
it never saw has learned a learning algorithm. With few distinct tasks it can memorise them
instead; the paper finds that the number of tasks moves it from memorising to generalising.

Generated task `i` is drawn from key `i`: a projection A_i (features × features, N(0, 1/features))
of the standardised inputs and a permutation π_i of the labels. Meta-training draws `i` from the
first `num_tasks` ids (0: any id below 2**30, a fresh task almost every sequence); meta-test ids
are at or above 2**30, so no meta-test task was ever trained on.

One deviation from the paper, for the compute two cores have: token t carries the query x_t
*and* the previous example with its label, [x_t, x_{t-1}, onehot(y_{t-1})], rather than
[x_t, onehot(y_{t-1})]. Attention then reads labelled examples directly and need not first learn
to bind each label to the token before it. The model has no position embedding: a context is a
set, and a trained learner takes contexts of any length.

The objective's step is one minibatch of `sequences` sequences of `context` examples, drawn from
the task's training split; its loss is the mean cross-entropy over every position. Meta-training
uses the `tbptt` estimator (backprop: the gradient of that loss). A task must offer its data,
`task.full(split)` -> {"x": (N, features), "y": (N,)} and `task.num_classes` (the mlp family does).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

REQUIRES = ("full", "num_classes")  # what a task must offer: task.full(split), task.num_classes
TEST_IDS = 2**30  # generated tasks with ids at or above this are meta-test tasks, never trained on


def _layer_norm(x: jax.Array) -> jax.Array:
    return (x - x.mean(-1, keepdims=True)) * jax.lax.rsqrt(x.var(-1, keepdims=True) + 1e-5)


@dataclasses.dataclass(frozen=True)
class InContextLearner:
    """The learnable: θ the Transformer's weights; its objective, sequences of generated tasks."""

    features: int = 64  # input features of the base data set (digits: 64)
    classes: int = 10
    num_tasks: int = 0  # distinct generated tasks meta-training draws from; 0: unbounded
    context: int = 64  # examples per sequence
    sequences: int = 16  # sequences per step
    d_model: int = 64
    layers: int = 2
    heads: int = 4

    name = "in_context_learner"
    kind = "classifier"
    usage = "as_classifier()"
    description = "a Transformer that learns classification in context, across generated tasks (GPICL)"
    requires = REQUIRES

    def __post_init__(self):
        sizes = {k: v for k, v in self.hparams.items() if k != "num_tasks"}
        if any(not isinstance(v, int) or v < 1 for v in sizes.values()):
            raise ValueError(f"in_context_learner's sizes must be positive integers, got {sizes}")
        if self.d_model % self.heads:
            raise ValueError(f"in_context_learner: d_model ({self.d_model}) must be a multiple of heads "
                             f"({self.heads})")
        if not 0 <= self.num_tasks < TEST_IDS:
            raise ValueError(f"in_context_learner: num_tasks must be 0 (unbounded) or 1..{TEST_IDS - 1} "
                             f"(ids from {TEST_IDS} on are meta-test tasks), got {self.num_tasks}")

    @property
    def hparams(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ---- the model -----------------------------------------------------------------------------

    @functools.partial(jax.jit, static_argnums=0)  # one program: eagerly, each draw compiles alone
    def init_theta(self, key: jax.Array) -> dict:
        d, tokens = self.d_model, 2 * self.features + self.classes + 1
        keys = iter(jax.random.split(key, 2 + 4 * self.layers))

        def dense(fan_in: int, fan_out: int, scale: float = 1.0) -> dict:
            w = scale * jax.random.normal(next(keys), (fan_in, fan_out), jnp.float32) / np.sqrt(fan_in)
            return {"w": w, "b": jnp.zeros((fan_out,), jnp.float32)}

        blocks = {f"block_{i}": {"qkv": dense(d, 3 * d), "out": dense(d, d), "fc1": dense(d, 4 * d),
                                 "fc2": dense(4 * d, d)} for i in range(self.layers)}
        return {"embed": dense(tokens, d), "head": dense(d, self.classes, scale=0.0), **blocks}

    def logits(self, theta: dict, tokens: jax.Array) -> jax.Array:
        """(B, L, 2·features + classes + 1) tokens -> (B, L, classes) logits of each position's query."""
        x = tokens @ theta["embed"]["w"] + theta["embed"]["b"]
        b, length, d = x.shape
        dh = d // self.heads
        causal = jnp.tril(jnp.ones((length, length), bool))
        for i in range(self.layers):
            p = theta[f"block_{i}"]
            qkv = (_layer_norm(x) @ p["qkv"]["w"] + p["qkv"]["b"]).reshape(b, length, 3, self.heads, dh)
            scores = jnp.einsum("bqhd,bkhd->bhqk", qkv[:, :, 0], qkv[:, :, 1]) / np.sqrt(dh)
            scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
            att = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), qkv[:, :, 2])
            x = x + att.reshape(b, length, d) @ p["out"]["w"] + p["out"]["b"]
            h = jax.nn.gelu(_layer_norm(x) @ p["fc1"]["w"] + p["fc1"]["b"])
            x = x + h @ p["fc2"]["w"] + p["fc2"]["b"]
        return _layer_norm(x) @ theta["head"]["w"] + theta["head"]["b"]

    def tokens(self, x: jax.Array, y: jax.Array) -> jax.Array:
        """(B, L, features) inputs and (B, L) labels -> (B, L, ·) tokens [x_t, x_{t-1}, y_{t-1}, t > 0]."""
        previous = jnp.pad(x, ((0, 0), (1, 0), (0, 0)))[:, :-1]
        labels = jnp.pad(jax.nn.one_hot(y, self.classes), ((0, 0), (1, 0), (0, 0)))[:, :-1]
        has_previous = jnp.broadcast_to((jnp.arange(x.shape[1]) > 0)[None, :, None], (*x.shape[:2], 1))
        return jnp.concatenate([x, previous, labels, has_previous.astype(x.dtype)], axis=-1)

    def as_classifier(self, theta: dict):
        """predict(context_x (N, features), context_y (N,) int, query_x (Q, features)) -> (Q, classes)
        logits: each query classified from the labelled context alone, nothing fitted. Inputs as in
        meta-training: standardised (zero mean, unit variance over all features)."""
        theta = jax.tree.map(jnp.asarray, theta)

        @jax.jit
        def predict(context_x, context_y, query_x):
            if context_x.shape[-1] != self.features or query_x.shape[-1] != self.features:
                raise ValueError(f"this learner takes {self.features} input features, got context "
                                 f"{context_x.shape} and queries {query_x.shape}")

            def one(query):  # the sequence context..., query: the last position's prediction
                x = jnp.concatenate([context_x, query[None]])[None]
                y = jnp.concatenate([context_y, jnp.zeros((1,), context_y.dtype)])[None]
                return self.logits(theta, self.tokens(x, y))[0, -1]

            return jax.vmap(one)(query_x)

        return predict

    # ---- generated tasks -----------------------------------------------------------------------

    def sequence(self, data: dict, task_id: jax.Array, key: jax.Array, length: int):
        """`length` distinct examples of `data` under generated task `task_id`: (x, y)."""
        projection_key, permutation_key = jax.random.split(jax.random.fold_in(jax.random.key(0), task_id))
        idx = jax.random.choice(key, data["y"].shape[0], (length,), replace=False)
        a = jax.random.normal(projection_key, (self.features, self.features)) / np.sqrt(self.features)
        return data["x"][idx] @ a, jax.random.permutation(permutation_key, self.classes)[data["y"][idx]]

    def objective(self, task, num_steps: int):
        if not all(hasattr(task, r) for r in REQUIRES):
            raise ValueError(f"in_context_learner needs tasks that give their data (task.full(split), "
                             f"task.num_classes); {type(task).__name__} does not")
        data = task.full("train")
        features = data["x"].shape[-1]
        if features != self.features or task.num_classes > self.classes:
            raise ValueError(f"in_context_learner has features={self.features}, classes={self.classes}, "
                             f"but the task has {features} features and {task.num_classes} classes")
        return InContextTraining(standardised(data), self)


def standardised(data: dict) -> dict:
    """Inputs shifted to zero mean per feature and scaled to unit variance overall."""
    x = data["x"] - data["x"].mean(0)
    return {"x": x / jnp.maximum(x.std(), 1e-6), "y": data["y"]}


@dataclasses.dataclass(frozen=True)
class InContextTraining:
    """The meta-objective: one minibatch of sequences of training tasks per step. No inner state."""

    data: dict
    learner: InContextLearner

    def init_state(self, key: jax.Array, theta) -> jax.Array:
        return jnp.zeros((), jnp.int32)

    def step(self, theta, state, key: jax.Array):
        id_key, example_key = jax.random.split(key)
        bound = self.learner.num_tasks or TEST_IDS
        ids = jax.random.randint(id_key, (self.learner.sequences,), 0, bound)
        x, y = jax.vmap(lambda i, k: self.learner.sequence(self.data, i, k, self.learner.context))(
            ids, jax.random.split(example_key, self.learner.sequences))
        logits = self.learner.logits(theta, self.learner.tokens(x, y))
        return state + 1, optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


jax.tree_util.register_dataclass(InContextTraining, data_fields=["data"], meta_fields=["learner"])
