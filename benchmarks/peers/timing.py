"""The two clocks both sides of the peer harness use, so that metaopt and the peer are timed alike.

Imports only the standard library: `peer_side.py` runs it in the peer's own virtual environment,
`run.py` in metaopt's.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def rate(fn: Callable[[], object], seconds: float, work_per_call: float) -> float:
    """Work per second of the blocking `fn()`, called back to back for at least `seconds`
    (and at least once); the caller has warmed it up."""
    start, calls = time.perf_counter(), 0
    while calls == 0 or time.perf_counter() - start < seconds:
        fn()
        calls += 1
    return work_per_call * calls / (time.perf_counter() - start)


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median milliseconds of `repeats` calls of the blocking `fn()`, after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)
