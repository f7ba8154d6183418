"""Room on disk: the footprint of a run from its model, refused before training when even the model
and one checkpoint cannot fit, warned about when the kept checkpoints may not (a real run refused is in
tests/e2e/test_disk_room_runs.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from rewardctl.errors import ConfigError
from rewardctl.training import disk
from rewardctl.training.disk import RunFootprint, check_disk_room, run_footprint


def test_the_footprint_counts_weights_and_adam_moments_of_trainable_parameters_only():
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 1).to(torch.bfloat16))
    model[0].weight.requires_grad_(False)  # 100 frozen fp32 weights: in the model, not in the optimizer
    weights = (110 * 4) + (11 * 2)
    moments = (10 * 4 + 11 * 2) * 2
    assert run_footprint(model, save_every=5, keep_checkpoints=2) == RunFootprint(weights, weights + moments, 3)
    assert run_footprint(model, save_every=0, keep_checkpoints=2).checkpoints == 1  # an interrupt writes one
    assert run_footprint(model, save_every=5, keep_checkpoints=0).checkpoints == 1  # unbounded: the minimum


def test_too_little_room_is_refused_and_a_tight_fit_is_warned_about(tmp_path: Path, caplog):
    footprint = RunFootprint(model_bytes=2**30, checkpoint_bytes=3 * 2**30, checkpoints=3)
    with pytest.raises(ConfigError) as info:
        check_disk_room(tmp_path, footprint, free=4 * 2**30 - 1)
    assert str(info.value) == (
        f"output_dir: {tmp_path} has 4.00 GiB free, but this run writes about 4.00 GiB (the "
        "model 1.00 GiB and one checkpoint of weights and optimizer state 3.00 GiB); free "
        "space or choose another output_dir"
    )
    with caplog.at_level(logging.WARNING, logger=disk.__name__):
        check_disk_room(tmp_path, footprint, free=4 * 2**30)
    assert "may write up to 10.00 GiB (3 checkpoints of 3.00 GiB and the model)" in caplog.text
    caplog.clear()
    check_disk_room(tmp_path, footprint, free=10 * 2**30)
    assert caplog.text == ""
