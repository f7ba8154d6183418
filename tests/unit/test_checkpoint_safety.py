"""Checkpoint files by hand (no training): a pickled checkpoint from an older rewardctl is never
loaded, and tied weights keep every key; the resume runs are in tests/e2e/test_checkpoint_safety_runs.py."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rewardctl.training.checkpoint import _unaliased, validate_checkpoint


def test_a_checkpoint_from_the_pickle_era_is_not_loaded(tmp_path: Path):
    old = tmp_path / "step-6"
    old.mkdir()
    (old / "trainer_state.json").write_text(json.dumps({"step": 6, "world_size": 1}))
    torch.save({"state": {}}, old / "optimizer.bin")
    assert validate_checkpoint(old) == (
        "checkpoint.json is missing (pickled state such as optimizer.bin, from an older rewardctl, is never loaded)"
    )


def test_tied_weights_keep_every_key_and_load_back(tmp_path: Path):
    model = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False))
    model[1].weight = model[0].weight  # tied, as in a causal LM's lm_head
    path = tmp_path / "model.safetensors"
    save_file(_unaliased(model.state_dict()), str(path))
    loaded = load_file(str(path))
    assert set(loaded) == {"0.weight", "1.weight"} and torch.equal(loaded["0.weight"], loaded["1.weight"])
    fresh = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False))
    fresh[1].weight = fresh[0].weight
    fresh.load_state_dict(loaded)
    assert torch.equal(fresh[1].weight, model[0].weight) and fresh[1].weight is fresh[0].weight
