"""The run directory's decisions and files, directly (no model, no training): what a rerun does."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from rewardctl.errors import ConfigError
from rewardctl.training.run_directory import RunDirectory


def finished_here(path: Path, step: int, status: str = "completed") -> RunDirectory:
    (path / "model").mkdir(parents=True)
    (path / "summary.json").write_text(json.dumps({"status": status, "step": step}))
    return RunDirectory(path)


def test_a_finished_run_is_returned_when_it_reached_the_steps_and_refused_without_a_checkpoint(tmp_path: Path):
    run_dir = finished_here(tmp_path / "run", step=20)
    assert run_dir.already_done(20, resume_from=None)["step"] == 20  # nothing to do: its summary
    with pytest.raises(ConfigError, match="finished 20-step run and no checkpoint") as refused:
        run_dir.already_done(30, resume_from=None)
    assert refused.value.key == "train.resume"
    assert run_dir.already_done(30, resume_from=tmp_path / "run" / "checkpoints" / "step-20") is None  # continues
    assert finished_here(tmp_path / "diverged", step=20, status="diverged").already_done(20, None) is None


def test_record_start_writes_the_config_and_report_and_sets_an_earlier_attempts_metrics_aside(tmp_path: Path):
    run_dir = RunDirectory(tmp_path / "run")
    (tmp_path / "run").mkdir()
    run_dir.metrics_path.write_text('{"step": 1}\n')
    cfg = OmegaConf.create({"output_dir": "outputs/${train.name}", "train": {"name": "a", "lr": 0.001}})
    run_dir.record_start(cfg, {"train": {"rows": 3}}, resuming=False)
    assert OmegaConf.load(tmp_path / "run" / "config.yaml") == {
        "output_dir": str(tmp_path / "run"),
        "train": {"name": "a", "lr": 0.001},
    }
    assert json.loads((tmp_path / "run" / "data_report.json").read_text()) == {"train": {"rows": 3}}
    assert not run_dir.metrics_path.exists()
    assert [p.read_text() for p in (tmp_path / "run").glob("metrics.*.jsonl.bak")] == ['{"step": 1}\n']
    run_dir.metrics_path.write_text('{"step": 2}\n')  # a resumed run keeps its metrics where they are
    run_dir.record_start(cfg, {}, resuming=True)
    assert run_dir.metrics_path.read_text() == '{"step": 2}\n'


def test_only_the_main_process_writes(tmp_path: Path):
    worker = RunDirectory(tmp_path / "run", main=False)
    worker.record_start(OmegaConf.create({"output_dir": "x"}), {}, resuming=False)
    worker.write_summary({"status": "completed"})
    assert not (tmp_path / "run").exists()


def test_resume_off_refuses_a_directory_that_holds_a_run(tmp_path: Path):
    run = OmegaConf.create({"train": {"resume": "off"}, "method": {"name": "pairwise"}})
    assert RunDirectory(tmp_path / "empty").resume_point(run) is None
    with pytest.raises(ConfigError, match="already holds a run"):
        finished_here(tmp_path / "run", step=5).resume_point(run)


def test_an_early_stop_summary_counts_only_when_written_during_this_launch(tmp_path: Path):
    run_dir = RunDirectory(tmp_path)
    run_dir.write_summary({"status": "interrupted", "step": 4})
    assert run_dir.early_stop_summary(since=time.time() - 60)["step"] == 4
    old = time.time() - 3600
    os.utime(run_dir.summary_path, (old, old))
    assert run_dir.early_stop_summary(since=time.time() - 60) is None  # an earlier launch's
    run_dir.write_summary({"status": "completed", "step": 9})
    assert run_dir.early_stop_summary(since=0) is None  # not an early stop
