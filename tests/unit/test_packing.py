"""Packed batches: shared-prefix rows and padding-free rows, by hand (tensors, the attention mask,
prompt-first truncation) and against the padded forward (rewards, losses and every gradient within
1e-5) on three decoder shapes, for every method that offers them."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer, BertConfig, LlamaConfig, MistralConfig, Qwen2Config

from rewardctl.config.schema import Overlength, Truncation
from rewardctl.data.collate import pad_sequences, padded_length
from rewardctl.data.loading import load_rows
from rewardctl.data.packing import (
    concat_sequences,
    pack_rows,
    segment_attention_mask,
    shared_prefix_length,
    unpad_index,
)
from rewardctl.data.text import Fit, SequenceEncoder
from rewardctl.errors import ConfigError
from rewardctl.methods.bco import BcoMethod, LocalRuntime
from rewardctl.methods.pairwise import PairwiseMethod
from rewardctl.methods.prm import PrmMethod
from rewardctl.methods.ranklist import RanklistMethod
from rewardctl.methods.registry import to_run_config

from ..conftest import TINY, _features, _methods, _pair_rows, _words, compose_train


# ---- pure functions by hand -----------------------------------------------------------------------
def test_shared_prefix_length_leaves_every_sequence_a_token_of_its_own():
    assert shared_prefix_length([[1, 2, 3], [1, 2, 4, 5]]) == 2
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2  # identical: all but the last
    assert shared_prefix_length([[1, 2], [1, 2, 3]]) == 1  # one is a prefix of the other
    assert shared_prefix_length([[7], [8]]) == 0
    assert shared_prefix_length([[1, 2, 3], [1, 2, 9], [1, 5]]) == 1
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3, 4], [1, 2, 3, 5]]) == 2  # capped by the shortest
    assert shared_prefix_length([[1, 2, 3]]) == 2
    assert shared_prefix_length([[1, 2, 3], []]) == 0 and shared_prefix_length([[], [1]]) == 0


def test_concat_sequences_restarts_positions_and_reads_each_last_token():
    out = concat_sequences([[1, 2, 3], [4], [5, 6]])
    assert out["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1]]
    assert out["reward_index"].tolist() == [2, 3, 5]


def test_unpad_index_lists_real_tokens_and_restarts_positions():
    out = unpad_index(torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]]))
    assert out["flat_index"].tolist() == [0, 1, 2, 4, 8, 9]
    assert out["flat_position_ids"].tolist() == [[0, 1, 2, 0, 0, 1]]


def test_pack_rows_exact_tensors_with_multiple_of():
    packed = pack_rows([[[1, 2, 3], [1, 2, 4, 5]], [[6], [7], [8, 9]]], pad_value=0, multiple_of=4)
    assert packed["input_ids"].tolist() == [[1, 2, 3, 4, 5, 0, 0, 0], [6, 7, 8, 9, 0, 0, 0, 0]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 2, 3, 0, 0, 0], [0, 0, 0, 1, 0, 0, 0, 0]]
    assert packed["segment_ids"].tolist() == [[0, 0, 1, 2, 2, -1, -1, -1], [1, 2, 3, 3, -1, -1, -1, -1]]
    assert packed["reward_index"].tolist() == [[2, 4, -1], [8, 9, 11]]
    assert {t.dtype for t in packed.values()} == {torch.long}


def test_pad_sequences_exact_tensors_on_either_side():
    values, mask = pad_sequences([[5, 6, 7], [8]], pad_value=0, side="right")
    assert values.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    values, mask = pad_sequences([[5, 6, 7], (8,)], pad_value=9, side="left", multiple_of=4)
    assert values.tolist() == [[9, 5, 6, 7], [9, 9, 9, 8]] and mask.tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert values.dtype == mask.dtype == torch.long


def test_padded_length_buckets_each_doubling_then_rounds_to_the_multiple():
    widths = {n: padded_length(n, buckets=8) for n in (1, 8, 9, 15, 16, 17, 127, 128, 129, 180, 256, 257, 300)}
    # steps of 1 up to 16, of 2 from 16, of 16 from 128, of 32 from 256: never more than 1/8 extra
    assert widths == {
        1: 1,
        8: 8,
        9: 9,
        15: 15,
        16: 16,
        17: 18,
        127: 128,
        128: 128,
        129: 144,
        180: 192,
        256: 256,
        257: 288,
        300: 320,
    }
    assert all(n <= w <= n * 9 / 8 for n, w in widths.items())
    assert len({padded_length(n, buckets=8) for n in range(129, 257)}) == 8  # 128 widths -> 8 shapes
    assert padded_length(180, buckets=0) == 180 and padded_length(180) == 180
    assert padded_length(180, buckets=8, multiple_of=64) == 192 and padded_length(129, buckets=4, multiple_of=24) == 168


def test_pack_rows_and_pad_sequences_pad_to_the_bucket_width():
    rows = [[list(range(1, 10)), [1, 2, 3, 4, 5, 6, 7, 8, 10, 11]]]  # packed: 8 shared + 1 + 2 = 11 tokens
    packed = pack_rows(rows, pad_value=0, buckets=4)  # 8 <= 11 < 16: steps of 2 -> 12
    assert packed["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 0]]
    assert packed["reward_index"].tolist() == [[8, 10]]
    values, mask = pad_sequences([[5] * 17, [6] * 3], pad_value=0, buckets=8)  # 17 -> 18
    assert values.shape == (2, 18) and mask.sum(dim=1).tolist() == [17, 3] and values[0, 17] == 0


def test_segment_mask_by_hand():
    # prefix p p, response 1: a, response 2: b b, one pad
    mask = segment_attention_mask(torch.tensor([[0, 0, 1, 2, 2, -1]]))[0, 0].int().tolist()
    assert mask == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],  # response 1 sees the prefix and itself
        [1, 1, 0, 1, 0, 0],  # response 2 never sees response 1
        [1, 1, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],  # padding sees only itself and is seen by nobody
    ]


def test_prompt_end_truncation_keeps_prompt_end_and_each_response_start_and_final_token():
    tokenizer = AutoTokenizer.from_pretrained(TINY)
    encoder = SequenceEncoder(tokenizer, 10, Overlength.truncate)
    bos = next(iter(encoder.keep_first), None)
    prompt = list(range(100, 108))  # 8 prompt tokens
    a = prompt + [1, 2, 3, 4, 5, 6, 99]
    b = prompt + [1, 2, 7, 8, 9, 10, 11, 99]
    (fa, fb), fit = encoder.fit_group([a, b], Truncation.prompt_end)
    assert fit == Fit.truncated
    # the shared prefix (prompt + "1 2", 10 tokens) keeps its last 5 (the longest response leaves 4, but
    # the prompt keeps half the budget); each response keeps its start and its final token (99, the EOS)
    assert fa == [105, 106, 107, 1, 2, 3, 4, 5, 6, 99] and fb == [105, 106, 107, 1, 2, 7, 8, 9, 10, 99]
    assert shared_prefix_length([fa, fb]) == 5
    # the earlier rule keeps each sequence's end: the shared prefix shrinks
    (sa, sb), _ = encoder.fit_group([a, b], Truncation.sequence_end)
    assert sa == a[-10:] and sb == b[-10:] and shared_prefix_length([sa, sb]) == 0
    if bos is not None:  # a leading BOS / [CLS] survives the prompt cut
        (ba, _), _ = encoder.fit_group([[bos] + a, [bos] + b], Truncation.prompt_end)
        assert ba[0] == bos and len(ba) == 10
    # responses that differ only near their start stay distinct (they became identical by sequence_end)
    tail = list(range(200, 220))
    x, y = prompt + [5] + tail + [99], prompt + [6] + tail + [99]
    (px, py), _ = encoder.fit_group([x, y], Truncation.prompt_end)
    (qx, qy), _ = encoder.fit_group([x, y], Truncation.sequence_end)
    assert px != py and qx == qy
    assert encoder.fit_group([[1, 2], [1, 3]], Truncation.prompt_end) == ([[1, 2], [1, 3]], Fit.fits)
    dropping = SequenceEncoder(tokenizer, 10, Overlength.drop)
    assert dropping.fit_group([a, b], Truncation.prompt_end)[1] == Fit.too_long


# ---- exactness against the stacked forward --------------------------------------------------------
def _model_dir(tmp_path: Path, kind: str) -> Path:
    """A tiny randomly initialised decoder of a real architecture, with the bundled tokenizer."""
    if kind == "tiny":
        return TINY
    tokenizer = AutoTokenizer.from_pretrained(TINY)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[kind](**common)
    path = tmp_path / kind
    config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _loss_and_grads(method, model, features):
    model.zero_grad(set_to_none=True)
    batch = method.collate(features)
    out = method.train_step(model, batch)
    out.loss_sum.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return method.eval_step(model, batch), out.loss_sum.detach(), grads


def _assert_same(packed, stacked, features, reward_keys):
    """Packed and stacked batches of the same rows give the same rewards, loss and gradients, with the
    layers over the padded batch and over its real tokens only (``model.skip_padding``)."""
    torch.manual_seed(0)
    model = packed.build_model()
    for skip_padding in (False, True):
        model.skip_padding = skip_padding
        a_out, a_loss, a_grads = _loss_and_grads(packed, model, features)
        b_out, b_loss, b_grads = _loss_and_grads(stacked, model, features)
        for key in reward_keys:
            torch.testing.assert_close(a_out[key], b_out[key], atol=1e-5, rtol=0)
        torch.testing.assert_close(a_loss, b_loss, atol=1e-5, rtol=0)
        assert a_grads.keys() == b_grads.keys() and len(a_grads) > 5
        for name in a_grads:
            torch.testing.assert_close(a_grads[name], b_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("kind", ["tiny", "llama", "qwen2"])
@pytest.mark.parametrize("conversational", [False, True])
def test_pairwise_packed_equals_stacked(tmp_path: Path, kind: str, conversational: bool):
    model_dir = _model_dir(tmp_path, kind)
    rng = random.Random(kind)
    for side in ("right", "left"):
        packed, stacked = _methods(
            PairwiseMethod, model_dir, f"model.padding_side={side}", "method.center_rewards_coefficient=0.01"
        )
        features = _features(packed, _pair_rows(rng, 6, conversational))
        assert all(f["prefix_length"] > 5 for f in features)
        _assert_same(packed, stacked, features, ("chosen_reward", "rejected_reward", "loss"))


@pytest.mark.parametrize("kind", ["tiny", "llama", "qwen2"])
def test_ranklist_packed_equals_stacked_for_k_2_to_9_and_differently_truncated_rows(tmp_path: Path, kind: str):
    model_dir = _model_dir(tmp_path, kind)
    rng = random.Random(kind)
    rows = [
        {
            "prompt": f"Q: {_words(rng, rng.randint(2, 40))}?",
            "responses": [" " + _words(rng, rng.randint(1, 30)) for _ in range(k)],
        }
        for k in range(2, 10)
    ]
    # sequence_end at 40 tokens cuts long prompts differently per response: shorter common prefixes
    for overrides in ([], ["model.max_length=40", "data.truncation=sequence_end"], ["model.max_length=40"]):
        packed, stacked = _methods(RanklistMethod, model_dir, *overrides)
        features = _features(packed, rows)
        _assert_same(packed, stacked, features, ("rewards", "loss_sum"))


@pytest.mark.parametrize("cls", [PairwiseMethod, RanklistMethod])
def test_padding_free_rows_equal_stacked(tmp_path: Path, cls):
    """Forced on CPU (auto keeps it for GPUs): one concatenated row, sequences told apart by their
    position ids only; transformers' packed-sequence mask keeps them apart exactly."""
    packed, stacked = _methods(cls, _model_dir(tmp_path, "qwen2"), layout="data.padding_free=true")
    rng = random.Random(3)
    if cls is PairwiseMethod:
        features, keys = _features(packed, _pair_rows(rng, 5, False)), ("chosen_reward", "rejected_reward", "loss")
    else:
        rows = [
            {"prompt": "Q:", "responses": [" " + _words(rng, rng.randint(1, 9)) for _ in range(k)]} for k in (2, 4, 3)
        ]
        features, keys = _features(packed, rows), ("rewards", "loss_sum")
    batch = packed.collate(features)
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch and "segment_ids" not in batch
    assert packed.token_count(batch).item() == stacked.token_count(stacked.collate(features)).item()
    _assert_same(packed, stacked, features, keys)


def test_padding_free_stays_off_on_cpu_unless_asked(tmp_path: Path):
    run = to_run_config(compose_train([]))
    method = PairwiseMethod(run.method, run)
    assert not method.padding_free and method.shares_prefix
    with pytest.raises(ConfigError, match="exclude each other"):
        to_run_config(compose_train(["data.padding_free=true", "data.share_prefix=true"]))


def test_eager_attention_gets_an_additive_mask_and_stays_exact(tmp_path: Path):
    packed, stacked = _methods(PairwiseMethod, _model_dir(tmp_path, "llama"), "model.attn_implementation=eager")
    features = _features(packed, _pair_rows(random.Random(1), 4, False))
    _assert_same(packed, stacked, features, ("chosen_reward", "rejected_reward"))


def test_prefix_sharing_is_refused_where_it_cannot_be_exact(tmp_path: Path):
    tokenizer = AutoTokenizer.from_pretrained(TINY)
    bert = tmp_path / "bert"
    BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    ).save_pretrained(bert)
    tokenizer.save_pretrained(bert)
    encoder = [f"model.name_or_path={bert}", "model.from_scratch=true"]
    run = to_run_config(compose_train([*encoder, "data.share_prefix=auto"]))
    assert not PairwiseMethod(run.method, run).shares_prefix  # auto: off, silently exact
    with pytest.raises(ConfigError) as info:
        to_run_config(compose_train([*encoder, "data.share_prefix=true"]))
    assert "data.share_prefix" in str(info.value) and "not a causal decoder" in str(info.value)
    with pytest.raises(ConfigError) as info:
        to_run_config(compose_train(["model.attn_implementation=flash_attention_2", "data.share_prefix=true"]))
    assert "flash_attention_2" in str(info.value)
    with pytest.raises(ConfigError, match="must be auto, true or false"):
        to_run_config(compose_train(["data.share_prefix=maybe"]))


def test_data_report_counts_the_tokens_the_prefix_saves():
    run = to_run_config(compose_train([]))
    method = PairwiseMethod(run.method, run)
    rows = [{"prompt": "User: tell me about the sky today please?\nAssistant:", "chosen": " Blue.", "rejected": " No."}]
    report = method.prepare(Dataset.from_list(rows * 3), "rows.jsonl", training=True).report
    chosen_len = len(method.tokenizer(rows[0]["prompt"] + rows[0]["chosen"])["input_ids"]) + 1
    rejected_len = len(method.tokenizer(rows[0]["prompt"] + rows[0]["rejected"])["input_ids"]) + 1
    stacked = 3 * (chosen_len + rejected_len)
    assert report["tokens_stacked"] == stacked and report["tokens_packed"] < stacked * 0.7
    assert "shared prefix" in report["details"] and report["truncation"] == "prompt_end"


@pytest.mark.parametrize("cls", [BcoMethod, PrmMethod])
def test_padding_free_token_methods_equal_padded(cls):
    """BCO (summed completion log-probs of policy and reference) and PRM (per-token step logits): the
    model runs on the real tokens only and its logits go back to the padded layout."""
    name = "bco" if cls is BcoMethod else "prm"
    methods = [
        cls(run.method, run)
        for run in (
            to_run_config(compose_train([f"method={name}", f"data.padding_free={m}"])) for m in ("true", "false")
        )
    ]
    free, padded = methods
    assert free.padding_free and not padded.padding_free
    rows = load_rows(padded.run.data.train, split="train").select(range(6))
    features = list(padded.prepare(rows, padded.run.data.train, training=True).dataset)
    torch.manual_seed(0)
    model = padded.build_model()
    results = []
    for method in methods:
        method.on_train_start(model, LocalRuntime(), resuming=False)
        model.zero_grad(set_to_none=True)
        batch = method.collate(features)
        out = method.train_step(model, batch)
        out.loss_sum.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        with torch.no_grad():
            outputs = method.eval_step(model, batch)
        results.append((out.loss_sum.detach(), grads, outputs, batch))
    (loss_a, grads_a, out_a, batch_a), (loss_b, grads_b, out_b, _) = results
    assert "flat_index" in batch_a and batch_a["flat_index"].numel() == batch_a["attention_mask"].sum()
    torch.testing.assert_close(loss_a, loss_b, atol=1e-5, rtol=0)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 5
    for key in grads_a:
        torch.testing.assert_close(grads_a[key], grads_b[key], atol=1e-5, rtol=1e-4, msg=key)
    for key in out_b:  # BCO's summed log-probs reach |562|, where one float32 step is 6e-5: relative
        torch.testing.assert_close(out_a[key], out_b[key], atol=1e-5, rtol=1e-6, msg=key)


def test_auto_picks_padding_free_on_a_gpu_with_varlen_attention_and_sharing_elsewhere(monkeypatch, tmp_path: Path):
    """The layout decision on a (pretended) GPU: flex_attention / flash_attention_2 take padding-free
    rows (and no 4-D mask); sdpa keeps shared-prefix rows; an encoder gets neither."""
    import rewardctl.machine as machine

    monkeypatch.setattr(machine, "wants_gpu", lambda hardware: True)
    for attention, free, shared in (("flex_attention", True, False), ("sdpa", False, True)):
        run = to_run_config(compose_train([f"model.attn_implementation={attention}"]))
        method = PairwiseMethod(run.method, run)
        assert (method.padding_free, method.shares_prefix) == (free, shared), attention
    run = to_run_config(compose_train(["method=prm", "model.attn_implementation=flex_attention"]))
    assert PrmMethod(run.method, run).padding_free
    tokenizer = AutoTokenizer.from_pretrained(TINY)
    bert = tmp_path / "bert"
    BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    ).save_pretrained(bert)
    tokenizer.save_pretrained(bert)
    with pytest.raises(ConfigError, match="data.padding_free.*not a causal decoder"):
        to_run_config(
            compose_train([f"model.name_or_path={bert}", "model.from_scratch=true", "data.padding_free=true"])
        )
