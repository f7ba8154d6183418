"""Room on disk, through a real run: without room for the model and one checkpoint the run stops before
its first step (the footprint and the check themselves are in tests/unit/test_disk_room.py)."""

from __future__ import annotations

from collections import namedtuple
from pathlib import Path

import pytest

from rewardctl.errors import ConfigError
from rewardctl.training import disk

from ..conftest import reset_accelerate, run_training


def test_a_run_without_room_stops_before_its_first_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(ConfigError, match=r"^output_dir: .* has 0.00 GiB free, but this run writes about"):
        run_training(tmp_path, ["experiment=smoke"])
    reset_accelerate()
    run_dir = tmp_path / "run"
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "checkpoints").exists()
