"""Screen a learned optimizer's design hyperparameters untrained, on a validation suite, before
any meta-training: each variant at θ₀ (its `init` at key 0, as `metaopt eval` takes a built-in
learned optimizer) against the suite's tuned baselines.

    python benchmarks/design_screen.py OPTIMIZER SUITE '{"hparam": value}' ... \
        [--baseline-cache DIR] [--json]

The reference optimizer's design choices are screened on examples/suites/design_validation.yaml,
which lies outside both the meta-training mix and every evaluation suite (tests/test_suites.py),
so a choice made here is never a choice made on what is then reported. With `--json` the last
line is {"suite", "variants": [{"hparams", "wins", "num_tasks", "geomean_final_loss_ratio",
"final_loss_ratio": {task: ratio}}]}.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp

from metaopt import evaluation, optimizers


def untrained(optimizer: str, hparams: dict) -> evaluation.OptimizerRef:
    opt = optimizers.make(optimizer, **hparams)
    if not opt.learned:
        raise SystemExit(f"{optimizer!r} is hand-designed: evaluate it with `metaopt eval` instead")
    theta = jax.tree.map(jnp.asarray, opt.init(jax.random.key(0)))
    label = optimizer + json.dumps(hparams, sort_keys=True)
    return evaluation.OptimizerRef(label, "builtin-learned", opt.name, dict(opt.hparams), theta,
                                   {"theta": "init(key(0))"})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("optimizer")
    ap.add_argument("suite", help="a suite name or a suite YAML file")
    ap.add_argument("variants", nargs="+", help="JSON objects of hyperparameters, one per variant")
    ap.add_argument("--baseline-cache", default=None, help="folder to keep tuned baselines in")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    try:
        variants = [json.loads(v) for v in args.variants]
    except json.JSONDecodeError as e:
        raise SystemExit(f"a variant is not JSON ({e}); write it as '{{\"rate_adaptation\": 0.1}}'") from None
    if not all(isinstance(v, dict) for v in variants):
        raise SystemExit("each variant must be a JSON object of hyperparameters")
    suite = evaluation.load_suite(args.suite)
    rows = []
    for hparams in variants:
        ref = untrained(args.optimizer, hparams)
        result = evaluation.evaluate(ref, suite, progress=not args.json, baseline_cache=args.baseline_cache)
        agg = result["aggregate"]
        rows.append({"hparams": hparams, "wins": agg["wins"], "num_tasks": agg["num_tasks"],
                     "geomean_final_loss_ratio": agg["geomean_final_loss_ratio"],
                     "final_loss_ratio": {t["name"]: t["final_loss_ratio"] for t in result["tasks"]}})
        ratios = " ".join(f"{name} {r:.3g}x" for name, r in rows[-1]["final_loss_ratio"].items())
        print(f"{json.dumps(hparams)}: wins {agg['wins']}/{agg['num_tasks']}, geomean "
              f"{agg['geomean_final_loss_ratio']:.3g}x | {ratios}",
              file=sys.stderr if args.json else sys.stdout, flush=True)
    if args.json:
        print(json.dumps({"suite": suite.name, "optimizer": args.optimizer, "variants": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
