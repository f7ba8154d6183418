"""The real command line, as subprocesses: default run, overrides, sweeps, errors, two processes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from rewardctl.training.launch import free_port

from ..conftest import SAMPLES, cli, read_jsonl, run_workers, write_jsonl

SMOKE = ["experiment=smoke"]


def run_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("config.yaml") if ".hydra" not in p.parts)


def test_help_lists_commands_and_groups(tmp_path: Path):
    top = cli("--help", cwd=tmp_path)
    assert top.returncode == 0 and "train" in top.stdout and "eval" in top.stdout
    train_help = cli("train", "--help", cwd=tmp_path)
    assert train_help.returncode == 0
    assert (
        "== Config groups" in train_help.stdout
        and "model: llama-3.2-1b, minilm, qwen2.5-0.5b, tiny" in train_help.stdout
    )
    assert "eval" in cli("eval", "--help", cwd=tmp_path).stdout
    assert "export" in top.stdout and "checkpoint=step-N" in cli("export", "--help", cwd=tmp_path).stdout
    assert cli("frobnicate", cwd=tmp_path).returncode == 2
    assert cli("--version", cwd=tmp_path).stdout.startswith("rewardctl ")


def test_cfg_job_prints_the_composed_config_without_running(tmp_path: Path):
    result = cli("train", "--cfg", "job", "train.lr=0.5", "method.center_rewards_coefficient=0.01", cwd=tmp_path)
    assert result.returncode == 0
    assert "lr: 0.5" in result.stdout and "center_rewards_coefficient: 0.01" in result.stdout
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_embedded_default_run_learns_and_eval_reproduces_it(tmp_path: Path):
    result = cli("train", cwd=tmp_path)  # no overrides at all: the embedded default
    assert result.returncode == 0, result.stderr[-3000:]
    [run_dir] = run_dirs(tmp_path / "outputs")
    summary = json.loads((run_dir / "summary.json").read_text())
    first, final = summary["first_eval"], summary["final_eval"]
    assert summary["status"] == "completed" and summary["step"] == 500
    assert final["accuracy"] >= first["accuracy"] + 0.2, (first["accuracy"], final["accuracy"])
    assert (run_dir / "curves.png").is_file() and (run_dir / "model" / "model.safetensors").is_file()
    assert "eval accuracy" in result.stdout + result.stderr
    evaluated = cli("eval", f"run_dir={run_dir}", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    metrics = json.loads((run_dir / "eval" / "eval" / "metrics.json").read_text())["metrics"]
    assert metrics["accuracy"] == pytest.approx(final["accuracy"]) and metrics["loss"] == pytest.approx(
        final["loss"], rel=1e-6
    )


def test_override_run(tmp_path: Path):
    out = tmp_path / "run"
    result = cli(
        "train",
        *SMOKE,
        "data=pairwise_sample_chat",
        "train.lr=5e-4",
        "train.per_device_batch_size=2",
        f"output_dir={out}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    config = (out / "config.yaml").read_text()
    assert "lr: 0.0005" in config and "per_device_batch_size: 2" in config and "pairwise_chat/train.jsonl" in config
    assert json.loads((out / "summary.json").read_text())["totals"]["pairs"] == 12


def test_multirun_sweep_writes_one_directory_per_job(tmp_path: Path):
    sweep = tmp_path / "sweep"
    result = cli("train", "-m", *SMOKE, "train.lr=1e-3,2e-3", f"output_dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (sweep / "multirun.yaml").is_file()
    assert run_dirs(sweep) == [sweep / "0", sweep / "1"]
    assert "lr: 0.001" in (sweep / "0" / "config.yaml").read_text()
    assert "lr: 0.002" in (sweep / "1" / "config.yaml").read_text()
    assert f"output_dir: {sweep / '1'}" in (sweep / "1" / "config.yaml").read_text()
    assert all((sweep / job / "model" / "config.json").is_file() for job in ("0", "1"))


def test_bad_key_fails_fast_naming_it(tmp_path: Path):
    out = tmp_path / "run"
    result = cli("train", "train.lrr=1e-3", f"output_dir={out}", cwd=tmp_path)
    assert result.returncode != 0 and "train.lrr" in result.stderr + result.stdout
    assert not out.exists()
    bad_value = cli("train", "train.per_device_batch_size=0", f"output_dir={out}", cwd=tmp_path)
    assert bad_value.returncode == 2
    assert "rewardctl: error: train.per_device_batch_size: must be >= 1 (got 0)" in bad_value.stderr

    assert "Traceback" not in bad_value.stderr


def test_debug_shows_the_full_stack_of_an_error_that_is_otherwise_one_line(tmp_path: Path):
    """``--debug`` sets Hydra's HYDRA_FULL_ERROR=1, so that variable alone does the same."""
    result = cli("train", "train.per_device_batch_size=0", "--debug", f"output_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr and "rewardctl/config/validate.py" in result.stderr
    assert result.stderr.rstrip().endswith(
        "rewardctl.errors.ConfigError: train.per_device_batch_size: must be >= 1 (got 0)"
    )


def test_malformed_data_fails_before_the_model_loads(tmp_path: Path):
    path = tmp_path / "broken.jsonl"
    write_jsonl(path, [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    with path.open("a") as handle:
        handle.write('{"prompt": "p", "chosen": "a" "rejected": "b"}\n')
    result = cli("train", *SMOKE, f"data.train={path}", f"output_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2
    assert f"rewardctl: error: {path}, row 2: line 2 is not valid JSON" in result.stderr
    assert not (tmp_path / "run" / "model").exists()


def torchrun(*args: str, cwd: Path):
    """``rewardctl <args>`` under torchrun with 2 CPU processes (``run_workers``: a hang is reported
    with every worker's stack and retried once)."""
    outputs = [Path(a.split("=", 1)[1]) for a in args if a.startswith(("output_dir=", "output="))]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    command += ["--master-port", str(free_port()), "-m", "rewardctl", *args]
    return run_workers(command, cwd=cwd, env={"OMP_NUM_THREADS": "1"}, outputs=outputs)


@pytest.mark.slow
def test_two_cpu_processes_share_one_run_and_match_one_process(tmp_path: Path):
    """2 processes x 4 rows is the same global batch as 1 process x 4 rows x 2 accumulation steps:
    the loss trajectory and the eval metrics must agree, and only one run directory is written.
    A 2-process run stopped mid-way and resumed must log exactly what the uninterrupted one did."""
    common = [*SMOKE, "train.log_every=1", "train.per_device_batch_size=4"]
    result = torchrun("train", *common, f"output_dir={tmp_path / 'ddp'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    single = cli("train", *common, "train.grad_accum=2", f"output_dir={tmp_path / 'single'}", cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    assert run_dirs(tmp_path) == [tmp_path / "ddp", tmp_path / "single"]  # no per-rank directories
    assert not (tmp_path / "outputs").exists()
    ddp, one = read_jsonl(tmp_path / "ddp" / "metrics.jsonl"), read_jsonl(tmp_path / "single" / "metrics.jsonl")
    assert [(r["step"], r["split"]) for r in ddp] == [(r["step"], r["split"]) for r in one]
    for a, b in zip(ddp, one, strict=True):
        for key in ("loss", "accuracy", "margin", "pairs", "tokens"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (a["step"], a["split"], key)
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["totals"]["pairs"] == 48
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoints" / "step-6").glob("*_state*_[01].*")) == [
        "process_state_0.json",
        "process_state_1.json",
        "rng_state_0.safetensors",
        "rng_state_1.safetensors",
    ]
    chunked = [*common, "train.stop_after_steps=4", f"output_dir={tmp_path / 'ddp-resumed'}"]
    for _ in range(2):  # stops at step 4, then the same command resumes both processes and finishes
        result = torchrun("train", *chunked, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-4000:]
    resumed = read_jsonl(tmp_path / "ddp-resumed" / "metrics.jsonl")
    timing = {"train_seconds", "eval_seconds", "pairs_per_sec", "tokens_per_sec"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in resumed] == [
        {k: v for k, v in r.items() if k not in timing} for r in ddp
    ]


def test_eval_and_export_write_nothing_in_the_working_directory(tmp_path: Path):
    out = tmp_path / "run"
    assert cli("train", *SMOKE, "train.max_steps=2", f"output_dir={out}", cwd=tmp_path).returncode == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = cli("eval", f"run_dir={out}", cwd=elsewhere)
    assert result.returncode == 0, result.stderr[-2000:]
    assert list(elsewhere.iterdir()) == []
    assert "accuracy" in result.stdout and (out / "eval" / "eval" / "metrics.json").is_file()
    exported = cli("export", f"run_dir={out}", cwd=elsewhere)
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert list(elsewhere.iterdir()) == [] and (out / "model-merged" / "model.safetensors").is_file()
    again = cli("export", f"run_dir={out}", cwd=elsewhere)  # never replaces an export silently
    assert again.returncode == 2 and "overwrite=true" in again.stderr


@pytest.mark.slow
def test_accelerate_launch_runs_two_cpu_processes_into_one_run(tmp_path: Path):
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        "-m",
        "rewardctl",
        "train",
        *SMOKE,
        f"output_dir={tmp_path / 'run'}",
    ]
    env = {"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = run_workers(command, cwd=tmp_path, env=env, outputs=[tmp_path / "run"])
    assert result.returncode == 0, result.stderr[-4000:]
    assert run_dirs(tmp_path) == [tmp_path / "run"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["totals"]["pairs"] == 48


def _bco_signs_determined(record: dict) -> bool:
    """BCO's accuracy is sign(r - delta) per row. Early in a run (and before it) every reward sits within
    float noise of delta, so the sign, and the accuracy, flip with the order of floating-point reductions:
    two process layouts then differ in noise only. Accuracy is compared where both sides' mean reward
    stands well clear of delta (rewards and delta themselves are compared everywhere)."""
    delta = record["delta"]
    return min(abs(record["rewards/chosen"] - delta), abs(record["rewards/rejected"] - delta)) > 1e-3


DDP_EXTRA = {
    "ranklist": [],
    "prm": [],
    "bco": ["method.precompute_ref_log_probs=true", "method.udm.enabled=true", "method.prompt_sample_size=16"],
}
DDP_KEYS = {
    "ranklist": ("loss", "accuracy", "kendall_tau", "lists", "tokens"),
    "bco": ("loss", "accuracy", "delta", "rewards/chosen", "rewards/rejected", "udm_weight", "rows"),
    "prm": ("loss", "step_accuracy", "error_f1", "steps", "tokens"),
}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ranklist", "bco", "prm"])
def test_each_method_under_two_processes_equals_one_process_with_the_same_global_batch(tmp_path: Path, method: str):
    """2 processes x 4 rows against 1 process x 8 rows (length grouping off, so both see the same rows
    per step): losses, metrics and the method's cross-process state (BCO's delta and UDM weights,
    PRM's labelled-token normaliser, ranklist's pair count) must agree, in one run directory."""
    common = [f"method={method}", *SMOKE, "train.log_every=1", "data.group_by_length=false", *DDP_EXTRA[method]]
    result = torchrun("train", *common, "train.per_device_batch_size=4", f"output_dir={tmp_path / 'ddp'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    single = cli("train", *common, "train.per_device_batch_size=8", f"output_dir={tmp_path / 'single'}", cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    assert run_dirs(tmp_path) == [tmp_path / "ddp", tmp_path / "single"]
    ddp, one = read_jsonl(tmp_path / "ddp" / "metrics.jsonl"), read_jsonl(tmp_path / "single" / "metrics.jsonl")
    assert [(r["step"], r["split"]) for r in ddp] == [(r["step"], r["split"]) for r in one]
    compared = 0
    for a, b in zip(ddp, one, strict=True):
        for key in DDP_KEYS[method]:
            if method == "bco" and key == "accuracy" and not _bco_signs_determined(a):
                continue
            if key in a or key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (a["step"], a["split"], key)
                compared += 1
    assert compared > 20
    assert json.loads((tmp_path / "ddp" / "summary.json").read_text())["processes"] == 2


@pytest.mark.slow
def test_train_starts_its_own_workers_through_accelerate_into_one_run(tmp_path: Path):
    """`hardware=ddp hardware.num_processes=2` on CPU: rewardctl launches 2 gloo workers itself; the
    result is the torchrun run's (same global batch), in one run directory named once."""
    common = [*SMOKE, "train.log_every=1", "data.group_by_length=false"]
    result = cli(
        "train",
        *common,
        "hardware=ddp",
        "hardware.device=cpu",
        "hardware.mixed_precision=no",
        "hardware.num_processes=2",
        f"hardware.main_process_port={free_port()}",
        cwd=tmp_path,
        env={"OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    [run_dir] = run_dirs(tmp_path)  # outputs/<date>/<time>: ${now:} resolved once, by the launcher
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["status"] == "completed" and summary["totals"]["pairs"] == 48
    reference = torchrun("train", *common, f"output_dir={tmp_path / 'torchrun'}", cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr[-3000:]
    ours, theirs = read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(tmp_path / "torchrun" / "metrics.jsonl")
    assert [(r["step"], r["split"], round(r["loss"], 5)) for r in ours] == [
        (r["step"], r["split"], round(r["loss"], 5)) for r in theirs
    ]


@pytest.mark.slow
def test_score_under_two_processes_writes_every_row_once_as_one_process_scores_it(tmp_path: Path):
    """torchrun: each process scores its share (an odd row count, so the shares differ in size) and
    the main process writes one file, every row once, in the input order, with one process's scores."""
    out = tmp_path / "run"
    assert cli("train", *SMOKE, "train.max_steps=2", f"output_dir={out}", cwd=tmp_path).returncode == 0
    rows = read_jsonl(SAMPLES / "pairwise" / "eval.jsonl")[:37]
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps({**r, "id": i}) + "\n" for i, r in enumerate(rows)), encoding="utf-8")
    one = cli("score", f"run_dir={out}", f"data={source}", f"output={tmp_path / 'one.jsonl'}", cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun("score", f"run_dir={out}", f"data={source}", f"output={tmp_path / 'two.jsonl'}", cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    alone, shared = read_jsonl(tmp_path / "one.jsonl"), read_jsonl(tmp_path / "two.jsonl")
    assert [r["id"] for r in shared] == list(range(37))
    for a, b in zip(alone, shared, strict=True):
        assert b["chosen_reward"] == pytest.approx(a["chosen_reward"], abs=1e-5)
        assert b["rejected_reward"] == pytest.approx(a["rejected_reward"], abs=1e-5)
