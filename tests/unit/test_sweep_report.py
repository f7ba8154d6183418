"""The sweep report (rewardctl/sweep.py) on hand-made sweep directories: the exact csv, the ranking in
each metric direction, failed jobs as rows with their error, the Hydra callback's records, and the
CLI's handling of a failing job inside a sweep."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import RunMode
from omegaconf import OmegaConf

from rewardctl import cli, sweep
from rewardctl.errors import ConfigError
from rewardctl.methods.pairwise import PairwiseMethod
from rewardctl.methods.registry import method_class

PAIRWISE = "rewardctl.methods.pairwise.PairwiseMethod"
REPO = Path(__file__).resolve().parents[2]


class LossRankedMethod(PairwiseMethod):
    """A method whose primary metric is lower-is-better (a user's own method could be one)."""

    primary_metric = "loss"
    primary_metric_higher_is_better = False


LOSS_RANKED = f"{__name__}.LossRankedMethod"


def make_job(
    root: Path,
    num: int,
    overrides: list[str],
    evals: list[tuple[int, float, float]],
    *,
    status: str = "completed",
    metric: str = "accuracy",
    rate: float = 100.0,
    target: str = PAIRWISE,
    message: str | None = None,
) -> Path:
    """A job directory as a real run leaves it (summary.json, metrics.jsonl with train and eval
    records) and its record in the sweep's sweep_jobs.jsonl. ``evals``: (step, metric, loss)."""
    run_dir = root / str(num)
    run_dir.mkdir(parents=True)
    values = [{"step": s, "split": "eval", "epoch": 0.0, metric: v, "loss": loss} for s, v, loss in evals]
    if metric == "loss":
        values = [{"step": s, "split": "eval", "epoch": 0.0, "loss": v, "accuracy": a} for s, v, a in evals]
    train = {"step": 1, "split": "train", metric: 99.0, "loss": 99.0}  # never read as an eval
    lines = [values[0], train, *values[1:]]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    summary = {
        "status": status,
        "method": "pairwise",
        "step": evals[-1][0],
        "pairs_per_sec": rate,
        "first_eval": values[0],
        "final_eval": values[-1],
        "primary_metric": metric,
        "run_dir": str(run_dir),
        "message": message,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary))
    record = {"job": str(num), "overrides": overrides, "run_dir": str(run_dir), "status": None, "error": ""}
    sweep.append_record(root, {**record, "method_target": target})
    return run_dir


def failed_job(root: Path, num: int, overrides: list[str], error: str) -> None:
    """A job refused before training: no directory left, only its record."""
    record = {"job": str(num), "overrides": overrides, "run_dir": str(root / str(num)), "status": "failed"}
    sweep.append_record(root, {**record, "error": error, "method_target": PAIRWISE})


def csv_lines(root: Path) -> list[str]:
    return (root / sweep.SUMMARY_CSV).read_text().splitlines()


def test_csv_holds_every_job_ranked_best_first_with_failed_and_diverged_after(tmp_path: Path):
    root = tmp_path / "sweep"
    make_job(root, 0, ["train.lr=1e-3", "output_dir=/s"], [(0, 0.5, 0.7), (2, 0.75, 0.6), (4, 0.625, 0.65)])
    failed_job(root, 1, ["train.lr=-1", "output_dir=/s"], "train.lr: must be > 0 (got -1.0)")
    make_job(root, 2, ["train.lr=3e-3", "output_dir=/s"], [(0, 0.5, 0.7), (4, 0.875, 0.5)], rate=50.0)
    # A diverged job's last eval is its baseline: ranked after every completed job, however high.
    message = "loss not finite for 3 updates in a row"
    make_job(root, 3, ["train.lr=1.0", "output_dir=/s"], [(0, 0.9, 0.7)], status="diverged", message=message)

    rows = sweep.write_report(root)

    assert [r.job for r in rows] == ["2", "0", "3", "1"]
    assert csv_lines(root) == [
        "rank,job,status,overrides,method,primary_metric,higher_is_better,final,best,best_step,final_step,"
        "items_per_sec,item_name,run_dir,error,final_accuracy,final_loss",
        f"1,2,completed,train.lr=3e-3 output_dir=/s,pairwise,accuracy,true,0.875,0.875,4,4,50.0,pairs,{root}/2,,"
        "0.875,0.5",
        f"2,0,completed,train.lr=1e-3 output_dir=/s,pairwise,accuracy,true,0.625,0.75,2,4,100.0,pairs,{root}/0,,"
        "0.625,0.65",
        f"3,3,diverged,train.lr=1.0 output_dir=/s,pairwise,accuracy,true,0.9,0.9,0,0,100.0,pairs,{root}/3,"
        f"{message},0.9,0.7",
        "4,1,failed,train.lr=-1 output_dir=/s,,,,,,,,,,,train.lr: must be > 0 (got -1.0),,",
    ]
    assert (root / sweep.CURVES_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_lower_is_better_primary_metric_ranks_the_smallest_first(tmp_path: Path):
    root = tmp_path / "sweep"
    make_job(root, 0, ["a=1"], [(0, 0.9, 0.5), (5, 0.3, 0.6)], metric="loss", target=LOSS_RANKED)
    make_job(root, 1, ["a=2"], [(0, 0.9, 0.5), (5, 0.1, 0.7), (9, 0.2, 0.7)], metric="loss", target=LOSS_RANKED)
    make_job(root, 2, ["a=3"], [(0, 0.9, 0.5), (5, 0.25, 0.8)], metric="loss", target=LOSS_RANKED)

    rows = sweep.write_report(root)

    assert [(r.job, r.primary, r.best, r.best_step) for r in rows] == [
        ("1", 0.2, 0.1, 5),  # final 0.2, but its best eval (the smallest loss) was 0.1 at step 5
        ("2", 0.25, 0.25, 5),
        ("0", 0.3, 0.3, 5),
    ]
    assert all(not r.higher_is_better for r in rows)
    assert [line.split(",")[:3] + line.split(",")[6:10] for line in csv_lines(root)[1:]] == [
        ["1", "1", "completed", "false", "0.2", "0.1", "5"],
        ["2", "2", "completed", "false", "0.25", "0.25", "5"],
        ["3", "0", "completed", "false", "0.3", "0.3", "5"],
    ]
    assert "ranked by eval loss (lower is better), best first" in (root / sweep.SUMMARY_MD).read_text()


def test_the_same_jobs_rank_the_other_way_for_a_higher_is_better_metric(tmp_path: Path):
    root = tmp_path / "sweep"
    for num, final in enumerate((0.3, 0.1, 0.25)):
        make_job(root, num, [f"a={num}"], [(0, 0.0, 0.5), (5, final, 0.6)])
    assert [(r.job, r.primary, r.higher_is_better) for r in sweep.collect(root)] == [
        ("0", 0.3, True),
        ("2", 0.25, True),
        ("1", 0.1, True),
    ]


@pytest.mark.parametrize("option", sorted(p.stem for p in (REPO / "conf" / "method").glob("*.yaml")))
def test_every_shipped_method_states_its_primary_metric_direction(option: str):
    config = OmegaConf.load(REPO / "conf" / "method" / f"{option}.yaml")
    target = OmegaConf.select(config, "method._target_") or config["_target_"]  # bco's is @package _global_
    cls = method_class(target)
    # accuracy, step accuracy, Spearman: larger is better for every method shipped today.
    assert cls.primary_metric in ("accuracy", "step_accuracy", "spearman")
    assert cls.primary_metric_higher_is_better is True
    assert sweep.higher_is_better(target, cls.primary_metric) is True


def test_the_direction_follows_the_class_and_falls_back_to_the_metric_name():
    assert sweep.higher_is_better(LOSS_RANKED, "loss") is False
    assert sweep.higher_is_better(PAIRWISE, "accuracy") is True
    assert sweep.higher_is_better("no.such.Method", "eval_loss") is False  # unimportable: by its name
    assert sweep.higher_is_better(None, "spearman") is True


def test_markdown_names_the_shared_overrides_once_and_escapes_pipes(tmp_path: Path):
    root = tmp_path / "sweep"
    make_job(root, 0, ["train.lr=1e-3", "output_dir=/s"], [(0, 0.5, 0.7), (4, 0.75, 0.6)])
    failed_job(root, 1, ["train.lr=-1", "output_dir=/s"], "data.train: a|b is not a file")
    sweep.write_report(root)
    text = (root / sweep.SUMMARY_MD).read_text()
    assert "2 job(s): 1 completed, 1 failed; ranked by eval accuracy (higher is better), best first" in text
    assert "Every job: `output_dir=/s`" in text
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert len({len(line) for line in lines}) == 1  # padded: the columns line up as plain text too
    cells = [[c.strip() for c in line[2:-2].split(" | ")] for line in (lines[0], *lines[2:])]
    assert cells == [
        ["#", "job", "overrides", "status", "accuracy", "loss", "best (step)", "pairs/s", "run dir", "error"],
        ["1", "0", "train.lr=1e-3", "completed", "0.7500", "0.6000", "0.7500 (4)", "100.0", "0", ""],
        ["2", "1", "train.lr=-1", "failed", "", "", "", "", "", "data.train: a\\|b is not a file"],
    ]
    assert "![eval curves](sweep_curves.png)" in text


def test_a_job_recorded_twice_keeps_its_last_record(tmp_path: Path):
    root = tmp_path / "sweep"
    failed_job(root, 0, ["a=1"], "first try")
    failed_job(root, 0, ["a=1"], "second try")
    assert [(r.job, r.error) for r in sweep.collect(root)] == [("0", "second try")]


def job_config(root: Path, num: int, mode: RunMode = RunMode.MULTIRUN) -> Any:
    """The config Hydra hands to on_job_end: the job's config with its ``hydra`` node."""
    return OmegaConf.create(
        {
            "method": {"_target_": PAIRWISE},
            "hydra": {
                "mode": mode,
                "job": {"num": num},
                "overrides": {"task": [f"a={num}"]},
                "runtime": {"output_dir": str(root / f"trial-{num}")},
                "sweep": {"dir": str(root)},
                "callbacks": {"sweep_report": {"_target_": "rewardctl.sweep.SweepReport"}},
            },
        }
    )


def test_the_callback_records_failed_jobs_from_the_job_note_and_from_hydra(tmp_path: Path, capsys):
    root = tmp_path / "sweep"
    root.mkdir()
    (root / sweep.RECORDS).write_text('{"stale": "from an earlier run of the same sweep"}\n')
    callback = sweep.SweepReport()
    callback.on_multirun_start(job_config(root, 0))
    assert not (root / sweep.RECORDS).exists()

    # Job 7: failed in our code, which notes its error and returns no objective (Hydra: COMPLETED).
    callback.on_job_start(job_config(root, 7), task_function=None)
    sweep.note_job_failure("train.lr: must be > 0 (got -1.0)")
    callback.on_job_end(job_config(root, 7), JobReturn(status=JobStatus.COMPLETED, _return_value=None))
    # Job 8: an exception reached Hydra (e.g. under --debug): Hydra's failed JobReturn holds it.
    callback.on_job_start(job_config(root, 8), task_function=None)
    failed = JobReturn(status=JobStatus.FAILED, _return_value=RuntimeError("boom\nsecond line"))
    callback.on_job_end(job_config(root, 8), failed)
    # A single run (not -m) is no sweep: nothing recorded.
    callback.on_job_end(job_config(root, 9, RunMode.RUN), JobReturn(status=JobStatus.COMPLETED))

    records = sweep.read_records(root)
    assert [(r["job"], r["overrides"], r["status"], r["error"]) for r in records] == [
        ("7", ["a=7"], "failed", "train.lr: must be > 0 (got -1.0)"),
        ("8", ["a=8"], "failed", "RuntimeError: boom"),
    ]
    assert records[0]["run_dir"] == str(root / "trial-7") and records[0]["method_target"] == PAIRWISE
    assert (root / sweep.SUMMARY_CSV).is_file()  # the report is up to date after each job

    callback.on_multirun_end(job_config(root, 0))
    out = capsys.readouterr().out
    assert "2 job(s): 2 failed; none has a final eval to rank by" in out
    assert "| 1 | 7   | a=7       | failed |" in out and "RuntimeError: boom" in out
    assert not (root / sweep.CURVES_PNG).exists()  # no eval curve to draw
    assert sweep.enabled(job_config(root, 0).hydra)


def test_a_sweep_job_error_is_one_line_and_exit_status_2_while_a_single_run_keeps_the_stack(capsys):
    def boom() -> None:
        raise RuntimeError("boom")

    def refused() -> None:
        raise ConfigError("train.lr", "must be > 0 (got -1.0)")

    with pytest.raises(RuntimeError, match="boom"):
        cli._guarded(boom)
    with pytest.raises(SystemExit) as exited:
        cli._guarded(boom, sweep_job=True)
    assert exited.value.code == 2 and cli._invocation["error_line"] == "RuntimeError: boom"
    with pytest.raises(SystemExit) as exited:
        cli._guarded(refused)
    assert exited.value.code == 2 and cli._invocation["error_line"] == "train.lr: must be > 0 (got -1.0)"
    # (the job's stack goes to the log; a handler an earlier test left on a closed stream may add noise)
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rewardctl: error:")]
    assert said == [
        "rewardctl: error: RuntimeError: boom",
        "rewardctl: error: train.lr: must be > 0 (got -1.0)",
    ]


def test_the_sweeps_exit_status_comes_from_every_jobs_record_on_disk(tmp_path: Path, capsys):
    """Jobs run by an out-of-process launcher (joblib, submitit) never touch the launching process's
    memory: the status the command exits with is read from the records the jobs wrote."""
    root = tmp_path / "sweep"
    make_job(root, 0, ["train.lr=1e-5"], [(0, 0.5, 0.69), (10, 0.8, 0.4)])
    callback = sweep.SweepReport()
    callback.on_multirun_end(job_config(root, 0))
    assert sweep.sweep_outcome["status"] == 0
    make_job(root, 1, ["train.lr=1e3"], [(0, 0.5, 0.69), (2, 0.5, 9.0)], status="diverged", message="loss exploded")
    callback.on_multirun_end(job_config(root, 0))
    assert sweep.sweep_outcome["status"] == 3
    failed_job(root, 2, ["train.lr=-1"], "train.lr: must be > 0 (got -1.0)")
    callback.on_multirun_end(job_config(root, 0))
    assert sweep.sweep_outcome["status"] == 3  # the worst wins: diverged (3) over failed (2)
    assert sweep.exit_status([r for r in sweep.collect(root) if r.status != "diverged"]) == 2
    sweep.sweep_outcome["status"] = 0
    capsys.readouterr()
