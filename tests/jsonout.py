"""The JSON report a subprocess printed: its last line that is a JSON object.

`--json` commands print their report last, but a Ray driver may print a worker's log line
after it ("(raylet) Task PESWorker.run failed ... will be retried"), which made a fresh
clone's tests fail on `stdout.splitlines()[-1]`."""

from __future__ import annotations

import json


def last_json(output: str) -> dict:
    """The last line of `output` that parses as a JSON object; fails showing the output's tail."""
    for line in reversed(output.splitlines()):
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            report = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(report, dict):
            return report
    raise AssertionError(f"no line of the output is a JSON object; its tail:\n{output[-3000:]}")
