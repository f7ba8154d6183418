"""AdamW with decoupled weight decay on matrices only (no decay on any 1-D parameter: biases, norm
weights, scales) and a warmup + decay schedule."""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import get_scheduler

from rewardctl.config.schema import Scheduler, TrainConfig

SCHEDULES = {Scheduler.linear: "linear", Scheduler.cosine: "cosine", Scheduler.constant: "constant_with_warmup"}


def build_optimizer(model: nn.Module, cfg: TrainConfig, *, fused: bool = False) -> torch.optim.Optimizer:
    """``fused``: one kernel per step over all parameters (CPU and CUDA), faster than the foreach
    update on this project's CPU for a 22M-parameter model (transformers' Trainer defaults to it too);
    left off where the strategy shards parameters (FSDP, DeepSpeed), which bring their own updates."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=cfg.lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_eps,
        fused=fused or None,
    )


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    return cfg.warmup_steps if cfg.warmup_steps > 0 else math.ceil(cfg.warmup_ratio * total_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    return get_scheduler(
        SCHEDULES[cfg.scheduler],
        optimizer,
        num_warmup_steps=warmup_steps(cfg, total_steps),
        num_training_steps=total_steps,
    )
