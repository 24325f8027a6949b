"""Screen a learned optimizer's design hyperparameters on a validation suite: each variant at θ₀
(its `init` at key 0, as `metaopt eval` takes a built-in learned optimizer), or with `--theta` at
a trained optimizer's θ and hyperparameters with the variant's on top, against the suite's tuned
baselines.

    python benchmarks/design_screen.py OPTIMIZER SUITE '{"hparam": value}' ... \
        [--theta NAME:VERSION --registry DIR] [--seeds N] [--baseline-cache DIR] [--json]

Untrained, the screen chooses a design before any meta-training; at a trained θ it asks how a
design change acts on what meta-training learned (a learned part can only hurt once it is trained).
A variant's key "zero" lists θ leaves ("mlp/w1") to set to zero at the trained θ: an ablation,
e.g. '{"zero": ["mlp/w1", "mlp/b1"]}' removes nominal_mlp's learned correction. `--seeds N`
screens on seeds 0..N-1 instead of the suite's own (one seed can flip a close call).

The reference optimizer's design choices are screened on examples/suites/design_validation.yaml,
which lies outside both the meta-training mix and every evaluation suite (tests/test_suites.py),
so a choice made here is never a choice made on what is then reported. With `--json` the last
line is {"suite", "seeds", "variants": [{"hparams", "wins", "num_tasks", "geomean_final_loss_ratio",
"final_loss_ratio": {task: ratio}}]}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import jax
import jax.numpy as jnp

from metaopt import evaluation, optimizers


def at_trained(trained: evaluation.OptimizerRef, variant: dict) -> evaluation.OptimizerRef:
    """The trained optimizer's θ, with its hyperparameters updated by the variant's and the leaves
    in the variant's "zero" set to zero."""
    hparams = {k: v for k, v in variant.items() if k != "zero"}
    merged = {**trained.hparams, **hparams}
    optimizers.make(trained.optimizer_name, **merged)  # a bad variant fails here, before any training
    zero = variant.get("zero", [])

    def name(path):
        return jax.tree_util.keystr(path, simple=True, separator="/")

    names = [name(path) for path, _ in jax.tree_util.tree_leaves_with_path(trained.theta)]
    unknown = sorted(set(zero) - set(names))
    if unknown:
        raise SystemExit(f"no θ leaves {unknown} in {trained.ref}; it has {names}")
    theta = jax.tree_util.tree_map_with_path(lambda p, x: jnp.zeros_like(x) if name(p) in zero else x,
                                             trained.theta)
    label = trained.ref + json.dumps(variant, sort_keys=True)
    return evaluation.OptimizerRef(label, "registry", trained.optimizer_name, merged, theta,
                                   dict(trained.info))


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
    ap.add_argument("--theta", default=None, help="screen at this trained optimizer's θ (NAME:VERSION)")
    ap.add_argument("--registry", default=None, help="the registry that holds --theta")
    ap.add_argument("--seeds", type=int, default=None, help="screen on seeds 0..N-1, not the suite's")
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
    if args.seeds is not None:
        if args.seeds < 1:
            raise SystemExit(f"--seeds needs at least 1, got {args.seeds}")
        suite = dataclasses.replace(suite, seeds=tuple(range(args.seeds)))
    trained = None
    if args.theta:
        if not args.registry:
            raise SystemExit("--theta needs --registry, the registry that holds it")
        trained = evaluation.resolve_ref(args.theta, args.registry)
        if trained.optimizer_name != args.optimizer:
            raise SystemExit(f"{args.theta} is a {trained.optimizer_name!r}, not {args.optimizer!r}")
    rows = []
    if not trained and any("zero" in v for v in variants):
        raise SystemExit('"zero" ablates a trained θ: pass --theta NAME:VERSION --registry DIR')
    for hparams in variants:
        ref = at_trained(trained, hparams) if trained else untrained(args.optimizer, hparams)
        result = evaluation.evaluate(ref, suite, progress=not args.json, baseline_cache=args.baseline_cache)
        agg = result["aggregate"]
        rows.append({"hparams": hparams, "wins": agg["wins"], "num_tasks": agg["num_tasks"],
                     "geomean_final_loss_ratio": agg["geomean_final_loss_ratio"],
                     "final_loss_ratio": {t["name"]: t["final_loss_ratio"] for t in result["tasks"]}})
        ratios = " ".join(f"{name} {r:.3g}x" for name, r in rows[-1]["final_loss_ratio"].items())
        print(f"{json.dumps(hparams)}: wins {agg['wins']}/{agg['num_tasks']}, geomean "
              f"{agg['geomean_final_loss_ratio']:.3g}x | {ratios}",
              file=sys.stderr if args.json else sys.stdout, flush=True)
        # A variant's compiled programs are never reused by the next one; kept, they add up (6
        # variants of 12 tasks on 3 seeds ran out of memory maps: LLVM "Cannot allocate memory").
        jax.clear_caches()
    if args.json:
        print(json.dumps({"suite": suite.name, "seeds": list(suite.seeds), "optimizer": args.optimizer,
                          "theta": args.theta or "init(key(0))", "variants": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
