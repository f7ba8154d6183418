"""Every package directory is listed in pyproject.toml, so a non-editable wheel carries it (the wheel
built, installed and trained from another directory is tests/e2e/test_packaging_wheel.py)."""

from __future__ import annotations

import gc

import pytest
import tomllib

from ..conftest import REPO


def test_every_package_directory_is_listed_in_pyproject():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "rewardctl").rglob("__init__.py")}
    assert found | {"rewardctl.conf"} == listed


def test_the_console_script_exits_with_mains_code_after_freezing_the_collector(monkeypatch):
    """``entry`` (the ``rewardctl`` script and ``python -m rewardctl``) returns main's status and
    freezes the garbage collector first, which skips the interpreter's 1.2-1.3 s of final collections."""
    from rewardctl import cli

    calls: list[str] = []
    monkeypatch.setattr(cli, "main", lambda: calls.append("main") or 3)
    monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze"))
    with pytest.raises(SystemExit) as exit_:
        cli.entry()
    assert exit_.value.code == 3 and calls == ["main", "freeze"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"rewardctl": "rewardctl.cli:entry"}
    assert "entry()" in (REPO / "rewardctl" / "__main__.py").read_text()
