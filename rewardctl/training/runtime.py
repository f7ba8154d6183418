"""Process-level set-up: the Accelerator, the run directory every process agrees on, quiet workers,
and the ``Runtime`` a method sees (collectives and placement, without knowing accelerate)."""

from __future__ import annotations

import atexit
import logging
from datetime import timedelta
from pathlib import Path

import datasets
import torch
import transformers
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    InitProcessGroupKwargs,
    ProjectConfiguration,
    broadcast_object_list,
)
from torch import nn

from rewardctl.config.schema import Device, HardwareConfig, TrainConfig
from rewardctl.kernels import ops as fused_kernels
from rewardctl.modeling import cpu_attention, rotary

log = logging.getLogger(__name__)


class AccelerateRuntime:
    """The ``Runtime`` a method sees: collectives and placement, backed by accelerate."""

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator
        self.device = accelerator.device
        self.num_processes = accelerator.num_processes
        self.process_index = accelerator.process_index
        self.is_main_process = accelerator.is_main_process

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.num_processes == 1:
            return tensor
        return self.accelerator.reduce(tensor, reduction="sum")

    def prepare_frozen(self, module: nn.Module) -> nn.Module:
        """Placed on the device and run under the run's autocast, but not registered with accelerate:
        a frozen reference must not be written into every checkpoint."""
        module.requires_grad_(False)
        module.eval()
        module.to(self.device)
        rotary.attach(module)
        precision = self.accelerator.mixed_precision
        if precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if precision == "bf16" else torch.float16
            module.forward = torch.autocast(device_type=self.device.type, dtype=dtype)(module.forward)
        return module


def compile_for_training(model: nn.Module) -> nn.Module:
    """``train.compile``: the prepared module under torch.compile (inductor). Padded batches change
    length every step (and the last batch its size), so shapes are dynamic from the first compile
    rather than recompiled per length. The caller keeps the uncompiled module for checkpoints and
    saving: the wrapper's state dict would prefix every key with ``_orig_mod.``."""
    return torch.compile(model, backend="inductor", dynamic=True)


def build_accelerator(hardware: HardwareConfig, report_to: list[str], train: TrainConfig | None = None) -> Accelerator:
    """The one Accelerator of train, eval and export: device, precision (already resolved, never
    ``auto``), TF32, the collective timeout and, under DeepSpeed, the engine's batch settings from ``train``.

    The loop feeds its own batches, so DeepSpeed cannot infer the micro-batch, accumulation and
    clipping from a loader: they are written into its config here, and the accelerator's
    ``gradient_accumulation_steps`` is the engine's count (the loop undoes accelerate's division by it).
    """
    use_cpu = hardware.device == Device.cpu or not torch.cuda.is_available()
    cpu_attention.configure(use_cpu and hardware.cpu_attention_fp32)
    rotary.configure(hardware.rotary_in_autocast_dtype)
    kernels_line = fused_kernels.configure(str(hardware.cpu_fused_kernels).lower(), cpu=use_cpu)
    if kernels_line:
        log.info(kernels_line)
    if hardware.tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    accelerator = Accelerator(
        cpu=use_cpu,
        mixed_precision=hardware.mixed_precision.value,
        log_with=list(report_to) or None,
        # Trackers insist on a directory at construction; the real one is set once the run dir is agreed.
        project_config=ProjectConfiguration(project_dir=".") if report_to else None,
        step_scheduler_with_optimizer=False,
        dataloader_config=DataLoaderConfiguration(even_batches=True),
        # How long a collective waits for the other processes (rewardctl.training.peers says why it failed).
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=hardware.collective_timeout_s))],
    )
    deepspeed = getattr(accelerator.state, "deepspeed_plugin", None)
    if deepspeed is not None and train is not None:
        deepspeed.deepspeed_config["train_micro_batch_size_per_gpu"] = train.per_device_batch_size
        deepspeed.deepspeed_config["gradient_accumulation_steps"] = train.grad_accum
        deepspeed.deepspeed_config["gradient_clipping"] = max(train.max_grad_norm, 0.0)
        accelerator.gradient_accumulation_steps = train.grad_accum
    if accelerator.num_processes > 1:
        atexit.unregister(destroy_process_group_at_exit)  # once per process, however many accelerators
        atexit.register(destroy_process_group_at_exit)
    return accelerator


def destroy_process_group_at_exit() -> None:
    """Tear a gloo process group down while the interpreter is still whole.

    A process that exits with its group alive (score, eval and export end without accelerate's
    ``end_training``; any command on an error path) leaves gloo's worker threads holding tensors that
    are freed during interpreter finalisation, which takes the GIL of a dying interpreter and aborts
    with SIGABRT, now and then (pytorch/pytorch#179291; CI saw it on a 2-process ``score``). NCCL is
    left alone: its ``destroy_process_group`` waits for pending collectives, which after a peer's
    failure would hang the exit. Run at exit, after ``end_training`` it finds nothing left to do."""
    distributed = torch.distributed
    if not (distributed.is_available() and distributed.is_initialized()) or distributed.get_backend() != "gloo":
        return
    try:
        distributed.destroy_process_group()
    except (RuntimeError, ValueError) as error:  # a peer already gone: the exit goes on, reported before
        logging.getLogger(__name__).debug("process group teardown at exit: %s", error)


def hydra_output_dir(fallback: str) -> Path:
    """Hydra's job directory (the run dir, or <sweep dir>/<job number> in a multirun)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # not running under Hydra (e.g. the compose API in tests)
        return Path(fallback)


def shared_run_dir(accelerator: Accelerator, fallback: str) -> Path:
    """Rank 0 decides; every process adopts its choice (no per-rank ${now:} directories)."""
    chosen = [str(hydra_output_dir(fallback).resolve())] if accelerator.is_main_process else [None]
    if accelerator.num_processes > 1:
        chosen = broadcast_object_list(chosen, from_process=0)
    return Path(chosen[0])


def quiet_other_processes(accelerator: Accelerator) -> None:
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one INFO line per checkpoint file otherwise
    if not accelerator.is_main_process:
        logging.getLogger("rewardctl").setLevel(logging.WARNING)
        transformers.logging.set_verbosity_error()
        datasets.utils.logging.set_verbosity_error()
        datasets.disable_progress_bars()
