"""Family ``lstm_lm``: a byte-level LSTM language model.

Architecture (plain JAX): byte embedding of width `hidden` -> one LSTM layer of `hidden` units
run over the sequence with `lax.scan` (zero initial state per window) -> untied projection to 256
byte logits. Loss: mean next-byte cross-entropy in nats. Data: see `task_zoo.text` (the corpus
is a spec kwarg, default ``"stdlib"``), shared with ``transformer_lm``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from metaopt.task_zoo import text
from metaopt.task_zoo._spec import choices, pick, seed, spec_error, spec_kwargs
from metaopt.task_zoo.base import TaskCost, TaskSpec

NAME = "lstm_lm"


def param_shapes(hidden: int) -> dict:
    """The shapes of the tree `LSTMLMTask.init` returns (`cost` counts them; a test checks they
    match). Gate order along the 4*hidden axis: input, forget, cell candidate, output."""
    h, v = hidden, text.VOCAB
    return {
        "embed": (v, h),
        "lstm": {"w_x": (h, 4 * h), "w_h": (h, 4 * h), "b": (4 * h,)},
        "head": {"w": (h, v), "b": (v,)},
    }


@struct.dataclass
class LSTMLMTask:
    """Sizes are static; corpus bytes and init scale are leaves, so tasks of equal sizes on
    equal-length corpora share one compiled program."""

    train: jax.Array  # (n_train,) uint8
    test: jax.Array  # (n_test,) uint8
    init_scale: jax.Array  # () float32, multiplies every random weight init
    hidden: int = struct.field(pytree_node=False)
    seq_len: int = struct.field(pytree_node=False)
    batch_size: int = struct.field(pytree_node=False)

    @jax.jit  # one compiled program: called eagerly, init would compile op by op
    def init(self, key: jax.Array) -> dict:
        """Tree of `param_shapes(hidden)`, float32: matrices ~ N(0, 1/hidden) * init_scale,
        biases 0 except the forget gate's, which is 1 (remember by default: the usual trick
        that lets gradients flow through long windows early in training)."""
        h = self.hidden
        k_emb, k_x, k_h, k_out = jax.random.split(key, 4)

        def normal(k: jax.Array, shape: tuple) -> jax.Array:
            return self.init_scale * jax.random.normal(k, shape, jnp.float32) / np.sqrt(h)

        return {
            "embed": normal(k_emb, (text.VOCAB, h)),
            "lstm": {
                "w_x": normal(k_x, (h, 4 * h)),
                "w_h": normal(k_h, (h, 4 * h)),
                "b": jnp.zeros(4 * h, jnp.float32).at[h : 2 * h].set(1.0),
            },
            "head": {"w": normal(k_out, (h, text.VOCAB)), "b": jnp.zeros(text.VOCAB, jnp.float32)},
        }

    def logits(self, params: dict, inputs: jax.Array) -> jax.Array:
        """(B, L) int byte ids -> (B, L, 256) float32 next-byte logits."""
        p = params["lstm"]
        # the input projection does not depend on the state: one big matmul outside the scan
        x_gates = params["embed"][inputs] @ p["w_x"] + p["b"]  # (B, L, 4h)

        def step(carry, xg):
            h, c = carry
            i, f, g, o = jnp.split(xg + h @ p["w_h"], 4, axis=-1)
            c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            h = jax.nn.sigmoid(o) * jnp.tanh(c)
            return (h, c), h

        zeros = jnp.zeros((inputs.shape[0], self.hidden), jnp.float32)
        _, hs = jax.lax.scan(step, (zeros, zeros), jnp.swapaxes(x_gates, 0, 1))  # time-major
        return jnp.swapaxes(hs, 0, 1) @ params["head"]["w"] + params["head"]["b"]

    def loss(self, params: dict, key: jax.Array, batch: dict) -> jax.Array:
        """Scalar float32 mean next-byte cross-entropy (nats). `key` is unused (no dropout)."""
        del key
        logits = self.logits(params, batch["inputs"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()

    def batch(self, key: jax.Array, split: str) -> dict:
        """{"inputs": (batch_size, seq_len) int32, "targets": (batch_size, seq_len) int32}."""
        data = text.TextData(self.train, self.test)
        return text.windows(data, key, split, self.batch_size, self.seq_len)


class LSTMLMFamily:
    """Distribution over byte-level LSTM LMs on one corpus: hidden size, seq_len and batch size
    drawn uniformly from their sets. Example: ``LSTMLMFamily(corpus="memory://c.txt")``."""

    name = NAME
    description = "byte-level LSTM LM on a text corpus (path, URI, stdlib or pydoc)"

    def __init__(
        self,
        corpus: str = text.STDLIB,
        hiddens: Sequence[int] = (32, 64, 128),
        seq_lens: Sequence[int] = (32, 64),
        batch_sizes: Sequence[int] = (8, 16, 32),
    ):
        self.corpus = text.check_corpus_setting(corpus)
        self.hiddens = choices("hiddens", hiddens)
        self.seq_lens = choices("seq_lens", seq_lens)
        self.batch_sizes = choices("batch_sizes", batch_sizes)

    def sample(self, key: jax.Array) -> TaskSpec:
        """Host-side (not jittable): returns a spec of plain Python values."""
        keys = jax.random.split(key, 4)
        return TaskSpec(
            NAME,
            {
                "corpus": self.corpus,
                "hidden": pick(keys[0], self.hiddens),
                "seq_len": pick(keys[1], self.seq_lens),
                "batch_size": pick(keys[2], self.batch_sizes),
                # tells apart draws of equal settings; the run's randomness is in init/batch keys
                "seed": seed(keys[3]),
            },
        )

    def _kwargs(self, spec: TaskSpec) -> dict:
        kw = spec_kwargs(
            spec,
            NAME,
            required={"corpus": str, "hidden": int, "seq_len": int, "batch_size": int, "seed": int},
            optional={"init_scale": (float, 1.0)},
        )
        if min(kw["hidden"], kw["seq_len"], kw["batch_size"]) < 1:
            raise spec_error(spec, "hidden, seq_len and batch_size must be >= 1")
        return kw

    def cost(self, spec: TaskSpec) -> TaskCost:
        """parameters: exact count. flops_per_step: 3 x forward, where forward (N = B*L tokens)
        = N * (16 h^2 [input and recurrent gate matmuls] + 2 h 256 [byte logits]); the gate
        nonlinearities (~10 h per token) are neglected."""
        kw = self._kwargs(spec)
        h, n = kw["hidden"], kw["batch_size"] * kw["seq_len"]
        shapes = jax.tree.leaves(param_shapes(h), is_leaf=lambda x: isinstance(x, tuple))
        forward = n * (16 * h * h + 2 * h * text.VOCAB)
        return TaskCost(parameters=sum(int(np.prod(s)) for s in shapes), flops_per_step=3.0 * forward)

    def task_fn(self, spec: TaskSpec) -> LSTMLMTask:
        """Spec kwargs: corpus, hidden, seq_len, batch_size, seed; optional init_scale (1)."""
        kw = self._kwargs(spec)
        try:
            data = text.corpus_for(kw["corpus"], kw["seq_len"])
        except ValueError as e:
            raise spec_error(spec, str(e)) from None
        return LSTMLMTask(
            train=data.train,
            test=data.test,
            init_scale=jnp.asarray(kw["init_scale"], jnp.float32),
            hidden=kw["hidden"],
            seq_len=kw["seq_len"],
            batch_size=kw["batch_size"],
        )
