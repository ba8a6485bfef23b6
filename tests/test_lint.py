"""Python's own mistakes that only show when a line runs: a name used but never defined or imported,
an import shadowed or unused, a redefinition. pyflakes' rules (ruff's F) find them statically, so a
path the other tests do not take (an error branch, a numerics mode) cannot ship a NameError."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_no_undefined_or_shadowed_names():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is missing: it comes with the dev extra (make install)"
    run = subprocess.run(
        [ruff, "check", "--select", "F", "--output-format", "concise", "refengine", "kernels", "tests", "scripts"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout + run.stderr
