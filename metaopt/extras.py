"""Which of metaopt's optional parts (pip extras) this environment has.

`pip install metaopt` is the library: load, verify and use trained optimizers. `metaopt[eval]`
adds the task zoo and evaluation, `metaopt[service]` meta-training (Ray, gRPC, Redis, ...). What
each extra needs is read from metaopt's installed metadata, so pyproject.toml stays the one list.
"""

from __future__ import annotations

import re
from importlib import metadata

_NAME = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?")
_EXTRA = re.compile(r"""extra\s*==\s*["']([^"']+)["']""")


class MissingExtraError(ImportError):
    """A part of metaopt is used whose extra is not installed; the message says what to install."""


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def missing(extra: str) -> list[str]:
    """The distributions `metaopt[extra]` needs that are not installed (none where metaopt itself
    is not installed, as when run from a bare checkout: nothing to compare with)."""
    try:
        requirements = metadata.requires("metaopt") or []
    except metadata.PackageNotFoundError:
        return []
    absent: set[str] = set()
    for requirement in requirements:
        spec, _, marker = requirement.partition(";")
        if extra not in _EXTRA.findall(marker):
            continue
        name, nested = _NAME.match(spec).groups()
        if _canonical(name) == "metaopt":  # metaopt[service] includes metaopt[eval]
            for inner in filter(None, (e.strip() for e in (nested or "").split(","))):
                absent.update(missing(inner))
            continue
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            absent.add(name)
    return sorted(absent)


def require(extra: str, what: str) -> None:
    """Raise MissingExtraError naming the extra to install if `what` cannot run here."""
    absent = missing(extra)
    if absent:
        verb = "is" if len(absent) == 1 else "are"
        raise MissingExtraError(f"{what} needs metaopt[{extra}], and {', '.join(absent)} {verb} not "
                                f"installed: pip install 'metaopt[{extra}]'")
