"""tests/data/e2e.yaml with in-run evaluation on the tiny suite (tests/data/tiny_suite.yaml), for
the real runs that check it (test_end_to_end, test_dashboards)."""

from __future__ import annotations

import pathlib

import yaml

DATA = pathlib.Path(__file__).parent / "data"
TINY_SUITE = DATA / "tiny_suite.yaml"


def e2e_with_eval(directory: pathlib.Path, record: dict | None = None, **settings) -> pathlib.Path:
    """Write the spec into `directory`; `settings` change the eval section (default: every 6 s);
    `record`, the job spec's record section (a dataset of training runs), if given."""
    spec = yaml.safe_load((DATA / "e2e.yaml").read_text())
    spec["eval"] = {"suite": str(TINY_SUITE), "every_minutes": 0.1, "seeds": 1, **settings}
    if record is not None:
        spec["record"] = record
    path = directory / "e2e_eval.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path
