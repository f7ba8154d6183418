"""Rotary tables in the autocast dtype (rewardctl/modeling/rotary.py): bf16 inside CPU bf16 autocast,
untouched outside it, in a bf16 model, or with the setting off."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from rewardctl.modeling import rotary
from rewardctl.modeling.sequence import SequenceRewardModel

from ..conftest import TINY


@pytest.fixture(autouse=True)
def _setting_back_on():
    yield
    rotary.configure(True)


def _model(dtype: torch.dtype = torch.float32) -> SequenceRewardModel:
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(TINY, num_labels=1)
    classifier = AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa", dtype=dtype)
    return SequenceRewardModel(classifier.eval())


def _tables(model: SequenceRewardModel, autocast: bool) -> list[torch.dtype]:
    seen: list[torch.dtype] = []
    rope = model.classifier.model.rotary_emb
    # registered after attach's hook, so it sees what the layers receive
    handle = rope.register_forward_hook(lambda m, a, out: seen.extend(t.dtype for t in out))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        model(ids, torch.ones_like(ids))
    handle.remove()
    return seen


def test_tables_are_bf16_inside_autocast_only_and_attach_is_idempotent():
    model = _model()
    assert rotary.attach(model) == 1 and rotary.attach(model) == 1
    assert len(model.classifier.model.rotary_emb._forward_hooks) == 1
    assert _tables(model, autocast=True) == [torch.bfloat16, torch.bfloat16]
    assert _tables(model, autocast=False) == [torch.float32, torch.float32]
    rotary.configure(False)
    assert _tables(model, autocast=True) == [torch.float32, torch.float32]


def test_a_bf16_model_keeps_its_own_tables():
    model = _model(torch.bfloat16)
    rotary.attach(model)
    assert _tables(model, autocast=False) == [torch.bfloat16, torch.bfloat16]


def test_rewards_under_autocast_change_by_bf16_rounding_only():
    """The hook changes what the layers compute (the rotation in bf16), within bf16's rounding of
    the fp32 forward."""
    model = _model()
    ids = torch.randint(5, 200, (6, 24), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        exact = model(ids, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            promoted = model(ids, mask)
            rotary.attach(model)
            rotated_in_bf16 = model(ids, mask)
    assert not torch.equal(promoted, rotated_in_bf16)
    spread = exact.std().item()
    assert (rotated_in_bf16 - exact).abs().max().item() < 0.1 * spread + 1e-2
