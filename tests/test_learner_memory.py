"""Bounded memory over long runs: the learner keeps a window of outer steps, job-wide totals
and replay records only while they matter, all restored exactly from checkpoints; no replay
gets through once a record is dropped. Plots and reports read metrics.jsonl."""

from __future__ import annotations

import json
import logging
import math
import threading
import time

import matplotlib.image
import numpy as np
import pytest

from metaopt import publishing, train
from metaopt._proto import learner_pb2 as pb
from metaopt.learner import core
from metaopt.learner.bookkeeping import Totals
from metaopt.learner.checkpointing import Checkpointer
from metaopt.learner.core import HISTORY_WINDOW, Learner
from metaopt.run_report import keep_outer_steps, plot_metrics, read_metrics
from tests.test_inrun_eval import _record
from tests.test_learner_streams import acks, estimate, hello, make_learner, serve  # noqa: F401

WINDOW = 16  # a small history window, so that runs of many windows stay quick
STALENESS = 2


@pytest.fixture
def small_window(monkeypatch):
    monkeypatch.setattr(core, "HISTORY_WINDOW", WINDOW)


def bounded_learner(**overrides) -> Learner:
    return make_learner(**({"max_staleness": STALENESS} | overrides))


def deliver(lrn: Learner, run: str, sequence: int = 1) -> pb.Ack:
    """One estimate of worker "w", incarnation `run`, at θ's current version, on a stream of its
    own (opened and closed around it, as the server does); waits for its outer step."""
    lrn.stream_opened("w", run)
    ack = lrn.submit(estimate(np.full(11, 0.01), sequence, run=run, version=lrn.version))
    lrn.stream_closed("w", run)
    assert lrn.wait_idle()
    return ack


def advance(lrn: Learner, steps: int) -> None:
    """`steps` outer steps, each from a new incarnation whose stream then closes."""
    for _ in range(steps):
        assert deliver(lrn, f"filler-{lrn.version}").accepted


def test_memory_stays_bounded_over_many_windows_while_totals_count_everything(small_window):
    lrn = bounded_learner()
    steps = 10 * WINDOW
    lrn.submit(estimate(np.full(11, np.nan), 1, run="bad"))  # one refusal among them
    advance(lrn, steps)
    assert lrn.version == steps and len(lrn.history) == WINDOW
    assert [h.step for h in lrn.history] == list(range(steps - WINDOW + 1, steps + 1))
    # A closed stream's record lives on only while its estimates could pass the staleness check.
    assert lrn.replay_records <= STALENESS + 1
    assert lrn.totals == Totals(estimates_accepted=steps, estimates_applied=steps,
                                inner_steps_applied=2 * steps, worker_incarnations=steps,
                                meta_loss_first=1.0, rejected={"REJECT_REASON_NON_FINITE": 1})
    assert lrn.worker_incarnations == steps
    assert [h.step for h in lrn.steps_after(steps - 3)] == [steps - 2, steps - 1, steps]
    assert [h.step for h in lrn.recent_steps(2)] == [steps - 1, steps]


def test_the_default_window_is_the_named_constant():
    assert make_learner().history.maxlen == HISTORY_WINDOW


def test_totals_history_and_replay_records_survive_a_checkpoint_exactly(small_window, tmp_path):
    lrn = bounded_learner()
    advance(lrn, 3 * WINDOW)
    lrn.stream_opened("w", "live")  # a live stream with an accepted estimate: its record is saved
    assert lrn.submit(estimate(np.full(11, 0.01), 5, run="live", version=lrn.version)).accepted
    assert not lrn.submit(estimate(np.full(11, 0.01), 5, run="live", version=lrn.version)).accepted
    assert lrn.wait_idle()
    Checkpointer(lrn, str(tmp_path)).save()

    restored = bounded_learner()
    assert Checkpointer(restored, str(tmp_path)).restore_latest() == lrn.version
    assert restored.snapshot()[2] == lrn.snapshot()[2]  # history window, totals, records, watermark
    assert restored.totals == lrn.totals and restored.worker_incarnations == 3 * WINDOW + 1
    assert restored.totals.rejected == {"REJECT_REASON_REPLAYED": 1}
    assert list(restored.history) == list(lrn.history) and restored.history.maxlen == WINDOW
    # The restored record still refuses the live incarnation's replay, and takes its next estimate.
    replay = restored.submit(estimate(np.full(11, 0.01), 5, run="live", version=restored.version))
    assert replay.reason == pb.REJECT_REASON_REPLAYED and "already seen" in replay.detail
    assert restored.submit(estimate(np.full(11, 0.01), 6, run="live", version=restored.version)).accepted


def test_a_checkpoint_from_before_totals_still_loads(small_window):
    """It holds the full history and no totals or replay records: totals come from the history,
    the window keeps its last steps, and as nothing says who sent what, estimates computed at
    θ versions that may be in θ already are refused from every incarnation."""
    lrn = bounded_learner(max_staleness=100)
    advance(lrn, 5)
    _, arrays, meta = lrn.snapshot()
    old = {k: v for k, v in meta.items() if k not in ("totals", "incarnations", "forgotten_through")}
    full = [{**meta["history"][0], "step": s, "estimates": 2, "inner_steps": 4, "meta_loss": s / 10}
            for s in range(1, 2 * WINDOW + 1)]
    old |= {"version": 2 * WINDOW, "history": full}

    restored = bounded_learner(max_staleness=100)
    restored.restore(arrays, old)
    assert [h.step for h in restored.history] == list(range(WINDOW + 1, 2 * WINDOW + 1))
    assert restored.totals == Totals(estimates_accepted=4 * WINDOW, estimates_applied=4 * WINDOW,
                                     inner_steps_applied=8 * WINDOW, meta_loss_first=0.1)
    version = restored.version
    refused = restored.submit(estimate(np.full(11, 0.01), 1, run="r", version=version - 1))
    assert refused.reason == pb.REJECT_REASON_REPLAYED, refused
    assert restored.submit(estimate(np.full(11, 0.01), 2, run="r", version=version)).accepted


def test_a_replay_after_its_stream_closed_is_refused_before_and_after_its_record_is_dropped():
    lrn = bounded_learner()
    assert deliver(lrn, "gone", sequence=7).accepted
    early = lrn.submit(estimate(np.full(11, 0.01), 7, run="gone", version=lrn.version - 1))
    assert early.reason == pb.REJECT_REASON_REPLAYED and "already seen" in early.detail
    advance(lrn, STALENESS + 2)
    assert lrn.replay_records <= STALENESS + 1
    assert lrn._incarnations.records.get(("w", "gone")) is None  # dropped: its stream closed
    lrn.stream_opened("w", "gone")  # the replayer opens a stream as that incarnation
    late = lrn.submit(estimate(np.full(11, 0.01), 7, run="gone", version=0))
    # Stale: the record was dropped only once that alone refuses it (and the watermark would too).
    assert late.reason == pb.REJECT_REASON_STALE and lrn._incarnations.forgotten_through >= 0
    assert lrn.totals.estimates_applied == STALENESS + 3  # nothing applied twice


def test_an_estimate_of_an_unknown_old_run_id_is_refused_even_where_staleness_would_pass():
    """After a restore into a learner with a larger `max_staleness`, the staleness check would
    let an estimate of a forgotten incarnation through: the dropped records' watermark does not."""
    lrn = bounded_learner()
    assert deliver(lrn, "old", sequence=1).accepted
    advance(lrn, STALENESS + 2)
    forgotten = lrn._incarnations.forgotten_through
    assert forgotten >= 0 and ("w", "old") not in lrn._incarnations.records
    _, arrays, meta = lrn.snapshot()
    lenient = bounded_learner(max_staleness=1000)
    lenient.restore(arrays, meta)
    for run in ("old", "never-seen"):
        ack = lenient.submit(estimate(np.full(11, 0.01), 1, run=run, version=forgotten))
        assert ack.reason == pb.REJECT_REASON_REPLAYED, (run, ack)
    # A new incarnation's estimate at a θ version after the watermark is new work.
    assert lenient.submit(estimate(np.full(11, 0.01), 1, run="new", version=forgotten + 1)).accepted


def test_a_live_streams_replay_record_is_kept_however_far_theta_moves():
    lrn = bounded_learner()
    lrn.stream_opened("w", "live")
    assert lrn.submit(estimate(np.full(11, 0.01), 3, run="live", version=0)).accepted
    fillers = 5 * STALENESS
    advance(lrn, fillers)
    assert ("w", "live") in lrn._incarnations.records
    replay = lrn.submit(estimate(np.full(11, 0.01), 3, run="live", version=lrn.version))
    assert replay.reason == pb.REJECT_REASON_REPLAYED and "already seen" in replay.detail
    assert lrn.submit(estimate(np.full(11, 0.01), 4, run="live", version=lrn.version)).accepted
    # A reconnect overlaps the old stream's end: the record stays until the last one closes.
    lrn.stream_opened("w", "live")
    lrn.stream_closed("w", "live")
    assert lrn.wait_idle()
    advance(lrn, STALENESS + 2)
    fillers += STALENESS + 2
    assert ("w", "live") in lrn._incarnations.records
    lrn.stream_closed("w", "live")  # its last stream: now its stale record goes
    assert ("w", "live") not in lrn._incarnations.records and lrn.worker_incarnations == 1 + fillers


def test_the_server_drops_a_closed_streams_record_and_refuses_its_replay(serve):  # noqa: F811
    """Through the real gRPC server: its streams open and close the incarnations' records."""
    lrn = make_learner(max_staleness=1)
    port = serve(lrn)
    first = pb.WorkerMessage(estimate=estimate(np.full(11, 0.01), 1, run="r1"))
    assert [a.accepted for a in acks(port, [hello(lrn, run="r1"), first])] == [True]
    assert lrn.wait_idle()
    for version in range(1, 4):  # another incarnation moves θ on, a stream per estimate
        more = pb.WorkerMessage(estimate=estimate(np.full(11, 0.01), version, run="r2", version=version))
        assert [a.accepted for a in acks(port, [hello(lrn, run="r2"), more])] == [True]
        assert lrn.wait_idle()
    deadline = time.monotonic() + 10
    while lrn.replay_records > 1 and time.monotonic() < deadline:  # r2's last stream may still close
        time.sleep(0.05)
    assert ("w", "r1") not in lrn._incarnations.records
    replay = acks(port, [hello(lrn, run="r1"), first])
    assert [a.reason for a in replay] == [pb.REJECT_REASON_STALE]  # as stale as its record was
    assert lrn.totals.estimates_applied == 4


def test_plots_resumes_and_provenance_read_metrics_jsonl_and_totals(small_window, tmp_path):
    """The learner's window no longer holds step 1: plots read metrics.jsonl, a resume keeps its
    lines up to the checkpoint, and provenance takes the first meta-loss from the totals."""
    metrics = tmp_path / "metrics.jsonl"
    rows = [{"kind": "outer_step", "step": s, "meta_loss": 1.0 / s, "estimates": 1} for s in range(1, 41)]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in [*rows, _record(40, 2, 0.9)]))
    plot_metrics(metrics, tmp_path / "plot.png", title="j")
    assert matplotlib.image.imread(tmp_path / "plot.png").shape[0] == math.ceil(7.5 * 120)  # + eval panel
    assert keep_outer_steps(metrics, 25) == 25  # steps after the checkpoint are redone
    assert read_metrics(metrics) == rows[:25] and read_metrics(metrics, "eval") == []
    assert keep_outer_steps(tmp_path / "absent.jsonl", 25) == 0

    lrn = bounded_learner()
    advance(lrn, 3 * WINDOW)
    _, _, meta = lrn.snapshot()
    assert len(meta["history"]) == WINDOW and meta["history"][0]["step"] == 2 * WINDOW + 1
    record = publishing.provenance({"tasks": []}, "j", meta["history"], lrn.version,
                                   meta_loss_first=meta["totals"]["meta_loss_first"], code_version="c")
    assert record["meta_loss_first"] == 1.0 and record["outer_steps"] == 3 * WINDOW


def test_a_resumed_run_keeps_its_metrics_lines_up_to_the_checkpoint_then_adds_new_steps(
        small_window, tmp_path, caplog):
    """`metaopt train`'s follower on a resume: the steps a crashed run did after its checkpoint
    are dropped from metrics.jsonl and redone. Without the old file (a learner resumed on another
    machine), the checkpoint's window is all there is: the gap is logged."""
    last = 3 * WINDOW
    lrn = bounded_learner(max_outer_steps=last + 2)
    advance(lrn, last)
    _, arrays, meta = lrn.snapshot()
    for has_file in (True, False):
        resumed = bounded_learner(max_outer_steps=last + 2)
        resumed.restore(arrays, meta)
        metrics = tmp_path / f"metrics-{has_file}.jsonl"
        if has_file:  # with 3 steps past the checkpoint and an evaluation, from the crashed run
            rows = [{"kind": "outer_step", "step": s, "meta_loss": 1.0} for s in range(1, last + 4)]
            metrics.write_text("".join(json.dumps(r) + "\n" for r in [*rows, _record(last, 1, 1.0)]))
        follower = threading.Thread(target=train._follow, args=(resumed, [], metrics, False, last))
        with caplog.at_level(logging.WARNING, logger="metaopt.train"):
            follower.start()
            advance(resumed, 2)
            follower.join(30)
        assert not follower.is_alive()
        first = 1 if has_file else last - WINDOW + 1
        assert [r["step"] for r in read_metrics(metrics)] == list(range(first, last + 3))
        gap = f"lacks outer steps 1 to {last - WINDOW}"
        assert (gap in caplog.text) == (not has_file)


def test_the_connected_workers_are_those_with_a_stream_open_now():
    """What the end of a run waits for (metaopt.train._collect): a worker with two incarnations'
    streams, one closed, is connected; once both close, it is not."""
    lrn = bounded_learner()
    lrn.stream_opened("w", "first")
    lrn.stream_opened("w", "second")
    lrn.stream_opened("v", "only")
    assert lrn.connected_workers() == {"w", "v"}
    lrn.stream_closed("w", "first")
    lrn.stream_closed("v", "only")
    assert lrn.connected_workers() == {"w"}
    lrn.stream_closed("w", "second")
    assert lrn.connected_workers() == set()
