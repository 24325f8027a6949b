"""Family ``transformer_lm``: a decoder-only byte-level transformer language model.

Architecture (plain JAX, parameters in a dict): byte embedding + learned positional embedding,
`layers` pre-LayerNorm blocks (causal multi-head self-attention, then a 4x GELU MLP, each
added to the residual stream), a final LayerNorm and an untied projection to 256 byte logits.
Loss: mean next-byte cross-entropy in nats (ln 256 ≈ 5.55 for a uniform guess). Data: see
`task_zoo.text` (the corpus is a spec kwarg, default ``"stdlib"``).
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

NAME = "transformer_lm"


def param_shapes(d_model: int, layers: int, seq_len: int) -> dict:
    """The parameter tree's shapes; `init` and `cost` both read it, so counts always agree."""
    d, v = d_model, text.VOCAB
    ln = {"scale": (d,), "bias": (d,)}
    block = {
        "ln1": ln,
        "qkv": {"w": (d, 3 * d), "b": (3 * d,)},
        "out": {"w": (d, d), "b": (d,)},
        "ln2": ln,
        "fc1": {"w": (d, 4 * d), "b": (4 * d,)},
        "fc2": {"w": (4 * d, d), "b": (d,)},
    }
    shapes = {"embed": (v, d), "pos": (seq_len, d), "ln_f": ln, "head": {"w": (d, v), "b": (v,)}}
    shapes.update({f"block_{i}": block for i in range(layers)})
    return shapes


def _is_shape(x) -> bool:
    return isinstance(x, tuple)


def _layer_norm(p: dict, x: jax.Array) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]


@struct.dataclass
class TransformerLMTask:
    """Sizes are static; corpus bytes and init scale are leaves, so tasks of equal sizes on
    equal-length corpora share one compiled program."""

    train: jax.Array  # (n_train,) uint8
    test: jax.Array  # (n_test,) uint8
    init_scale: jax.Array  # () float32, multiplies every random weight init
    d_model: int = struct.field(pytree_node=False)
    layers: int = struct.field(pytree_node=False)
    heads: int = struct.field(pytree_node=False)
    seq_len: int = struct.field(pytree_node=False)
    batch_size: int = struct.field(pytree_node=False)

    @jax.jit  # one compiled program: called eagerly, init would compile op by op
    def init(self, key: jax.Array) -> dict:
        """Tree of `param_shapes(...)`, float32: weights and embeddings ~ N(0, 1/fan_in) *
        init_scale (fan_in = d_model for embeddings), biases 0, LayerNorm scales 1."""
        shapes = param_shapes(self.d_model, self.layers, self.seq_len)
        n_leaves = len(jax.tree.leaves(shapes, is_leaf=_is_shape))
        keys = iter(jax.random.split(key, n_leaves))  # tree_map visits leaves in flatten order

        def draw(path, shape: tuple) -> jax.Array:
            name, k = path[-1].key, next(keys)
            if name == "scale":
                return jnp.ones(shape, jnp.float32)
            if name in ("b", "bias"):
                return jnp.zeros(shape, jnp.float32)
            fan_in = shape[0] if name == "w" else self.d_model  # embedding rows: norm ≈ 1
            return self.init_scale * jax.random.normal(k, shape, jnp.float32) / np.sqrt(fan_in)

        return jax.tree_util.tree_map_with_path(draw, shapes, is_leaf=_is_shape)

    def _attention(self, p: dict, x: jax.Array) -> jax.Array:
        """(B, L, d) -> (B, L, d) causal multi-head self-attention."""
        b, length, d = x.shape
        dh = d // self.heads
        qkv = (x @ p["qkv"]["w"] + p["qkv"]["b"]).reshape(b, length, 3, self.heads, dh)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each (B, L, H, dh)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(dh)
        causal = jnp.tril(jnp.ones((length, length), bool))  # query q sees keys k <= q
        scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
        att = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
        return att.reshape(b, length, d) @ p["out"]["w"] + p["out"]["b"]

    def logits(self, params: dict, inputs: jax.Array) -> jax.Array:
        """(B, L) int byte ids (L <= seq_len) -> (B, L, 256) float32 next-byte logits."""
        x = params["embed"][inputs] + params["pos"][: inputs.shape[1]]
        for i in range(self.layers):
            p = params[f"block_{i}"]
            x = x + self._attention(p, _layer_norm(p["ln1"], x))
            h = jax.nn.gelu(_layer_norm(p["ln2"], x) @ p["fc1"]["w"] + p["fc1"]["b"])
            x = x + h @ p["fc2"]["w"] + p["fc2"]["b"]
        return _layer_norm(params["ln_f"], x) @ params["head"]["w"] + params["head"]["b"]

    def loss(self, params: dict, key: jax.Array, batch: dict) -> jax.Array:
        """Scalar float32 mean next-byte cross-entropy (nats). `key` is unused (no dropout)."""
        del key
        logits = self.logits(params, batch["inputs"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()

    def batch(self, key: jax.Array, split: str) -> dict:
        """{"inputs": (batch_size, seq_len) int32, "targets": (batch_size, seq_len) int32}."""
        data = text.TextData(self.train, self.test)
        return text.windows(data, key, split, self.batch_size, self.seq_len)


class TransformerLMFamily:
    """Distribution over byte-level transformer LMs on one corpus: d_model, layers, heads,
    seq_len and batch size drawn uniformly from their sets (every head count must divide every
    d_model). Example: ``TransformerLMFamily(corpus="data/*.txt", d_models=(32,))``."""

    name = NAME
    description = "byte-level decoder-only transformer LM on a text corpus (path, URI, stdlib or pydoc)"

    def __init__(
        self,
        corpus: str = text.STDLIB,
        d_models: Sequence[int] = (32, 64),
        layers: Sequence[int] = (1, 2),
        heads: Sequence[int] = (2, 4),
        seq_lens: Sequence[int] = (32, 64),
        batch_sizes: Sequence[int] = (8, 16, 32),
    ):
        self.corpus = text.check_corpus_setting(corpus)
        self.d_models = choices("d_models", d_models)
        self.layers = choices("layers", layers)
        self.heads = choices("heads", heads)
        self.seq_lens = choices("seq_lens", seq_lens)
        self.batch_sizes = choices("batch_sizes", batch_sizes)
        bad = [(d, h) for d in self.d_models for h in self.heads if d % h]
        if bad:
            raise ValueError(f"every head count must divide every d_model; (d_model, heads) {bad}")

    def sample(self, key: jax.Array) -> TaskSpec:
        """Host-side (not jittable): returns a spec of plain Python values."""
        keys = jax.random.split(key, 6)
        return TaskSpec(
            NAME,
            {
                "corpus": self.corpus,
                "d_model": pick(keys[0], self.d_models),
                "layers": pick(keys[1], self.layers),
                "heads": pick(keys[2], self.heads),
                "seq_len": pick(keys[3], self.seq_lens),
                "batch_size": pick(keys[4], self.batch_sizes),
                # tells apart draws of equal settings; the run's randomness is in init/batch keys
                "seed": seed(keys[5]),
            },
        )

    def _kwargs(self, spec: TaskSpec) -> dict:
        kw = spec_kwargs(
            spec,
            NAME,
            required={k: int for k in ("d_model", "layers", "heads", "seq_len", "batch_size", "seed")}
            | {"corpus": str},
            optional={"init_scale": (float, 1.0)},
        )
        if min(kw["d_model"], kw["layers"], kw["heads"], kw["seq_len"], kw["batch_size"]) < 1:
            raise spec_error(spec, "d_model, layers, heads, seq_len and batch_size must be >= 1")
        if kw["d_model"] % kw["heads"]:
            raise spec_error(spec, "heads must divide d_model")
        return kw

    def cost(self, spec: TaskSpec) -> TaskCost:
        """parameters: exact count. flops_per_step: 3 x forward, where forward (N = B*L tokens)
        = layers * (24 N d^2 [qkv, out, MLP matmuls] + 4 B L^2 d [scores, weighted sum])
        + 2 N d 256 [byte logits]; LayerNorm, softmax and GELU are neglected."""
        kw = self._kwargs(spec)
        d, n_layers, length, b = kw["d_model"], kw["layers"], kw["seq_len"], kw["batch_size"]
        shapes = jax.tree.leaves(param_shapes(d, n_layers, length), is_leaf=_is_shape)
        n = b * length
        forward = n_layers * (24 * n * d * d + 4 * b * length * length * d) + 2 * n * d * text.VOCAB
        return TaskCost(parameters=sum(int(np.prod(s)) for s in shapes), flops_per_step=3.0 * forward)

    def task_fn(self, spec: TaskSpec) -> TransformerLMTask:
        """Spec kwargs: corpus, d_model, layers, heads, seq_len, batch_size, seed; optional
        init_scale (default 1)."""
        kw = self._kwargs(spec)
        try:
            data = text.corpus_for(kw["corpus"], kw["seq_len"])
        except ValueError as e:
            raise spec_error(spec, str(e)) from None
        return TransformerLMTask(
            train=data.train,
            test=data.test,
            init_scale=jnp.asarray(kw["init_scale"], jnp.float32),
            d_model=kw["d_model"],
            layers=kw["layers"],
            heads=kw["heads"],
            seq_len=kw["seq_len"],
            batch_size=kw["batch_size"],
        )
