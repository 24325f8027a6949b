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
import json
import logging
import os
import shlex
import tempfile
import time
from collections.abc import Iterator

from metaopt.jobspec import JobSpec

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
SPEC_FILE = "job.yaml"  # the validated spec, as the cluster receives it


class SubmitError(ValueError):
    """The job cannot run on this cluster, or the cluster cannot be reached; nothing started."""


@dataclasses.dataclass(frozen=True)
class NodeResources:
    address: str
    cpus: float
    gpus: float


def client(address: str):
    """A Ray JobSubmissionClient, or a SubmitError that says what to check."""
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
    """Refuse a remote storage root that cannot be reached from here (a missing bucket, a wrong
    endpoint, no credentials), before the run finds out at its first checkpoint."""
    root = spec.storage.root
    if root is None or "://" not in root or root.startswith("file://"):
        return  # a local root that does not exist yet is made by the first checkpoint
    from concurrent.futures import ThreadPoolExecutor
    from concurrent.futures import TimeoutError as Timeout

    from fsspec.core import url_to_fs

    def list_bucket() -> None:  # needs the endpoint, the credentials and the bucket
        fs, path = url_to_fs(root)
        fs.ls(path.split("/")[0], detail=False)

    pool = ThreadPoolExecutor(1)
    try:
        # Object-store clients retry an unreachable endpoint for minutes; a person waits less.
        pool.submit(list_bucket).result(timeout=timeout_s)
    except FileNotFoundError:
        raise SubmitError(f"storage.root {root}: its bucket does not exist; create it first") from None
    except Timeout:
        raise SubmitError(f"storage.root {root} did not answer within {timeout_s:g} s; check the URI "
                          "and $AWS_ENDPOINT_URL") from None
    except Exception as err:  # fsspec backends raise their own types: all mean "unreachable"
        raise SubmitError(f"storage.root {root} is unreachable: {_first_line(err)}. Check the URI, "
                          "$AWS_ENDPOINT_URL and the credentials") from None
    finally:
        pool.shutdown(wait=False)


def entrypoint(job_id: str) -> str:
    """The command the cluster runs on its head node, in the job's working directory."""
    return shlex.join(["python", "-m", "metaopt.cli", "train", SPEC_FILE, "--job-id", job_id, "--json"])


def submit(spec: JobSpec, address: str, job_id: str, retry_s: float = 60.0) -> str:
    """Validate the job against the cluster, then submit it; returns the job id at once."""
    import yaml

    jobs = client(address)
    check_fits(spec, cluster_nodes(address))
    check_storage(spec)
    with tempfile.TemporaryDirectory(prefix="metaopt-submit-") as working_dir:
        # The cluster gets the spec as validated here, defaults filled in, so it runs exactly
        # what was checked, whatever metaopt version fills defaults there.
        with open(f"{working_dir}/{SPEC_FILE}", "w") as f:
            yaml.safe_dump(spec.model_dump(mode="json"), f, sort_keys=False)
        # The record first: a learner that starts at once must find it, not be overwritten by it.
        _record(spec, job_id, state="PENDING", ray_address=address)
        deadline = time.monotonic() + retry_s
        while True:
            try:
                return jobs.submit_job(
                    entrypoint=entrypoint(job_id), submission_id=job_id,
                    runtime_env={"working_dir": working_dir, "env_vars": {"PYTHONUNBUFFERED": "1"}},
                    metadata={"metaopt_job": spec.name},
                )
            except RuntimeError as err:
                # A head node that has just started answers "no available agent ... try again
                # later" until its job agent is up.
                if "try again" in str(err) and time.monotonic() < deadline:
                    time.sleep(1.0)
                    continue
                error = f"the cluster refused job {job_id}: {_first_line(err)}"
                _record(spec, job_id, state="FAILED", error=error)
                raise SubmitError(error) from None


def _record(spec: JobSpec, job_id: str, **fields) -> None:
    """Write the job's record, if the spec names a job store; the submission does not depend
    on it (the learner rewrites the whole record as it runs)."""
    if spec.storage.job_store is None:
        return
    from metaopt.jobstore import JobStoreError, open_job_store

    try:
        store = open_job_store(spec.storage.job_store, spec.storage.job_store_prefix)
        store.put(job_id, spec=spec.model_dump(mode="json"), **fields)
        store.close()
    except JobStoreError as err:
        log.warning("job %s: its record could not be written to the job store: %s", job_id, err)


def job_info(address: str, job_id: str) -> dict:
    """Ray's view of one job: status, message, times; SubmitError if Ray does not know it."""
    jobs = client(address)
    try:
        info = jobs.get_job_info(job_id)
    except RuntimeError:
        raise SubmitError(f"no job {job_id} on the Ray cluster at {address}; `metaopt list-jobs` "
                          "shows the jobs it knows") from None
    return _row(info)


def list_jobs(address: str) -> list[dict]:
    """Every job the cluster knows, newest first."""
    rows = [_row(info) for info in client(address).list_jobs()]
    return sorted(rows, key=lambda r: r["start_time"] or 0, reverse=True)


def latest_job(address: str) -> str:
    rows = list_jobs(address)
    if not rows:
        raise SubmitError(f"the Ray cluster at {address} has no jobs yet; submit one with `metaopt submit`")
    return rows[0]["job_id"]


def cancel(address: str, job_id: str) -> bool:
    """Ask Ray to stop the job (SIGTERM to `metaopt train`, which writes a final checkpoint).
    False if it had already ended."""
    job_info(address, job_id)  # a clear error for an unknown id
    return client(address).stop_job(job_id)


def logs(address: str, job_id: str, follow: bool = False) -> Iterator[str]:
    """The job's driver output so far; with `follow`, then new output until the job ends."""
    jobs = client(address)
    job_info(address, job_id)
    if not follow:
        yield jobs.get_job_logs(job_id)
        return
    stream = jobs.tail_job_logs(job_id)
    loop = asyncio.new_event_loop()
    try:
        while True:
            try:
                yield loop.run_until_complete(anext(stream))
            except StopAsyncIteration:
                return
    finally:
        loop.run_until_complete(stream.aclose())
        loop.close()


def _row(info) -> dict:
    return {
        "job_id": info.submission_id, "status": str(info.status.value), "message": info.message,
        "start_time": info.start_time, "end_time": info.end_time,
        "metaopt_job": (info.metadata or {}).get("metaopt_job"),
    }


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


def describe(row: dict, record: dict | None) -> str:
    """A few human lines about a job: Ray's status and, when the job store has it, progress."""
    lines = [f"job {row['job_id']}: {row['status']}" + (f" ({row['message']})" if row["message"] else "")]
    if record:
        keys = ("state", "theta_version", "meta_loss", "estimates_per_second", "workers_alive",
                "last_checkpoint", "artifact", "error")
        lines += [f"  {k}: {json.dumps(record[k]) if isinstance(record[k], dict) else record[k]}"
                  for k in keys if record.get(k) is not None]
    return "\n".join(lines)
