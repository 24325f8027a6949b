"""Bad input at metaopt's edges: invalid job specs through `metaopt train` and `metaopt submit`,
tampered and truncated artifacts through `metaopt pull`, `registry.pull` and `metaopt.load`.

The two halves live apart and are described there, with their figures: `chaos_specs.py`
(`fuzz_job_specs`, `SPEC_KINDS`) and `chaos_artifacts.py` (`fuzz_artifacts`, `ARTIFACT_KINDS`).
This script runs both and reports their figures together, with `benchmark` and `seed`.

    python benchmarks/chaos_inputs.py [--quick] [--json] [--examples N] [--seed S] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile

# Run as a script, only benchmarks/ is on sys.path: the halves are imported as `benchmarks.*`.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from benchmarks.chaos_artifacts import ARTIFACT_KINDS, fuzz_artifacts  # noqa: E402
from benchmarks.chaos_specs import SPEC_KINDS, fuzz_job_specs  # noqa: E402

__all__ = ["fuzz_artifacts", "fuzz_job_specs", "main"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 cases of each kind")
    parser.add_argument("--examples", type=int, help="cases per part (default: 40 of each kind)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--out", type=pathlib.Path, help="write chaos_inputs.json here")
    args = parser.parse_args()
    per_kind = 8 if args.quick else 40
    with tempfile.TemporaryDirectory(prefix="chaos-inputs-") as tmp:
        specs = fuzz_job_specs(args.examples or per_kind * len(SPEC_KINDS), args.seed,
                               pathlib.Path(tmp, "specs"))
        artifacts = fuzz_artifacts(args.examples or per_kind * len(ARTIFACT_KINDS), args.seed,
                                   pathlib.Path(tmp, "artifacts"))
    result = {"benchmark": "chaos_inputs", "seed": args.seed, **specs, **artifacts}
    for part in ("spec_by_kind", "artifact_by_kind"):
        for kind, s in result[part].items():
            print(f"{kind:20s} tried {s['tried']:3d}  failures {s['failures']:3d}  "
                  + ", ".join(f"{v} {n}" for v, n in sorted(s["variants"].items()))[:160])
    print(f"{result['spec_cases']} invalid specs in {result['spec_seconds']} s: {result['spec_started']} "
          f"started, {result['spec_unclear']} unclear, {result['secrets_echoed']} echoed a password; "
          f"{result['artifact_cases']} tampered artifacts in {result['artifact_seconds']} s: "
          f"{result['artifact_accepted']} accepted, {result['cache_poisoned']} poisoned the cache, "
          f"{result['artifact_unclear']} unclear, {result['intact_failed']} broke an intact pull, "
          f"{result['undetectable_accepted']} consistent rewrites accepted (undetectable by design)")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "chaos_inputs.json").write_text(json.dumps(result, indent=2, default=str))
    if args.json:
        print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
