"""Stopping early, safely, in real runs: skipped non-finite updates, diverged runs, SIGTERM/SIGINT and
their resume, signals passed to launcher and workers (the rules alone are in
tests/unit/test_fault_tolerance.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rewardctl.methods.pairwise import PairwiseMethod
from rewardctl.training import guards
from rewardctl.training.loop import TrainingLoop

from ..conftest import cli as run_cli
from ..conftest import read_jsonl, reset_accelerate, run_training

TIMING_KEYS = {"train_seconds", "eval_seconds", "pairs_per_sec", "tokens_per_sec"}


def comparable(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def checkpoint_weights(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_file(str(p / "model.safetensors")) for p in sorted((run_dir / "checkpoints").glob("step-*"))}


# ---- non-finite updates, in-process ---------------------------------------------------------------
@pytest.fixture
def nan_at_steps(monkeypatch):
    """Make the loss (and so every gradient) NaN in the optimizer steps listed in the returned set."""
    steps: set[int] = set()
    current = {"step": 0}
    optimizer_step, train_step = TrainingLoop._optimizer_step, PairwiseMethod.train_step

    def counting(self, stream):
        current["step"] = self.step + 1
        return optimizer_step(self, stream)

    def poisoned(self, model, batch):
        out = train_step(self, model, batch)
        return dataclasses.replace(out, loss_sum=out.loss_sum * float("nan")) if current["step"] in steps else out

    monkeypatch.setattr(TrainingLoop, "_optimizer_step", counting)
    monkeypatch.setattr(PairwiseMethod, "train_step", poisoned)
    return steps


@pytest.fixture
def loss_times(monkeypatch):
    """Multiply the logged loss metric (not the gradients) by ``factor[step]`` from the given steps on."""
    factor: dict[int, float] = {}
    current = {"step": 0}
    optimizer_step, train_step = TrainingLoop._optimizer_step, PairwiseMethod.train_step

    def counting(self, stream):
        current["step"] = self.step + 1
        return optimizer_step(self, stream)

    def inflated(self, model, batch):
        out = train_step(self, model, batch)
        times = factor.get(current["step"], 1.0)
        loss = dataclasses.replace(out.metrics["loss"], value=out.metrics["loss"].value * times)
        return dataclasses.replace(out, metrics={**out.metrics, "loss": loss})

    monkeypatch.setattr(TrainingLoop, "_optimizer_step", counting)
    monkeypatch.setattr(PairwiseMethod, "train_step", inflated)
    return factor


SHORT = ["experiment=smoke", "train.max_steps=8", "train.log_every=2", "train.eval_every=4", "train.save_every=4"]


def test_a_non_finite_update_is_skipped_logged_and_resumes_exactly(tmp_path: Path, nan_at_steps):
    nan_at_steps.add(5)
    full, full_dir = run_training(tmp_path, SHORT, name="full")
    assert full["status"] == "completed" and full["skipped_steps"] == 1 and full["step"] == 8
    train = [r for r in read_jsonl(full_dir / "metrics.jsonl") if r["split"] == "train"]
    assert [r["skipped_steps"] for r in train] == [0, 0, 1, 1]
    assert all(v is not None for r in train for v in r.values())  # nothing non-finite reached metrics.jsonl
    assert train[2]["pairs"] == train[1]["pairs"] + 4  # step 5's rows were skipped with its update
    # Stopped right after the bad step: its checkpoint is withheld, the rerun continues from step 4.
    part, part_dir = run_training(tmp_path, [*SHORT, "train.stop_after_steps=5"], name="part")
    assert part["status"] == "stopped" and sorted(checkpoint_weights(part_dir)) == ["step-4"]
    resumed, _ = run_training(tmp_path, [*SHORT, "train.stop_after_steps=5"], name="part")
    assert resumed["status"] == "completed" and resumed["skipped_steps"] == 1
    assert comparable(read_jsonl(part_dir / "metrics.jsonl")) == comparable(read_jsonl(full_dir / "metrics.jsonl"))
    assert resumed["final_eval"]["loss"] == full["final_eval"]["loss"]
    a, b = load_file(str(full_dir / "model/model.safetensors")), load_file(str(part_dir / "model/model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_updates_in_a_row_end_the_run_as_diverged_keeping_finite_checkpoints(tmp_path: Path, nan_at_steps):
    nan_at_steps.update({3, 4, 5})
    summary, run_dir = run_training(tmp_path, [*SHORT, "train.save_every=1", "train.keep_checkpoints=2"])
    assert summary["status"] == "diverged" and summary["step"] == 5 and summary["skipped_steps"] == 3
    assert summary["message"].startswith("diverged at step 5: 3 updates in a row had a non-finite loss")
    assert summary["model_dir"] is None and not (run_dir / "model").exists()
    assert sorted(checkpoint_weights(run_dir)) == ["step-1", "step-2"]  # nothing written after a bad update
    assert summary["checkpoint"].endswith("step-2")
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "diverged"


def test_a_logged_loss_far_above_the_recent_median_ends_the_run_as_diverged(tmp_path: Path, loss_times):
    loss_times.update({13: 1e4, 14: 1e4})
    summary, run_dir = run_training(
        tmp_path,
        ["experiment=smoke", "train.max_steps=16", "train.log_every=1", "train.eval_every=0", "train.save_every=4"],
    )
    assert summary["status"] == "diverged" and summary["step"] == 13 and summary["skipped_steps"] == 0
    assert "over 100x the median" in summary["message"] and not (run_dir / "model").exists()
    assert sorted(checkpoint_weights(run_dir)) == ["step-12", "step-8"] and summary["checkpoint"].endswith("step-12")


def test_a_run_that_fails_with_an_error_keeps_its_curves_up_to_the_failure(tmp_path: Path, monkeypatch):
    # Evals redraw curves.png at most once a minute (train.curves_every_s): a short run draws at its end,
    # and one that ends in an error draws on the way out, then the error propagates unchanged.
    train_step, calls = PairwiseMethod.train_step, {"n": 0}

    def failing(self, model, batch):
        calls["n"] += 1
        if calls["n"] == 6:
            raise RuntimeError("injected fault in micro-batch 6")
        return train_step(self, model, batch)

    monkeypatch.setattr(PairwiseMethod, "train_step", failing)
    with pytest.raises(RuntimeError, match="injected fault in micro-batch 6"):
        run_training(tmp_path, SHORT)
    reset_accelerate()
    [run_dir] = [p for p in tmp_path.iterdir() if p.is_dir()]
    evals = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if r["split"] == "eval"]
    assert evals == [0, 4] and (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (run_dir / "summary.json").exists()


# ---- the real command ----------------------------------------------------------------------------
def test_a_huge_learning_rate_ends_as_diverged_with_exit_3_and_finite_checkpoints(tmp_path: Path):
    out = tmp_path / "run"
    result = run_cli(
        "train",
        "train.lr=1e8",
        "train.save_every=1",
        "train.keep_checkpoints=1",
        "train.progress_bar=false",
        "train.eval_at_start=false",
        f"output_dir={out}",
        cwd=tmp_path,
    )
    assert result.returncode == 3, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("rewardctl: error:")]
    assert len(errors) == 1 and "diverged at step" in errors[0] and "train.lr" in errors[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged" and not (out / "model").exists()
    weights = checkpoint_weights(out)
    assert weights and all(torch.isfinite(t).all() for w in weights.values() for t in w.values())
    assert summary["checkpoint"] == str(out / "checkpoints" / next(iter(weights)))


def test_a_learning_rate_blow_up_ends_as_diverged(tmp_path: Path):
    """lr=1e3 on the tiny default: the logged loss is already ~1e4 at the first log (step 10), so the
    median rule has nothing sane to compare with; the gradients overflow during warm-up and three
    non-finite updates in a row stop it (measured: steps 24-26)."""
    out = tmp_path / "run"
    result = run_cli(
        "train", "train.lr=1e3", "train.progress_bar=false", "data.max_eval_rows=100", f"output_dir={out}", cwd=tmp_path
    )
    assert result.returncode == 3, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged" and not (out / "model").exists() and summary["skipped_steps"] == 3
    assert "3 updates in a row had a non-finite" in summary["message"] and summary["step"] < 100


def start(args: list[str], cwd: Path) -> tuple[subprocess.Popen, Path]:
    """`python -m rewardctl train ...` in the background; stderr goes to a file read afterwards."""
    err = cwd / f"stderr-{time.monotonic_ns()}.txt"
    proc = subprocess.Popen(
        [sys.executable, "-m", "rewardctl", "train", *args], cwd=cwd, stdout=subprocess.DEVNULL, stderr=err.open("w")
    )
    return proc, err


def wait_for_training(proc: subprocess.Popen, run_dir: Path, timeout: float = 120.0) -> None:
    """Until metrics.jsonl holds a train record: the loop (and its signal handlers) is running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it was signalled"
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and '"split": "train"' in metrics.read_text():
            return
        time.sleep(0.05)
    raise AssertionError("no train record appeared")


def resume_args(stderr: str) -> list[str]:
    [line] = [line for line in stderr.splitlines() if "resume with: " in line]
    command = shlex.split(line.split("resume with: ", 1)[1])
    assert command[:2] == ["rewardctl", "train"]
    return command[2:]


INTERRUPTIBLE = ["train.max_steps=400", "train.save_every=0", "train.progress_bar=false", "data.max_eval_rows=100"]


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_after_the_step_with_a_checkpoint_and_the_resume_command(tmp_path: Path, signum, status):
    out = tmp_path / "run"
    proc, err = start([*INTERRUPTIBLE, f"output_dir={out}"], tmp_path)
    wait_for_training(proc, out)
    proc.send_signal(signum)
    assert proc.wait(timeout=120) == status
    stderr = err.read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["signal"] == signal.Signals(signum).name
    assert 10 <= summary["step"] < 400 and not (out / "model").exists()
    assert summary["checkpoint"] == str(out / "checkpoints" / f"step-{summary['step']}")
    assert (out / "checkpoints" / f"step-{summary['step']}" / "model.safetensors").is_file()
    assert resume_args(stderr) == [*INTERRUPTIBLE, f"output_dir={out}"]
    assert "Traceback" not in stderr


@pytest.mark.slow
def test_an_interrupted_run_resumed_by_its_command_matches_an_uninterrupted_one(tmp_path: Path):
    args = [
        "train.max_steps=100",
        "train.eval_every=50",
        "train.save_every=0",
        "train.progress_bar=false",
        "data.max_eval_rows=100",
        "train.log_every=5",
    ]
    proc, err = start([*args, f"output_dir={tmp_path / 'part'}"], tmp_path)
    wait_for_training(proc, tmp_path / "part")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    resumed = run_cli("train", *resume_args(err.read_text()), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    full = run_cli("train", *args, f"output_dir={tmp_path / 'full'}", cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]
    part_summary = json.loads((tmp_path / "part" / "summary.json").read_text())
    full_summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert part_summary["status"] == "completed" and part_summary["final_eval"] == {
        **full_summary["final_eval"],
        "eval_seconds": part_summary["final_eval"]["eval_seconds"],
    }
    assert comparable(read_jsonl(tmp_path / "part" / "metrics.jsonl")) == comparable(
        read_jsonl(tmp_path / "full" / "metrics.jsonl")
    )


def test_a_second_signal_stops_the_command_at_once(tmp_path: Path):
    """Slow steps (3,072 pairs each, about 3 s on a quiet machine: with 512 a quiet machine finished
    the step, saved and exited within the 0.7 s between the signals), so the second signal lands while
    the first is still being honoured. The first signal comes 0.3 s after step 1's record, i.e. inside
    step 2: sent the moment the record appeared, it could land before step 1's own stop check (a few
    lines after the record is written), and then the run checkpointed step 1 and was exiting, its
    handlers gone, when the second signal came (exit status -15, seen once in `make test`)."""
    out = tmp_path / "run"
    proc, err = start(
        [
            "train.max_steps=50",
            "train.save_every=0",
            "train.progress_bar=false",
            "train.log_every=1",
            "train.eval_at_start=false",
            "train.per_device_batch_size=64",
            "train.grad_accum=48",
            f"output_dir={out}",
        ],
        tmp_path,
    )
    wait_for_training(proc, out)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    time.sleep(guards.DUPLICATE_WINDOW_S + 0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    assert err.read_text().splitlines()[-1] == "rewardctl: SIGTERM: stopped at once, without a checkpoint"
    assert not (out / "checkpoints").exists()


def worker_pid(launcher: int, rank: int, timeout: float = 60.0) -> int:
    """The pid of torchrun's worker with RANK=``rank`` (a child of the launcher)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
        for pid in children:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if f"RANK={rank}".encode() in environ:
                return int(pid)
        time.sleep(0.1)
    raise AssertionError(f"no worker with RANK={rank}")


@pytest.mark.slow
def test_a_signal_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path: Path):
    """Only rank 1 is signalled: the per-step agreement stops rank 0 at the same step, both write
    their part of one checkpoint, nothing hangs, and the same launch command continues the run."""
    from rewardctl.training.launch import free_port

    out = tmp_path / "ddp"
    args = [
        "train.max_steps=40",
        "train.save_every=0",
        "train.progress_bar=false",
        "data.max_eval_rows=64",
        "train.per_device_batch_size=8",
        f"output_dir={out}",
    ]

    def torchrun() -> tuple[subprocess.Popen, Path]:
        err = tmp_path / f"stderr-{time.monotonic_ns()}.txt"
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(free_port()),
            "-m",
            "rewardctl",
            "train",
            *args,
        ]
        return subprocess.Popen(
            command,
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=err.open("w"),
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        ), err

    proc, err = torchrun()
    wait_for_training(proc, out, timeout=300)
    os.kill(worker_pid(proc.pid, rank=1), signal.SIGTERM)
    assert proc.wait(timeout=300) != 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["signal"] == "SIGTERM" and summary["processes"] == 2
    checkpoint = Path(summary["checkpoint"])
    assert checkpoint.name == f"step-{summary['step']}" and summary["step"] < 40
    assert {p.name for p in checkpoint.glob("process_state_*.json")} == {"process_state_0.json", "process_state_1.json"}
    assert "resume with: the same launcher with rewardctl train" in err.read_text()
    proc, err = torchrun()
    assert proc.wait(timeout=600) == 0, err.read_text()[-3000:]
    resumed = json.loads((out / "summary.json").read_text())
    assert resumed["status"] == "completed" and resumed["step"] == 40 and resumed["processes"] == 2


@pytest.mark.slow
def test_a_frozen_process_ends_the_other_after_the_collective_timeout_naming_the_checkpoint(tmp_path: Path):
    """Rank 1 frozen (SIGSTOP) mid-run: rank 0 waits in its next collective only for
    hardware.collective_timeout_s, then ends with one line that says where it waited and which intact
    checkpoint the same command resumes from (not a hang until the job's wall-clock limit)."""
    from rewardctl.training.launch import free_port

    out, err = tmp_path / "ddp", tmp_path / "stderr.txt"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    command += ["--master-port", str(free_port()), "-m", "rewardctl", "train", "train.max_steps=400"]
    command += ["train.save_every=2", "train.progress_bar=false", "data.max_eval_rows=64"]
    command += ["hardware.collective_timeout_s=10", f"output_dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err.open("w"), env=env)
    try:
        deadline = time.monotonic() + 300
        while not list((out / "checkpoints").glob("step-*")):
            assert proc.poll() is None and time.monotonic() < deadline, err.read_text()[-3000:]
            time.sleep(0.05)
        frozen = worker_pid(proc.pid, rank=1)
        os.kill(frozen, signal.SIGSTOP)
        deadline = time.monotonic() + 120
        while "rewardctl: error: process 0 of 2" not in err.read_text():
            assert time.monotonic() < deadline, "rank 0 did not give up on the frozen process"
            time.sleep(0.1)
        os.kill(frozen, signal.SIGCONT)  # torchrun's SIGTERM to it is pending: let it end
        assert proc.wait(timeout=120) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
    [line] = [line for line in err.read_text().splitlines() if line.startswith("rewardctl: error: process 0 of 2")]
    latest = max((out / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    assert "a collective with the other processes failed (waiting in rewardctl/" in line
    assert "Timed out waiting" in line and "hardware.collective_timeout_s=10" in line
    assert line.endswith(f"rerun the same command to resume from {latest}")
    assert not (out / "model").exists()


RECORDER = """
import os, signal, subprocess, sys, time
log = sys.argv[1]
def record(signum, frame):
    with open(log, "a") as f:
        f.write(f"{os.getpid()} {signal.Signals(signum).name}\\n")
signal.signal(signal.SIGINT, record)
signal.signal(signal.SIGTERM, record)
if len(sys.argv) > 2:  # the launcher: one worker below it, in a session of its own like torch elastic's
    subprocess.Popen([sys.executable, "-c", sys.argv[2], log], start_new_session=True)
print("ready", flush=True)
time.sleep(30)
"""


def test_the_first_signal_goes_to_the_launcher_only_and_a_second_to_every_worker(tmp_path: Path):
    """What a self-launched run does with Ctrl-C: the launcher alone passes the first signal on (so every
    worker gets it exactly once and checkpoints); a second reaches the workers directly (the launcher
    would abandon them) so they stop at once."""
    from rewardctl.training.launch import ForwardedSignals

    log = tmp_path / "signals.txt"
    launcher = subprocess.Popen([sys.executable, "-c", RECORDER, str(log), RECORDER], stdout=subprocess.PIPE, text=True)
    try:
        assert launcher.stdout.readline() == "ready\n"
        deadline = time.monotonic() + 30
        while not (
            worker := [p for p in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()]
        ):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)  # the worker's handlers are installed
        forwarded = ForwardedSignals(launcher)
        forwarded._forward(signal.SIGINT, None)
        time.sleep(0.5)
        assert log.read_text().splitlines() == [f"{launcher.pid} SIGINT"]
        forwarded._forward(signal.SIGINT, None)
        time.sleep(0.5)
        assert sorted(log.read_text().splitlines()) == sorted(
            [f"{launcher.pid} SIGINT", f"{launcher.pid} SIGINT", f"{worker[0]} SIGINT"]
        )
        assert forwarded.count == 2 and forwarded.signum == signal.SIGINT
    finally:
        for pid in [*Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split(), launcher.pid]:
            os.kill(int(pid), signal.SIGKILL)
        launcher.wait()


def test_a_signal_before_the_launcher_exists_is_passed_on_once_and_a_third_kills_everything(tmp_path: Path):
    from rewardctl.training.launch import ForwardedSignals

    log = tmp_path / "signals.txt"
    forwarded = ForwardedSignals()
    forwarded._forward(signal.SIGHUP, None)  # the terminal closed while Popen was starting the launcher
    launcher = subprocess.Popen([sys.executable, "-c", RECORDER, str(log), RECORDER], stdout=subprocess.PIPE, text=True)
    try:
        assert launcher.stdout.readline() == "ready\n"
        deadline = time.monotonic() + 30
        while not Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        [worker] = [int(p) for p in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()]
        time.sleep(0.5)
        forwarded.attach(launcher)
        time.sleep(0.5)
        assert log.read_text().splitlines() == [f"{launcher.pid} SIGTERM"]  # a hang-up is passed on as SIGTERM
        forwarded._forward(signal.SIGINT, None)
        forwarded._forward(signal.SIGINT, None)  # the third: SIGKILL to the launcher and every worker
        assert launcher.wait(timeout=10) == -signal.SIGKILL
        deadline = time.monotonic() + 10
        while Path(f"/proc/{worker}").exists() and "Z" not in Path(f"/proc/{worker}/stat").read_text().split()[2]:
            assert time.monotonic() < deadline, "the worker outlived a third signal"
            time.sleep(0.05)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()


@pytest.mark.slow
def test_ctrl_c_on_a_self_launched_two_process_run_checkpoints_and_prints_one_resume_command(tmp_path: Path):
    """`rewardctl train hardware.num_processes=2` and Ctrl-C (SIGINT to the terminal's whole process
    group): both workers finish the same step and write one checkpoint, the command exits 130 after
    them with one resume line: the user's own command, not the workers'."""
    out = tmp_path / "ddp"
    args = [
        "hardware.num_processes=2",
        "train.max_steps=400",
        "train.save_every=0",
        "train.progress_bar=false",
        "data.max_eval_rows=64",
        "train.per_device_batch_size=8",
        f"output_dir={out}",
    ]
    err = tmp_path / "stderr.txt"
    proc = subprocess.Popen(
        [sys.executable, "-m", "rewardctl", "train", *args],
        cwd=tmp_path,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=err.open("w"),
    )
    try:
        wait_for_training(proc, out, timeout=300)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=300) == 130
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    stderr = err.read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["signal"] == "SIGINT" and summary["processes"] == 2
    checkpoint = Path(summary["checkpoint"])
    assert checkpoint.name == f"step-{summary['step']}" and summary["step"] < 400
    assert {p.name for p in checkpoint.glob("process_state_*.json")} == {"process_state_0.json", "process_state_1.json"}
    assert len([line for line in stderr.splitlines() if "resume with: " in line]) == 1, stderr[-3000:]
    assert resume_args(stderr) == args
    assert "Traceback" not in stderr
