"""Load, short: 256 worker streams held on the real learner for 8 s (`benchmarks/chaos_load.py`
holds them for minutes). Every stream stays open and keeps sending, every accepted estimate is
applied in exactly one outer step, and the learner's memory stays within the stated bound."""

from __future__ import annotations

import pytest

from benchmarks.chaos_load import RSS_BOUND_MB, hold_streams

STREAMS, SECONDS, WARM_S = 256, 8.0, 3.0


@pytest.fixture(scope="module")
def held() -> dict:
    return hold_streams(STREAMS, SECONDS, warm_s=WARM_S)


def _figures(held: dict) -> dict:
    return {k: v for k, v in held.items() if k != "samples"}


def test_every_stream_is_held(held):
    assert held["streams"] == STREAMS, f"streams open at peak, not {STREAMS}: {_figures(held)}"
    assert held["streams_min"] == STREAMS, f"streams dropped during the hold: {_figures(held)}"
    assert held["streams_dropped"] == held["streams_failed"] == 0, _figures(held)
    assert held["accepted_per_s"] > STREAMS / SECONDS, f"streams held but not sending: {_figures(held)}"


def test_no_accepted_estimate_is_lost_or_applied_twice(held):
    assert held["unanswered"] == 0, f"estimates sent and never answered: {_figures(held)}"
    assert held["accepted"] > 0 and held["outer_steps"] > 0, _figures(held)
    assert held["accepted_lost"] == 0, f"accepted but not applied (or applied twice): {_figures(held)}"
    assert held["accepted"] == held["learner_accepted"] == held["applied"], _figures(held)
    assert held["workers_mismatched"] == 0, _figures(held)


def test_memory_stays_within_bound(held):
    assert held["rss_bound_mb"] == RSS_BOUND_MB
    grew = f"learner RSS grew {held['rss_growth_mb']:.1f} MB over {held['rss_start_mb']:.0f} MB"
    assert held["within_bound"], f"{grew} (bound {RSS_BOUND_MB} MB): {_figures(held)}"
