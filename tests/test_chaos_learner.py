"""The learner SIGKILLed again and again, at random and in the middle of checkpoint writes
(`benchmarks/chaos_learner.py`, short version): every restart resumes the newest complete
checkpoint with the state bit for bit as saved, no checkpoint is ever corrupt, the workers
reconnect on their own, and the run finishes."""

from __future__ import annotations

from benchmarks.chaos_learner import kill_learner


def test_every_restart_of_a_killed_learner_resumes_exactly_what_was_saved(tmp_path):
    # Two kills: the first at random, the second during a checkpoint write (every other one is).
    report = kill_learner(tmp_path, trials=2, interval_s=0.5, workers=2, seed=1)
    assert report["learner_kills"] == 2 and report["kills_during_write"] >= 1, report
    assert report["resumes"] == 2 and report["resume_mismatches"] == 0, report
    assert report["corrupt_checkpoints"] == 0, report
    assert report["within_one_interval"], report
    assert report["run_finished"] and report["workers_exited_ok"], report
