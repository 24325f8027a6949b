"""Meta-training jobs on a Ray cluster, through the Ray Jobs API: submit, follow, cancel.

`submit` checks the job against the cluster before anything starts (a worker that asks for
more GPUs or CPUs than any node has would wait forever; a storage root nobody can reach would
fail only at the first checkpoint), then hands Ray an entrypoint that runs `metaopt train` on
the head node. The job id is both Ray's submission id and the learner's job id, so one name
finds the job in Ray, in the job store and in storage.

The Ray dashboard address comes from `--address` or $RAY_ADDRESS, as with `ray job`. A cluster
with token authentication (Ray's default) needs its token in $RAY_AUTH_TOKEN (or the file
~/.ray/auth_token) and RAY_AUTH_MODE=token, as Ray's own CLI does.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import os
import shlex
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator

from metaopt import plugins
from metaopt.jobspec import JobSpec

log = logging.getLogger(__name__)

SPEC_FILE = "job.yaml"  # the validated spec, as the cluster receives it


class SubmitError(ValueError):
    """The job cannot run on this cluster, or the cluster cannot be reached; nothing started."""


@dataclasses.dataclass(frozen=True)
class NodeResources:
    address: str
    cpus: float
    gpus: float


@functools.lru_cache(maxsize=4)
def client(address: str):
    """A Ray JobSubmissionClient, or a SubmitError that says what to check. One per address:
    making one asks the dashboard for its version, and a command may need it several times."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    # Ray's job SDK logs every upload and websocket at INFO, its loggers set to INFO explicitly.
    for name in ("ray", "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        with _address_as_given(address):
            return JobSubmissionClient(address)
    except AuthenticationError:
        raise SubmitError(
            f"the Ray cluster at {address} wants a token: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN "
            "(or put it in ~/.ray/auth_token)") from None
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise SubmitError(
            f"cannot reach the Ray dashboard at {address} ({_first_line(err)}); is the cluster up? "
            "Give its dashboard address with --address or $RAY_ADDRESS (on Kubernetes: kubectl "
            "port-forward svc/RAYCLUSTER-head-svc 8265)") from None


@contextlib.contextmanager
def _address_as_given(address: str):
    """Ray's clients prefer $RAY_ADDRESS to the address they are given; a command line's
    --address must win over the environment, so Ray sees it in the variable it reads first."""
    saved = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ["RAY_API_SERVER_ADDRESS"] = address
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("RAY_API_SERVER_ADDRESS")
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = saved


def cluster_nodes(address: str) -> list[NodeResources]:
    """The alive nodes and their total CPUs and GPUs, from Ray's state API."""
    from ray.util.state import list_nodes

    try:
        with _address_as_given(address):
            nodes = list_nodes(address=address, filters=[("state", "=", "ALIVE")], detail=True, timeout=30)
    except Exception as err:  # the state API wraps transport errors in several types
        raise SubmitError(f"cannot list the nodes of the Ray cluster at {address}: "
                          f"{_first_line(err)}") from None
    return [NodeResources(n.node_ip, float(n.resources_total.get("CPU", 0)),
                          float(n.resources_total.get("GPU", 0))) for n in nodes]


def check_fits(spec: JobSpec, nodes: list[NodeResources]) -> None:
    """Refuse a job whose workers no node can hold: Ray would keep them pending forever."""
    if not nodes:
        raise SubmitError("the Ray cluster has no alive nodes")
    wants = spec.workers
    fitting = [n for n in nodes if n.cpus >= wants.cpus and n.gpus >= wants.gpus]
    if not fitting:
        largest = max(nodes, key=lambda n: (n.gpus, n.cpus))
        raise SubmitError(
            f"each worker asks for {wants.cpus:g} CPUs and {wants.gpus:g} GPUs (workers.cpus, "
            f"workers.gpus), but no node of the cluster has that much: the largest has "
            f"{largest.cpus:g} CPUs and {largest.gpus:g} GPUs. Lower the request or add bigger nodes.")


def check_storage(spec: JobSpec, timeout_s: float = 20.0) -> None:
    """Refuse a job without a storage root (its checkpoints and trained optimizer would vanish
    with the head node's temporary working directory) or with one that cannot be reached from
    here (a missing bucket, a wrong endpoint, no credentials), before the run finds out at its
    first checkpoint."""
    root = spec.storage.root
    if root is None:
        raise SubmitError("storage.root is not set: on a cluster the job's checkpoints and its trained "
                          "optimizer would be lost with the head node's working directory; set it to "
                          "shared storage, e.g. s3://BUCKET/metaopt")
    if "://" not in root or root.startswith("file://"):
        log.warning("storage.root %s is a path on the head node: fine for a one-node cluster, but "
                    "other nodes cannot resume from it", root)
        return
    from fsspec.core import url_to_fs

    outcome: list[BaseException | None] = []

    def list_bucket() -> None:  # needs the endpoint, the credentials and the bucket
        try:
            fs, path = url_to_fs(root)
            fs.ls(path.split("/")[0], detail=False)
            outcome.append(None)
        except BaseException as err:  # handed to the caller below
            outcome.append(err)

    # A daemon thread: object-store clients retry an unreachable endpoint for minutes, and
    # neither the person waiting nor the exiting interpreter should wait for them.
    probe = threading.Thread(target=list_bucket, daemon=True, name="storage-probe")
    probe.start()
    probe.join(timeout_s)
    if not outcome:
        raise SubmitError(f"storage.root {root} did not answer within {timeout_s:g} s; check the URI "
                          "and $AWS_ENDPOINT_URL")
    if isinstance(outcome[0], FileNotFoundError):
        raise SubmitError(f"storage.root {root}: its bucket does not exist; create it first")
    if outcome[0] is not None:  # fsspec backends raise their own types: all mean "unreachable"
        raise SubmitError(f"storage.root {root} is unreachable: {_first_line(outcome[0])}. Check the "
                          "URI, $AWS_ENDPOINT_URL and the credentials")


def entrypoint(job_id: str) -> str:
    """The command the cluster runs on its head node, in the job's working directory."""
    return shlex.join(["python", "-m", "metaopt.cli", "train", SPEC_FILE, "--job-id", job_id, "--json"])


ACTIVE = ("PENDING", "RUNNING")
# Ray's default grace between SIGTERM and SIGKILL for a stopped job is 3 s; the learner needs
# longer to write its final checkpoint and record (to object storage, perhaps).
STOP_GRACE_S = 60


def submit(spec: JobSpec, address: str, job_id: str, retry_s: float = 60.0) -> str:
    """Validate the job against the cluster, then submit it; returns Ray's submission id at once.

    Ray never reuses a submission id, so resubmitting a job id (to resume it from its last
    checkpoint) submits a new attempt, JOB_ID-attempt-N; `status`, `logs` and `cancel` of the
    job id follow its newest attempt."""
    import yaml

    jobs = client(address)
    check_fits(spec, cluster_nodes(address))
    check_storage(spec)
    earlier = attempts(address, job_id)
    running = [a for a in earlier if a["status"] in ACTIVE]
    if running:
        raise SubmitError(f"job {job_id} is still {running[-1]['status']} ({running[-1]['submission_id']}); "
                          f"`metaopt cancel {job_id}` it first, or submit under another --job-id")
    submission_id = job_id if not earlier else f"{job_id}-attempt-{len(earlier) + 1}"
    with tempfile.TemporaryDirectory(prefix="metaopt-submit-") as working_dir:
        # The cluster gets the spec as validated here, defaults filled in, so it runs exactly
        # what was checked, whatever metaopt version fills defaults there.
        with open(f"{working_dir}/{SPEC_FILE}", "w") as f:
            yaml.safe_dump(spec.model_dump(mode="json"), f, sort_keys=False)
        env = {"PYTHONUNBUFFERED": "1", "RAY_JOB_STOP_WAIT_TIME_S": str(STOP_GRACE_S)}
        # The job's plugins go in its working directory, which Ray uploads and puts on the path
        # of its driver and of every worker (the job SDK's py_modules takes directories only).
        for source in {plugins.source(p) for p in spec.plugins}:
            if source.is_dir():  # a package
                shutil.copytree(source, f"{working_dir}/{source.name}",
                                ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy(source, working_dir)
        deadline = time.monotonic() + retry_s
        while True:
            try:
                jobs.submit_job(entrypoint=entrypoint(job_id), submission_id=submission_id,
                                runtime_env={"working_dir": working_dir, "env_vars": env},
                                metadata={"metaopt_job_id": job_id, "metaopt_job": spec.name})
                break
            except (RuntimeError, OSError) as err:
                # A head node that has just started answers "no available agent ... try again
                # later" until its job agent is up.
                if "try again" in str(err) and time.monotonic() < deadline:
                    time.sleep(1.0)
                    continue
                raise SubmitError(f"the cluster refused job {job_id}: {_first_line(err)}") from None
    _write_submission_record(spec, job_id, submission_id, address)
    return submission_id


def _write_submission_record(spec: JobSpec, job_id: str, submission_id: str, address: str) -> None:
    """Mark the job PENDING in the job store, if the spec names one. After the submission, so a
    refused one leaves an earlier record alone; a learner that started first loses nothing, as
    it rewrites its whole record (state RUNNING) every few seconds."""
    if spec.storage.job_store is None:
        return
    from metaopt.jobstore import PENDING, JobStoreError, open_job_store

    try:
        store = open_job_store(spec.storage.job_store, spec.storage.job_store_prefix)
        try:
            store.put(job_id, spec=spec.model_dump(mode="json"), state=PENDING,
                      ray_submission_id=submission_id, ray_address=address)
        finally:
            store.close()
    except JobStoreError as err:
        log.warning("job %s is submitted, but the job store could not record it: %s", job_id, err)


def _ask(address: str, what: str, call):
    """call(), with Ray's and the network's errors turned into a SubmitError."""
    try:
        return call()
    except (RuntimeError, OSError) as err:  # requests' errors are OSErrors
        raise SubmitError(f"the Ray cluster at {address} failed to {what}: {_first_line(err)}") from None


def list_jobs(address: str) -> list[dict]:
    """Every attempt the cluster knows, newest first."""
    infos = _ask(address, "list its jobs", client(address).list_jobs)
    return sorted((_row(info) for info in infos), key=lambda r: r["start_time"] or 0, reverse=True)


def attempts(address: str, job_id: str) -> list[dict]:
    """The attempts of one job, oldest first."""
    return [r for r in reversed(list_jobs(address)) if r["job_id"] == job_id]


def job_info(address: str, job_id: str | None = None) -> dict:
    """Ray's view of a job's newest attempt (of the newest job, without `job_id`)."""
    rows = list_jobs(address) if job_id is None else attempts(address, job_id)[::-1]
    if not rows:
        raise SubmitError(f"no job {job_id} on the Ray cluster at {address}; `metaopt list-jobs` shows the "
                          "jobs it knows" if job_id else
                          f"the Ray cluster at {address} has no jobs yet; submit one with `metaopt submit`")
    return rows[0]


def cancel(address: str, job_id: str) -> bool:
    """Ask Ray to stop the job's newest attempt (SIGTERM to `metaopt train`, which writes a
    final checkpoint and record). False if it had already ended."""
    submission_id = job_info(address, job_id)["submission_id"]
    return _ask(address, f"stop job {job_id}", lambda: client(address).stop_job(submission_id))


def logs(address: str, job_id: str, follow: bool = False) -> Iterator[str]:
    """The newest attempt's output so far; with `follow`, then new output until it ends."""
    submission_id = job_info(address, job_id)["submission_id"]
    jobs = client(address)
    if not follow:
        yield _ask(address, f"send the logs of {job_id}", lambda: jobs.get_job_logs(submission_id))
        return
    stream = jobs.tail_job_logs(submission_id)
    loop = asyncio.new_event_loop()
    try:
        while True:
            try:
                yield loop.run_until_complete(anext(stream))
            except StopAsyncIteration:
                return
            except (RuntimeError, OSError) as err:
                raise SubmitError(f"the log stream of {job_id} broke off: {_first_line(err)}") from None
    finally:
        loop.run_until_complete(stream.aclose())
        loop.close()


def _row(info) -> dict:
    metadata = info.metadata or {}
    return {
        "job_id": metadata.get("metaopt_job_id", info.submission_id), "submission_id": info.submission_id,
        "status": str(info.status.value), "message": info.message,
        "start_time": info.start_time, "end_time": info.end_time,
    }


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


def describe(row: dict, record: dict | None) -> str:
    """A few human lines about a job: Ray's status and, when the job store has it, progress."""
    attempt = f" (attempt {row['submission_id']})" if row["submission_id"] != row["job_id"] else ""
    message = f", {row['message']}" if row["message"] else ""
    lines = [f"job {row['job_id']}{attempt}: {row['status']}{message}"]
    if record:
        keys = ("state", "theta_version", "meta_loss", "estimates_per_second", "workers_alive",
                "last_checkpoint", "artifact", "error")
        lines += [f"  {k}: {json.dumps(record[k]) if isinstance(record[k], dict) else record[k]}"
                  for k in keys if record.get(k) is not None]
    return "\n".join(lines)
