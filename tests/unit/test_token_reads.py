"""A PRM token classifier computing the logits it is read at only (rewardctl/modeling/token_reads.py):
each read logit, the loss and every gradient equal the stock forward's in fp32, for the layers on the
real tokens, the last layer at the reads, both and neither; the stock forward wherever that would not be
exact; and the saved model stays stock."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForTokenClassification, LlamaConfig, Qwen2Config

from rewardctl.config.schema import ModelConfig
from rewardctl.data.packing import token_read_index
from rewardctl.methods.prm import IGNORE
from rewardctl.modeling import read_slots, token_reads, unpadded_decoder
from rewardctl.modeling.common import token_logits
from rewardctl.modeling.token import compute_labelled_tokens_only
from rewardctl.modeling.token_reads import ReadSettings, compute_reads_only, computes_reads_only

SETTINGS = [
    pytest.param(ReadSettings(skip_padding=True, last_at_reads=True), id="real-tokens+last-at-reads"),
    pytest.param(ReadSettings(skip_padding=True, last_at_reads=False), id="real-tokens"),
    pytest.param(ReadSettings(skip_padding=False, last_at_reads=True), id="last-at-reads"),
]


def _classifier(kind: str, attention: str = "sdpa", **qwen2: object) -> torch.nn.Module:
    """A 3-layer token classifier; ``qwen2`` keywords reach a Qwen2 config (sliding windows)."""
    shape = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        num_labels=2,
        pad_token_id=0,
    )
    config = LlamaConfig(**shape) if kind == "llama" else Qwen2Config(**shape, **{"use_sliding_window": False, **qwen2})
    config.classifier_dropout = 0.0
    torch.manual_seed(0)
    return AutoModelForTokenClassification.from_config(config, attn_implementation=attention).float()


def _batch(seed: int = 1, every_step: bool = True) -> dict[str, torch.Tensor]:
    """Right-padded rows of different lengths, labels at a few step ends (or the last one only)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [13, 7, 10, 4]
    width = max(lengths)
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    labels = torch.full((len(lengths), width), IGNORE)
    for row, length in enumerate(lengths):
        input_ids[row, :length] = torch.randint(1, 97, (length,), generator=generator)
        ends = list(range(2, length, 3)) + [length - 1] if every_step else [length - 1]
        labels[row, sorted(set(ends))] = torch.randint(0, 2, (len(set(ends)),), generator=generator)
    attention_mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    return {**batch, **token_read_index(labels != IGNORE, attention_mask)}


def _loss_and_grads(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, dict]:
    model.zero_grad()
    read = batch["labels"] != IGNORE
    logits = token_logits(model, batch)[0]
    picked = logits[read]
    loss = torch.nn.functional.cross_entropy(picked, batch["labels"][read])
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return picked.detach(), loss.detach(), grads


def _assert_same_gradients(fast: dict, stock: dict) -> None:
    """The same parameters got gradients, each equal within fp32 rounding."""
    assert fast.keys() == stock.keys()
    for name, grad in stock.items():
        torch.testing.assert_close(fast[name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.fixture(autouse=True)
def any_width(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test models are narrower than ``unpadded_decoder.MIN_HIDDEN``: let them gather anyway."""
    monkeypatch.setattr(unpadded_decoder, "MIN_HIDDEN", 0)


@pytest.fixture
def no_rounding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny batches hold less padding than one rounding step of the gathered row."""
    monkeypatch.setattr(unpadded_decoder, "TOKEN_ROWS_MULTIPLE", 1)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("every_step", [True, False], ids=["every-step", "last-step"])
def test_read_logits_loss_and_gradients_equal_the_stock_forward(kind, settings, every_step, no_rounding):
    model = _classifier(kind)
    batch = _batch(every_step=every_step)
    stock = _loss_and_grads(model, batch)
    compute_reads_only(model, settings)
    assert computes_reads_only(model)
    fast = _loss_and_grads(model, batch)
    torch.testing.assert_close(fast[0], stock[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(fast[1], stock[1], atol=1e-6, rtol=0)
    _assert_same_gradients(fast[2], stock[2])


def test_the_layers_and_head_see_the_real_tokens_and_the_reads_only(no_rounding):
    model = _classifier("llama")
    compute_reads_only(model, ReadSettings(skip_padding=True, last_at_reads=True))
    batch = _batch()
    seen: dict[str, tuple[int, ...]] = {}
    modules = {
        "first_q": model.model.layers[0].self_attn.q_proj,
        "last_q": model.model.layers[-1].self_attn.q_proj,
        "score": model.score,
    }

    def record(name: str):
        def hook(_module, args, _output) -> None:
            seen.setdefault(name, tuple(args[0].shape))

        return hook

    for name, module in modules.items():
        module.register_forward_hook(record(name))
    token_logits(model, batch)
    real = int(batch["attention_mask"].sum())
    most = int((batch["labels"] != IGNORE).sum(1).max())
    assert seen["first_q"] == (1, real, 32)  # the real tokens, one gathered row
    assert seen["last_q"] == (4, most, 32)  # each row's reads (slots up to the most reads of a row)
    assert seen["score"] == (4, most, 32)  # the head at the read slots only


def test_unread_positions_are_zero_and_read_ones_are_not():
    model = _classifier("llama")
    compute_reads_only(model, ReadSettings(skip_padding=False, last_at_reads=True))
    batch = _batch(every_step=False)
    read = batch["labels"] != IGNORE
    logits = token_logits(model, batch)[0]
    assert logits[~read].abs().sum() == 0
    assert (logits[read].abs().sum(-1) > 0).all()


def test_read_slots_are_left_aligned_and_padded_with_the_rows_last_real_token():
    read = torch.tensor([[0, 1, 0, 1, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 1, 1]], dtype=torch.bool)
    real = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]])
    found = token_read_index(read, real)
    assert found["read_columns"].tolist() == [[1, 3, 4], [2, 2, 2], [0, 3, 3], [3, 3, 3]]  # (3, 4) is padding
    assert found["read_valid"].tolist() == [[True] * 3, [False] * 3, [True, False, False], [True, False, False]]
    empty = token_read_index(torch.zeros(2, 3, dtype=torch.bool), torch.ones(2, 3))
    assert empty["read_columns"].tolist() == [[2], [2]] and not empty["read_valid"].any()


def test_stock_forward_where_the_reads_path_would_not_be_exact_or_is_not_asked_for(no_rounding):
    batch = _batch()
    read = batch["labels"] != IGNORE
    eager = _classifier("llama", attention="eager")
    compute_reads_only(eager, ReadSettings(skip_padding=True, last_at_reads=True))
    stock_logits = _classifier("llama", attention="eager")(
        **{k: batch[k] for k in ("input_ids", "attention_mask")}
    ).logits
    # eager attention is exact too (additive masks): same logits at the reads
    torch.testing.assert_close(token_logits(eager, batch)[0][read], stock_logits[read], atol=1e-5, rtol=0)
    # no reads in the batch: every position, as stock
    unread = {k: v for k, v in batch.items() if not k.startswith("read_")}
    torch.testing.assert_close(token_logits(eager, unread)[0], stock_logits, atol=1e-5, rtol=0)
    # hidden states requested: stock
    out = eager(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        output_hidden_states=True,
        **{token_reads.READS_KEY: (batch["read_columns"], batch["read_valid"])},
    )
    assert out.hidden_states is not None and out.logits[~read].abs().sum() > 0


def test_blockers_name_why(caplog: pytest.LogCaptureFixture):
    assert token_reads.reads_blocker(_classifier("qwen2")) is None
    flex = _classifier("llama")
    flex.config._attn_implementation = "flex_attention"
    assert token_reads.reads_blocker(flex) is None  # the backbone is stock: each saving is judged apart
    with caplog.at_level(logging.INFO, logger="rewardctl.modeling.read_slots"):
        compute_labelled_tokens_only(flex, ModelConfig(name_or_path="unused"))
    assert not computes_reads_only(flex)  # neither saving: the stock class
    assert (
        "token classifier: every layer over every position: attn_implementation=flex_attention is not sdpa or "
        "eager; attn_implementation=flex_attention takes no dense mask" in caplog.text
    )


def _shapes_seen(model: torch.nn.Module) -> dict[str, list[tuple[int, ...]]]:
    """The (rows, positions) the first layer's queries and the last layer's MLP run on, per call."""
    seen: dict[str, list[tuple[int, ...]]] = {"first_q": [], "last_mlp": []}
    for name, module in (("first_q", model.model.layers[0].self_attn.q_proj), ("last_mlp", model.model.layers[-1].mlp)):
        module.register_forward_hook(lambda _m, args, _o, name=name: seen[name].append(tuple(args[0].shape[:2])))
    return seen


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing_and_a_hooked_layer_keep_the_last_layer_and_head_at_the_reads(
    reentrant, no_rounding, caplog: pytest.LogCaptureFixture
):
    """Either keeps the layers on the padded batch (``unpadded_blocker``), not the last layer at the
    reads: the stock layers run, checkpointed or hooked, and the forward stops before the last one."""
    batch = _batch()
    stock = _loss_and_grads(_classifier("llama"), batch)
    most = int((batch["labels"] != IGNORE).sum(1).max())
    real = int(batch["attention_mask"].sum())
    checkpointed = _classifier("llama")
    checkpointed.activation_checkpointing_enable({"use_reentrant": reentrant})
    checkpointed.train()
    with caplog.at_level(logging.INFO, logger="rewardctl.modeling.read_slots"):
        compute_labelled_tokens_only(checkpointed, ModelConfig(name_or_path="unused"))
    assert (
        "token classifier: layers on the real tokens of CPU batches in evaluation, over the padding in training: "
        "gradient checkpointing (the layers run their own checkpointed call); last layer and head at the "
        "labelled tokens only (GPU batches too)" in caplog.text
    )
    seen = _shapes_seen(checkpointed)
    fast = _loss_and_grads(checkpointed, batch)
    # the padded layers, the first recomputed in the backward (checkpointed); the last at the reads, once
    assert seen == {"first_q": [(4, 13), (4, 13)], "last_mlp": [(4, most)]}
    torch.testing.assert_close(fast[0], stock[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(fast[1], stock[1], atol=1e-6, rtol=0)
    _assert_same_gradients(fast[2], stock[2])
    checkpointed.eval()  # checkpointing applies in training only: an evaluation gathers the real tokens
    seen["first_q"].clear()
    with torch.no_grad():
        token_logits(checkpointed, batch)
    assert seen["first_q"] == [(1, real)]

    # The last layer in full by choice: training runs the stock forward, an evaluation still gathers.
    full_last = _classifier("llama")
    full_last.activation_checkpointing_enable({"use_reentrant": reentrant})
    compute_labelled_tokens_only(full_last, ModelConfig(name_or_path="unused", final_layer_at_reads=False))
    assert computes_reads_only(full_last)
    seen = _shapes_seen(full_last)
    full_last.eval()
    with torch.no_grad():
        token_logits(full_last, batch)
    assert seen["first_q"] == [(1, real)]

    hooked = _classifier("llama")
    compute_reads_only(hooked, ReadSettings(skip_padding=True, last_at_reads=True))
    calls = []
    hooked.model.layers[0].register_forward_hook(lambda *_: calls.append(1))  # the stock layers run it
    seen = _shapes_seen(hooked)
    fast = _loss_and_grads(hooked, batch)
    assert calls == [1] and seen == {"first_q": [(4, 13)], "last_mlp": [(4, most)]}
    torch.testing.assert_close(fast[0], stock[0], atol=1e-5, rtol=0)
    _assert_same_gradients(fast[2], stock[2])


def test_the_switch_logs_and_saves_a_stock_classifier(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    model = _classifier("llama")
    cfg = ModelConfig(name_or_path="unused")
    with caplog.at_level(logging.INFO, logger="rewardctl.modeling.read_slots"):
        compute_labelled_tokens_only(model, cfg)
    assert "layers on the real tokens of CPU batches; last layer and head at the labelled tokens only" in caplog.text
    assert type(model).__name__ == "LlamaForTokenClassification" and computes_reads_only(model)
    model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForTokenClassification.from_pretrained(tmp_path / "saved")
    assert not computes_reads_only(reloaded) and reloaded.config.architectures == ["LlamaForTokenClassification"]
    off = _classifier("llama")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rewardctl.modeling.read_slots"):
        compute_labelled_tokens_only(
            off, ModelConfig(name_or_path="unused", skip_padding=False, final_layer_at_reads=False)
        )
    assert not computes_reads_only(off) and "every layer over every position" in caplog.text


def test_a_lora_classifier_reads_the_same_logits_and_trains_the_same_adapter(no_rounding):
    from peft import LoraConfig, get_peft_model

    def lora(model: torch.nn.Module) -> torch.nn.Module:
        config = LoraConfig(
            task_type="TOKEN_CLS",
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "down_proj"],
            modules_to_save=["score"],
            init_lora_weights=False,
        )
        torch.manual_seed(3)
        return get_peft_model(model, config)

    batch = _batch()
    stock_model, fast_model = lora(_classifier("llama")), lora(_classifier("llama"))
    compute_reads_only(fast_model, ReadSettings(skip_padding=True, last_at_reads=True))
    assert computes_reads_only(fast_model) and not computes_reads_only(stock_model)
    stock, fast = _loss_and_grads(stock_model, batch), _loss_and_grads(fast_model, batch)
    torch.testing.assert_close(fast[0], stock[0], atol=1e-5, rtol=0)
    assert all("lora_" in k or "score" in k for k in fast[2])
    _assert_same_gradients(fast[2], stock[2])


def test_the_prm_method_trains_and_evaluates_the_same_through_the_reads(no_rounding):
    """The bundled PRM run's own batches, through ``PrmMethod``'s collator, step and eval step."""
    from accelerate.utils import set_seed

    from rewardctl.data.loading import load_rows
    from rewardctl.methods.prm import PrmMethod
    from rewardctl.methods.registry import to_run_config

    from ..conftest import compose_train

    run = to_run_config(compose_train(["method=prm"]))
    method = PrmMethod(run.method, run)
    rows = load_rows(run.data.train, split="train").select(range(6))
    features = list(method.prepare(rows, run.data.train, training=True).dataset)
    batch = method.collate(features)
    assert batch["read_columns"].shape[0] == 6 and batch["read_valid"].sum() == (batch["labels"] != IGNORE).sum()
    set_seed(0)
    model = method.build_model()
    assert computes_reads_only(model)
    outputs = {}
    for name in ("reads", "stock"):
        model.zero_grad()
        out = method.train_step(model, batch)
        out.loss_sum.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        with torch.no_grad():
            evaluated = method.eval_step(model.eval(), batch)
        model.train()
        outputs[name] = (out.loss_sum.detach(), grads, evaluated)
        compute_reads_only(model, ReadSettings(skip_padding=False, last_at_reads=False))
    assert not computes_reads_only(model)
    (loss, grads, evaluated), (stock_loss, stock_grads, stock_evaluated) = outputs["reads"], outputs["stock"]
    torch.testing.assert_close(loss, stock_loss, atol=1e-5, rtol=1e-6)
    _assert_same_gradients(grads, stock_grads)
    for key in ("step_prob", "loss_sum", "present"):
        torch.testing.assert_close(evaluated[key], stock_evaluated[key], atol=1e-5, rtol=1e-6, msg=key)


def test_a_sliding_last_layer_runs_in_full_and_the_log_says_so(no_rounding, caplog: pytest.LogCaptureFixture):
    model = _classifier("qwen2", use_sliding_window=True, sliding_window=32, max_window_layers=0)
    assert model.model.layers[-1].self_attn.sliding_window == 32  # wider than the batch: the layout still applies
    batch = _batch()
    stock = _loss_and_grads(model, batch)
    with caplog.at_level(logging.INFO, logger="rewardctl.modeling.read_slots"):
        compute_labelled_tokens_only(model, ModelConfig(name_or_path="unused"))
    assert (
        "layers on the real tokens of CPU batches; last layer at every position: the last layer attends "
        "through a sliding window" in caplog.text
    )
    fast = _loss_and_grads(model, batch)
    torch.testing.assert_close(fast[0], stock[0], atol=1e-5, rtol=0)
    _assert_same_gradients(fast[2], stock[2])


def test_no_real_tokens_layout_for_a_batch_with_an_empty_row(no_rounding):
    model = _classifier("llama")
    real = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    assert read_slots.real_tokens_layout(model.model, real) is not None
    assert read_slots.real_tokens_layout(model.model, torch.cat([real, torch.zeros(1, 4, dtype=torch.bool)])) is None


def test_a_narrow_model_keeps_its_padded_layers_and_still_reads_at_the_labels(
    monkeypatch: pytest.MonkeyPatch, no_rounding, caplog: pytest.LogCaptureFixture
):
    monkeypatch.setattr(unpadded_decoder, "MIN_HIDDEN", 256)
    model = _classifier("llama")
    batch = _batch()
    stock = _loss_and_grads(model, batch)
    with caplog.at_level(logging.INFO, logger="rewardctl.modeling.read_slots"):
        compute_labelled_tokens_only(model, ModelConfig(name_or_path="unused"))
    assert "layers over the padding: hidden size 32 < 256" in caplog.text
    assert "last layer and head at the labelled tokens only" in caplog.text
    gathered = []
    monkeypatch.setattr(unpadded_decoder, "layers_before_last", lambda *a, **k: gathered.append(1))
    fast = _loss_and_grads(model, batch)
    assert gathered == []  # no real-tokens layout at this width
    torch.testing.assert_close(fast[0], stock[0], atol=1e-5, rtol=0)
