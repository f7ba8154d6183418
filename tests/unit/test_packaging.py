"""Every package directory is listed in pyproject.toml, so a non-editable wheel carries it (the wheel
built, installed and trained from another directory is tests/e2e/test_packaging_wheel.py)."""

from __future__ import annotations

import tomllib

from ..conftest import REPO


def test_every_package_directory_is_listed_in_pyproject():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "rewardctl").rglob("__init__.py")}
    assert found | {"rewardctl.conf"} == listed
