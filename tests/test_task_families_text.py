"""Text corpora and the byte-level LM families (transformer_lm, lstm_lm)."""

from __future__ import annotations

import math
import uuid

import fsspec
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metaopt import task_zoo
from metaopt.task_zoo import TEST, TRAIN, TaskSpec
from metaopt.task_zoo.text import load_corpus

LM_FAMILIES = ("transformer_lm", "lstm_lm")
# a small, highly predictable corpus: a model that learns anything gets far below ln(256)
SENTENCE = b"the quick brown fox jumps over the lazy dog. "
TINY = {
    "transformer_lm": {"d_model": 32, "layers": 1, "heads": 2, "seq_len": 32, "batch_size": 16},
    "lstm_lm": {"hidden": 32, "seq_len": 32, "batch_size": 16},
}


def _memory_corpus(data: bytes) -> str:
    """A fresh memory:// file (unique name: load_corpus caches by the corpus string)."""
    uri = f"memory://text-tests/{uuid.uuid4().hex}.txt"
    with fsspec.open(uri, "wb") as f:
        f.write(data)
    return uri


@pytest.fixture(scope="module")
def repetitive() -> str:
    return _memory_corpus(SENTENCE * 200)


def _spec(name: str, corpus: str, **overrides) -> TaskSpec:
    return TaskSpec(name, {**TINY[name], "corpus": corpus, "seed": 0, **overrides})


def test_corpus_from_file_directory_glob_and_memory(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"a" * 90 + b"b" * 10)
    np.testing.assert_array_equal(load_corpus(str(tmp_path / "a.txt")).test, [ord("b")] * 10)
    sub = tmp_path / "dir"
    (sub / "nested").mkdir(parents=True)
    (sub / "2.txt").write_bytes(b"y" * 50)
    (sub / "nested" / "1.txt").write_bytes(b"x" * 50)  # sorted path order: 2.txt < nested/1.txt
    (sub / ".hidden").write_bytes(b"z" * 1000)  # skipped
    data = load_corpus(f"file://{sub}")
    assert data.train.dtype == jnp.uint8 and data.train.shape == (90,) and data.test.shape == (10,)
    assert bytes(np.asarray(data.train)) == b"y" * 50 + b"x" * 40
    assert load_corpus(str(sub / "*.txt")).train.shape == (45,)  # glob: 2.txt only
    data = load_corpus(_memory_corpus(bytes(range(256)) * 4))
    assert data.train.shape[0] + data.test.shape[0] == 1024 and data.train.shape[0] == 921
    folder = f"memory://text-tests/{uuid.uuid4().hex}"
    for i in range(2):
        with fsspec.open(f"{folder}/{i}.txt", "wb") as f:
            f.write(bytes([i]) * 100)
    assert load_corpus(folder).train.shape == (180,)  # a directory URI


def test_corpus_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_corpus(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        load_corpus(str(tmp_path / "empty.txt"))
    with pytest.raises(ValueError, match="matches no files"):
        load_corpus(str(tmp_path / "*.md"))
    short = _memory_corpus(b"x" * 200)  # test split: 20 bytes < seq_len + 1
    for name in LM_FAMILIES:
        with pytest.raises(ValueError, match="too short for seq_len=32"):
            task_zoo.task(_spec(name, short))
        with pytest.raises(ValueError, match="no such file"):
            task_zoo.task(_spec(name, str(tmp_path / "missing.txt")))


def test_stdlib_default_corpus():
    data = load_corpus("stdlib")
    assert data.train.shape[0] > 100_000 and data.test.shape[0] > 10_000
    assert b"def " in bytes(np.asarray(data.test))
    for name in LM_FAMILIES:
        assert task_zoo.family(name).sample(jax.random.key(0)).kwargs["corpus"] == "stdlib"


def test_pydoc_corpus_is_the_interpreters_documentation_topics():
    from pydoc_data.topics import topics  # the interpreter's own import: the truth to compare with

    data = load_corpus("pydoc")
    text = bytes(np.asarray(data.train)) + bytes(np.asarray(data.test))
    assert text == "\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8")
    assert data.train.shape[0] > 300_000 and data.test.shape[0] > 30_000
    # English prose, not code: words and spaces, no Python source framing
    assert b"The \"assert\" statement" in text and b"topics = {" not in text
    assert sum(c == ord(" ") for c in text) / len(text) > 0.12
    assert text[:50_000] != bytes(np.asarray(load_corpus("stdlib").train[:50_000]))
    for name in LM_FAMILIES:
        t = task_zoo.task(_spec(name, "pydoc"))
        loss = jax.jit(lambda task: task.loss(task.init(jax.random.key(0)), jax.random.key(1),
                                              task.batch(jax.random.key(2), TEST)))(t)
        assert abs(float(loss) - math.log(256)) < 1.0  # an untrained byte model: about uniform


def test_windows_are_consecutive_bytes_shifted_by_one(repetitive):
    t = task_zoo.task(_spec("lstm_lm", repetitive))
    batch = jax.jit(t.batch, static_argnums=1)(jax.random.key(0), TEST)
    assert batch["inputs"].shape == (16, 32) and batch["inputs"].dtype == jnp.int32
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    text = SENTENCE.decode()
    for row in np.asarray(batch["inputs"]):
        assert "".join(map(chr, row)) in text * 3


def test_family_overrides_and_bad_settings(repetitive):
    fam = task_zoo.family("transformer_lm", corpus=repetitive, d_models=(16,), heads=(4,), layers=(3,))
    kw = fam.sample(jax.random.key(0)).kwargs
    assert (kw["corpus"], kw["d_model"], kw["heads"], kw["layers"]) == (repetitive, 16, 4, 3)
    assert task_zoo.family("lstm_lm", hiddens=(8,)).sample(jax.random.key(0)).kwargs["hidden"] == 8
    with pytest.raises(ValueError, match="divide"):
        task_zoo.family("transformer_lm", d_models=(30,), heads=(4,))
    with pytest.raises(ValueError, match="hiddens"):
        task_zoo.family("lstm_lm", hiddens=(0,))
    with pytest.raises(ValueError, match="corpus"):
        task_zoo.family("lstm_lm", corpus="")
    with pytest.raises(ValueError, match="heads must divide d_model"):
        task_zoo.task(_spec("transformer_lm", repetitive, heads=3))
    with pytest.raises(ValueError, match="must be >= 1"):
        task_zoo.task(_spec("lstm_lm", repetitive, hidden=0))
    with pytest.raises(ValueError, match="corpus must be str"):
        task_zoo.task(_spec("lstm_lm", 5))


@pytest.mark.parametrize("name", LM_FAMILIES)
def test_cost_counts_parameters_exactly_and_orders_sizes(name, repetitive):
    fam = task_zoo.family(name)
    small = _spec(name, repetitive)
    big_sizes = {"d_model": 64, "layers": 2} if name == "transformer_lm" else {"hidden": 128}
    large = _spec(name, repetitive, seq_len=64, **big_sizes)
    for spec in (small, large, fam.sample(jax.random.key(3))):
        params = jax.eval_shape(task_zoo.task(spec).init, jax.random.key(0))
        assert fam.cost(spec).parameters == sum(math.prod(p.shape) for p in jax.tree.leaves(params))
    lo, hi = fam.cost(small), fam.cost(large)
    assert lo.parameters < hi.parameters and 0 < lo.flops_per_step < hi.flops_per_step
    # compute is per token: twice the batch, twice the flops, same parameters
    double = fam.cost(_spec(name, repetitive, batch_size=2 * small.kwargs["batch_size"]))
    assert double == type(lo)(lo.parameters, 2 * lo.flops_per_step)


def test_transformer_is_causal(repetitive):
    t = task_zoo.task(_spec("transformer_lm", repetitive, layers=2))
    params = jax.jit(t.init)(jax.random.key(0))  # jitted: eager init dispatches op by op
    inputs = jax.jit(t.batch, static_argnums=1)(jax.random.key(1), TRAIN)["inputs"]
    changed = inputs.at[:, 20].set((inputs[:, 20] + 1) % 256)
    logits = jax.jit(t.logits)
    a, b = logits(params, inputs), logits(params, changed)
    np.testing.assert_allclose(a[:, :20], b[:, :20], atol=1e-5)
    assert float(jnp.abs(a[:, 20:] - b[:, 20:]).max()) > 1e-3  # and it does see the past


@pytest.mark.parametrize("name", LM_FAMILIES)
def test_adam_learns_repetitive_text(name, repetitive):
    t = task_zoo.task(_spec(name, repetitive))
    opt = optax.adam(1e-2)

    @jax.jit
    def run(task, key):
        params = task.init(key)

        def step(carry, k):
            p, s = carry
            g = jax.grad(task.loss)(p, k, task.batch(k, TRAIN))
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        (final, _), _ = jax.lax.scan(step, (params, opt.init(params)), jax.random.split(key, 200))
        test = task.batch(jax.random.key(99), TEST)
        return task.loss(params, key, test), task.loss(final, key, test)

    before, after = run(t, jax.random.key(0))
    assert float(before) > 0.8 * math.log(256) and float(after) < 1.0, (before, after)
