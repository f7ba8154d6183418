"""The distribution contracts checked through real CPU runs: what the loop tells DeepSpeed's engine
about accumulation boundaries, and the update when the engine divides by its accumulation count
(FSDP wrapping and the launcher's arguments are in tests/unit/test_distributed.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from ..conftest import read_jsonl, run_training


def test_only_the_last_micro_batch_of_a_window_is_a_sync_boundary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """DeepSpeed's engine reduces and steps exactly when accelerate's sync_gradients is set."""
    flags: list[bool] = []
    original = Accelerator.backward

    def recording(self: Accelerator, loss: torch.Tensor, **kwargs) -> None:
        flags.append(self.sync_gradients)
        original(self, loss, **kwargs)

    monkeypatch.setattr(Accelerator, "backward", recording)
    summary, _ = run_training(
        tmp_path,
        [
            "experiment=smoke",
            "train.max_steps=4",
            "train.grad_accum=3",
            "train.per_device_batch_size=2",
            "train.save_every=0",
        ],
    )
    assert summary["status"] == "completed"
    assert flags == [False, False, True] * 4


def test_an_engine_that_divides_by_its_accumulation_count_gets_the_same_update(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Under DeepSpeed accelerate's gradient_accumulation_steps is the engine's count and the engine
    divides each loss by it. Emulated here by setting that count, which makes accelerate divide:
    the loop must undo it, so the run equals one with the count at 1."""
    common = [
        "experiment=smoke",
        "train.max_steps=4",
        "train.log_every=1",
        "train.save_every=0",
        "train.eval_every=0",
        "train.grad_accum=3",
        "train.per_device_batch_size=2",
    ]
    plain, plain_dir = run_training(tmp_path, common, name="plain")
    from rewardctl.training import session

    build = session.build_accelerator

    def with_engine_count(*args, **kwargs) -> Accelerator:
        accelerator = build(*args, **kwargs)
        accelerator.gradient_accumulation_steps = 3
        return accelerator

    monkeypatch.setattr(session, "build_accelerator", with_engine_count)
    emulated, emulated_dir = run_training(tmp_path, common, name="emulated")
    a = [r for r in read_jsonl(plain_dir / "metrics.jsonl") if r["split"] == "train"]
    b = [r for r in read_jsonl(emulated_dir / "metrics.jsonl") if r["split"] == "train"]
    assert len(a) == len(b) == 4
    for x, y in zip(a, b, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-6) and x["grad_norm"] == pytest.approx(
            y["grad_norm"], rel=1e-5
        )
    wa, wb = (
        load_file(str(plain_dir / "model/model.safetensors")),
        load_file(str(emulated_dir / "model/model.safetensors")),
    )
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
