"""Services going away: the job store (Redis) and the object store (S3) stop and come back in
the middle of a real `metaopt train` run; the run goes on, or holds its writes back and resumes
them, and nothing committed is lost.

Both scenarios run the real local job of `tests/data/e2e.yaml` (2 Ray workers, the learner's
gRPC server in this process) for a time budget (`stop.max_minutes`: WARMUP_S, then each outage
and the time its service's users need to recover), and stop a service once a few outer steps are
done (compilation is over) for `outage_s` seconds, then start it again. The run is called in this
thread (Ray starts from here, as `metaopt train` starts it) while another thread makes the
outages; run together, both scenarios share one local Ray. A run that raises is a figure (`run_finished`
false, `error`), not a crash of the benchmark.

Redis (`redis_outage`): a real redis-server (`tests/redis_fixture.RedisServer`: ACL user, no
persistence) holds the job's lease and record. It is killed and restarted EMPTY on its port, as an
unpersisted Redis loses everything in a crash. The learner must not stop stepping meanwhile
(`steps_during_outage`, from the step times in metrics.jsonl), the record must reappear while the
run goes on (`record_back_s` after each restart) and end whole: SUCCEEDED, θ's version equal to
the outer steps done, the published artifact, and the spec, written only at the start and lost
with Redis's data (`record_caught_up`).

Object store (`object_store_outage`): checkpoints (every 0.5 s) and the registry live under
s3://BUCKET/chaos on moto's S3 server, run in a process of its own that can stop and start again
on its port WITHOUT losing its data (a store that restarts from its disks). An outage begins the
moment a checkpoint upload arrives, in turn its marker (its data is already up) and its data:
the server drops that request and every open connection and refuses new ones. Before each outage
(once pruning has begun) the committed checkpoints are listed with their markers' sha256s; right
after the restart and at the end each must still be there, unchanged and whole, or have been
pruned in the normal way (at least `KEEP` newer committed ones exist): else it counts in
`committed_lost`. At the end every committed checkpoint must verify (`corrupt_checkpoints` counts
those that do not), the newest must be the run's last step, no uncommitted leftover of a cut
write may remain (`uncommitted_left`), and the published artifact must load and pull, verified.
`checkpoint_write_failures` counts the learner's "checkpoint write to ... failed; will retry".

With botocore's default retries (5 attempts, jittered exponential backoff) a write to a server
that refuses connections was measured to fail after 4.3 s, and may take up to ~15 s: one
started during a short outage often waits it out and succeeds, a good outcome but one that never
exercises the checkpointer's own retry. `AWS_MAX_ATTEMPTS=2`, in this scenario's environment
only, makes it fail in 0.6 s, so that outages of a few seconds show both paths.

Figures, per scenario: `redis_outages` / `object_store_outages`, `outage_s`, `run_finished`,
`outer_steps`, `steps_during_outage`, `wall_s`, `warmup_s` (from the workers' start to the first
outer step); Redis: `record_caught_up`, `record_back_s`, `checkpoints_held_back` (checkpoints not
written while the learner could not confirm its lease: outages over half the lease's 15 s); S3:
`checkpoint_write_failures`, `committed_lost` (must be 0), `corrupt_checkpoints` (must be 0),
`committed_before_outages`, `writes_cut` (outages that began during an upload) and `cut`,
`uncommitted_left`, `latest_checkpoint`, `artifact_verified`.

    python benchmarks/chaos_services.py [--quick] [--json] [--outage-s S] [--only redis|s3] [--out DIR]
"""

from __future__ import annotations

import _thread
import argparse
import json
import logging
import pathlib
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import s3fs
import safetensors.numpy
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `tests` is not installed: the fixtures below come from the checkout

from metaopt import registry, storage  # noqa: E402
from metaopt.jobspec import JobSpec, parse_job_spec  # noqa: E402
from metaopt.jobstore import PASSWORD_ENV, SUCCEEDED, JobStoreError, open_job_store  # noqa: E402
from metaopt.run_report import read_metrics  # noqa: E402
from metaopt.train import train  # noqa: E402
from tests.redis_fixture import RedisServer  # noqa: E402
from tests.s3_fixture import BUCKET, use_s3_endpoint  # noqa: E402

E2E = ROOT / "tests" / "data" / "e2e.yaml"
KEEP = 3  # checkpoints the learner's Checkpointer keeps (its default, which `train` uses)
MAX_OUTER_STEPS = 10**6  # a cap never reached: a run lasts its time budget (below)
# A run's time budget (`stop.max_minutes`, counted from the workers' start) is WARMUP_S and, for
# each outage, its length and the time to see the service's users recover: the job record is
# back within ~10 s of Redis's return (the recorder's retries back off to 5 intervals of 2 s);
# checkpoints, every 0.5 s, are written and older ones pruned within a few seconds of S3's.
WARMUP_S, REDIS_RECOVERY_S, S3_RECOVERY_S = 20.0, 12.0, 5.0
WARM_STEPS = 3  # outer steps done before an outage: compilation is over, the run is under way
GAP_STEPS = 3  # outer steps between the end of one outage and the start of the next
WAIT_S = 120.0  # the longest wait for the run to reach a point; a longer one is a hung run
# The uploads of a checkpoint during which outages begin, in turn: its marker, written last (its
# data is up, and must never count), then its data.
CUT = (storage.MARKER, storage.ARRAYS_FILE)

# moto's S3 server in a process of its own, as tests/s3_fixture.py runs it, but one that can stop
# and start again on its port: moto keeps buckets in module-level backends, so a new server in
# the same process serves what the old one held. Not moto's ThreadedMotoServer, whose stop()
# leaves clients' keep-alive connections open and served (werkzeug serves HTTP/1.1 on threads
# that outlive shutdown()) and then waits for them: a store that went away refuses connections
# and drops open ones. One command per stdin line, one line back for each:
#   start              -> "started"
#   stop               -> "stopped -"
#   stop-at M SUFFIX T -> stops the moment a request M .../SUFFIX arrives (before moto handles
#                         it): "stopped M PATH"; or after T s without one: "stopped -"
_S3_SERVER = r"""
import logging, socket, sys, threading
from werkzeug.serving import make_server
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app

logging.getLogger("werkzeug").setLevel(logging.CRITICAL)
moto = DomainDispatcherApplication(create_backend_app)
lock, conns, hit = threading.Lock(), set(), threading.Event()
state = {"down": True, "trigger": None, "hit": "-", "port": 0, "server": None, "thread": None}

def sever():  # under lock: no request is served from here on
    state["down"] = True
    for conn in list(conns):
        try:
            conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

class Handler(MotoRequestHandler):
    def setup(self):
        super().setup()
        with lock:
            conns.add(self.connection)
            if state["down"]:
                sever()

    def finish(self):
        with lock:
            conns.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

def app(environ, start_response):
    with lock:
        trigger = state["trigger"]
        if trigger and environ["REQUEST_METHOD"] == trigger[0] and environ["PATH_INFO"].endswith(trigger[1]):
            state["trigger"], state["hit"] = None, environ["REQUEST_METHOD"] + " " + environ["PATH_INFO"]
            hit.set()
            sever()
        if state["down"]:
            raise ConnectionResetError("the store went away")
    return moto(environ, start_response)

def start():
    server = make_server("127.0.0.1", state["port"], app, threaded=True, request_handler=Handler)
    state["port"], state["server"] = server.server_address[1], server
    state["thread"] = threading.Thread(target=server.serve_forever, daemon=True)
    state["thread"].start()
    with lock:
        state["down"] = False

def stop():
    with lock:
        sever()
        state["trigger"] = None
    state["server"].shutdown()  # its loop's end closes the listening socket, then joins the handlers
    state["thread"].join()
    hit.clear()
    said, state["hit"] = state["hit"], "-"
    return said

start()
print(state["port"], flush=True)
for line in sys.stdin:
    command, *args = line.split()
    if command == "start":
        start()
        print("started", flush=True)
    elif command == "stop":
        print("stopped", stop(), flush=True)
    elif command == "stop-at":
        with lock:
            state["trigger"] = (args[0], args[1])
        hit.wait(float(args[2]))
        print("stopped", stop(), flush=True)
"""


class StoppableS3:
    """The S3 server above, in its own process; `endpoint` is http://127.0.0.1:PORT."""

    def __init__(self, log_path: pathlib.Path):
        self._log = log_path.open("w")
        self._proc = subprocess.Popen([sys.executable, "-c", _S3_SERVER], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._log, text=True)
        port = self._proc.stdout.readline().strip()
        if not port.isdigit():
            self.close()
            said = log_path.read_text()[-2000:]
            raise RuntimeError(f"the S3 server did not start (exit status {self._proc.poll()}; install "
                               f"moto[server]: pip install -e '.[dev]'); its log: {said}")
        self.endpoint = f"http://127.0.0.1:{port}"

    def _say(self, command: str) -> str:
        self._proc.stdin.write(command + "\n")
        self._proc.stdin.flush()
        return self._proc.stdout.readline().strip()

    def stop(self, during: tuple[str, str] | None = None, wait_s: float = 10.0) -> str | None:
        """Stop now, or (`during` = (METHOD, PATH SUFFIX)) the moment such a request arrives, if
        one does within `wait_s`. The request it cut ("PUT /bucket/key"), or None."""
        said = self._say("stop" if during is None else f"stop-at {during[0]} {during[1]} {wait_s}")
        cut = said.removeprefix("stopped ")
        return None if cut == "-" else cut

    def start(self) -> None:
        said = self._say("start")
        if said != "started":
            raise RuntimeError(f"the S3 server did not start again (said {said!r})")

    def close(self) -> None:
        self._proc.stdin.close()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._log.close()


class _Logged(logging.Handler):
    """Times (Unix seconds) of the log records of `logger` whose message contains `needle`."""

    def __init__(self, logger: str, needle: str):
        super().__init__(logging.DEBUG)
        self.logger, self.needle, self.times = logging.getLogger(logger), needle, []

    def emit(self, record: logging.LogRecord) -> None:
        if self.needle in record.getMessage():
            self.times.append(record.created)

    def __enter__(self) -> _Logged:
        self._level = self.logger.level
        if self.logger.getEffectiveLevel() > logging.WARNING:  # a quiet root must not hide what we count
            self.logger.setLevel(logging.WARNING)
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self._level)


def _spec(max_outer_steps: int, max_s: float, **changes) -> JobSpec:
    raw = yaml.safe_load(E2E.read_text())
    stop = {"max_outer_steps": max_outer_steps, "max_minutes": max_s / 60}
    return parse_job_spec({**raw, "stop": stop, **changes})


def _steps(metrics: pathlib.Path) -> list[dict]:
    return read_metrics(metrics)  # the outer steps; a last line half-written is left out


class _Run:
    """The run as the outage thread sees it: its outer steps (metrics.jsonl), whether it has
    finished, and what is left of its time budget, which `train` counts from the moment it
    creates metrics.jsonl (seen here within 0.1 s, so never less than what is really left)."""

    def __init__(self, metrics: pathlib.Path, budget_s: float):
        self.metrics, self.budget_s, self.finished = metrics, budget_s, threading.Event()
        self.started_at: float | None = None  # Unix seconds, as `train` and metrics.jsonl count

    def steps(self) -> list[dict]:
        return _steps(self.metrics)

    def left_s(self) -> float:
        return self.budget_s - (time.time() - self.started_at) if self.started_at else self.budget_s

    def wait(self, more: int, then_need_s: float) -> bool:
        """Wait for `more` outer steps; whether they came with `then_need_s` of the budget left."""
        deadline, count = time.monotonic() + WAIT_S, None
        while not self.finished.is_set():
            if self.started_at is None and self.metrics.exists():
                self.started_at = time.time()
            done = len(self.steps())
            count = done + more if count is None else count
            if done >= count:
                return self.left_s() >= then_need_s
            if time.monotonic() > deadline:
                raise TimeoutError(f"the run made {done} outer steps in {WAIT_S} s, not {count}: it hangs, "
                                   "or its machine is far too slow")
            time.sleep(0.1)
        return False


def _train_during(chaos, spec: JobSpec, out: pathlib.Path, job_id: str) -> tuple[dict, dict]:
    """Run `train` in this thread while `chaos(run)` (a `_Run`) runs in another: (the run's
    figures, what `chaos` returned). A run that raised is a figure (`run_finished` false,
    `error`), not an exception: it is what these scenarios look for."""
    run = _Run(out / "runs" / job_id / "metrics.jsonl", spec.stop.max_minutes * 60)
    box = {}

    def target():
        try:
            box["value"] = chaos(run)
        except BaseException as err:  # re-raised below, in this thread
            box["error"] = err
            if not run.finished.is_set():
                _thread.interrupt_main()  # the run must not go on (or hang) without its chaos

    thread = threading.Thread(target=target, name="chaos", daemon=True)
    thread.start()
    figures: dict = {"run_finished": False, "error": None, "outer_steps": None, "artifact": None}
    try:
        result = train(spec, out=str(out), job_id=job_id, progress=False)
        figures.update(run_finished=True, outer_steps=result.outer_steps, artifact=result.artifact,
                       registry=result.registry, wall_s=round(result.wall_s, 1))
    except Exception as err:
        figures["error"] = f"{type(err).__name__}: {err}"
    except KeyboardInterrupt:
        if "error" not in box:
            raise
    finally:
        run.finished.set()
        thread.join(WAIT_S)
    if "error" in box:
        raise box["error"]
    steps = run.steps()
    if steps and run.started_at:  # how long the workers took to start and compile: what WARMUP_S allows
        figures["warmup_s"] = round(steps[0]["time"] - run.started_at, 1)
    return figures, box.get("value", {})


def _during(steps: list[dict], windows: list[tuple[float, float]]) -> int:
    return sum(any(start <= s["time"] <= end for start, end in windows) for s in steps)


def redis_outage(workdir: pathlib.Path, outage_s: float, max_outer_steps: int, outages: int = 1) -> dict:
    """Kill the job store's Redis `outages` times for `outage_s` each and restart it empty, during
    a run of at most `max_outer_steps` that otherwise lasts its time budget (see WARMUP_S)."""
    (workdir / "redis").mkdir(parents=True, exist_ok=True)
    redis = RedisServer(workdir / "redis")
    redis.start()
    job_id = "chaos-redis"

    def chaos(run: _Run) -> dict:
        store, windows, back = open_job_store(redis.url), [], []
        for i in range(outages):
            if not run.wait(GAP_STEPS if i else WARM_STEPS, outage_s + REDIS_RECOVERY_S):
                break
            stopped_at = time.time()
            redis.stop()
            try:
                time.sleep(outage_s)
            finally:
                redis.start()
            windows.append((stopped_at, time.time()))
            back.append(_record_back_s(store, job_id, run.finished))
        return {"windows": windows, "record_back_s": back}

    max_s = WARMUP_S + outages * (outage_s + REDIS_RECOVERY_S)
    spec = _spec(max_outer_steps, max_s, storage={"job_store": redis.url_for(redis.user)})
    try:
        with pytest.MonkeyPatch.context() as env, \
                _Logged("metaopt.learner.checkpointing", "lease is not confirmed") as held_back:
            env.setenv(PASSWORD_ENV, redis.password)
            run, seen = _train_during(chaos, spec, workdir / "out", job_id)
        record = open_job_store(redis.url).get(job_id) or {}
    finally:
        redis.stop()
    caught_up = run["run_finished"] and record.get("state") == SUCCEEDED and \
        record.get("theta_version") == run["outer_steps"] and record.get("artifact") == run["artifact"] \
        and record.get("spec") == spec.model_dump(mode="json")  # written once at the start, and lost
    return {"redis_outages": len(seen["windows"]), "outage_s": outage_s, **run,
            "steps_during_outage": _during(_steps(workdir / "out" / "runs" / job_id / "metrics.jsonl"),
                                           seen["windows"]),
            "record_caught_up": caught_up, "record_back_s": seen["record_back_s"],
            "checkpoints_held_back": len(held_back.times),
            "record": {k: record.get(k) for k in ("state", "theta_version", "artifact", "error")}}


def _record_back_s(store, job_id: str, finished: threading.Event) -> float | None:
    """Seconds from now until the job's record is back in the restarted (empty) Redis, RUNNING;
    None if the run finished first."""
    started = time.monotonic()
    while not finished.is_set():
        try:
            if (store.get(job_id) or {}).get("state") == "RUNNING":
                return round(time.monotonic() - started, 2)
        except JobStoreError:
            pass  # the server is just back; the client reconnects on the next call
        if time.monotonic() - started > WAIT_S:
            raise TimeoutError(f"the job record did not come back within {WAIT_S} s of Redis's restart")
        time.sleep(0.1)
    return None


def _committed(root: str) -> dict[int, dict]:
    """The committed checkpoints under `root`: step -> their marker's files (sha256s and sizes)."""
    found = {}
    for name in storage.list_subdirs(root):
        match = storage.CHECKPOINT_DIR_RE.fullmatch(name)
        if match:
            try:
                found[int(match.group(1))] = storage.read_marker(f"{root}/{name}")["files"]
            except (FileNotFoundError, storage.CorruptArtifactError):
                pass  # being written or pruned right now, or left by a write that failed: not committed
    return found


def _verifies(root: str, step: int) -> bool:
    """Whether checkpoint `step` reads back whole: every file's sha256, then its arrays."""
    try:
        files, meta = storage.read_committed(storage.checkpoint_uri(root, step))
        safetensors.numpy.load(files[storage.ARRAYS_FILE])
        return meta["step"] == step
    except Exception:
        return False


def _lost(root: str, before: dict[int, dict]) -> set[int]:
    """Steps of `before` (committed earlier) that are now neither there, unchanged and whole,
    nor pruned in the normal way (KEEP newer committed checkpoints exist)."""
    now = _committed(root)
    lost = set()
    for step, files in before.items():
        if step in now:
            if now[step] != files or not _verifies(root, step):
                lost.add(step)
        elif sum(s > step for s in now) < KEEP:
            lost.add(step)
    return lost


def object_store_outage(workdir: pathlib.Path, outage_s: float, max_outer_steps: int,
                        outages: int = 1) -> dict:
    """Stop the S3 server holding checkpoints and the registry `outages` times, each during a
    checkpoint upload, for `outage_s`, and start it again with its data, during a run of at
    most `max_outer_steps` that otherwise lasts its time budget (see WARMUP_S)."""
    workdir.mkdir(parents=True, exist_ok=True)
    server = StoppableS3(workdir / "s3.log")
    job_id = "chaos-s3"
    root = f"s3://{BUCKET}/chaos/runs/{job_id}/checkpoints"

    def chaos(run: _Run) -> dict:
        windows, before, lost, cuts = [], {}, set(), []
        for i in range(outages):
            if not run.wait(GAP_STEPS if i else WARM_STEPS, outage_s + S3_RECOVERY_S):
                break
            committed = _committed(root)
            while len(committed) < KEEP and not run.finished.is_set():  # pruning has begun
                time.sleep(0.1)
                committed = _committed(root)
            before.update(committed)
            stopped_at = time.time()
            try:
                cuts.append(server.stop(during=("PUT", CUT[i % len(CUT)])))
                time.sleep(outage_s)
            finally:
                server.start()
            windows.append((stopped_at, time.time()))
            lost |= _lost(root, committed)  # at once, before newer checkpoints prune them
        return {"windows": windows, "before": before, "lost": lost, "cuts": cuts}

    max_s = WARMUP_S + outages * (outage_s + S3_RECOVERY_S)
    spec = _spec(max_outer_steps, max_s, checkpoint_interval_s=0.5, storage={"root": f"s3://{BUCKET}/chaos"})
    try:
        with pytest.MonkeyPatch.context() as env, \
                _Logged("metaopt.learner.checkpointing", "failed; will retry") as failures:
            use_s3_endpoint(env, server.endpoint, workdir)
            # See the module docstring: a write fails within a second, not after ~15 s of retries.
            env.setenv("AWS_MAX_ATTEMPTS", "2")
            s3fs.S3FileSystem().mkdir(BUCKET)
            run, seen = _train_during(chaos, spec, workdir / "out", job_id)
            committed = _committed(root)
            corrupt = sum(not _verifies(root, step) for step in committed)
            uncommitted = [name for name in storage.list_subdirs(root) if name.startswith("ckpt-")
                           and int(name.removeprefix("ckpt-")) not in committed]
            latest = storage.latest_checkpoint(root)
            artifact_verified = run["run_finished"] and _artifact_verifies(run, workdir / "pulled")
            lost = seen["lost"] | _lost(root, seen["before"])
            s3fs.S3FileSystem.clear_instance_cache()
    finally:
        server.close()
    return {"object_store_outages": len(seen["windows"]), "outage_s": outage_s, **run,
            "steps_during_outage": _during(_steps(workdir / "out" / "runs" / job_id / "metrics.jsonl"),
                                           seen["windows"]),
            "checkpoint_write_failures": len(failures.times),
            "failures_during_outage": _during([{"time": t} for t in failures.times], seen["windows"]),
            "committed_before_outages": len(seen["before"]), "committed_lost": len(lost),
            "lost_steps": sorted(lost), "corrupt_checkpoints": corrupt,
            "latest_checkpoint": None if latest is None else latest[0], "uncommitted_left": uncommitted,
            "writes_cut": sum(cut is not None for cut in seen["cuts"]), "cut": seen["cuts"],
            "artifact_verified": artifact_verified}


def _artifact_verifies(run: dict, dest: pathlib.Path) -> bool:
    try:
        registry.load(run["artifact"], run["registry"])
        registry.load_path(registry.pull(run["artifact"], run["registry"], str(dest)))
        return True
    except Exception as err:
        logging.getLogger(__name__).error("artifact %s does not verify: %s", run["artifact"], err)
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one short outage of each service (~2 min)")
    parser.add_argument("--outage-s", type=float, help="seconds each service is away (default 15; quick 5)")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--out", type=pathlib.Path, help="write chaos_services.json here")
    parser.add_argument("--only", choices=("redis", "s3"), help="run one scenario")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    outage_s = args.outage_s or (5.0 if args.quick else 15.0)
    outages = 1 if args.quick else 3
    started = time.perf_counter()
    scenarios = {"redis": redis_outage, "object_store": object_store_outage}
    chosen = {"redis": "redis", "s3": "object_store"}.get(args.only)
    with tempfile.TemporaryDirectory() as tmp:
        ran = {name: scenario(pathlib.Path(tmp) / name, outage_s, MAX_OUTER_STEPS, outages)
               for name, scenario in scenarios.items() if chosen in (None, name)}
    redis, s3 = ran.get("redis", {}), ran.get("object_store", {})
    result = {"benchmark": "chaos_services", "quick": args.quick,
              "run_finished": all(r["run_finished"] for r in ran.values()),
              "redis_outages": redis.get("redis_outages", 0),
              "object_store_outages": s3.get("object_store_outages", 0),
              "committed_lost": s3.get("committed_lost", 0),
              "corrupt_checkpoints": s3.get("corrupt_checkpoints", 0),
              "seconds": round(time.perf_counter() - started, 1), **ran}
    if redis:
        print(f"redis: {redis['redis_outages']} outage(s) of {outage_s} s, run finished: "
              f"{redis['run_finished']}, {redis['steps_during_outage']} steps during them, "
              f"record caught up: {redis['record_caught_up']}")
    if s3:
        print(f"object store: {s3['object_store_outages']} outage(s), {s3['writes_cut']} cutting a write, "
              f"run finished: {s3['run_finished']}, {s3['checkpoint_write_failures']} failed writes, "
              f"{s3['committed_lost']} committed lost, {s3['corrupt_checkpoints']} corrupt")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "chaos_services.json").write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
