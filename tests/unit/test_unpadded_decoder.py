"""A decoder's layers on the real tokens only (rewardctl/modeling/unpadded_decoder.py): the same rewards,
losses and gradients as the padded forward for every batch layout the methods build, the layers fed
the real tokens only, and the padded forward wherever the gathered one would not be exact or pay."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from accelerate.hooks import ModelHook, add_hook_to_module
from transformers import AutoModelForSequenceClassification, GPT2Config, Qwen2Config

from rewardctl.data.packing import PAD_SEGMENT, pack_rows
from rewardctl.methods.pairwise import PairwiseMethod
from rewardctl.methods.ranklist import RanklistMethod
from rewardctl.modeling import unpadded_decoder
from rewardctl.modeling.sequence import SequenceRewardModel
from rewardctl.modeling.unpadded_decoder import DecoderLayout, decoder_layout

from ..conftest import TINY, _features, _pair_rows
from .test_final_layer import _assert_steps_equal, _method, _step, _tiny, lists_k_2_to_9
from .test_packing import _model_dir


@pytest.fixture(autouse=True)
def any_width(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test models are narrower than ``MIN_HIDDEN``: let them gather, to test the gathered forward."""
    monkeypatch.setattr(unpadded_decoder, "MIN_HIDDEN", 0)


@pytest.fixture
def every_batch(monkeypatch: pytest.MonkeyPatch) -> list[DecoderLayout]:
    """No rounding of the gathered rows (tiny test batches hold less padding than one rounding step),
    and a record of the layouts the gathered forward ran with."""
    monkeypatch.setattr(unpadded_decoder, "TOKEN_ROWS_MULTIPLE", 1)
    seen: list[DecoderLayout] = []
    original = unpadded_decoder.hidden_at_reads

    def recorded(backbone, input_ids, position_ids, mask, layout, *args, **kwargs):
        seen.append(layout)
        return original(backbone, input_ids, position_ids, mask, layout, *args, **kwargs)

    monkeypatch.setattr(unpadded_decoder, "hidden_at_reads", recorded)
    return seen


def _assert_gathered_equals_padded(method, model, batch, keys, seen: list[DecoderLayout]) -> None:
    """Same model, same batch: model.skip_padding on (the gathered forward must run) against off."""
    assert model.skip_padding and model.skip_padding_blocker() is None
    fast = _step(method, model, batch)
    assert seen, "the gathered forward never ran"
    model.skip_padding = False
    calls = len(seen)
    padded = _step(method, model, batch)
    assert len(seen) == calls  # off means off
    model.skip_padding = True
    _assert_steps_equal(fast, padded, keys)


# ---- the layout --------------------------------------------------------------------------------------
def test_the_layout_lists_the_real_tokens_row_by_row_and_puts_them_back(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(unpadded_decoder, "TOKEN_ROWS_MULTIPLE", 4)
    real = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 0]], dtype=torch.bool)  # right and left padding
    layout = decoder_layout(real)
    assert layout.tokens == 7 and (layout.rows, layout.width) == (2, 6)
    assert layout.index.tolist() == [0, 1, 2, 7, 8, 9, 10, 3]  # one spare row: a padding position
    assert layout.gathered(torch.tensor([2, 7, 10])).tolist() == [2, 3, 6]
    heads = torch.arange(8 * 3 * 2, dtype=torch.float32).view(1, 3, 8, 2)  # (1, heads, T', head_dim)
    padded = layout.pad(heads)
    assert padded.shape == (2, 3, 6, 2)
    torch.testing.assert_close(padded[1, :, 1], heads[0, :, 3])  # row 1's first real token
    assert padded[0, :, 3:].abs().sum() == 0 and padded[1, :, 0].abs().sum() == 0  # padding: zeros
    back = layout.unpad(padded.transpose(1, 2).reshape(2, 6, 6))
    assert back.shape == (1, 8, 6)
    torch.testing.assert_close(back[0, :7], heads[0, :, :7].transpose(0, 1).reshape(7, 6))
    assert back[0, 7].abs().sum() == 0  # the spare row's attention output


def test_attention_sees_the_span_of_real_columns_only(monkeypatch: pytest.MonkeyPatch):
    """Columns no row has a real token in (a bucketed width's right end, a left-padded batch's left
    end) stay out of the attention layout: its width is the span of real columns rounded up to
    ``ATTENTION_WIDTH_MULTIPLE``, and masks and read positions are moved into it."""
    monkeypatch.setattr(unpadded_decoder, "TOKEN_ROWS_MULTIPLE", 1)
    monkeypatch.setattr(unpadded_decoder, "ATTENTION_WIDTH_MULTIPLE", 4)
    real = torch.zeros(2, 12, dtype=torch.bool)
    real[0, 2:5] = True  # columns 2-4
    real[1, 3:7] = True  # columns 3-6
    layout = decoder_layout(real)
    assert (layout.first, layout.span) == (2, 8)  # columns 2-6: 5 wide, rounded up to 8
    assert layout.attention_index.tolist() == [0, 1, 2, 9, 10, 11, 12]  # row * 8 + column - 2
    heads = torch.arange(7 * 2, dtype=torch.float32).view(1, 1, 7, 2)
    padded = layout.pad(heads)
    assert padded.shape == (2, 1, 8, 2)
    torch.testing.assert_close(padded[1, 0, 1:5], heads[0, 0, 3:7])  # row 1's tokens at columns 3-6
    assert padded[0, 0, 3:].abs().sum() == 0 and padded[1, 0, 0].abs().sum() == 0
    torch.testing.assert_close(layout.unpad(padded.transpose(1, 2).reshape(2, 8, 2))[0], heads[0, 0])
    mask = torch.rand(2, 1, 12, 12) > 0.5
    assert torch.equal(layout.crop(mask), mask[:, :, 2:10, 2:10])
    flat = torch.tensor([4, 12 + 6, 12 + 11, 0])  # two reads, then padding columns right and left of the span
    assert layout.attention_positions(flat).tolist() == [2, 8 + 4, 8 + 7, 0]  # the last two clamped into it
    # the span never reaches past the batch: columns 9-11 of 12 would round up to 4 columns
    late = torch.zeros(1, 12, dtype=torch.bool)
    late[0, 9:12] = True
    assert (decoder_layout(late).first, decoder_layout(late).span) == (9, 3)


def test_reads_are_grouped_by_row_and_land_back_in_their_order():
    layout = DecoderLayout(
        index=torch.arange(1), tokens=1, rows=3, width=10, first=0, span=10, attention_index=torch.arange(1)
    )
    reads = torch.tensor([25, 3, 21, 7, 24, 5])  # row 2, 0, 2, 0, 2, 0: three reads in rows 0 and 2, none in 1
    slots, landing = unpadded_decoder.reads_by_row(reads, layout)
    assert slots.shape == (3, 3)
    assert slots[0].tolist() == [3, 7, 5] and slots[2].tolist() == [25, 21, 24]  # each row's reads, in order
    assert torch.equal(slots.flatten()[landing], reads)  # every read's output comes back to its place
    assert slots[1].tolist() == [25] * 3  # a row without reads repeats a read; its outputs are never taken
    lists = torch.tensor([0, 4, 11, 9, 8, 13, 22])  # rows with 4, 2 and 1 reads
    slots, landing = unpadded_decoder.reads_by_row(lists, layout)
    assert slots.tolist() == [
        [0, 4, 9, 8],
        [11, 13, 11, 11],
        [22, 22, 22, 22],
    ]  # spare slots repeat the row's first read
    assert torch.equal(slots.flatten()[landing], lists)


def test_a_batch_wider_than_its_real_columns_equals_the_padded_forward(every_batch):
    """Padding columns left and right of every row (a bucketed width, a left-padded batch): attention
    over the span of real columns only, with one to three reads a row, changes no reward or gradient."""
    torch.manual_seed(0)
    model = SequenceRewardModel(_tiny())
    rows = [[list(range(5, 5 + n)), list(range(5, 9)) + list(range(40, 40 + n))] for n in (3, 7)]
    rows.append([[5, 6, 7], [5, 6, 8, 9], [5, 10]])  # a list of three
    packed = pack_rows(rows, 0)
    left, right = 3, 13
    width = packed["input_ids"].shape[1]
    batch = {
        key: torch.nn.functional.pad(packed[key], (left, right), value=value)
        for key, value in (("input_ids", 0), ("position_ids", 0), ("segment_ids", PAD_SEGMENT))
    }
    index = packed["reward_index"]
    widened = index // width * (width + left + right) + index % width + left
    reads = torch.where(index >= 0, widened, -1).T.flatten()
    reads = reads[reads >= 0]
    results = []
    for skip in (True, False):
        model.skip_padding = skip
        model.zero_grad(set_to_none=True)
        rewards = model(
            batch["input_ids"], reward_index=reads, segment_ids=batch["segment_ids"], position_ids=batch["position_ids"]
        )
        rewards.pow(2).sum().backward()
        results.append((rewards.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert len(every_batch) == 1
    assert every_batch[0].first == left and every_batch[0].span < width + right  # the attention was cut
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=0)
    for name, grad in results[1][1].items():
        torch.testing.assert_close(results[0][1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_the_fp32_cpu_attention_takes_one_float_mask_for_every_layer_bit_for_bit(monkeypatch, every_batch):
    """With ``fp32_cpu_sdpa`` installed, the gathered layers get the boolean mask as sdpa's own fp32
    additive mask once (``cpu_attention.fp32_mask_once``) instead of converting it at every layer: the
    same rewards and gradients to the bit under bf16 autocast, and one mask tensor shared by the layers."""
    from rewardctl.modeling import cpu_attention

    torch.manual_seed(0)
    model = SequenceRewardModel(_tiny())
    packed = pack_rows([[list(range(5, 12)), list(range(5, 9)) + [40, 41]], [[5, 6, 7], [5, 6, 8, 9], [5, 10]]], 0)
    reads = packed["reward_index"].T.flatten()
    reads = reads[reads >= 0]
    masks: list[torch.Tensor] = []
    sdpa = cpu_attention.fp32_cpu_sdpa

    def recording(module, query, key, value, attention_mask, **kwargs):
        masks.append(attention_mask)
        return sdpa(module, query, key, value, attention_mask, **kwargs)

    cpu_attention.install()
    try:
        results = []
        for once in (True, False):
            if not once:
                monkeypatch.setattr(cpu_attention, "fp32_mask_once", lambda mask, implementation: mask)
            masks.clear()
            monkeypatch.setattr(unpadded_decoder, "attention_function", lambda attn: recording)
            model.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                rewards = model(
                    packed["input_ids"],
                    reward_index=reads,
                    segment_ids=packed["segment_ids"],
                    position_ids=packed["position_ids"],
                )
            rewards.float().pow(2).sum().backward()
            results.append((rewards.detach(), [p.grad.clone() for p in model.parameters()], list(masks)))
    finally:
        cpu_attention.uninstall()
    (fast, fast_grads, fast_masks), (slow, slow_grads, slow_masks) = results
    assert every_batch and torch.equal(fast, slow) and all(map(torch.equal, fast_grads, slow_grads))
    layers = len(model.classifier.model.layers) - 1  # the last one attends at its reads, its own mask rows
    assert len(fast_masks) == layers and all(m is fast_masks[0] for m in fast_masks)
    assert fast_masks[0].dtype == torch.float32 and slow_masks[0].dtype == torch.bool
    assert torch.equal(fast_masks[0] == 0, slow_masks[0]) and torch.isinf(fast_masks[0][~slow_masks[0]]).all()


def test_no_layout_where_it_would_not_pay_or_would_stall_a_gpu(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(unpadded_decoder, "TOKEN_ROWS_MULTIPLE", 4)
    assert decoder_layout(torch.ones(2, 6, dtype=torch.bool)) is None  # no padding
    assert decoder_layout(torch.tensor([[1, 1, 1, 1, 1, 0]], dtype=torch.bool)) is None  # 5 -> 8 rows > 6
    assert decoder_layout(torch.zeros(2, 6, dtype=torch.bool, device="meta")) is None  # off the CPU
    assert decoder_layout(torch.zeros(2, 40, dtype=torch.bool)) is None  # no real token at all


# ---- exactness ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["tiny", "llama", "qwen2", "mistral"])
@pytest.mark.parametrize(
    "layout",
    [
        ("data.share_prefix=true", "model.padding_side=right"),
        ("data.share_prefix=false", "data.padding_free=false", "model.padding_side=right"),
        ("data.share_prefix=false", "data.padding_free=false", "model.padding_side=left"),
    ],
    ids=["shared-prefix", "stacked-right", "stacked-left"],
)
def test_pairwise_rewards_loss_and_gradients_equal_the_padded_decoder(tmp_path: Path, kind: str, layout, every_batch):
    method = _method(PairwiseMethod, _model_dir(tmp_path, kind), *layout, "method.center_rewards_coefficient=0.01")
    torch.manual_seed(0)
    model = method.build_model()
    features = _features(method, _pair_rows(random.Random(kind), 6, conversational=kind == "tiny"))
    batch = method.collate(features)
    _assert_gathered_equals_padded(method, model, batch, ("chosen_reward", "rejected_reward"), every_batch)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("final_layer_at_reads", [True, False])
def test_ranklist_k_2_to_9_equals_the_padded_decoder(tmp_path: Path, attention: str, final_layer_at_reads, every_batch):
    method = _method(
        RanklistMethod,
        _model_dir(tmp_path, "qwen2"),
        f"model.attn_implementation={attention}",
        f"model.final_layer_at_reads={str(final_layer_at_reads).lower()}",
    )
    torch.manual_seed(0)
    model = method.build_model()
    assert (model.read_only_blocker() is None) == final_layer_at_reads
    batch = method.collate(_features(method, lists_k_2_to_9()))
    _assert_gathered_equals_padded(method, model, batch, ("rewards",), every_batch)


def test_lora_keeps_the_gathered_forward_exact_and_the_base_weights_untouched(every_batch):
    method = _method(PairwiseMethod, TINY, "peft=lora", "peft.dropout=0.0", "data.share_prefix=true")
    torch.manual_seed(0)
    model = method.build_model()
    model.train()
    batch = method.collate(_features(method, _pair_rows(random.Random(2), 4, False)))
    _assert_gathered_equals_padded(method, model, batch, ("chosen_reward", "rejected_reward"), every_batch)
    _, _, grads = _step(method, model, batch)
    assert grads and all("lora_" in name or "score" in name for name in grads)


def test_the_spare_rows_of_the_default_rounding_change_nothing(monkeypatch: pytest.MonkeyPatch):
    """A batch with enough padding for the default rounding: the spare rows (copies of a padding
    position) run through the layers but are never attended to, read, or given a gradient."""
    seen: list[DecoderLayout] = []
    original = unpadded_decoder.hidden_at_reads
    monkeypatch.setattr(
        unpadded_decoder, "hidden_at_reads", lambda *args, **kwargs: seen.append(args[4]) or original(*args, **kwargs)
    )
    torch.manual_seed(0)
    model = SequenceRewardModel(_tiny())
    rows = [[list(range(5, 5 + n)), list(range(5, 9)) + list(range(40, 40 + n))] for n in (3, 30, 6, 9)]
    batch = pack_rows(rows, 0)
    layout = decoder_layout(batch["segment_ids"] != PAD_SEGMENT)
    assert layout is not None and layout.index.numel() % unpadded_decoder.TOKEN_ROWS_MULTIPLE == 0
    assert layout.index.numel() > layout.tokens  # spare rows present
    reads = batch.pop("reward_index").T.flatten()
    results = []
    for skip in (True, False):
        model.skip_padding = skip
        model.zero_grad(set_to_none=True)
        rewards = model(
            batch["input_ids"], reward_index=reads, **{k: batch[k] for k in ("segment_ids", "position_ids")}
        )
        rewards.pow(2).sum().backward()
        results.append((rewards.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert len(seen) == 1 and seen[0].index.numel() > seen[0].tokens  # gathered, with spare rows, once
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=0)
    for name, grad in results[1][1].items():
        torch.testing.assert_close(results[0][1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_the_layers_before_the_last_see_the_real_tokens_only(every_batch):
    """What makes it faster: every projection and MLP sees T tokens, not B * L; the last layer's MLP
    sees one token per reward and its key projection the T tokens."""
    model = SequenceRewardModel(_tiny())
    rows = [[[5, 6, 7, 8, 9, 17, 18, 19], [5, 6, 7, 10]], [[5, 11, 12], [5, 13]]]
    batch = pack_rows(rows, 0)
    real = int((batch["segment_ids"] != PAD_SEGMENT).sum())
    assert real < batch["input_ids"].numel()
    reads = batch.pop("reward_index").T.flatten()
    reads = reads[reads >= 0]
    seen: dict[str, list[torch.Size]] = {}
    layers = model.classifier.model.layers
    watched = {"first.mlp": layers[0].mlp, "first.q_proj": layers[0].self_attn.q_proj}
    watched |= {"last.mlp": layers[-1].mlp, "last.k_proj": layers[-1].self_attn.k_proj}
    for name, module in watched.items():
        module.register_forward_hook(lambda m, args, out, name=name: seen.setdefault(name, []).append(args[0].shape))
    model(batch["input_ids"], reward_index=reads, **{k: batch[k] for k in ("segment_ids", "position_ids")})
    assert len(every_batch) == 1
    assert seen["first.mlp"][0][:-1].numel() == seen["first.q_proj"][0][:-1].numel() == real
    assert seen["last.k_proj"][0][:-1].numel() == real and seen["last.mlp"][0][:-1].numel() == 4


class _Doubled(ModelHook):
    """An accelerate hook that changes its module's output, so skipping it would show."""

    def post_forward(self, module, output):
        return output * 2


def _saved_bytes(model: SequenceRewardModel, ids: torch.Tensor, mask: torch.Tensor) -> tuple[int, list]:
    """Bytes the forward keeps for its backward (each storage once), and the float tensors among them
    shaped like one layer's gathered heads (T, heads, head_dim)."""
    kept: dict[int, int] = {}
    heads: list[tuple[int, ...]] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        if tensor.is_floating_point() and tensor.dim() == 3 and tensor.shape[1:] == (4, 16):
            heads.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(ids, mask)
    return sum(kept.values()), heads


def test_the_gathered_forward_keeps_no_more_for_its_backward_than_the_padded_one(every_batch):
    """Scattering the gathered queries, keys and values into the attention layout keeps only the
    positions for the backward (autograd's ``index_copy`` kept a copy of each: more memory than the
    padded forward on batches with little padding, as PRM's and BCO's long rows are); the gradient
    is the same (the equality tests above)."""
    model = SequenceRewardModel(_tiny())  # 64 wide, 4 heads of 16
    model.train()
    ids = torch.randint(5, 100, (4, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 34:] = mask[3, 30:] = 0  # 144 real tokens of 160
    gathered, heads = _saved_bytes(model, ids * mask, mask)
    assert every_batch and not heads
    model.skip_padding = False
    padded, _ = _saved_bytes(model, ids * mask, mask)
    assert gathered < padded


# ---- where the padded forward runs -------------------------------------------------------------------
def test_the_padded_decoder_runs_where_the_gathered_one_would_not_be_exact(every_batch):
    def blocker(classifier, **kwargs) -> str | None:
        return SequenceRewardModel(classifier, **kwargs).skip_padding_blocker()

    assert blocker(_tiny()) is None and SequenceRewardModel(_tiny()).skip_padding
    assert blocker(_tiny(), skip_padding=False) == "model.skip_padding=false"
    gpt2 = AutoModelForSequenceClassification.from_config(
        GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, pad_token_id=0, num_labels=1)
    )
    assert blocker(gpt2) == "GPT2Model is not one of transformers' LlamaModel, MistralModel, Qwen2Model"
    hooked = _tiny()
    hooked.model.layers[0].register_forward_pre_hook(lambda module, args: None)
    assert blocker(hooked) == "hooks on LlamaDecoderLayer (the gathered forward would skip them)"
    offloaded = _tiny()  # accelerate's hooks replace ``forward`` instead of registering a torch hook
    add_hook_to_module(offloaded.model.layers[1], ModelHook())
    assert blocker(offloaded) == "hooks on LlamaDecoderLayer (the gathered forward would skip them)"
    norm = _tiny().model.layers[0].input_layernorm
    add_hook_to_module(norm, _Doubled())
    hidden = torch.randn(1, 3, norm.weight.numel())
    torch.testing.assert_close(unpadded_decoder.rms_norm(norm, hidden), norm(hidden))  # the hook runs
    assert blocker(_tiny("flex_attention")) == "attn_implementation=flex_attention is not sdpa or eager"
    checkpointed = _tiny()
    checkpointed.gradient_checkpointing_enable()
    checkpointed.eval()  # how a run logs it: before training starts
    assert blocker(checkpointed) == "gradient checkpointing (the layers run their own checkpointed call)"
    assert unpadded_decoder.unpadded_blocker(checkpointed.model) is None  # eval batches: no checkpointing
    checkpointed.train()
    assert unpadded_decoder.unpadded_blocker(checkpointed.model) == blocker(checkpointed)

    # a sliding window narrower than the batch: the stock mask applies it, the segment mask would not
    config = Qwen2Config(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_labels=1,
        pad_token_id=0,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=0,
    )
    windowed = SequenceRewardModel(AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa"))
    assert unpadded_decoder.narrowest_window(windowed.classifier.model) == 4
    ids = torch.randint(1, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4])
    windowed(ids, mask)
    model = SequenceRewardModel(_tiny())
    model(ids, mask)
    assert len(every_batch) == 1  # the tiny Llama only


def test_a_model_narrower_than_min_hidden_keeps_its_padded_layers(monkeypatch: pytest.MonkeyPatch, every_batch):
    """At the bundled model's 64 wide the gather cost more than the padding it skips (MIN_HIDDEN):
    the padded forward runs, and the log's reason says why."""
    monkeypatch.setattr(unpadded_decoder, "MIN_HIDDEN", 256)
    method = _method(PairwiseMethod, TINY)
    model = method.build_model()
    assert model.skip_padding  # the setting stays on: the width is judged per model
    assert model.skip_padding_blocker() == (
        "hidden size 64 < 256 (at this width the gather costs more than the padding)"
    )
    batch = method.collate(_features(method, _pair_rows(random.Random(0), 6, False)))
    _step(method, model, batch)
    assert every_batch == []  # the gathered forward never ran
    monkeypatch.setattr(unpadded_decoder, "MIN_HIDDEN", 64)
    assert model.skip_padding_blocker() is None
    _step(method, model, batch)
    assert every_batch  # the same batch gathers at a width the rule allows
