"""Where a PES inner step's time goes, against this machine's measured float32 peak.

The reference configuration of benchmarks/worker_throughput.py and benchmarks/peers/run.py
(MLP 64→32→10 on 8×8 digits, batch 128, 8 antithetic pairs, truncation 10, `small_fc` with
hidden width 32 at its initial θ), in one process on one jax device (with `--one-core`, pinned
to one core, as a pinned worker is). An inner step here is one
step of every half of every pair (16 inner trainings), the body of the truncation's scan.
Everything is timed in this one run, call by call in turns (worker_throughput.interleaved),
in rounds whose order alternates; the figures are medians over rounds of per-round medians:
  - `peak`: a jitted n×n float32 matmul (2n³ FLOPs), this process's attainable FLOP/s;
  - `truncation`: one whole PES truncation (worker_throughput.pes_truncation); / K is
    `inner_step_ms`;
  - the parts of an inner step, each a jitted function on the same shapes, batch and halves,
    batched as the estimator batches them (workers/estimators.py `_unroll_halves`):
    `loss_and_grad` (the reset select, the batch, the task's loss and gradient, vmapped over
    the halves) and `lopt_update` (the learned optimizer's features, per-parameter MLP and
    apply_updates, one half after another on CPU); `remainder` is the step minus both: PES
    bookkeeping, perturbation, per-truncation set-up, what the fused program does between
    parts (it may come out negative where the parts run faster inside the one program);
  - `mlp_within_update`: small_fc's bare MLP matmul chain on the same elements (part of
    `lopt_update`, not a part of its own; benchmarks/lopt_step.bare_mlp).
  - `truncation_sgd`: the same truncation with SGD (no θ) in place of small_fc; the
    difference, `lopt_in_program`, is what the learned optimizer (and PES on its θ) costs
    inside the one fused program (measured here: less than `lopt_update` timed alone).
FLOPs: XLA's cost analysis of each part; it counts a loop's body once, whatever its trip
count, so a part run one half at a time is costed on one half and multiplied by the halves.
The MLP's FLOPs are the closed form 2·(F·H + H·H + H·O) per element (matmuls only; F=18
features, H hidden, O=2 outputs), beside XLA's count, which adds the bias adds, relus and the
output multiply. A part is compute-bound if it reaches COMPUTE_BOUND of the peak.

    python benchmarks/pes_profile.py [--quick] [--one-core] [--json] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import shlex
import statistics
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: this checkout's benchmarks and metaopt

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import lopt_step, worker_throughput  # noqa: E402
from metaopt import optimizers, task_zoo  # noqa: E402
from metaopt.optimizers import small_fc  # noqa: E402

PARTICLES = worker_throughput.REFERENCE_PARTICLES
K = worker_throughput.TRUNCATION_LENGTH
MATMUL_N = 1024
MEASURED = ("loss_and_grad", "lopt_update")  # the parts timed alone; the remainder is the rest
COMPUTE_BOUND = 0.5  # the fraction of peak FLOP/s from which a part counts as compute-bound


def compiled(fn, *args, donate: tuple[int, ...] = ()):
    """`fn` compiled for `args` by jax.jit: callable on arguments of their shapes, and costed."""
    return jax.jit(fn, donate_argnums=donate).lower(*args).compile()


def xla_flops(program) -> float:
    """XLA's count of the floating-point operations of a `compiled` program."""
    cost = program.cost_analysis()
    if isinstance(cost, list | tuple):  # older jax: one dict per computation
        cost = cost[0]
    return float(cost["flops"])


def mlp_closed_form_flops(opt: small_fc.SmallFC, elements: int) -> int:
    """Multiply-adds of small_fc's per-parameter MLP, 2 FLOPs each: 2·(F·H + H·H + H·O) per
    element for one hidden-to-hidden layer, generally the sum over its layers."""
    sizes = [small_fc.NUM_FEATURES] + [opt.hidden] * opt.hidden_layers + [2]
    return elements * sum(2 * a * b for a, b in zip(sizes[:-1], sizes[1:], strict=True))


def _blocking(program, *args):
    return lambda: jax.block_until_ready(program(*args))


def parts(task, lopt, device) -> tuple[dict, dict, int]:
    """({name: blocking callable} of the parts of one inner step, {name: FLOPs per inner step},
    the elements per half the optimizer's MLP runs on), on the reference estimator's shapes and
    a state some steps into a run."""
    est, objective = worker_throughput.reference_estimator(task, lopt, PARTICLES, [device])
    halves = 2 * PARTICLES
    theta = lopt.init(jax.random.key(0))

    @jax.jit  # one program: op by op, this set-up would compile each op alone
    def start(key):
        """θ ± ε for each pair (as `_estimate` perturbs it), each half's reset key, and the
        fresh inner state of each half (params, optimizer state), from which the carry starts."""
        eps_key, reset_key = jax.random.split(key)
        leaves, treedef = jax.tree.flatten(theta)
        eps = [est.config.sigma * jax.random.normal(k, (PARTICLES, *t.shape))
               for k, t in zip(jax.random.split(eps_key, len(leaves)), leaves, strict=True)]
        perturbed = [jnp.concatenate([t + e, t - e]) for t, e in zip(leaves, eps, strict=True)]
        perturbed = jax.tree.unflatten(treedef, perturbed)
        reset_keys = jax.random.split(reset_key, halves)
        fresh = jax.vmap(objective.init_state)(reset_keys, perturbed)
        return perturbed, reset_keys, fresh

    perturbed, reset_keys, fresh = start(jax.random.key(2))
    carry = (fresh, jnp.zeros((halves,), jnp.int32), reset_keys, jnp.full((halves,), jnp.nan))
    # The update runs one half at a time on CPU, vmapped elsewhere, as LearnedOptimizerTraining's
    # step_batch does.
    over_halves = jax.lax.map if jax.default_backend() == "cpu" else lambda f, xs: jax.vmap(f)(xs)

    def loss_and_grad(carry):
        carry, reset, keys = jax.vmap(est._begin)(carry, reset_keys, fresh)
        loss, grads = jax.vmap(objective.gradient)(carry[0], keys)
        return carry, reset, loss, grads

    def lopt_update(perturbed, inner, grads, loss):
        return over_halves(lambda a: objective.update(*a), (perturbed, inner, grads, loss))

    # Each call takes its state and gives it back (donated): its outputs reuse its input
    # buffers as the truncation's scan carry does, so a part alone allocates nothing the step
    # does not.
    grad_step = compiled(loss_and_grad, carry, donate=(0,))
    carry, _, loss, grads = grad_step(carry)
    update_step = compiled(lopt_update, perturbed, carry[0], grads, loss, donate=(1,))
    for _ in range(K):  # a state some steps into its inner run: real moments, not zeros
        carry, _, loss, grads = grad_step(carry)
        carry = (update_step(perturbed, carry[0], grads, loss), *carry[1:])
    carry, _, loss, grads = grad_step(carry)
    inner = jax.tree.map(jnp.copy, carry[0])  # the update's own (params, opt_state): it donates them
    update_args = (perturbed, inner, grads, loss)
    state = {"carry": carry, "inner": inner}

    def grad_call():
        state["carry"], *out = grad_step(state["carry"])
        jax.block_until_ready(out)

    def update_call():
        state["inner"] = jax.block_until_ready(update_step(perturbed, state["inner"], grads, loss))

    shapes = jax.eval_shape(task.init, jax.random.key(0))
    layout = small_fc._Layout([x.shape for x in jax.tree.leaves(shapes)])
    elements = layout.num_chunks * layout.chunk  # padding is computed like data
    mlp_one, (_, x) = lopt_step.bare_mlp(lopt, theta, elements)
    xs = jnp.broadcast_to(x, (halves, *x.shape))

    def mlp(mlps, xs):
        return over_halves(lambda a: mlp_one(*a), (mlps, xs))

    first = lambda tree: jax.tree.map(lambda a: a[0], tree)  # noqa: E731
    callables = {"loss_and_grad": grad_call, "lopt_update": update_call,
                 "mlp_within_update": _blocking(compiled(mlp, perturbed["mlp"], xs), perturbed["mlp"], xs)}
    flops = {"loss_and_grad": xla_flops(grad_step),  # vmapped: no loop to undercount
             "lopt_update": halves * xla_flops(compiled(objective.update, *map(first, update_args))),
             "mlp_within_update": halves * mlp_closed_form_flops(lopt, elements),
             "mlp_cost_analysis": halves * xla_flops(compiled(mlp_one, first(perturbed["mlp"]), x))}
    return callables, flops, elements


def run(quick: bool, rounds: int | None) -> dict:
    rounds = rounds or (3 if quick else 7)
    # A 1024² matmul takes tens of ms here, near a truncation's length: on a shared machine
    # longer calls are preempted more often, which would understate the peak.
    repeats, n = (5 if quick else 15), MATMUL_N
    device = jax.devices()[0]
    date, load_before = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"), os.getloadavg()
    task = task_zoo.task(worker_throughput.TASK)
    lopt = optimizers.make("small_fc")
    a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.float32) for i in range(2))
    truncation = lambda opt: worker_throughput.pes_truncation(task, opt, PARTICLES, [device])  # noqa: E731
    # With SGD (no θ) in place of small_fc: what the learned optimizer costs inside the one program.
    items = {"peak": _blocking(compiled(jnp.matmul, a, b), a, b), "truncation": truncation(lopt),
             "truncation_sgd": truncation(optimizers.make("sgd"))}
    part_calls, flops, elements = parts(task, lopt, device)
    items.update(part_calls)
    per_round: dict[str, list[float]] = {name: [] for name in items}
    for r in range(rounds):  # the order reversed every other round
        # Items timed in turns, call by call: this shared machine's load comes and goes within
        # seconds, and the shares divide times that must have seen the same load.
        order = list(items) if r % 2 == 0 else list(reversed(items))
        seconds = worker_throughput.interleaved({name: items[name] for name in order}, repeats)
        for name, s in seconds.items():
            per_round[name].append(1e3 * s)
        print(f"round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    ms = {name: statistics.median(v) for name, v in per_round.items()}
    return _report(ms, flops, elements, lopt, n, per_round, repeats, quick, started=(date, load_before))


def _report(ms, flops, elements, lopt, n, per_round, repeats, quick, started) -> dict:
    """The report from the median ms, FLOPs and per-round ms; `started`: (date, load average)
    when the run began."""
    (date, load_before), rounds = started, len(per_round["peak"])
    peak = 2 * n**3 / (ms["peak"] / 1e3)
    step_ms = ms["truncation"] / K

    # How far single rounds stray from the medians: each round's shares and fractions of peak.
    round_step = [t / K for t in per_round["truncation"]]
    round_peak = [2 * n**3 / (t / 1e3) for t in per_round["peak"]]
    round_rest = [step - sum(per_round[p][r] for p in MEASURED) for r, step in enumerate(round_step)]

    def spread(values) -> list[float]:
        values = list(values)
        return [min(values), max(values)]

    def shares(times: list[float]) -> list[float]:
        return spread(t / step for t, step in zip(times, round_step, strict=True))

    def figures(name: str) -> dict:
        rate = flops[name] / (ms[name] / 1e3)
        return {"ms": ms[name], "share": ms[name] / step_ms, "flops": flops[name], "flops_per_s": rate,
                "fraction_of_peak": rate / peak,
                "share_range": shares(per_round[name]),
                "fraction_of_peak_range": spread(flops[name] / (t / 1e3) / top for t, top
                                                 in zip(per_round[name], round_peak, strict=True))}

    measured = {name: figures(name) for name in MEASURED}
    rest = step_ms - sum(p["ms"] for p in measured.values())
    # The remainder is what no part computes: its FLOPs are not counted.
    parts = {**measured, "remainder": {
        "ms": rest, "share": rest / step_ms, "flops": None, "flops_per_s": None, "fraction_of_peak": None,
        "share_range": shares(round_rest),
        "fraction_of_peak_range": None}}
    mlp = figures("mlp_within_update") | {"cost_analysis_flops": flops["mlp_cost_analysis"],
                                          "share_of_update": ms["mlp_within_update"] / ms["lopt_update"]}
    bound_by = max(parts, key=lambda name: parts[name]["share"])
    fraction = parts[bound_by]["fraction_of_peak"]
    compute_bound = fraction is not None and fraction >= COMPUTE_BOUND
    floor_ms = 1e3 * sum(p["flops"] for p in measured.values()) / peak
    sgd_ms = ms["truncation_sgd"] / K
    return {
        "benchmark": "pes_profile", "date": date,
        "command": shlex.join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]), "quick": quick,
        "rounds": rounds, "repeats": repeats, "jax": jax.__version__, "device": str(jax.devices()[0]),
        "cores": len(os.sched_getaffinity(0)),
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "task": worker_throughput.TASK.to_json(), "particles": PARTICLES, "truncation_length": K,
        "optimizer": {"name": "small_fc", **lopt.hparams}, "elements_per_half": elements, "matmul_n": n,
        "peak_flops_per_s": peak, "inner_step_ms": step_ms,
        "inner_steps_per_s": 2 * PARTICLES / (step_ms / 1e3),
        "parts": parts, "mlp_within_update": mlp,
        "compute_floor_ms": floor_ms, "step_over_floor": step_ms / floor_ms,
        "sgd_inner_step_ms": sgd_ms,
        "lopt_in_program": {"ms": step_ms - sgd_ms, "share": 1 - sgd_ms / step_ms},
        "bound_by": bound_by, "compute_bound": compute_bound,
        "verdict": (f"{bound_by} takes {parts[bound_by]['share']:.0%} of the step"
                    + (f" at {fraction:.1%} of peak: " if fraction is not None else ": ")
                    + ("compute-bound" if compute_bound else "not compute-bound (overhead or memory)")),
        "per_round_ms": per_round,
    }


def print_report(r: dict) -> None:
    print(f"{r['date']}, {r['device']}, {r['cores']} cores, load {r['load_average']['before'][0]:.1f}"
          f"→{r['load_average']['after'][0]:.1f}; medians of {r['rounds']} alternating rounds")
    print(f"peak float32 ({r['matmul_n']}² matmul): {r['peak_flops_per_s'] / 1e9:.1f} GFLOP/s")
    print(f"inner step ({2 * r['particles']} halves, one step each): {r['inner_step_ms']:.3f} ms "
          f"({r['inner_steps_per_s']:.0f} inner steps/s)")
    print(f"{'part':<20}{'ms':>8}{'share':>7}{'(rounds)':>14}{'MFLOP':>8}{'GFLOP/s':>8}{'of peak':>8}"
          f"{'(rounds)':>14}")
    rows = [*r["parts"].items(), ("  of update: MLP", r["mlp_within_update"])]
    for name, p in rows:
        low, high = p["share_range"]
        line = f"{name:<20}{p['ms']:>8.3f}{p['share']:>7.0%}{f'{low:.0%}-{high:.0%}':>14}"
        if p["flops"] is None:
            line += f"{'—':>8}{'—':>8}{'—':>8}"
        else:
            low, high = p["fraction_of_peak_range"]
            line += (f"{p['flops'] / 1e6:>8.1f}{p['flops_per_s'] / 1e9:>8.1f}{p['fraction_of_peak']:>8.0%}"
                     f"{f'{low:.0%}-{high:.0%}':>14}")
        print(line)
    mlp = r["mlp_within_update"]
    print(f"MLP FLOPs: closed form {mlp['flops'] / 1e6:.2f} M, XLA {mlp['cost_analysis_flops'] / 1e6:.2f} M; "
          f"the MLP is {mlp['share_of_update']:.0%} of the update")
    print(f"compute floor (the parts' FLOPs at peak): {r['compute_floor_ms']:.3f} ms; "
          f"the step takes {r['step_over_floor']:.1f}x that")
    print(f"the same truncation with SGD in place of small_fc: {r['sgd_inner_step_ms']:.3f} ms a step, so "
          f"small_fc costs {r['lopt_in_program']['ms']:.3f} ms ({r['lopt_in_program']['share']:.0%}) "
          "inside the one program")
    print(f"bound by: {r['verdict']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 short rounds, a 1024² matmul")
    parser.add_argument("--rounds", type=int, help="alternating rounds (default 3 quick, 7 full)")
    parser.add_argument("--one-core", action="store_true",
                        help="pin this process to one core first, as a pinned worker is")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--out", type=pathlib.Path, help="write pes_profile.json here")
    args = parser.parse_args()
    if args.one_core:  # before jax starts its CPU backend, which sizes its thread pools by it
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    result = run(args.quick, args.rounds)
    print_report(result)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "pes_profile.json").write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result, allow_nan=False))


if __name__ == "__main__":
    main()
