"""Real sweeps through the console entry point: a failing job is a row of the sweep report and the
sweep goes on (basic sweeper), and the report follows a sweeper plugin's own trials (Optuna)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from ..conftest import cli, read_jsonl

SMOKE = ["experiment=smoke", "train.max_steps=2"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def report_rows(sweep: Path) -> list[dict[str, str]]:
    with (sweep / "sweep_summary.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_a_failing_job_is_a_row_with_its_error_and_the_sweep_goes_on(tmp_path: Path):
    sweep = tmp_path / "sweep"
    # Job 0 trains; job 1's learning rate is refused by the config checks of its own job.
    result = cli("train", "-m", *SMOKE, "train.lr=1e-3,-1", f"output_dir={sweep}", cwd=tmp_path)

    assert result.returncode == 2, result.stderr[-3000:]
    assert "rewardctl: error: train.lr: must be > 0 (got -1.0)" in result.stderr
    assert "Traceback" not in result.stderr
    completed, failed = report_rows(sweep)
    assert completed["job"] == "0" and completed["status"] == "completed"
    assert completed["overrides"] == f"experiment=smoke train.max_steps=2 train.lr=0.001 output_dir={sweep}"
    summary = json.loads((sweep / "0" / "summary.json").read_text())
    evals = [r for r in read_jsonl(sweep / "0" / "metrics.jsonl") if r["split"] == "eval"]
    best = max(evals, key=lambda r: (r["accuracy"], -r["step"]))
    assert float(completed["final"]) == summary["final_eval"]["accuracy"]
    assert float(completed["final_loss"]) == summary["final_eval"]["loss"]
    assert (float(completed["best"]), int(completed["best_step"])) == (best["accuracy"], best["step"])
    assert float(completed["items_per_sec"]) == summary["pairs_per_sec"] and completed["item_name"] == "pairs"
    assert completed["run_dir"] == str(sweep / "0") and completed["error"] == ""
    assert failed["job"] == "1" and failed["status"] == "failed"
    assert failed["error"] == "train.lr: must be > 0 (got -1.0)"
    assert failed["run_dir"] == "" and not (sweep / "1").exists()  # refused before training: no directory
    table = (sweep / "sweep_summary.md").read_text()
    assert "2 job(s): 1 completed, 1 failed; ranked by eval accuracy (higher is better), best first" in table
    assert "| train.lr=-1    | failed    |" in table and "train.lr: must be > 0 (got -1.0) |" in table
    assert "2 job(s): 1 completed, 1 failed" in result.stdout  # the table, printed at the end
    assert (sweep / "sweep_curves.png").read_bytes()[:8] == PNG_MAGIC


def test_the_report_follows_the_optuna_sweepers_own_trials(tmp_path: Path):
    sweep = tmp_path / "optuna"
    result = cli(
        "train",
        "-m",
        "hydra/sweeper=optuna",
        "hydra/sweeper/sampler=random",
        "hydra.sweeper.sampler.seed=1",
        "hydra.sweeper.direction=maximize",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.n_jobs=1",
        "hydra.sweep.subdir=trial-${hydra.job.num}",
        *SMOKE,
        "train.lr=choice(0.001,-1)",
        f"output_dir={sweep}",
        cwd=tmp_path,
    )

    rows = report_rows(sweep)
    assert len(rows) == 3 and {r["job"] for r in rows} == {"0", "1", "2"}, result.stderr[-3000:]
    for row in rows:  # whatever the sampler drew, every trial is a row that says how it ended
        if "train.lr=-1" in row["overrides"].split():
            assert row["status"] == "failed" and row["error"] == "train.lr: must be > 0 (got -1.0)", row
        else:
            assert row["status"] == "completed" and row["run_dir"] == str(sweep / f"trial-{row['job']}"), row
            assert 0.0 <= float(row["final"]) <= 1.0 and row["best_step"] != ""
    failures = sum(r["status"] == "failed" for r in rows)
    assert 0 < failures < 3  # seed 1 draws both values: a failed trial did not end the study
    assert result.returncode == 2, result.stderr[-3000:]
    assert [r["status"] for r in rows][: 3 - failures] == ["completed"] * (3 - failures)  # ranked first
    assert "best_value" in (sweep / "optimization_results.yaml").read_text()
    assert (sweep / "sweep_curves.png").read_bytes()[:8] == PNG_MAGIC
