"""Byte-level text corpora for the language-model families (``transformer_lm``, ``lstm_lm``).

A *corpus* is a string naming where the text lives:

* a path or any fsspec URI (``file://``, ``memory://``, ``s3://`` ... with the matching fsspec
  backend installed) of one text file, of a directory (every file below it, in sorted path
  order; names starting with ``.`` are skipped), or a glob (``data/*.txt``);
* the special name ``"stdlib"`` (the default): the concatenated source of a fixed list of
  Python standard-library modules (`STDLIB_MODULES`), read from the running interpreter's
  stdlib directory. It is real text that every machine has without a download; its exact
  bytes follow the interpreter version, so results on it compare only within one version;
* the special name ``"pydoc"``: English prose, the Python documentation's topic pages that
  every CPython ships for `help()` (the values of the `topics` dict in the stdlib's
  ``pydoc_data/topics.py``, ~470 KB, joined in sorted topic order by blank lines). The dict
  literal is read with `ast.literal_eval`, so nothing is executed. Same caveat on versions.

Bytes are used as-is (vocabulary 256, no decoding). The concatenation is split contiguously:
the first 90% is the train split, the rest the test split, so no test window overlaps a train
window. Corpora are read once per process and kept on the device (`load_corpus` is cached by
the corpus string: a file changed after its first load is not re-read).
"""

from __future__ import annotations

import ast
import functools
import os
import sysconfig
from typing import Any, NamedTuple

import fsspec
import jax
import jax.numpy as jnp
import numpy as np

from metaopt.task_zoo.base import SPLITS, TRAIN

STDLIB = "stdlib"
PYDOC = "pydoc"
PYDOC_TOPICS = "pydoc_data/topics.py"
VOCAB = 256  # byte-level: every byte value is a token
TRAIN_FRACTION = 0.9
# ~630 KB of plain, long-lived modules (present in every CPython 3.11+ install).
STDLIB_MODULES = (
    "abc.py",
    "base64.py",
    "bisect.py",
    "calendar.py",
    "collections/__init__.py",
    "contextlib.py",
    "copy.py",
    "csv.py",
    "dataclasses.py",
    "fractions.py",
    "functools.py",
    "heapq.py",
    "json/decoder.py",
    "json/encoder.py",
    "operator.py",
    "pprint.py",
    "queue.py",
    "random.py",
    "shutil.py",
    "statistics.py",
    "string.py",
    "textwrap.py",
    "threading.py",
    "tokenize.py",
)


class TextData(NamedTuple):
    """The two splits of a corpus as device arrays of bytes."""

    train: jax.Array  # (n_train,) uint8, the first 90% of the corpus
    test: jax.Array  # (n_test,) uint8, the remaining 10%


def _stdlib_bytes() -> bytes:
    root = sysconfig.get_paths()["stdlib"]
    paths = [os.path.join(root, m) for m in STDLIB_MODULES]
    found = [p for p in paths if os.path.isfile(p)]
    if not found:  # e.g. an embedded interpreter shipped without .py sources
        raise ValueError(f"corpus 'stdlib': no module sources found under {root!r}")
    parts = []
    for p in found:
        with open(p, "rb") as f:
            parts.append(f.read())
    return b"".join(parts)


def _pydoc_bytes() -> bytes:
    path = os.path.join(sysconfig.get_paths()["stdlib"], PYDOC_TOPICS)
    try:
        with open(path, "rb") as f:
            tree = ast.parse(f.read(), path)
    except (OSError, SyntaxError) as e:  # e.g. a stripped-down interpreter without pydoc_data
        raise ValueError(f"corpus 'pydoc': cannot read {path!r}: {e}") from None
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["topics"]:
            topics = ast.literal_eval(node.value)
            return "\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8")
    raise ValueError(f"corpus 'pydoc': no `topics = {{...}}` dict in {path!r}")


NAMED_CORPORA = {STDLIB: _stdlib_bytes, PYDOC: _pydoc_bytes}


def _read_bytes(corpus: str) -> bytes:
    """All bytes a corpus string names, concatenated in sorted path order."""
    if corpus in NAMED_CORPORA:
        return NAMED_CORPORA[corpus]()
    try:
        fs, path = fsspec.core.url_to_fs(corpus)
    except (ImportError, ValueError) as e:  # unknown protocol or backend not installed
        raise ValueError(f"corpus {corpus!r}: cannot open: {e}") from None
    if any(c in path for c in "*?["):
        files = [p for p in fs.glob(path) if fs.isfile(p)]
    elif fs.isdir(path):
        files = list(fs.find(path))  # recursive, files only
    elif fs.isfile(path):
        files = [path]
    else:
        raise ValueError(f"corpus {corpus!r}: no such file, directory or glob match")
    files = sorted(p for p in files if not os.path.basename(p).startswith("."))
    if not files:
        raise ValueError(f"corpus {corpus!r}: matches no files")
    return b"".join(fs.cat_file(p) for p in files)


@functools.lru_cache(maxsize=8)
def load_corpus(corpus: str) -> TextData:
    """Read `corpus` (see the module docstring) and split it 90/10; cached per process.

    Raises ValueError for a missing path, no matching files, or an empty corpus.
    """
    if not isinstance(corpus, str) or not corpus:
        raise ValueError(f"corpus must be a non-empty str, got {corpus!r}")
    data = np.frombuffer(_read_bytes(corpus), dtype=np.uint8)
    if data.size == 0:
        raise ValueError(f"corpus {corpus!r} is empty")
    n_train = int(data.size * TRAIN_FRACTION)
    # device arrays are immutable, so every task built from this corpus shares one copy
    return TextData(train=jnp.asarray(data[:n_train]), test=jnp.asarray(data[n_train:]))


def corpus_for(corpus: str, seq_len: int) -> TextData:
    """`load_corpus(corpus)`, checked to hold at least one `seq_len + 1` window per split."""
    data = load_corpus(corpus)
    short = min(data.train.shape[0], data.test.shape[0])
    if short < seq_len + 1:
        total = data.train.shape[0] + data.test.shape[0]
        raise ValueError(
            f"corpus {corpus!r} is too short for seq_len={seq_len}: its {total} bytes split into "
            f"{data.train.shape[0]} train / {data.test.shape[0]} test, and each split needs "
            f"at least seq_len + 1 = {seq_len + 1}"
        )
    return data


# jitted so that eager callers (`task_zoo.batches`) run one program, not a dozen small ones
@functools.partial(jax.jit, static_argnames=("split", "batch_size", "seq_len"))
def windows(data: TextData, key: jax.Array, split: str, batch_size: int, seq_len: int) -> dict:
    """Random next-byte windows, jittable: {"inputs": (B, L) int32, "targets": (B, L) int32}.

    Each row is `seq_len + 1` consecutive bytes of `split` starting at a uniform offset;
    targets are the inputs shifted left by one byte.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    text = data.train if split == TRAIN else data.test
    # the last valid start is len - (seq_len + 1); randint's maxval is exclusive
    starts = jax.random.randint(key, (batch_size, 1), 0, text.shape[0] - seq_len)
    rows = text[starts + jnp.arange(seq_len + 1)].astype(jnp.int32)
    return {"inputs": rows[:, :-1], "targets": rows[:, 1:]}


def check_corpus_setting(corpus: Any) -> str:
    """Validate a family's `corpus` setting (its presence is checked when a task is built)."""
    if not isinstance(corpus, str) or not corpus:
        raise ValueError(f"corpus must be a non-empty path, URI or one of {sorted(NAMED_CORPORA)}, "
                         f"got {corpus!r}")
    return corpus
