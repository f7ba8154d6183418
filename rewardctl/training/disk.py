"""Room on disk for what a run will write, checked before training starts.

A run that fills its disk on the last checkpoint loses hours; the sizes are known once the model
exists: the final model holds every weight, a checkpoint the weights plus AdamW's two moments per
trainable parameter (sharded runs write the same bytes in total).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import broadcast_object_list

from rewardctl.errors import ConfigError

log = logging.getLogger(__name__)
ADAM_MOMENTS = 2  # exp_avg and exp_avg_sq, each the size of its parameter


@dataclass(frozen=True)
class RunFootprint:
    model_bytes: int  # the final model/ directory
    checkpoint_bytes: int  # one checkpoints/step-N/ directory
    checkpoints: int  # how many can exist at once (rotation writes the new one before pruning)

    @property
    def minimum(self) -> int:
        """Enough to finish and stay resumable: the model and one checkpoint."""
        return self.model_bytes + self.checkpoint_bytes

    @property
    def full(self) -> int:
        return self.model_bytes + self.checkpoint_bytes * self.checkpoints


def run_footprint(model: torch.nn.Module, save_every: int, keep_checkpoints: int) -> RunFootprint:
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    moments = sum(p.numel() * p.element_size() * ADAM_MOMENTS for p in model.parameters() if p.requires_grad)
    # An interrupted or diverging run writes one even with save_every=0; keep <= 0 keeps every one,
    # which cannot be bounded here: the minimum stays the refusal line.
    kept = (keep_checkpoints + 1) if save_every and keep_checkpoints > 0 else 1
    return RunFootprint(weights, weights + moments, kept)


def gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"


def check_disk_room(run_dir: Path, footprint: RunFootprint, free: int | None = None) -> None:
    """Refuse a run that cannot finish for lack of space; warn when its kept checkpoints may not fit."""
    free = shutil.disk_usage(run_dir).free if free is None else free
    if free < footprint.minimum:
        raise ConfigError(
            "output_dir",
            f"{run_dir} has {gib(free)} free, but this run writes about "
            f"{gib(footprint.minimum)} (the model {gib(footprint.model_bytes)} and one checkpoint of "
            f"weights and optimizer state {gib(footprint.checkpoint_bytes)}); free space or "
            "choose another output_dir",
        )
    if free < footprint.full:
        log.warning(
            "%s has %s free; with train.keep_checkpoints the run may write up to %s (%d checkpoints of %s "
            "and the model): lower train.keep_checkpoints or free space",
            run_dir,
            gib(free),
            gib(footprint.full),
            footprint.checkpoints,
            gib(footprint.checkpoint_bytes),
        )


def check_room_on_every_process(accelerator: Any, run_dir: Path, footprint: RunFootprint) -> None:
    """The main process decides (the run directory is its); every process raises alike, so none waits
    in a collective for one that stopped."""
    problem = None
    if accelerator.is_main_process:
        try:
            check_disk_room(run_dir, footprint)
        except ConfigError as exc:
            problem = exc.reason
    if accelerator.num_processes > 1:
        problem = broadcast_object_list([problem], from_process=0)[0]
    if problem is not None:
        raise ConfigError("output_dir", problem)
