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
    args = ["--num_processes", str(per_machine * hardware.num_machines), "--num_machines", str(hardware.num_machines),
            "--machine_rank", str(hardware.machine_rank), "--main_process_port", str(port),
            "--mixed_precision", hardware.mixed_precision.value, "--dynamo_backend", "no"]
    if hardware.main_process_ip:
        args += ["--main_process_ip", hardware.main_process_ip]
    env: dict[str, str] = {SELF_LAUNCHED_ENV: "1",
                           "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT",
                                                                            SHUTDOWN_TIMEOUT_S)}
    if hardware.strategy == Strategy.fsdp:
        args += ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
                 "--fsdp_reshard_after_forward", RESHARD_AFTER_FORWARD[hardware.fsdp_sharding_strategy],
                 "--fsdp_offload_params", str(hardware.fsdp_cpu_offload).lower()]
    elif hardware.strategy == Strategy.deepspeed:
        args += ["--use_deepspeed", "--zero_stage", str(hardware.zero_stage),
                 "--offload_optimizer_device", "cpu" if hardware.offload_optimizer else "none"]
        if hardware.zero_stage == 3:  # the final model is gathered into one 16-bit state dict
            args += ["--zero3_save_16bit_model", "true"]
    else:
        args += ["--multi_gpu"]
        if on_cpu:  # several CPU processes over gloo (accelerate needs to be told)
            env["ACCELERATE_USE_CPU"] = "true"
            if "OMP_NUM_THREADS" not in os.environ:  # a user's own setting wins
                env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // per_machine))
    return args, env


def launch_workers(hardware: HardwareConfig, overrides: list[str], run_dir: Path) -> int:
    """Run the workers to completion; returns their exit status."""
    args, env = launcher_arguments(hardware)
    command = [sys.executable, "-m", "rewardctl.training.agent", *args, "-m", "rewardctl", "train",
               *[o for o in overrides if not o.startswith("output_dir=")], f"output_dir={run_dir}"]
    log.info("starting %s processes through accelerate launch into %s", args[1], run_dir)
    # A session of its own: the terminal's Ctrl-C reaches this process only, which passes each signal
    # on exactly once (a copy from the terminal and one from us would read as a second signal).
    process = subprocess.Popen(command, env={**os.environ, **env}, start_new_session=True)
    with ForwardedSignals(process) as forwarded:
        status = process.wait()
    if forwarded.count > 1:  # the workers stopped at once, without a checkpoint
        from rewardctl.training.guards import ImmediateStop

        raise ImmediateStop(forwarded.signum)
    return status


class ForwardedSignals:
    """While the workers run: SIGINT/SIGTERM are passed on instead of ending this process.

    The first goes to the launcher (accelerate launch / torch elastic), which hands it to every worker:
    they finish the step, checkpoint and exit with 128 + signal. Any later one goes straight to the
    launcher and every worker (the launcher alone would abandon them): they stop at once.
    Without this, Python's KeyboardInterrupt in ``subprocess.run`` killed the launcher after 0.25 s and
    left the workers checkpointing on their own after the command had returned.
    """

    def __init__(self, process: subprocess.Popen) -> None:
        self.process = process
        self.count = 0
        self.signum = signal.SIGINT.value
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> ForwardedSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._forward)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _forward(self, signum: int, _frame: FrameType | None) -> None:
        self.count += 1
        self.signum = signum
        targets = [self.process.pid]
        if self.count > 1:
            try:
                targets += [child.pid for child in psutil.Process(self.process.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        for pid in targets:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
