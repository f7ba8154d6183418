"""Pairwise method units: exact token ids, exact collated tensors, losses against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from torch import nn

from rewardctl.config.schema import Overlength
from rewardctl.data.loading import load_rows
from rewardctl.data.text import Fit, SequenceEncoder
from rewardctl.errors import DataError, RowError
from rewardctl.methods.pairwise import PairwiseMethod, bradley_terry_loss
from rewardctl.methods.registry import to_run_config

from ..conftest import compose_train, write_jsonl

CHAT_PROMPT = [{"role": "user", "content": "Is the sky blue?"}]
CHAT_GOOD = [{"role": "assistant", "content": "Yes, on a clear day."}]


def make_method(*overrides: str) -> PairwiseMethod:
    run = to_run_config(compose_train(list(overrides)))
    return PairwiseMethod(run.method, run)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=True)["input_ids"]


# ---- tokenisation ---------------------------------------------------------------------------------
def test_standard_explicit_prompt_is_one_text_plus_eos(tiny_tokenizer):
    encoder = SequenceEncoder(tiny_tokenizer, 128, Overlength.truncate)
    got = encoder.encode("User: Is the sky blue?\nAssistant:", " Yes.", response_field="chosen")
    assert got == ids(tiny_tokenizer, "User: Is the sky blue?\nAssistant: Yes.") + [tiny_tokenizer.eos_token_id]
    assert tiny_tokenizer.decode(got) == "User: Is the sky blue?\nAssistant: Yes.<|endoftext|>"
    assert encoder.encode(None, "Whole text<|endoftext|>", response_field="chosen") == ids(
        tiny_tokenizer, "Whole text<|endoftext|>"
    )


def test_conversational_rows_use_the_chat_template_without_extra_eos(tiny_tokenizer):
    encoder = SequenceEncoder(tiny_tokenizer, 128, Overlength.truncate)
    got = encoder.encode(CHAT_PROMPT, CHAT_GOOD, response_field="chosen")
    text = "<|im_start|>user\nIs the sky blue?<|im_end|>\n<|im_start|>assistant\nYes, on a clear day.<|im_end|>\n"
    assert tiny_tokenizer.decode(got) == text
    assert got == ids(tiny_tokenizer, text)
    assert tiny_tokenizer.eos_token_id not in got
    assert encoder.encode(None, CHAT_PROMPT + CHAT_GOOD, response_field="chosen") == got  # implicit prompt


@pytest.mark.parametrize(
    ("prompt", "response", "field", "text"),
    [
        ("Q", CHAT_GOOD, "prompt", "is a string but 'chosen' is a message list"),
        (CHAT_PROMPT, "A", "prompt", "is a message list but 'chosen' is a string"),
        (None, "   ", "chosen", "is empty"),
        (None, 42, "chosen", "must be a string or a list of chat messages"),
        (None, [], "chosen", "non-empty list"),
        (None, [{"role": "assistant"}], "chosen", "string 'content'"),
    ],
)
def test_bad_fields_raise_row_errors(tiny_tokenizer, prompt, response, field, text):
    encoder = SequenceEncoder(tiny_tokenizer, 128, Overlength.truncate)
    with pytest.raises(RowError) as info:
        encoder.encode(prompt, response, response_field="chosen")
    assert info.value.field == field and text in str(info.value)


def test_truncation_keeps_the_end_and_a_leading_bos(tiny_tokenizer):
    encoder = SequenceEncoder(tiny_tokenizer, 5, Overlength.truncate)
    assert encoder.fit([10, 11, 12]) == ([10, 11, 12], Fit.fits)
    assert encoder.fit([10, 11, 12, 13, 14, 15, 16, 1]) == ([13, 14, 15, 16, 1], Fit.truncated)
    encoder.keep_first = {10}  # as for a tokenizer that prepends BOS id 10
    assert encoder.fit([10, 11, 12, 13, 14, 15, 16, 1]) == ([10, 14, 15, 16, 1], Fit.truncated)
    dropping = SequenceEncoder(tiny_tokenizer, 5, Overlength.drop)
    assert dropping.fit([1, 2, 3, 4, 5, 6]) == ([1, 2, 3, 4, 5, 6], Fit.too_long)


# ---- data preparation -----------------------------------------------------------------------------
def test_prepare_counts_truncation_and_keeps_margins():
    method = make_method("model.max_length=24")
    rows = [
        {"prompt": "User: hi\nAssistant:", "chosen": " Hello there.", "rejected": " Go away.", "margin": 1},
        {"prompt": "User: hi\nAssistant:", "chosen": " Sure. " * 20, "rejected": " No.", "margin": 0.5},
    ]
    split = method.prepare(Dataset.from_list(rows), "mem", training=True)
    features = split.dataset.to_list()
    eos = method.tokenizer.eos_token_id
    assert features[0]["chosen_ids"] == ids(method.tokenizer, "User: hi\nAssistant: Hello there.") + [eos]
    assert len(features[1]["chosen_ids"]) == 24 and features[1]["chosen_ids"][-1] == eos
    assert [f["margin"] for f in features] == [1.0, 0.5]
    assert split.report["truncated"] == 1 and split.report["used"] == 2 and split.report["margin"] is True


def test_prepare_drop_policy_removes_and_counts_over_long_pairs():
    method = make_method("model.max_length=12", "data.overlength=drop")
    rows = [{"chosen": "Hi.", "rejected": "No."}, {"chosen": "Sure. " * 20, "rejected": "No."}]
    split = method.prepare(Dataset.from_list(rows), "mem", training=True)
    assert split.report["dropped_overlength"] == 1 and split.report["used"] == 1 and split.dataset["_row"] == [0]


def test_prepare_accepts_pretokenised_rows_and_checks_the_vocabulary():
    method = make_method()
    split = method.prepare(Dataset.from_list([{"chosen_ids": [5, 6, 7], "rejected_ids": [5, 8]}]), "mem", training=True)
    assert split.dataset.to_list()[0]["chosen_ids"] == [5, 6, 7]
    with pytest.raises(DataError) as info:
        method.prepare(Dataset.from_list([{"chosen_ids": [5, 99999], "rejected_ids": [5]}]), "ids.jsonl", training=True)
    assert "ids.jsonl, row 1, field 'chosen_ids'" in str(info.value) and "outside the vocabulary" in str(info.value)


def test_prepare_rejects_null_prompts_and_pairs_mixing_formats(tmp_path):
    method = make_method()
    rows = [{"prompt": "Q", "chosen": "a", "rejected": "b"}, {"prompt": None, "chosen": "a", "rejected": "b"}]
    path = write_jsonl(tmp_path / "null.jsonl", rows)
    with pytest.raises(DataError) as info:
        method.prepare(load_rows(str(path), split="train"), str(path), training=True)
    assert str(info.value) == (
        f"{path}, row 2, field 'prompt': is missing (null) in a dataset with a prompt column; "
        "data.bad_rows=skip leaves such rows out"
    )
    rows = [{"chosen": CHAT_PROMPT + CHAT_GOOD, "rejected": "User: Is the sky blue?\nAssistant: No."}]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(DataError) as info:
        method.prepare(load_rows(str(path), split="train"), str(path), training=True)
    assert info.value.row == 1 and info.value.field == "rejected" and "same format" in str(info.value)


def test_prepare_rejects_a_non_numeric_margin_by_row(tmp_path):
    method = make_method()
    rows = [{"chosen": "a", "rejected": "b", "margin": 1.0}, {"chosen": "a", "rejected": "b", "margin": "big"}]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    with pytest.raises(DataError) as info:
        method.prepare(load_rows(str(path), split="train"), str(path), training=True)
    assert str(info.value).startswith(f"{path}, row 2, field 'margin': must be a finite number")


# ---- collation ------------------------------------------------------------------------------------
def test_collator_stacks_chosen_then_rejected_with_exact_padding():
    method = make_method("data.share_prefix=false")
    pad = method.tokenizer.pad_token_id
    features = [
        {"chosen_ids": [1, 2, 3], "rejected_ids": [6, 7], "margin": 0.1, "_row": 4},
        {"chosen_ids": [4, 5], "rejected_ids": [8], "margin": 0.2, "_row": 9},
    ]
    batch = method.collate(features)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, pad], [6, 7, pad], [8, pad, pad]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0], [1, 1, 0], [1, 0, 0]]
    assert torch.equal(batch["margin"], torch.tensor([0.1, 0.2]))
    assert batch["row"].tolist() == [4, 9]
    method.tokenizer.padding_side = "left"
    method.run.data.pad_to_multiple_of = 4
    batch = method.collate(features)
    assert batch["input_ids"].tolist() == [[pad, 1, 2, 3], [pad, pad, 4, 5], [pad, pad, 6, 7], [pad, pad, pad, 8]]
    assert batch["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]]
    assert method.batch_weight(batch).item() == 2


def test_flex_attention_batches_are_padded_to_whole_kernel_blocks():
    """flex_attention's CPU kernel reads the padding mask over whole 128-token key blocks: a batch
    narrower than a block made NaN rewards (tests/e2e/test_packing_flex.py), so its width is rounded
    up to the block, and to the least common multiple with data.pad_to_multiple_of."""
    from torch.nn.attention.flex_attention import _DEFAULT_SPARSE_BLOCK_SIZE

    from rewardctl.methods.base import FLEX_BLOCK_TOKENS

    assert FLEX_BLOCK_TOKENS == _DEFAULT_SPARSE_BLOCK_SIZE
    # the eval path: training with flex_attention on this CPU is refused (no backward pass here)
    run = to_run_config(
        compose_train(["data.share_prefix=false", "model.attn_implementation=flex_attention"]), for_training=False
    )
    method = PairwiseMethod(run.method, run)
    features = [{"chosen_ids": [1, 2, 3], "rejected_ids": [6, 7], "_row": 0}]
    batch = method.collate(features)
    assert batch["input_ids"].shape == (2, 128)
    assert batch["attention_mask"].sum(-1).tolist() == [3, 2]
    method.run.data.pad_to_multiple_of = 48
    assert method.collate(features)["input_ids"].shape == (2, 384)
    assert make_method("data.share_prefix=false").collate(features)["input_ids"].shape == (2, 3)


def test_collator_packs_each_pair_behind_its_shared_prefix():
    """The tiny decoder shares prefixes by default: one sequence per pair, rewards read chosen-first."""
    method = make_method()
    assert method.shares_prefix
    pad = method.tokenizer.pad_token_id
    features = [
        {"chosen_ids": [1, 2, 3], "rejected_ids": [1, 2, 7, 9], "_row": 4},
        {"chosen_ids": [4, 5], "rejected_ids": [8], "_row": 9},
    ]
    batch = method.collate(features)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 7, 9], [4, 5, 8, pad, pad]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 2, 3], [0, 1, 0, 0, 0]]
    assert batch["segment_ids"].tolist() == [[0, 0, 1, 2, 2], [1, 1, 2, -1, -1]]
    assert batch["reward_index"].tolist() == [2, 6, 4, 7]  # chosen of rows 0, 1, then rejected
    assert "attention_mask" not in batch and batch["row"].tolist() == [4, 9]
    assert method.batch_weight(batch).item() == 2 and method.token_count(batch).item() == 8


# ---- loss -----------------------------------------------------------------------------------------
def nll_sigmoid(x: float) -> float:
    return -math.log(1.0 / (1.0 + math.exp(-x)))


def test_bradley_terry_loss_by_hand():
    chosen, rejected = torch.tensor([1.0, 0.5]), torch.tensor([0.0, 1.0])
    expected = [nll_sigmoid(1.0), nll_sigmoid(-0.5)]  # 0.313262, 0.974077
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected), torch.tensor(expected))
    margin = torch.tensor([0.5, -0.5])
    torch.testing.assert_close(
        bradley_terry_loss(chosen, rejected, margin), torch.tensor([nll_sigmoid(0.5), nll_sigmoid(0.0)])
    )
    centered = bradley_terry_loss(chosen, rejected, margin, 0.01)
    torch.testing.assert_close(
        centered, torch.tensor([nll_sigmoid(0.5) + 0.01 * 1.0**2, nll_sigmoid(0.0) + 0.01 * 1.5**2])
    )
    assert centered.mean().item() == pytest.approx((0.474077 + 0.01 + 0.693147 + 0.0225) / 2, abs=1e-6)


def test_shapes_that_would_broadcast_are_refused():
    """TRL before v0.24: (B,1) rewards minus a (B,) margin broadcast to (B,B) and mixed every pair."""
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        bradley_terry_loss(torch.zeros(4, 1), torch.zeros(4, 1))
    with pytest.raises(ValueError, match="margin must have shape"):
        bradley_terry_loss(torch.zeros(4), torch.zeros(4), torch.zeros(4, 1))
    with pytest.raises(ValueError, match="margin must have shape"):
        bradley_terry_loss(torch.zeros(4), torch.zeros(4), torch.zeros(1))


class FixedRewards(nn.Module):
    """Stands in for the model: returns preset rewards for the 2B responses (stacked or packed)."""

    def __init__(self, rewards: list[float]) -> None:
        super().__init__()
        self.rewards = torch.tensor(rewards)

    def forward(self, input_ids, **inputs):
        return self.rewards


def test_train_step_metrics_and_loss_sum():
    method = make_method()
    batch = method.collate(
        [{"chosen_ids": [1, 2], "rejected_ids": [3]}, {"chosen_ids": [4], "rejected_ids": [5, 6, 7]}]
    )
    out = method.train_step(FixedRewards([2.0, -1.0, 0.0, 1.0]), batch)
    losses = [nll_sigmoid(2.0), nll_sigmoid(-2.0)]
    assert out.loss_sum.item() == pytest.approx(sum(losses))
    metric = out.metrics
    assert metric["loss"].value.item() == pytest.approx(sum(losses)) and metric["loss"].count == 2
    assert metric["accuracy"].value.item() == 1.0 and metric["accuracy"].count == 2
    assert metric["margin"].value.item() == pytest.approx(2.0 + -2.0)
    assert metric["reward_min"].value.item() == -1.0 and metric["reward_max"].value.item() == 2.0
    assert metric["tokens"].value.item() == 7 and metric["pairs"].value.item() == 2


def test_ties_count_as_wrong_in_eval_metrics():
    method = make_method()
    outputs = {
        "chosen_reward": torch.tensor([1.0, 0.0, 2.0, 0.5]),
        "rejected_reward": torch.tensor([0.0, 0.0, 3.0, 0.0]),
        "loss": torch.tensor([0.1, 0.2, 0.3, 0.4]),
    }
    metrics = method.eval_metrics(outputs)
    assert metrics["accuracy"] == 0.5 and metrics["pairs"] == 4
    assert metrics["loss"] == pytest.approx(0.25) and metrics["margin"] == pytest.approx((1.0 + 0.0 - 1.0 + 0.5) / 4)
    assert metrics["reward_min"] == 0.0 and metrics["reward_max"] == 3.0
    records = method.predictions({**outputs, "row": torch.tensor([0, 1, 2, 3])})
    assert records[1] == {"row": 2, "chosen_reward": 0.0, "rejected_reward": 0.0, "correct": False}
