"""The peer's side of the harness: google/learned_optimization doing the harness's work, one round
per request, run by the peer's own virtual environment's Python with its source on PYTHONPATH.

Work, as metaopt does it in `run.py`:
  - PES on the reference configuration: an MLP 64→32→10 (relu, haiku, as the peer's own image
    MLP tasks) on the harness's 8×8 digits (the same arrays metaopt trains on, fed through the
    peer's `Datasets` iterators as its tasks are fed), batch 128; `AdafacMLPLOpt(hidden_size=32)`
    (the peer's small_fc_lopt) at its initial θ; `VectorizedLOptTruncatedStep` over 8 tasks, a
    constant 100-step truncation schedule, `TruncatedPES` with truncation length 10, std 0.01.
    Inner steps count both halves of every pair: 2 · 8 · 10 per estimate.
  - the update step of `AdafacMLPLOpt(hidden_size=32)`, `MLPLOpt(hidden_size=32)` and
    `optax.adam`, jitted, each returning the new parameters, on float32 tensors of the shapes
    the harness sends.

Protocol (one JSON object a line): once warmed up it prints {"ready": true, ...versions};
then for each request line
  {"pes_seconds": S}                 -> {"inner_steps_per_s": x}
  {"step_shapes": [[r, c], ...], "repeats": R} -> {"ms": {"adafac_mlp": x, "mlp": y, "adam": z}}
and it exits at end of input.

    PYTHONPATH=LO_SRC python peer_side.py --data DIGITS.npz [--particles 8] [--no-pes]
"""

from __future__ import annotations

import argparse
import json
import sys
import types

import flax.io  # noqa: F401  (before the stand-in below: flax looks for a real tensorflow)
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import timing

# learned_optimization imports tensorflow at module level only (summary.py calls
# enable_v2_behavior; tasks/datasets/base.py imports tensorflow_datasets); nothing this script
# runs uses either, so a stand-in is enough and the peer's venv needs no tensorflow.
_tf = types.ModuleType("tensorflow")
_tf.compat = types.ModuleType("tensorflow.compat")
_tf.compat.v2 = types.ModuleType("tensorflow.compat.v2")
_tf.compat.v2.enable_v2_behavior = lambda: None
sys.modules.update({"tensorflow": _tf, "tensorflow.compat": _tf.compat, "tensorflow.compat.v2": _tf.compat.v2,
                    "tensorflow_datasets": types.ModuleType("tensorflow_datasets")})

from learned_optimization.learned_optimizers import adafac_mlp_lopt, mlp_lopt  # noqa: E402
from learned_optimization.outer_trainers import (  # noqa: E402
    gradient_learner,
    lopt_truncated_step,
    truncated_pes,
    truncation_schedule,
)
from learned_optimization.tasks import base as tasks_base  # noqa: E402
from learned_optimization.tasks.datasets import base as datasets_base  # noqa: E402

TRUNCATION_LENGTH = 10
INNER_HORIZON = 10 * TRUNCATION_LENGTH
HIDDEN = 32


class DigitsMLP(tasks_base.Task):
    """MLP 64→32→10 (relu) softmax classifier on the harness's digits, random batches of 128."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int = 0):
        rng = np.random.default_rng(seed)

        def batches():
            while True:
                idx = rng.integers(0, len(labels), batch_size)
                yield {"image": images[idx], "label": labels[idx]}

        self.datasets = datasets_base.Datasets(train=batches(), inner_valid=batches(),
                                               outer_valid=batches(), test=batches())
        mlp = lambda x: hk.nets.MLP([32, 10], activation=jax.nn.relu)(x)  # noqa: E731
        self._net = hk.without_apply_rng(hk.transform(mlp))
        self._example = jnp.zeros((1, images.shape[1]), jnp.float32)

    def init(self, key):
        return self._net.init(key, self._example)

    def loss(self, params, key, data):
        del key
        logits = self._net.apply(params, data["image"])
        labels = jax.nn.one_hot(data["label"], 10)
        return jnp.mean(tasks_base.softmax_cross_entropy(logits=logits, labels=labels))


def pes_estimate(task: DigitsMLP, particles: int):
    """A blocking callable that computes one TruncatedPES gradient estimate, carrying its state."""
    lopt = adafac_mlp_lopt.AdafacMLPLOpt(hidden_size=HIDDEN)
    step = lopt_truncated_step.VectorizedLOptTruncatedStep(
        tasks_base.single_task_to_family(task), lopt,
        truncation_schedule.ConstantTruncationSchedule(INNER_HORIZON), num_tasks=particles,
        random_initial_iteration_offset=INNER_HORIZON)
    estimator = truncated_pes.TruncatedPES(step, trunc_length=TRUNCATION_LENGTH, std=0.01,
                                           steps_per_jit=TRUNCATION_LENGTH)
    weights = gradient_learner.WorkerWeights(theta=lopt.init(jax.random.PRNGKey(0)), theta_model_state=None,
                                             outer_state=gradient_learner.OuterState(jnp.asarray(0)))
    state = [estimator.init_worker_state(weights, jax.random.PRNGKey(1))]
    key = [jax.random.PRNGKey(2)]

    def one():
        key[0], sub = jax.random.split(key[0])
        out, _ = estimator.compute_gradient_estimate(weights, sub, state[0], with_summary=False)
        state[0] = out.unroll_state
        jax.block_until_ready(out.grad)

    return one


def update_steps(shapes: list[list[int]]) -> dict:
    """{name: blocking callable running one jitted update that returns the new parameters}."""
    key = jax.random.PRNGKey(0)
    params = {f"w{i}": jax.random.normal(jax.random.fold_in(key, i), tuple(s)) for i, s in enumerate(shapes)}
    grads = jax.tree_util.tree_map(lambda x: 0.01 * x, params)
    loss = jnp.asarray(1.0)
    calls = {}
    for name, lopt in (("adafac_mlp", adafac_mlp_lopt.AdafacMLPLOpt(hidden_size=HIDDEN)),
                       ("mlp", mlp_lopt.MLPLOpt(hidden_size=HIDDEN))):
        opt = lopt.opt_fn(lopt.init(jax.random.PRNGKey(1)))
        update = jax.jit(lambda s, g, opt=opt: opt.update(s, g, loss=loss))
        state = opt.init(params, num_steps=1000)
        calls[name] = lambda u=update, s=state: jax.block_until_ready(u(s, grads))
    adam = optax.adam(1e-3)

    @jax.jit
    def adam_step(p, s, g):
        updates, s = adam.update(g, s, p)
        return optax.apply_updates(p, updates), s

    adam_state = adam.init(params)
    calls["adam"] = lambda: jax.block_until_ready(adam_step(params, adam_state, grads))
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="npz with train_x (N, 64) float32, train_y (N,) int")
    parser.add_argument("--particles", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--no-pes", action="store_true", help="answer step requests only")
    args = parser.parse_args()
    data = np.load(args.data)
    estimate = None
    if not args.no_pes:
        estimate = pes_estimate(DigitsMLP(data["train_x"], data["train_y"], args.batch_size), args.particles)
        for _ in range(3):
            estimate()
    print(json.dumps({"ready": True, "jax": jax.__version__, "optax": optax.__version__,
                      "haiku": hk.__version__, "devices": len(jax.devices())}), flush=True)
    steps: dict[str, dict] = {}  # compiled update callables by shapes
    for line in sys.stdin:
        request = json.loads(line)
        if "pes_seconds" in request:
            rate = timing.rate(estimate, request["pes_seconds"], 2 * args.particles * TRUNCATION_LENGTH)
            reply = {"inner_steps_per_s": rate}
        else:
            shapes = json.dumps(request["step_shapes"])
            calls = steps.setdefault(shapes, update_steps(request["step_shapes"]))
            reply = {"ms": {name: timing.median_ms(fn, request["repeats"]) for name, fn in calls.items()}}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
