"""`rewardctl train hardware.num_processes=N ...`: start the workers through accelerate's launcher.

The launching process composes the config, decides the run directory once and starts
``accelerate launch -m rewardctl train <the same overrides> output_dir=<that directory>`` (through
``rewardctl.training.agent``, which ends a signalled launch quietly): every worker
composes the same config with the run directory fixed, so a multi-process run has one directory and
``${now:}`` cannot split it (facebookresearch/hydra#2070). Inside a worker (``WORLD_SIZE`` set by the
launcher, torchrun or a user's own ``accelerate launch``) nothing is launched again.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import psutil
import torch

from rewardctl.config.schema import Device, HardwareConfig, Strategy
from rewardctl.utils.environment import SELF_LAUNCHED_ENV

log = logging.getLogger(__name__)

# How long the launcher gives interrupted workers to finish their step and write a checkpoint
# before it kills them (torch elastic's default of 30 s is too short for a large model's optimizer state).
SHUTDOWN_TIMEOUT_S = "600"

# FSDP1 sharding names -> FSDP2's reshard-after-forward (FULL_SHARD frees parameters after forward).
RESHARD_AFTER_FORWARD = {"FULL_SHARD": "true", "HYBRID_SHARD": "true", "SHARD_GRAD_OP": "false", "NO_SHARD": "false"}


def inside_worker() -> bool:
    return "WORLD_SIZE" in os.environ or "LOCAL_RANK" in os.environ


def processes_per_machine(hardware: HardwareConfig) -> int:
    """``num_processes``, where 0 means one per visible GPU."""
    return hardware.num_processes or torch.cuda.device_count()


def wants_launch(hardware: HardwareConfig) -> bool:
    return not inside_worker() and processes_per_machine(hardware) * hardware.num_machines > 1


def launcher_arguments(hardware: HardwareConfig) -> tuple[list[str], dict[str, str]]:
    """Arguments of ``accelerate launch`` and the environment the workers need."""
    per_machine = processes_per_machine(hardware)
    on_cpu = hardware.device == Device.cpu or not torch.cuda.is_available()
    # One machine: a free port, so concurrent runs and parallel sweep jobs never collide.
    port = hardware.main_process_port if hardware.num_machines > 1 else free_port()
    args = [
        "--num_processes",
        str(per_machine * hardware.num_machines),
        "--num_machines",
        str(hardware.num_machines),
        "--machine_rank",
        str(hardware.machine_rank),
        "--main_process_port",
        str(port),
        "--mixed_precision",
        hardware.mixed_precision.value,
        "--dynamo_backend",
        "no",
    ]
    if hardware.main_process_ip:
        args += ["--main_process_ip", hardware.main_process_ip]
    env: dict[str, str] = {
        SELF_LAUNCHED_ENV: "1",
        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", SHUTDOWN_TIMEOUT_S),
    }
    if hardware.strategy == Strategy.fsdp:
        args += [
            "--use_fsdp",
            "--fsdp_version",
            "2",
            "--fsdp_auto_wrap_policy",
            "TRANSFORMER_BASED_WRAP",
            "--fsdp_reshard_after_forward",
            RESHARD_AFTER_FORWARD[hardware.fsdp_sharding_strategy],
            "--fsdp_offload_params",
            str(hardware.fsdp_cpu_offload).lower(),
        ]
    elif hardware.strategy == Strategy.deepspeed:
        args += [
            "--use_deepspeed",
            "--zero_stage",
            str(hardware.zero_stage),
            "--offload_optimizer_device",
            "cpu" if hardware.offload_optimizer else "none",
        ]
        if hardware.zero_stage == 3:  # the final model is gathered into one 16-bit state dict
            args += ["--zero3_save_16bit_model", "true"]
    else:
        args += ["--multi_gpu"]
        if on_cpu:  # several CPU processes over gloo (accelerate needs to be told)
            env["ACCELERATE_USE_CPU"] = "true"
            if "OMP_NUM_THREADS" not in os.environ:  # a user's own setting wins
                env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // per_machine))
    return args, env


def launch_workers(hardware: HardwareConfig, overrides: list[str], run_dir: Path) -> tuple[int, int | None]:
    """Run the workers to completion; returns their exit status and the signal this process passed
    on to them (None when none came)."""
    args, env = launcher_arguments(hardware)
    command = [
        sys.executable,
        "-m",
        "rewardctl.training.agent",
        *args,
        "-m",
        "rewardctl",
        "train",
        *[o for o in overrides if not o.startswith("output_dir=")],
        f"output_dir={run_dir}",
    ]
    log.info("starting %s processes through accelerate launch into %s", args[1], run_dir)
    # A session of its own: the terminal's Ctrl-C reaches this process only, which passes each signal
    # on exactly once (a copy from the terminal and one from us would read as a second signal). The
    # handlers are in place before the process exists, so no signal can orphan it.
    with ForwardedSignals() as forwarded:
        process = subprocess.Popen(command, env={**os.environ, **env}, start_new_session=True)
        try:
            forwarded.attach(process)
            status = process.wait()
        except BaseException:
            forwarded.kill_all()
            raise
    if forwarded.count > 1:  # the workers stopped at once, without a checkpoint
        from rewardctl.training.guards import ImmediateStop

        raise ImmediateStop(forwarded.signum)
    return status, (forwarded.signum if forwarded.count else None)


class ForwardedSignals:
    """While the workers run: SIGINT/SIGTERM/SIGHUP are passed on instead of ending this process.

    The first goes to the launcher (accelerate launch / torch elastic), which hands it to every worker:
    they finish the step, checkpoint and exit with 128 + signal (a hang-up, the terminal closing, is
    passed on as SIGTERM). The second goes to the launcher and every worker directly (the launcher
    alone would abandon them): they stop at once. A third kills them all (a worker stuck in a
    collective never runs its handler). Without this, Python's KeyboardInterrupt in ``subprocess.run``
    killed the launcher after 0.25 s and left the workers checkpointing on their own after the
    command had returned.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self, process: subprocess.Popen | None = None) -> None:
        self.process = process
        self.count = 0
        self.signum = signal.SIGINT.value
        self._pending = 0  # signals that came before the process existed
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> ForwardedSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._forward)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def attach(self, process: subprocess.Popen) -> None:
        """The process now exists: pass on what came before it did."""
        self.process = process
        pending, self._pending, self.count = self._pending, 0, 0
        for _ in range(pending):
            self._forward(self.signum, None)

    def _forward(self, signum: int, _frame: FrameType | None) -> None:
        passed = signal.SIGTERM.value if signum == signal.SIGHUP else int(signum)
        if self.process is None:
            self._pending += 1
            self.signum = passed
            return
        self.count += 1
        self.signum = passed
        if self.count == 1:
            if self.process.poll() is None:  # send_signal would not touch a reaped (maybe reused) pid
                self.process.send_signal(passed)
        elif self.count == 2:
            self._signal_all(passed)
        else:
            self._signal_all(signal.SIGKILL.value)

    def kill_all(self) -> None:
        if self.process is not None:
            self._signal_all(signal.SIGKILL.value)

    def _signal_all(self, signum: int) -> None:
        """The launcher and every process under it (they live in the launcher's session)."""
        try:
            processes = [psutil.Process(self.process.pid)]
            processes += processes[0].children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for process in processes:
            try:
                process.send_signal(signum)  # psutil checks the pid still names that process
            except psutil.NoSuchProcess:
                pass


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
