"""What the two halves of `chaos_inputs.py` share (`chaos_specs.py`, `chaos_artifacts.py`): one
seeded hypothesis run per kind of bad input, the per-kind figures, and a few strategies."""

from __future__ import annotations

import collections
import functools
import pathlib
import string

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

# Words pydantic would read as a number or a boolean in lax mode.
LAX_WORDS = {"nan", "inf", "infinity", "true", "false", "yes", "no", "on", "off", "t", "f", "y", "n"}
WORD = st.text(string.ascii_letters, min_size=1, max_size=12).filter(lambda w: w.lower() not in LAX_WORDS)
MAPPING = st.dictionaries(WORD, st.integers(-9, 9), min_size=1, max_size=2)


def files_under(path: pathlib.Path) -> list[pathlib.Path]:
    return [p for p in path.rglob("*") if p.is_file()] if path.exists() else []


def kind_stats() -> dict:
    return {"tried": 0, "failures": 0, "variants": collections.Counter(), "examples": []}


def run_kinds(kinds: dict, examples: int, seed: int, one_case) -> None:
    """`examples` cases shared evenly among `kinds`; one seeded hypothesis run per kind
    (hypothesis wants a test's draws to depend on nothing but its own earlier draws)."""
    for i, (kind, make) in enumerate(kinds.items()):
        count = examples // len(kinds) + (i < examples % len(kinds))
        if count:
            _hypothesis_run(count, seed, functools.partial(one_case, kind, make))


def _hypothesis_run(count: int, seed: int, body) -> None:
    @hypothesis_seed(seed)
    @settings(max_examples=count, deadline=None, database=None, phases=[Phase.generate], print_blob=False,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                     HealthCheck.data_too_large, HealthCheck.large_base_example])
    @given(st.data())
    def run(data):
        body(data.draw)

    run()


def by_kind(stats: dict) -> dict:
    return {k: {"tried": s["tried"], "failures": s["failures"], "variants": dict(s["variants"]),
                "examples": s["examples"][:3]} for k, s in stats.items()}
