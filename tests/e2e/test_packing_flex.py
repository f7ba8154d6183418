"""flex_attention on padding-free rows: compiled on first use (about 30 s on 2 CPUs), so it sits with
the long runs; the other packed-vs-stacked checks are in tests/unit/test_packing.py."""

from __future__ import annotations

import random

import pytest
import torch

from rewardctl.methods.pairwise import PairwiseMethod

from ..conftest import TINY, _features, _methods, _pair_rows


@pytest.mark.slow
def test_flex_attention_padding_free_rows_score_like_padded_rows_on_cpu():
    """flex_attention builds its block mask from the packed position ids. The CPU build runs it forward
    only (no backward on CPU, compiled on first use: ~30 s), so this checks the eval path's rewards."""
    packed, stacked = _methods(
        PairwiseMethod,
        TINY,
        "model.attn_implementation=flex_attention",
        layout="data.padding_free=true",
        for_training=False,
    )
    features = _features(packed, _pair_rows(random.Random(0), 4, False))
    torch.manual_seed(0)
    model = packed.build_model()
    with torch.no_grad():
        ours, theirs = (
            packed.eval_step(model, packed.collate(features)),
            stacked.eval_step(model, stacked.collate(features)),
        )
    for key in ("chosen_reward", "rejected_reward"):
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-5, rtol=0)
