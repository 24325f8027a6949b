"""The README's self-contained Python examples run as written."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    # The first example uses what `make demo` trained; the end-to-end tests cover that path.
    runnable = [b for b in blocks if "runs/registry" not in b]
    assert runnable, "no self-contained example in the README"
    for block in runnable:
        # -P: the checkout's folders are not importable as they would be from `python -c` here, so
        # an example must import metaopt as a user's environment has it (metaopt.task_zoo, ...).
        done = subprocess.run([sys.executable, "-P", "-c", block], capture_output=True, text=True,
                              timeout=300, cwd=README.parent)
        assert done.returncode == 0, f"README example failed:\n{block}\n{done.stderr[-2000:]}"
