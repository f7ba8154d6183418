"""Stopping early, safely, by the rules alone (no training): the divergence guard, signal handling in
this process, the printed resume command, unsafe settings refused, and what the loop's update does with
a non-finite step. The runs, the real command and the signals to other processes are in
tests/e2e/test_fault_tolerance_runs.py."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from rewardctl import cli
from rewardctl.errors import ConfigError
from rewardctl.methods.registry import to_run_config
from rewardctl.training import guards
from rewardctl.training.guards import MEDIAN_WARMUP, DivergenceGuard, ImmediateStop, SignalStop
from rewardctl.training.loop import TrainingLoop

from ..conftest import compose_train


def test_bad_updates_stop_the_run_only_in_a_row():
    nan = float("nan")
    guard = DivergenceGuard(max_bad_steps=3, factor=100.0)
    assert [guard.after_update(step, nan, True, True) for step in (1, 2)] == [None, None]
    assert guard.after_update(3, 0.7, False, False) is None and guard.bad_streak == 0  # a good update resets the streak
    assert (
        guard.after_update(4, 0.6, True, False) is None and guard.bad_streak == 0
    )  # fp16 scaler overflow: skipped only
    reasons = [guard.after_update(step, nan, True, True) for step in (5, 6, 7)]
    assert reasons[:2] == [None, None] and "3 updates in a row" in reasons[2]
    assert guard.skipped_steps == 6
    message = guard.message(7, reasons[2])
    assert "\n" not in message and message.startswith("diverged at step 7: 3 updates in a row had a non-finite loss")
    assert "(last finite loss 0.6 at step 4)" in message and "train.lr" in message and "bf16" in message
    assert DivergenceGuard(max_bad_steps=0, factor=100.0).after_update(1, nan, True, True) is None  # 0: never stops


def test_the_median_rule_waits_for_its_warmup_and_compares_with_recent_losses():
    guard = DivergenceGuard(max_bad_steps=3, factor=100.0)
    assert guard.after_log(1e6) is None  # a blow-up before the warm-up is not judged
    guard = DivergenceGuard(max_bad_steps=3, factor=100.0)
    for i in range(MEDIAN_WARMUP):
        assert guard.after_log(0.5 + 0.01 * i) is None
    assert guard.after_log(40.0) is None  # 80x the median: noisy, not diverged
    reason = guard.after_log(60.0)
    assert reason == "train loss 60 is over 100x the median 0.55 of the last 11 logged losses"
    assert guard.recent[-1] == 40.0  # the exploded loss does not move the median
    assert DivergenceGuard(max_bad_steps=3, factor=0.0).after_log(1e9) is None  # 0: the rule is off
    restored = DivergenceGuard(max_bad_steps=3, factor=100.0)
    restored.load_state_dict(json.loads(json.dumps(guard.state_dict())))  # as trainer_state.json holds it
    assert restored == guard


def test_a_first_signal_asks_a_second_stops_at_once_and_handlers_come_back(monkeypatch):
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with SignalStop() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert stop.requested and stop.name == "SIGTERM"
        os.kill(os.getpid(), signal.SIGINT)  # the launcher's forwarded copy: the same request
        time.sleep(0.01)
        monkeypatch.setattr(guards, "DUPLICATE_WINDOW_S", 0.0)
        with pytest.raises(ImmediateStop) as info:  # noqa: PT012 - the signal arrives during the sleep
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
        assert info.value.signum == signal.SIGINT and isinstance(info.value, KeyboardInterrupt)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_the_resume_command_keeps_the_arguments_and_fixes_the_run_directory():
    assert (
        cli.resume_command(["train.max_steps=400"], "/runs/a", sweep=False)
        == "rewardctl train train.max_steps=400 output_dir=/runs/a"
    )
    assert (
        cli.resume_command(["output_dir=runs/a", "data.train=my file.jsonl"], "/abs/runs/a", sweep=False)
        == "rewardctl train output_dir=runs/a 'data.train=my file.jsonl'"
    )
    assert (
        cli.resume_command(["output_dir=out/${now:%H}", "train.resume=off"], "/abs/out/12", sweep=False)
        == "rewardctl train train.resume=auto output_dir=/abs/out/12"
    )
    assert (
        cli.resume_command(["-m", "train.lr=1e-3,2e-3"], "/sweep/1", sweep=True)
        == "rewardctl train -m train.lr=1e-3,2e-3 output_dir=/sweep"
    )


def test_a_second_signal_ends_the_command_with_one_line(monkeypatch, capsys):
    def stopped_at_once() -> None:
        raise ImmediateStop(signal.SIGTERM)

    monkeypatch.setitem(cli.COMMANDS, "train", stopped_at_once)
    assert cli.main(["train"]) == 143
    assert capsys.readouterr().err == "rewardctl: SIGTERM: stopped at once, without a checkpoint\n"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.dtype=float16", "model.dtype: float16 weights need a GPU"),
        ("train.max_bad_steps=-1", "train.max_bad_steps: must be >= 0"),
        ("train.divergence_factor=0.5", "train.divergence_factor: must be 0 (off) or > 1"),
    ],
)
def test_unsafe_settings_are_refused_before_anything_loads(override: str, message: str):
    with pytest.raises(ConfigError) as info:
        to_run_config(compose_train(["hardware.device=cpu", override]))
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


class Counting:
    """An optimizer / scheduler stand-in that counts its calls."""

    def __init__(self) -> None:
        self.steps = self.zeroed = 0

    def step(self) -> None:
        self.steps += 1

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.zeroed += 1


def bare_loop(*, scaler: bool, overflow: bool) -> TrainingLoop:
    """Just what ``TrainingLoop._update`` reads: an accelerator (with or without an fp16 loss scaler
    that reports an overflow), an optimizer, a scheduler and the guard."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    loop = TrainingLoop.__new__(TrainingLoop)
    loop.accelerator = SimpleNamespace(
        scaler=object() if scaler else None,
        distributed_type=DistributedType.NO,
        mixed_precision="fp16" if scaler else "no",
        optimizer_step_was_skipped=overflow,
    )
    loop.optimizer, loop.scheduler = Counting(), Counting()
    loop.guard, loop._diverged, loop.step = DivergenceGuard(3, 100.0), None, 0
    return loop


def test_without_a_loss_scaler_a_non_finite_update_never_reaches_the_optimizer():
    from rewardctl.training.loop import StepHealth

    loop = bare_loop(scaler=False, overflow=False)
    assert loop._update(StepHealth(grad_bad=True, loss=0.7, signum=0)) == (True, True)
    assert (loop.optimizer.steps, loop.scheduler.steps, loop.optimizer.zeroed) == (0, 0, 1)
    assert loop._update(StepHealth(grad_bad=False, loss=0.7, signum=0)) == (False, False)
    assert (loop.optimizer.steps, loop.scheduler.steps) == (1, 1)


def test_under_fp16_the_loss_scaler_sees_every_step_and_its_overflows_are_not_bad():
    """The GradScaler must step (and update its scale) after every unscale, or the next step fails;
    it skips an overflowing update itself. Only a non-finite loss counts towards max_bad_steps."""
    from rewardctl.training.loop import StepHealth

    loop = bare_loop(scaler=True, overflow=True)
    for _ in range(5):  # a scale still calibrating: many overflows in a row, never diverged
        assert loop._update(StepHealth(grad_bad=True, loss=0.7, signum=0)) == (False, True)
    assert (loop.optimizer.steps, loop.scheduler.steps) == (5, 0) and loop._diverged is None
    assert loop.guard.skipped_steps == 5 and loop.guard.bad_streak == 0
    for _ in range(3):
        loop._update(StepHealth(grad_bad=True, loss=float("nan"), signum=0))
    assert loop._diverged == "3 updates in a row had a non-finite loss or gradient norm"


# ---- a collective that failed because another process died or hangs -------------------------------
GLOO_TIMEOUT = "[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 10000ms for recv"


class _StuckAccelerator:
    """What a collective does when the other process never comes: gloo's timeout error."""

    device, num_processes, process_index, is_main_process = "cpu", 2, 1, False

    def __init__(self, error: Exception) -> None:
        self.error = error

    def reduce(self, tensor, reduction):
        raise self.error


def _reduce_line() -> int:
    import inspect

    from rewardctl.training.runtime import AccelerateRuntime

    lines, first = inspect.getsourcelines(AccelerateRuntime.all_reduce_sum)
    return first + next(i for i, line in enumerate(lines) if "accelerator.reduce(" in line)


def _fail_in_a_collective(error: Exception, *, processes: int = 2, checkpoint=None):
    import torch

    from rewardctl.training.peers import peer_failures_reported
    from rewardctl.training.runtime import AccelerateRuntime

    with peer_failures_reported(rank=1, processes=processes, timeout_s=600, resume_point=lambda: checkpoint):
        AccelerateRuntime(_StuckAccelerator(error)).all_reduce_sum(torch.ones(1))


def test_a_peer_failure_becomes_one_line_naming_the_process_the_waiting_point_and_the_checkpoint(tmp_path):
    from rewardctl.training.peers import PeerFailure

    checkpoint = tmp_path / "checkpoints" / "step-6"
    with pytest.raises(PeerFailure) as info:
        _fail_in_a_collective(RuntimeError(GLOO_TIMEOUT), checkpoint=checkpoint)
    assert str(info.value) == (
        "process 1 of 2: a collective with the other processes failed (waiting in "
        f"rewardctl/training/runtime.py:{_reduce_line()} all_reduce_sum): Timed out waiting 10000ms for recv. "
        "Another process died or stopped answering (see its output; a hang is cut after "
        f"hardware.collective_timeout_s=600); rerun the same command to resume from {checkpoint}"
    )
    assert isinstance(info.value, cli.RewardctlError)  # so the CLI prints it as one line, exit status 2
    with pytest.raises(PeerFailure, match="no checkpoint was written yet: rerun the same command to start again$"):
        _fail_in_a_collective(RuntimeError(GLOO_TIMEOUT))


def test_only_backend_failures_of_several_processes_are_peer_failures():
    import torch.distributed as dist

    from rewardctl.training.peers import PeerFailure

    with pytest.raises(PeerFailure, match=r"failed \(waiting in .*\): NCCL watchdog timeout\. Another"):
        _fail_in_a_collective(dist.DistBackendError("NCCL watchdog timeout\nmore detail"))
    bug = RuntimeError("shape mismatch")
    with pytest.raises(RuntimeError) as info:
        _fail_in_a_collective(bug)
    assert info.value is bug
    alone = RuntimeError(GLOO_TIMEOUT)
    with pytest.raises(RuntimeError) as info:
        _fail_in_a_collective(alone, processes=1)
    assert info.value is alone


def test_the_collective_timeout_reaches_the_process_group_and_is_checked():
    from datetime import timedelta

    from rewardctl.training.runtime import build_accelerator

    run = to_run_config(compose_train(["hardware.collective_timeout_s=42"]))
    accelerator = build_accelerator(run.hardware, report_to=[])
    assert accelerator.init_handler.to_kwargs() == {"timeout": timedelta(seconds=42)}
    with pytest.raises(ConfigError, match=r"^hardware.collective_timeout_s: must be >= 1 second \(got 0\)$"):
        to_run_config(compose_train(["hardware.collective_timeout_s=0"]))


def test_a_process_group_is_torn_down_before_the_interpreter_finalises(tmp_path, monkeypatch):
    """Several processes: build_accelerator registers one exit handler (however many accelerators a
    process builds). The handler destroys a live gloo group (its threads would otherwise free tensors
    during finalisation and abort), leaves an NCCL group alone (its teardown waits for pending
    collectives: a hang after a peer's failure), is a no-op without a group, and never raises."""
    import atexit

    import torch.distributed as dist

    from rewardctl.training import runtime

    class SeveralProcesses:  # what build_accelerator reads of an Accelerator under torchrun
        def __init__(self, **_: object) -> None:
            self.num_processes, self.state = 2, object()

    registered: list[object] = []
    with monkeypatch.context() as patch:
        patch.setattr(runtime, "Accelerator", SeveralProcesses)
        patch.setattr(atexit, "register", registered.append)
        patch.setattr(atexit, "unregister", lambda f: registered.remove(f) if f in registered else None)
        hardware = to_run_config(compose_train([])).hardware
        runtime.build_accelerator(hardware, report_to=[])
        runtime.build_accelerator(hardware, report_to=[])
    assert registered == [runtime.destroy_process_group_at_exit]

    try:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        with monkeypatch.context() as patch:
            patch.setattr(dist, "get_backend", lambda *_: "nccl")
            runtime.destroy_process_group_at_exit()
        assert dist.is_initialized()  # NCCL: left to the process's end
        runtime.destroy_process_group_at_exit()
        assert not dist.is_initialized()
        runtime.destroy_process_group_at_exit()  # nothing left: a no-op, as after end_training

        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'again'}", rank=0, world_size=1)
        with monkeypatch.context() as patch:
            patch.setattr(dist, "destroy_process_group", lambda: (_ for _ in ()).throw(RuntimeError("peer gone")))
            runtime.destroy_process_group_at_exit()  # swallowed: the exit goes on
        assert dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
