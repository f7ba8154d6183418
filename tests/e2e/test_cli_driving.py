"""Driving the command as a new user does: mistakes are one line with exit status 2 and leave nothing
behind, `--help` documents every key, shell completion answers through the subcommand, and a piped
run logs plain progress lines."""

from __future__ import annotations

import json
from pathlib import Path

from ..conftest import SAMPLES, cli


def test_hydra_level_mistakes_are_one_line_with_exit_2_and_leave_no_run_directory(tmp_path: Path):
    for args, expected in [
        (["train.lrr=1"], "rewardctl: error: train.lrr: no such key (did you mean train.lr?)"),
        (["+train.lrr=1e-3"], "rewardctl: error: +train.lrr: adds a key no setting reads (did you mean train.lr?)"),
        (["method=pairwse"], "rewardctl: error: method=pairwse: method has no option 'pairwse' (did you mean"),
        (["method=prm", "method.step_separator=[SEP]"], "method.step_separator='\"[SEP]\"'"),
    ]:
        result = cli("train", *args, f"output_dir={tmp_path / 'run'}", cwd=tmp_path)
        assert result.returncode == 2, (args, result.stderr[-2000:])
        assert result.stderr.strip().splitlines() == [result.stderr.strip()] and expected in result.stderr, args
        assert not (tmp_path / "run").exists() and not (tmp_path / "outputs").exists()
    # a refused run removes only the directory Hydra made for it, never one that was there before
    here = tmp_path / "here"
    here.mkdir()
    refused = cli("train", "output_dir=.", f"data.train={tmp_path / 'missing.jsonl'}", cwd=here)
    assert refused.returncode == 2 and "missing.jsonl" in refused.stderr and here.is_dir()


def test_help_documents_every_key_with_its_default_and_the_chosen_methods_keys(tmp_path: Path):
    result = cli("train", "method=bco", "--help", cwd=tmp_path)
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert any(line.split() == ["train.lr=1e-05", "Peak", "learning", "rate", "of", "AdamW"] for line in lines)
    assert any(line.strip().startswith("method.beta=0.1") for line in lines)
    assert any(line.strip().startswith("method.udm.l2=1.0") for line in lines)
    assert any(line.strip().startswith("hardware.num_processes=1") for line in lines)


def test_shell_completion_is_installed_for_rewardctl_and_answers_through_the_subcommand(tmp_path: Path):
    script = cli("train", "-sc", "install=bash", cwd=tmp_path)
    assert script.returncode == 0 and script.stdout.rstrip().endswith("-F hydra_bash_completion rewardctl")

    def query(line: str) -> list[str]:
        answer = cli("-sc", "query=bash", cwd=tmp_path, env={"COMP_LINE": line, "COMP_POINT": str(len(line))})
        assert answer.returncode == 0, answer.stderr[-2000:]
        return answer.stdout.split()

    assert query("rewardctl tr") == ["train"]
    assert query("rewardctl train method=") == [
        f"method={m}" for m in ("bco", "pairwise", "prm", "ranklist", "regression")
    ]
    assert "train.lr=" in query("rewardctl train train.l")


def test_a_piped_run_logs_a_plain_progress_line_per_logged_step(tmp_path: Path):
    out = tmp_path / "run"
    result = cli("train", "experiment=smoke", "train.progress_bar=true", f"output_dir={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    text = result.stdout + result.stderr
    assert "\r" not in text  # no carriage-return bar in a pipe
    shown = [line.split(" - ", 1)[1] for line in text.splitlines() if " - step " in line and "/6 (" in line]
    assert [s.split(" (")[0] for s in shown] == ["step 2/6", "step 4/6", "step 6/6"]
    assert all("loss " in s and " pairs/s" in s and "ETA " in s for s in shown)
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"
    # `rewardctl eval data=<file>`: `data` is also a config group, which Hydra alone would refuse here
    rows = SAMPLES / "pairwise" / "eval.jsonl"
    scored = cli("eval", f"run_dir={out}", f"data={rows}", "max_rows=8", f"output_dir={tmp_path / 'ev'}", cwd=tmp_path)
    assert scored.returncode == 0, scored.stderr[-2000:]
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["data"] == str(rows) and metrics["metrics"]["pairs"] == 8
