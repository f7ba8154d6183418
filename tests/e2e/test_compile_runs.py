"""train.compile end to end: a compiled run trains like an eager one and saves the same files (no
``_orig_mod.`` key anywhere); the refusals are in tests/unit/test_compile.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file

from rewardctl.methods.pairwise import PairwiseMethod
from rewardctl.methods.registry import to_run_config

from ..conftest import compose_train, read_jsonl, run_training

# Three logged steps, no eval set (an eval-mode graph would be a second compile), one checkpoint.
TINY_RUN = [
    "experiment=smoke",
    "train.max_steps=3",
    "train.log_every=1",
    "train.eval_every=0",
    "train.save_every=3",
    "train.eval_at_start=false",
    "data.eval=null",
]


def train_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if r["split"] == "train"]


def initial_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The starting weights, rebuilt exactly as the session builds them (seed, then model)."""
    run = to_run_config(compose_train([f"output_dir={run_dir}", *TINY_RUN]))
    method = PairwiseMethod(run.method, run)
    set_seed(run.train.seed)
    return method.build_model().state_dict()


@pytest.mark.slow  # inductor compiles forward and backward: ~15 s with a warm cache, ~60 s cold on 2 CPUs
def test_compiled_run_trains_like_eager_and_saves_the_same_keys(tmp_path: Path):
    eager, eager_dir = run_training(tmp_path, TINY_RUN, name="eager")
    compiled, compiled_dir = run_training(tmp_path, [*TINY_RUN, "train.compile=true"], name="compiled")
    assert compiled["status"] == "completed" and compiled["compile"] is True and eager["compile"] is False
    assert train_losses(compiled_dir) == pytest.approx(train_losses(eager_dir), abs=1e-4)
    for name in ("model/model.safetensors", "checkpoints/step-3/model.safetensors"):
        ours, theirs = load_file(str(compiled_dir / name)), load_file(str(eager_dir / name))
        assert sorted(ours) == sorted(theirs) and not any("_orig_mod" in k for k in ours), name
        assert all(torch.allclose(ours[k], theirs[k], atol=1e-4) for k in ours), name
    start, end = initial_weights(compiled_dir), load_file(str(compiled_dir / "checkpoints/step-3/model.safetensors"))
    assert set(start) == set(end)
    assert [k for k in start if torch.equal(start[k], end[k])] == []  # every parameter moved
