"""A non-editable install carries exactly the packages pyproject.toml lists: a sub-package missing from
the list works in the editable install the tests use and is missing from a wheel."""

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_of_the_tree_is_listed_in_pyproject():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    on_disk = {"refengine.kernels"} | {
        ".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "refengine").rglob("__init__.py")
    }
    assert on_disk == listed, f"not listed: {sorted(on_disk - listed)}; listed, absent: {sorted(listed - on_disk)}"
    assert setuptools["package-dir"]["refengine.kernels"] == "kernels" and (ROOT / "kernels" / "__init__.py").exists()
