"""End-to-end meta-training throughput: the real `metaopt train` path with 1 and 2 workers.

Runs the learner (gRPC, in-process), Ray workers and checkpoints exactly as `metaopt train`
does, on the reference configuration (MLP 64→32→10 on 8×8 digits, batch 128, small_fc hidden
32, 8 particles, truncation 10), and reports from each run's metrics.jsonl: gradient estimates
per second and inner steps per second over the steps after warm-up (the first fifth of the
outer steps, which include compilation, are left out), and the learner's share of wall time
(time inside `Learner.submit`, all streams together, over the run's wall time). Workers are
pinned to cores as `metaopt train` does by default; the full run adds 2 unpinned workers.

    python benchmarks/meta_training.py [--quick] [--json] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile

from metaopt.jobspec import parse_job_spec
from metaopt.run_report import read_metrics
from metaopt.train import train

REFERENCE = {
    "name": "throughput",
    "tasks": [{"family": "mlp", "kwargs": {"widths": [32], "depths": [1], "activations": ["relu"],
                                           "batch_sizes": [128], "init_scales": [1.0, 1.0]}}],
    "optimizer": {"name": "small_fc", "hparams": {"hidden": 32}},
    "estimator": {"num_particles": 8, "truncation_length": 10, "inner_horizon": 100},
    "outer": {"meta_batch_size": 4, "learning_rate": 0.003},
    "checkpoint_interval_s": 30,
}


def measure(workers: int, outer_steps: int, out: str, pin_cores: bool = True) -> dict:
    spec = parse_job_spec({**REFERENCE, "workers": {"count": workers, "pin_cores": pin_cores},
                           "stop": {"max_outer_steps": outer_steps}})
    job_id = f"throughput-{workers}w" + ("" if pin_cores else "-unpinned")
    result = train(spec, out=out, job_id=job_id, progress=False)
    rows = read_metrics(pathlib.Path(result.run_dir) / "metrics.jsonl")
    warm = rows[len(rows) // 5:]
    seconds = warm[-1]["time"] - warm[0]["time"]
    estimates = sum(r["estimates"] for r in warm[1:])  # those that arrived after warm[0]
    inner_steps = sum(r["inner_steps"] for r in warm[1:])
    return {"workers": workers, "pin_cores": pin_cores, "outer_steps": outer_steps,
            "measured_outer_steps": len(warm) - 1,
            "estimates_per_s": estimates / seconds, "inner_steps_per_s": inner_steps / seconds,
            "outer_steps_per_s": (len(warm) - 1) / seconds, "wall_s": result.wall_s,
            "learner_busy_s": result.learner_busy_s,
            "learner_share_of_wall": result.learner_busy_s / result.wall_s}


def plot(result: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["runs"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.5))
    labels = [f"{r['workers']} worker(s)" + ("" if r["pin_cores"] else ", unpinned") for r in rows]
    left.bar(labels, [r["inner_steps_per_s"] for r in rows])
    left.set(ylabel="inner steps per second", title="meta-training throughput")
    right.bar(labels, [100 * r["learner_share_of_wall"] for r in rows], color="tab:orange")
    right.set(ylabel="% of wall time", title="learner busy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a run of about a minute")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--out", type=pathlib.Path, help="write meta_training.json and .png here")
    args = parser.parse_args()
    outer_steps = 25 if args.quick else 150
    with tempfile.TemporaryDirectory() as tmp:
        runs = [measure(workers, outer_steps, tmp) for workers in (1, 2)]
        if not args.quick:  # what pinning each worker to its own core is worth
            runs.append(measure(2, outer_steps, tmp, pin_cores=False))
    result = {"benchmark": "meta_training", "quick": args.quick, "reference": REFERENCE, "runs": runs}
    for r in runs:
        busy = 100 * r["learner_share_of_wall"]
        print(f"{r['workers']} worker(s){'' if r['pin_cores'] else ' unpinned'}: "
              f"{r['estimates_per_s']:.1f} estimates/s, "
              f"{r['inner_steps_per_s']:.0f} inner steps/s, learner busy {busy:.1f}%")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "meta_training.json").write_text(json.dumps(result, indent=2))
        if not args.quick:
            plot(result, args.out / "meta_training.png")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
