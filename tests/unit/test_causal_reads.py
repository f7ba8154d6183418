"""A causal LM policy computing its logits at the completion-predicting positions only
(rewardctl/modeling/causal_reads.py): each log-probability and every gradient equal the stock forward's
in fp32, for the layers on the real tokens, the last layer at the positions, and both; the stock forward
wherever that would not be exact or is not asked for; BCO's own steps through it; and the saved model
stays stock."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from rewardctl.config.schema import ModelConfig
from rewardctl.data.packing import completion_logit_index
from rewardctl.modeling import causal_reads, unpadded_decoder
from rewardctl.modeling.causal import completion_logps, compute_predicting_positions_only
from rewardctl.modeling.causal_reads import compute_positions_only, computes_positions_only
from rewardctl.modeling.common import takes_logit_positions, takes_logits_to_keep
from rewardctl.modeling.read_slots import ReadSettings

SETTINGS = [
    pytest.param(ReadSettings(skip_padding=True, last_at_reads=True), id="real-tokens+last-at-positions"),
    pytest.param(ReadSettings(skip_padding=True, last_at_reads=False), id="real-tokens"),
    pytest.param(ReadSettings(skip_padding=False, last_at_reads=True), id="last-at-positions"),
]
LENGTHS, PROMPTS = [13, 7, 10, 4], [5, 3, 2, 3]  # completions of 8, 4, 8 and 1 tokens


@pytest.fixture(autouse=True)
def any_width(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test models are narrower than ``unpadded_decoder.MIN_HIDDEN``, and their tiny batches hold
    less padding than one rounding step of the gathered row: let them gather anyway."""
    monkeypatch.setattr(unpadded_decoder, "MIN_HIDDEN", 0)
    monkeypatch.setattr(unpadded_decoder, "TOKEN_ROWS_MULTIPLE", 1)


def _policy(kind: str, attention: str = "sdpa") -> torch.nn.Module:
    shape = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    config = LlamaConfig(**shape) if kind == "llama" else Qwen2Config(**shape, use_sliding_window=False)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attention).float()


def _batch() -> dict[str, torch.Tensor]:
    """Right-padded rows (the policy's padding side), each a prompt then a completion."""
    generator = torch.Generator().manual_seed(1)
    width = max(LENGTHS)
    input_ids = torch.zeros(len(LENGTHS), width, dtype=torch.long)
    completion_mask = torch.zeros_like(input_ids)
    for row, (length, prompt) in enumerate(zip(LENGTHS, PROMPTS, strict=True)):
        input_ids[row, :length] = torch.randint(1, 97, (length,), generator=generator)
        completion_mask[row, prompt:length] = 1
    attention_mask = (torch.arange(width)[None, :] < torch.tensor(LENGTHS)[:, None]).long()
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}
    return {**batch, **completion_logit_index(completion_mask)}


def _logps_and_grads(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    logps = completion_logps(model, batch)[0]
    (logps * torch.tensor([1.0, -2.0, 0.5, 3.0])).sum().backward()  # every row's gradient weighs differently
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logps.detach(), grads


def _assert_same(fast: tuple[torch.Tensor, dict], stock: tuple[torch.Tensor, dict]) -> None:
    torch.testing.assert_close(fast[0], stock[0], atol=1e-5, rtol=0)
    assert fast[1].keys() == stock[1].keys()
    for name, grad in stock[1].items():
        torch.testing.assert_close(fast[1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("settings", SETTINGS)
def test_logps_and_gradients_equal_the_stock_forward(kind, settings):
    model = _policy(kind)
    batch = _batch()
    assert batch["logit_columns"].shape == (4, 8)  # rows needing 4 and 1 positions hold spare slots
    stock = _logps_and_grads(model, batch)
    compute_positions_only(model, settings)
    assert computes_positions_only(model)
    first, last = _query_rows(model, 0), _query_rows(model, -1)
    fast = _logps_and_grads(model, batch)
    _assert_same(fast, stock)
    # the savings asked for really ran: the gathered row of real tokens, the last layer at 8 slots
    assert first[0] == ((1, sum(LENGTHS)) if settings.skip_padding else (4, max(LENGTHS)))
    assert last[0] == ((4, 8) if settings.last_at_reads else (1, sum(LENGTHS)))


def test_the_layers_see_the_real_tokens_and_the_last_layer_and_head_the_positions_only(
    monkeypatch: pytest.MonkeyPatch,
):
    import rewardctl.data.packing as packing

    monkeypatch.setattr(packing, "LOGIT_COLUMN_BUCKETS", 0)  # exact widths: the slots are the positions
    model = _policy("llama")
    compute_positions_only(model, ReadSettings(skip_padding=True, last_at_reads=True))
    batch = _batch()
    seen: dict[str, tuple[int, ...]] = {}
    modules = {
        "first_q": model.model.layers[0].self_attn.q_proj,
        "last_q": model.model.layers[-1].self_attn.q_proj,
        "last_k": model.model.layers[-1].self_attn.k_proj,
        "lm_head": model.lm_head,
    }

    def record(name: str):
        def hook(_module, args, _output) -> None:  # returns None: the output stays the module's own
            seen.setdefault(name, tuple(args[0].shape))

        return hook

    for name, module in modules.items():
        module.register_forward_hook(record(name))
    completion_logps(model, batch)
    real = sum(LENGTHS)
    most = max(length - prompt for length, prompt in zip(LENGTHS, PROMPTS, strict=True))  # 8
    assert seen["first_q"] == (1, real, 32)  # the real tokens, one gathered row
    assert seen["last_k"] == (1, real, 32)  # the last layer's keys and values: every real token
    assert seen["last_q"] == (4, most, 32)  # its queries: each row's predicting positions
    assert seen["lm_head"] == (4, most, 32)


def _query_rows(model: torch.nn.Module, layer: int) -> list[tuple[int, int]]:
    """The (rows, positions) a layer's queries are computed for, per call: (B, L) on the stock path,
    (1, real tokens) gathered, (B, K) for the last layer at the kept positions (a hook on the
    projection, which no blocker looks at)."""
    seen: list[tuple[int, int]] = []

    def hook(_module, args, _output) -> None:
        seen.append(tuple(args[0].shape[:2]))

    model.model.layers[layer].self_attn.q_proj.register_forward_hook(hook)
    return seen


def test_the_stock_forward_runs_where_positions_are_not_given_as_rows_of_columns():
    model = _policy("llama")
    stock = copy.deepcopy(model)
    compute_positions_only(model, ReadSettings(skip_padding=True, last_at_reads=True))
    batch = _batch()
    ids, mask, columns = batch["input_ids"], batch["attention_mask"], batch["logit_columns"]
    calls = _query_rows(model, -1)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=columns)
        assert calls == [(4, columns.shape[1])]  # the positions path: the last layer at the kept positions only
        for kwargs in (
            {"logits_to_keep": 1},  # BCO's UDM prompt embeddings: the last position only
            {"logits_to_keep": torch.tensor([2, 5])},  # 1-D: one packed row's positions
            {"logits_to_keep": torch.arange(ids.shape[1]).expand_as(ids), "labels": ids},  # a loss asked for
            {"logits_to_keep": columns, "output_hidden_states": True},
            {"logits_to_keep": columns, "position_ids": torch.arange(ids.shape[1]).expand_as(ids)},
        ):
            calls.clear()
            got = model(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs)
            want = stock(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs)
            assert calls == [(4, ids.shape[1])], kwargs.keys()  # every position: the stock forward
            torch.testing.assert_close(got.logits, want.logits, atol=0, rtol=0)


def test_the_stock_forward_runs_where_the_config_or_the_positions_ask_for_something_else():
    """A boolean mask of positions, a cache by the config's default, hidden states by the config's
    flag: each returns what the stock forward returns (same logits, same extra outputs)."""
    batch = _batch()
    ids, mask, columns = batch["input_ids"], batch["attention_mask"], batch["logit_columns"]
    for change, kwargs in (
        ({}, {"use_cache": False, "logits_to_keep": batch["completion_mask"].bool()}),  # (N, V) in stock
        ({}, {"logits_to_keep": columns}),  # use_cache left to the config (True): stock returns a cache
        ({"output_hidden_states": True}, {"use_cache": False, "logits_to_keep": columns}),
    ):
        model = _policy("llama")
        for key, value in change.items():
            setattr(model.config, key, value)
        stock = copy.deepcopy(model)
        compute_positions_only(model, ReadSettings(skip_padding=True, last_at_reads=True))
        calls = _query_rows(model, -1)
        with torch.no_grad():
            got, want = (
                model(input_ids=ids, attention_mask=mask, **kwargs),
                stock(input_ids=ids, attention_mask=mask, **kwargs),
            )
        assert calls == [(4, ids.shape[1])], (change, kwargs.keys())
        torch.testing.assert_close(got.logits, want.logits, atol=0, rtol=0)
        assert (got.past_key_values is None) == (want.past_key_values is None)
        assert (got.hidden_states is None) == (want.hidden_states is None)


def test_transformers_output_capturing_hooks_leave_the_positions_path_on():
    """The first forward asking for hidden states (BCO's prompt embeddings) makes transformers install
    inert recording hooks on every layer and attention, for good; a user's hook still blocks."""
    model = _policy("llama")
    compute_positions_only(model, ReadSettings(skip_padding=True, last_at_reads=True))
    batch = _batch()
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    assert model.model.layers[0]._forward_hooks  # transformers' own, installed by that call
    assert unpadded_decoder.unpadded_blocker(model.model) is None
    calls = _query_rows(model, -1)
    stock = copy.deepcopy(model)
    compute_positions_only(stock, ReadSettings(skip_padding=False, last_at_reads=False))
    torch.testing.assert_close(completion_logps(model, batch)[0], completion_logps(stock, batch)[0], atol=1e-5, rtol=0)
    assert calls[0] == (4, batch["logit_columns"].shape[1])
    model.model.layers[0].register_forward_hook(lambda *_: None)
    assert "hooks on LlamaDecoderLayer" in unpadded_decoder.unpadded_blocker(model.model)


def test_blockers_name_why(caplog: pytest.LogCaptureFixture):
    flex = _policy("llama")
    flex.config._attn_implementation = "flex_attention"
    assert causal_reads.positions_blocker(flex) is None  # the backbone is stock: each saving is judged apart
    with caplog.at_level(logging.INFO, logger="rewardctl.modeling.read_slots"):
        compute_predicting_positions_only(flex, ModelConfig(name_or_path="unused"))
    assert not computes_positions_only(flex)
    assert "policy: every layer over every position: attn_implementation=flex_attention" in caplog.text

    class OwnPolicy(type(_policy("llama"))):
        pass

    own = _policy("llama")
    own.__class__ = OwnPolicy
    assert "is not one of transformers'" in causal_reads.positions_blocker(own)
    assert causal_reads.positions_blocker(_policy("qwen2")) is None


def test_a_checkpointed_policy_runs_its_last_layer_and_head_at_the_positions(caplog: pytest.LogCaptureFixture):
    """Gradient checkpointing keeps the stock layers over the padded batch, checkpointed, and the last
    layer still runs at the completion-predicting positions only: log-probabilities and gradients
    equal the unswapped, uncheckpointed forward's."""
    batch = _batch()
    stock = _logps_and_grads(_policy("llama"), batch)
    model = _policy("llama")
    model.activation_checkpointing_enable()
    model.train()
    with caplog.at_level(logging.INFO, logger="rewardctl.modeling.read_slots"):
        compute_predicting_positions_only(model, ModelConfig(name_or_path="unused"))
    assert (
        "policy: layers on the real tokens of CPU batches in evaluation, over the padding in training: gradient "
        "checkpointing (the layers run their own checkpointed call); last layer and head at the "
        "completion-predicting positions only" in caplog.text
    )
    first, last = _query_rows(model, 0), _query_rows(model, -1)
    fast = _logps_and_grads(model, batch)
    assert first == [(4, max(LENGTHS))] * 2  # padded, and recomputed in the backward (checkpointed)
    assert last == [(4, batch["logit_columns"].shape[1])]  # the last layer at the positions, once
    _assert_same(fast, stock)


def test_the_switch_keeps_what_the_policy_takes_logs_and_saves_a_stock_model(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    model = _policy("llama")
    with caplog.at_level(logging.INFO, logger="rewardctl.modeling.read_slots"):
        compute_predicting_positions_only(model, ModelConfig(name_or_path="unused"))
    assert (
        "policy: layers on the real tokens of CPU batches; last layer and head at the completion-predicting "
        "positions only" in caplog.text
    )
    # What callers judge by the class: still the stock forward's (a swap must not turn these off).
    assert computes_positions_only(model) and takes_logit_positions(model) and takes_logits_to_keep(model)
    reference = copy.deepcopy(model)  # BCO's frozen reference: the same forward on its own weights
    assert computes_positions_only(reference)
    model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert not computes_positions_only(reloaded) and reloaded.config.architectures == ["LlamaForCausalLM"]
    off = _policy("llama")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rewardctl.modeling.read_slots"):
        compute_predicting_positions_only(
            off, ModelConfig(name_or_path="unused", skip_padding=False, final_layer_at_reads=False)
        )
    assert not computes_positions_only(off) and "policy: every layer over every position" in caplog.text


def test_a_lora_policy_and_its_adapter_free_reference_equal_the_stock_forward():
    from peft import LoraConfig, get_peft_model

    def lora(model: torch.nn.Module) -> torch.nn.Module:
        config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
        torch.manual_seed(3)
        peft_model = get_peft_model(model, config, autocast_adapter_dtype=False)
        for name, param in peft_model.named_parameters():  # LoRA's B starts at zero: make the adapter matter
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.1)
        return peft_model

    batch = _batch()
    stock_model, fast_model = lora(_policy("llama")), lora(_policy("llama"))
    compute_positions_only(fast_model, ReadSettings(skip_padding=True, last_at_reads=True))
    assert computes_positions_only(fast_model) and not computes_positions_only(stock_model)
    fast, stock = _logps_and_grads(fast_model, batch), _logps_and_grads(stock_model, batch)
    assert fast[1] and all("lora_" in name for name in fast[1])
    _assert_same(fast, stock)
    with torch.no_grad(), fast_model.disable_adapter(), stock_model.disable_adapter():
        torch.testing.assert_close(
            completion_logps(fast_model, batch)[0], completion_logps(stock_model, batch)[0], atol=1e-5, rtol=0
        )


def test_bco_trains_and_evaluates_the_same_through_the_positions():
    """The bundled BCO run's own rows, through ``BcoMethod``'s collator, reference, train and eval steps."""
    from accelerate.utils import set_seed

    from rewardctl.data.loading import load_rows
    from rewardctl.methods.bco import BcoMethod, LocalRuntime
    from rewardctl.methods.registry import to_run_config

    from ..conftest import compose_train

    run = to_run_config(compose_train(["method=bco"]))
    outputs = {}
    for name in ("positions", "stock"):
        method = BcoMethod(run.method, run)
        rows = load_rows(run.data.train, split="train").select(range(6))
        batch = method.collate(list(method.prepare(rows, run.data.train, training=True).dataset))
        set_seed(0)
        model = method.build_model()
        if name == "stock":
            compute_positions_only(model, ReadSettings(skip_padding=False, last_at_reads=False))
        method.on_train_start(model, LocalRuntime(), resuming=False)
        assert computes_positions_only(model) == (name == "positions")
        assert computes_positions_only(method.reference) == (name == "positions")
        model.train()
        model.zero_grad()
        with torch.no_grad():  # move the policy off the reference, so the rewards are not all zero
            for param in model.parameters():
                param.add_(torch.randn_like(param) * 1e-2)
        out = method.train_step(model, batch)
        out.loss_sum.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        with torch.no_grad():
            evaluated = method.eval_step(model.eval(), batch)
        outputs[name] = (out.loss_sum.detach(), grads, evaluated)
    (loss, grads, evaluated), (stock_loss, stock_grads, stock_evaluated) = outputs["positions"], outputs["stock"]
    torch.testing.assert_close(loss, stock_loss, atol=1e-5, rtol=1e-6)
    assert loss.item() != 0.0
    for name, grad in stock_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    for key, value in stock_evaluated.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(evaluated[key], value, atol=1e-5, rtol=1e-6, msg=key)
