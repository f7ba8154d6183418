"""A non-editable wheel carries conf/, the tiny model asset and the samples, and trains from any
directory (the package list itself is checked in tests/unit/test_packaging.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ..conftest import REPO


@pytest.mark.slow
def test_wheel_installs_and_trains_from_another_directory(tmp_path: Path):
    dist = tmp_path / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(REPO)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    [wheel] = list(dist.glob("rewardctl-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "rewardctl/conf/train.yaml",
        "rewardctl/conf/method/pairwise.yaml",
        "rewardctl/conf/experiment/smoke.yaml",
        "rewardctl/assets/tiny-llama/tokenizer.json",
        "rewardctl/assets/tiny-llama/config.json",
        "rewardctl/samples/data/pairwise/train.jsonl",
        "rewardctl/cli.py",
    ):
        assert required in names, required
    assert not any(n.startswith(("tests/", "conf/")) for n in names)
    site = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run(
        [sys.executable, "-c", "import rewardctl; print(rewardctl.__file__)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
    )
    assert where.stdout.strip().startswith(str(site)), where.stdout
    run = subprocess.run(
        [sys.executable, "-m", "rewardctl", "train", "experiment=smoke", "train.max_steps=2", "train.save_every=0"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    [config] = [p for p in (elsewhere / "outputs").rglob("config.yaml") if ".hydra" not in p.parts]
    assert str(site / "rewardctl" / "assets" / "tiny-llama") in config.read_text()
    assert (config.parent / "model" / "model.safetensors").is_file()
