"""In-run evaluation: is the optimizer learning?

A run's meta-loss mixes task families and moves with the tasks it happens to sample, so it cannot
say whether the optimizer improves. With an `eval` section in the job spec (`jobspec.EvalSpec`),
every `every_minutes` the newest checkpoint's θ trains the suite's tasks on its first `seeds`
seeds beside the suite's tuned baselines (`metaopt.evaluation.evaluate`), and once more the final
θ when the run ends, so that even a short run has a point.

Off the learner's hot path: evaluations run in one spawned process of their own (a fresh
interpreter, at the lowest CPU priority), which reads the checkpoint from storage as anyone could.
The run's main thread only sends it a checkpoint's URI and records the answer; the learner's
threads never see it. At most one evaluation is in flight: a tick that finds one running is
skipped, and says so in the log. The process keeps its compiled programs from one evaluation to
the next, and the baselines are tuned once per run, kept in RUN_DIR/eval_baselines.

Each result goes
* to metrics.jsonl as a line of its own, {"kind": "eval", "outer_step", "elapsed_s" (seconds
  since this invocation's start, when the result came), "suite", "seeds", "baselines", "wins",
  "num_tasks", "win_share", "geomean_final_loss_ratio" (θ / best tuned baseline, geometric mean
  over the tasks; null if every run diverged), "checkpoint", "report", "eval_s", "time"}, and to
  RUN_DIR/eval/evaluations.jsonl, from which a resumed run takes its earlier ones;
* to the learner's /metrics: `metaopt_eval_win_share` and `metaopt_eval_final_loss_ratio`
  {job_id, suite};
* in full (per task losses and curves) to RUN_DIR/eval/step-NNNNNNNNN.json.

With `publish: best` the θ of the best evaluated checkpoint so far (`best_evaluation`) is kept in
RUN_DIR/eval/theta-NNNNNNNNN.safetensors, and the run publishes it in place of the last θ.

With the job spec's `record` (a dataset of training runs, docs/datasets.md), every evaluation
records θ's runs at the suite's test points into the job's recording, beside the workers' runs;
the tuned baselines' runs, the same at every evaluation, are recorded by a process's first one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import multiprocessing
import os
import pathlib
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import safetensors.numpy

from metaopt import storage
from metaopt.jobspec import EvalSpec

log = logging.getLogger(__name__)
EVAL_DIR, BASELINES_DIR, RECORDS_FILE = "eval", "eval_baselines", "evaluations.jsonl"
STOP_TIMEOUT_S = 10.0  # for the evaluation process to end once asked, before it is terminated
SELECTION_RULE = "most wins on the suite, then the lowest geometric-mean final-loss ratio"


def best_evaluation(records: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The best of in-run evaluation records: the most wins, then the lowest geometric-mean
    final-loss ratio (null, every run diverged, counts as the worst), then the later outer step.
    None if there are none."""

    def rank(record: dict[str, Any]) -> tuple:
        ratio = record.get("geomean_final_loss_ratio")
        ratio = ratio if ratio is not None and math.isfinite(ratio) else math.inf
        return record["wins"], -ratio, record["outer_step"]

    return max(records, key=rank, default=None)


@dataclasses.dataclass(frozen=True)
class Publication:
    """What a run with in-run evaluation publishes: the θ of outer step `step` (`theta` flat, or
    None for the learner's last θ), the `metaopt eval` report for its provenance's `evaluation`,
    and other provenance fields (`selection`)."""

    step: int
    theta: np.ndarray | None
    report: dict[str, Any] | None
    provenance: dict[str, Any]


def theta_file(eval_dir: pathlib.Path, step: int) -> pathlib.Path:
    return eval_dir / f"theta-{step:09d}.safetensors"


class InRunEvaluator:
    """The run's side of in-run evaluation (module docstring). Called from the run's main thread
    only: `start`, then `poll` on every turn of the follow loop, `finish` when the learner has
    stopped and written its final checkpoint, `close` always."""

    def __init__(self, settings: EvalSpec, run_dir: pathlib.Path, checkpoint_root: str, job_id: str,
                 metrics, saved_step: Callable[[], int | None], record: tuple[str, int] | None = None):
        """`checkpoint_root`: the run's checkpoints folder (URI); `metrics`: the learner's
        LearnerMetrics; `saved_step()`: the step of the newest committed checkpoint, or None;
        `record`: (the job's recording URI, records per shard) to record the evaluations' runs."""
        self.settings, self.checkpoint_root, self.job_id = settings, checkpoint_root, job_id
        self.metrics, self.saved_step, self.record = metrics, saved_step, record
        self.dir, self.baselines_dir = run_dir / EVAL_DIR, run_dir / BASELINES_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        records = self.dir / RECORDS_FILE
        self.records: list[dict[str, Any]] = (
            [json.loads(line) for line in records.read_text().splitlines() if line.strip()]
            if records.exists() else [])
        self.every_s = settings.every_minutes * 60
        self._process = self._conn = None
        self._in_flight: int | None = None  # the step being evaluated
        self._last_requested = max((r["outer_step"] for r in self.records), default=None)
        self._started = self._due = 0.0

    def start(self) -> None:
        """Start the evaluation process now (it imports and sets up while the workers start);
        the first tick is due `every_minutes` from now."""
        self._started, self._due = time.time(), time.monotonic() + self.every_s
        self._spawn()

    def poll(self) -> list[dict[str, Any]]:
        """Collect a finished evaluation, and ask for one if a tick is due; the new records."""
        new = self._collect(timeout_s=0)
        if time.monotonic() >= self._due:
            self._due = time.monotonic() + self.every_s
            step = self.saved_step()
            if self._in_flight is not None:
                log.info("in-run evaluation: tick skipped, the evaluation of step %d is still running",
                         self._in_flight)
            elif step is None:
                log.info("in-run evaluation: tick skipped, no checkpoint yet")
            elif step == self._last_requested:
                log.info("in-run evaluation: tick skipped, no new checkpoint since step %d", step)
            else:
                self._request(step)
        return new

    def finish(self) -> list[dict[str, Any]]:
        """Wait for the evaluation in flight, then evaluate the final checkpoint unless it has
        been already; the new records."""
        new = []
        if self._in_flight is not None:
            log.info("in-run evaluation: waiting for the evaluation of step %d", self._in_flight)
        while self._in_flight is not None:
            new += self._collect(timeout_s=1.0)
        step = self.saved_step()
        if step is not None and step != self._last_requested:
            log.info("in-run evaluation: evaluating the final checkpoint, step %d", step)
            self._request(step)
            while self._in_flight is not None:
                new += self._collect(timeout_s=1.0)
        return new

    def close(self) -> None:
        """End the evaluation process (at once if it is busy: the run is over)."""
        if self._process is None:
            return
        with contextlib.suppress(OSError):
            self._conn.send_bytes(b"null")
        self._process.join(STOP_TIMEOUT_S if self._in_flight is None else 0)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(STOP_TIMEOUT_S)
        if self._process.is_alive():
            self._process.kill()
        self._drop()

    def best(self) -> tuple[dict[str, Any], np.ndarray] | None:
        """(record, flat float32 θ) of the best evaluated checkpoint past step 0 (an untrained θ is
        no result to publish) whose θ was kept (`publish: best`), or None if there is none."""
        kept = [r for r in self.records
                if r["outer_step"] >= 1 and theta_file(self.dir, r["outer_step"]).exists()]
        chosen = best_evaluation(kept)
        if chosen is None:
            return None
        return chosen, safetensors.numpy.load_file(theta_file(self.dir, chosen["outer_step"]))["theta"]

    def publication(self, last_step: int) -> Publication:
        """What the run publishes. `publish: last`: the last θ (of `last_step`), with its
        evaluation report if it was evaluated. `publish: best`: the best evaluated θ, with the
        selection in its provenance, and no evaluation report: the suite that chose it must not
        report on it (the last θ, with a warning, if no evaluation finished)."""
        if self.settings.publish == "last":
            reports = [r["report"] for r in self.records if r["outer_step"] == last_step]
            report = pathlib.Path(reports[-1]) if reports else None
            evaluation = json.loads(report.read_text()) if report and report.exists() else None
            return Publication(last_step, None, evaluation, {})
        chosen = self.best()
        if chosen is None:
            log.warning("eval.publish is best, but no in-run evaluation finished: publishing the last θ")
            return Publication(last_step, None, None, {})
        record, theta = chosen
        log.info("publishing the θ of outer step %d, the best of %d in-run evaluations on %s",
                 record["outer_step"], len(self.records), record["suite"])
        keys = ("suite", "seeds", "baselines", "outer_step", "checkpoint", "wins", "num_tasks",
                "geomean_final_loss_ratio")
        selection = {"rule": SELECTION_RULE, **{k: record[k] for k in keys}, "evaluations": len(self.records)}
        return Publication(record["outer_step"], theta, None, {"selection": selection})

    # -- the process ----------------------------------------------------------------------

    def _spawn(self) -> None:
        # spawn, not fork: this process runs the learner's threads, gRPC and Ray.
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(
            target=_serve, name=f"metaopt-eval-{self.job_id}", daemon=True,
            args=(child, self.settings.suite, self.settings.seeds, str(self.baselines_dir), str(self.dir),
                  self.job_id, self.settings.publish == "best", self.record))
        self._process.start()
        child.close()

    def _drop(self) -> None:
        """Forget the process (ended, or ending); the next request starts another."""
        self._process.join()
        self._conn.close()
        self._process = self._conn = self._in_flight = None

    def _request(self, step: int) -> None:
        if self._process is not None and not self._process.is_alive():
            self._drop()
        if self._process is None:
            self._spawn()
        try:
            self._conn.send_bytes(json.dumps({"checkpoint": storage.checkpoint_uri(
                self.checkpoint_root, step)}).encode())
        except OSError as err:
            log.error("in-run evaluation: cannot reach its process (%s); a new one starts next tick", err)
            self._process.kill()
            self._drop()
            return
        self._in_flight = self._last_requested = step

    def _collect(self, timeout_s: float) -> list[dict[str, Any]]:
        if self._in_flight is None:
            return []
        try:
            if not self._conn.poll(timeout_s):
                if self._process.is_alive():
                    return []
                raise EOFError
            reply = json.loads(self._conn.recv_bytes())
        except (EOFError, OSError):
            self._process.join(STOP_TIMEOUT_S)
            log.error("in-run evaluation: its process ended (exit code %s) while evaluating step %d; a "
                      "new one starts at the next tick", self._process.exitcode, self._in_flight)
            self._process.kill()
            self._drop()
            return []
        step, self._in_flight = self._in_flight, None
        if "error" in reply:
            log.error("in-run evaluation of step %d failed: %s", step, reply["error"])
            return []
        return [self._record(reply["record"])]

    def _record(self, result: dict[str, Any]) -> dict[str, Any]:
        record = {"kind": "eval", "outer_step": result["outer_step"],
                  "elapsed_s": round(time.time() - self._started, 1), **result}
        self.records.append(record)
        with (self.dir / RECORDS_FILE).open("a") as sink:
            sink.write(json.dumps(record) + "\n")
        self.metrics.evaluated(record["suite"], record["win_share"], record["geomean_final_loss_ratio"])
        if self.settings.publish == "best":  # keep only the best θ
            best = self.best()
            keep = theta_file(self.dir, best[0]["outer_step"]) if best else None
            for path in self.dir.glob("theta-*.safetensors"):
                if path != keep:
                    path.unlink(missing_ok=True)
        ratio = record["geomean_final_loss_ratio"]
        log.info("in-run evaluation of step %d on %s: %d/%d wins, geomean final-loss ratio %s (%.1f s)",
                 record["outer_step"], record["suite"], record["wins"], record["num_tasks"],
                 "n/a" if ratio is None else f"{ratio:.3f}", record["eval_s"])
        return record


def _serve(conn, suite_ref: str, num_seeds: int, baselines_dir: str, eval_dir: str, job_id: str,
           keep_theta: bool, record: tuple[str, int] | None) -> None:
    """The evaluation process: evaluate each checkpoint the run names, answer with its record
    ({"record": ...} or {"error": ...}, JSON); end at `null` or when the run is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the run's; the run ends this process
    with contextlib.suppress(OSError):
        # The lowest priority: training comes first. Ray starts its actors (the workers) at
        # niceness 15, so anything less nice than 19 here would run ahead of them.
        os.nice(19 - os.nice(0))
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # a GPU here is the workers'
    # Imported here: the run's own process never needs them, and they load while it starts up.
    from metaopt import evaluation

    suite = evaluation.load_suite(suite_ref)
    seeds = list(suite.seeds[:num_seeds])
    recording = None if record is None else evaluation.RunRecording.into(*record)
    while True:
        try:
            request = json.loads(conn.recv_bytes())
        except EOFError:  # the run is gone
            return
        if request is None:
            return
        try:
            reply = {"record": _evaluate_checkpoint(request["checkpoint"], suite, seeds, baselines_dir,
                                                    pathlib.Path(eval_dir), job_id, keep_theta, recording)}
            if recording is not None:  # the baselines' runs are the same at every evaluation
                recording = dataclasses.replace(recording, baselines=False)
        except Exception as err:  # reported by the run; the next tick tries again
            reply = {"error": f"{type(err).__name__}: {err}"}
        conn.send_bytes(json.dumps(reply).encode())


def checkpoint_ref(checkpoint, job_id: str):
    """An `evaluation.OptimizerRef` for a checkpoint's θ (publishing.Checkpoint), named
    JOB@step-N."""
    import jax
    import jax.numpy as jnp

    from metaopt import evaluation, publishing

    optimizer, theta = publishing.checkpoint_theta(checkpoint, checkpoint.meta["spec"])
    return evaluation.OptimizerRef(
        f"{job_id}@step-{checkpoint.step}", "checkpoint", optimizer.name, dict(optimizer.hparams),
        jax.tree.map(jnp.asarray, theta), {"checkpoint": checkpoint.uri})


def _evaluate_checkpoint(uri: str, suite, seeds: list[int], baselines_dir: str, eval_dir: pathlib.Path,
                         job_id: str, keep_theta: bool, recording) -> dict[str, Any]:
    from metaopt import evaluation, publishing

    started = time.perf_counter()
    checkpoint = publishing.find_checkpoint(uri)
    ref = checkpoint_ref(checkpoint, job_id)
    if recording is not None:
        recording = dataclasses.replace(recording, theta_version=checkpoint.step)
    result = evaluation.evaluate(ref, suite, seeds=seeds, progress=False, baseline_cache=baselines_dir,
                                 record=recording)
    # Each file whole or not at all (tmp, then rename): the run may be killed at any moment.
    report, kept = eval_dir / f"step-{checkpoint.step:09d}.json", theta_file(eval_dir, checkpoint.step)
    report.with_suffix(".tmp").write_text(json.dumps(result, indent=1, allow_nan=False))
    report.with_suffix(".tmp").replace(report)
    if keep_theta:
        theta_flat = np.asarray(checkpoint.arrays["theta"], np.float32)
        safetensors.numpy.save_file({"theta": theta_flat}, str(kept.with_suffix(".tmp")))
        kept.with_suffix(".tmp").replace(kept)
    aggregate = result["aggregate"]
    return {"outer_step": checkpoint.step, "suite": suite.name, "seeds": seeds,
            "baselines": result["baselines"], "wins": aggregate["wins"],
            "num_tasks": aggregate["num_tasks"], "win_share": aggregate["win_rate"],
            "geomean_final_loss_ratio": aggregate["geomean_final_loss_ratio"],
            "checkpoint": checkpoint.uri, "report": str(report),
            "eval_s": round(time.perf_counter() - started, 2), "time": time.time()}
