"""A worker's recording of its inner runs, for a dataset of training runs (the job spec's
`record`; metaopt/datasets.py holds the format, docs/datasets.md the schema).

Every `every_truncations` truncations, after the estimate has come back to the host (the
worker's one sync per truncation), the recorder takes the parameters of the + halves of the first
`runs` antithetic pairs, computes each one's training loss (one fixed training batch per inner
run, so that a run's records are comparable) and held-out loss, and buffers them as records;
shards of `per_shard` records go to ROOT/runs/JOB/dataset/shards. The first time a run is
recorded, its step 0 is recorded too (its initial parameters, rebuilt from its episode key), so a
dataset holds where each run started. Nothing is added inside an unroll. A worker that is killed
loses the records it had not yet written (fewer than a shard).
"""

from __future__ import annotations

import jax
import numpy as np

from metaopt import datasets, storage
from metaopt.evaluation import run_losses
from metaopt.jobspec import JobSpec


def _initial(objective, theta, episode_keys):
    """Each run's state at step 0: what `init_state` gave it from its episode key (it does not
    depend on θ for a learned optimizer's task, whose parameters come from the key alone)."""
    return jax.vmap(objective.init_state, in_axes=(0, None))(episode_keys, theta)


def _losses(objective, states, episode_keys):
    """(training loss, held-out loss) of each state's parameters, on batches drawn from its
    run's episode key (evaluation.run_losses: the same batches at every record of one run)."""
    return jax.vmap(lambda state, key: run_losses(objective.task_at(state), state[0], key))(
        states, episode_keys)


class RunRecorder:
    """Records a worker's inner runs as its job spec's `record` says (see the module docstring)."""

    def __init__(self, spec: JobSpec, job_id: str, worker_id: str, run_id: str):
        if spec.storage.root is None:
            raise ValueError("the job spec's `record` needs storage.root, where the workers write their "
                             "shards: a path or an fsspec URI every worker can reach (`metaopt train` "
                             "sets it to --out when it is not given)")
        self.config, self.worker_id = spec.record, worker_id
        self.prefix = f"{worker_id}-{run_id[:8]}"
        self.writer = datasets.ShardWriter(datasets.recording_uri(spec.storage.root, job_id), self.prefix,
                                           spec.record.per_shard)
        self.optimizer = {"name": spec.optimizer.name, "hparams": dict(spec.optimizer.hparams)}
        self.horizon = spec.estimator.inner_horizon
        self.truncations = 0
        self.seen: set[str] = set()  # runs recorded so far (their step 0 is recorded once)
        self._losses = jax.jit(_losses)  # one program per task shape (the objective is its argument)
        self._initial = jax.jit(_initial)

    def after_truncation(self, task_spec, objective, particles, theta, theta_version: int) -> None:
        """Called once per truncation, after its estimate is on the host; `theta` is the θ it
        unrolled with (version `theta_version`)."""
        self.truncations += 1
        if self.truncations % self.config.every_truncations:
            return
        n = self.config.runs
        keys = particles.episode_key[:n]
        key_data = np.asarray(jax.random.key_data(keys))
        runs = [f"{self.prefix}-{key_data[i].tobytes().hex()}" for i in range(n)]
        states = jax.tree.map(lambda x: x[:n], particles.inner)  # the + halves of the first n pairs
        steps = np.asarray(particles.step[:n])
        if any(run not in self.seen for run in runs):
            self._record(runs, task_spec, objective, self._initial(objective, theta, keys), keys,
                         np.zeros(n, np.int64), theta_version, [run not in self.seen for run in runs])
            self.seen.update(runs)
        self._record(runs, task_spec, objective, states, keys, steps, theta_version, [True] * n)

    def _record(self, runs, task_spec, objective, states, keys, steps, theta_version, which) -> None:
        loss, held_out = jax.device_get(self._losses(objective, states, keys))
        params = jax.device_get(states[0])
        task = {"name": task_spec.name, "kwargs": dict(task_spec.kwargs)}
        for i, run in enumerate(runs):
            if not which[i]:
                continue
            meta = {"run": run, "step": int(steps[i]), "horizon": self.horizon, "loss": float(loss[i]),
                    "held_out_loss": float(held_out[i]), "task": task, "optimizer": self.optimizer,
                    "theta_version": int(theta_version), "worker": self.worker_id}
            flat = storage.flatten_tree(jax.tree.map(lambda x, i=i: np.asarray(x[i]), params))
            self.writer.add(datasets.Record(meta, flat))

    def close(self) -> None:
        """Write the records still buffered (a last, smaller shard)."""
        self.writer.flush()
