"""bf16 sdpa attention computed in fp32 on CPU (rewardctl/modeling/cpu_attention.py): the function it
computes, when it applies, that models built by transformers route through it, and that the
accelerator of every command installs or removes it as hardware.cpu_attention_fp32 says."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from rewardctl.config.schema import Device, HardwareConfig, MixedPrecision
from rewardctl.modeling import cpu_attention
from rewardctl.training.runtime import build_accelerator


@pytest.fixture(autouse=True)
def stock_sdpa_after():
    yield
    ALL_ATTENTION_FUNCTIONS["sdpa"] = sdpa_attention_forward  # whatever a test left there


def qkv(dtype: torch.dtype) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(2, 3, 5, 8, generator=generator).to(dtype).requires_grad_() for _ in range(3)]


def test_bf16_inputs_are_attended_in_fp32_and_returned_in_bf16_with_gradients():
    module = torch.nn.Module()
    module.is_causal = True
    q, k, v = qkv(torch.bfloat16)
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    cpu_attention.install()
    out, _ = cpu_attention.fp32_cpu_sdpa(module, q, k, v, mask, scaling=0.5)
    assert out.dtype == torch.bfloat16
    # exactly transformers' sdpa on the same values in fp32, rounded once at the end
    want, _ = sdpa_attention_forward(module, q.float(), k.float(), v.float(), mask, scaling=0.5)
    torch.testing.assert_close(out, want.to(torch.bfloat16), rtol=0, atol=0)
    out.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 and t.grad.abs().sum() > 0 for t in (q, k, v))


def test_fp32_inputs_reach_the_stock_function_unchanged_unless_autocast_would_lower_them():
    module = torch.nn.Module()
    q, k, v = qkv(torch.float32)
    cpu_attention.install()
    out, _ = cpu_attention.fp32_cpu_sdpa(module, q, k, v, None, is_causal=False)
    want, _ = sdpa_attention_forward(module, q, k, v, None, is_causal=False)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 inputs: autocast would attend in bf16
        inside, _ = cpu_attention.fp32_cpu_sdpa(module, q, k, v, None, is_causal=False)
    assert inside.dtype == torch.bfloat16  # as stock sdpa returns it under autocast, computed in fp32
    torch.testing.assert_close(inside, want.to(torch.bfloat16), rtol=0, atol=0)


def test_a_boolean_mask_becomes_sdpa_s_own_float_mask_only_where_attention_runs_in_fp32_on_cpu():
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    assert cpu_attention.fp32_mask_once(mask, "sdpa") is mask  # not installed: the stock sdpa converts
    cpu_attention.install()
    once = cpu_attention.fp32_mask_once(mask, "sdpa")
    assert once.dtype == torch.float32 and torch.equal(once, torch.where(mask, 0.0, float("-inf")))
    assert cpu_attention.fp32_mask_once(mask, "eager") is mask and cpu_attention.fp32_mask_once(once, "sdpa") is once
    module = torch.nn.Module()
    q, k, v = qkv(torch.bfloat16)
    with_bool, _ = cpu_attention.fp32_cpu_sdpa(module, q, k, v, mask, scaling=0.5)
    with_float, _ = cpu_attention.fp32_cpu_sdpa(module, q, k, v, once, scaling=0.5)
    torch.testing.assert_close(with_float, with_bool, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_a_transformers_model_under_bf16_autocast_attends_through_it(kind: str, monkeypatch):
    if kind == "llama":
        model = LlamaModel(
            LlamaConfig(
                vocab_size=64,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                attn_implementation="sdpa",
            )
        )
    else:
        model = BertModel(
            BertConfig(
                vocab_size=64,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                attn_implementation="sdpa",
            )
        )
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    seen: list[torch.dtype] = []
    stock = sdpa_attention_forward

    def spy(module, query, *args, **kwargs):
        # the dtype sdpa's kernel computes in: its inputs', or autocast's when autocast is on
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else query.dtype)
        return stock(module, query, *args, **kwargs)

    cpu_attention.install()
    monkeypatch.setitem(cpu_attention._stock, "sdpa", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert seen == [torch.float32, torch.float32]  # one fp32 call per layer
    assert torch.isfinite(hidden.float()).all()
    cpu_attention.uninstall()  # the function that was there before (the spy) is called directly again
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, attention_mask=mask)
    assert seen == [torch.bfloat16, torch.bfloat16]  # autocast's bf16, no longer widened


def test_the_accelerator_installs_it_on_cpu_unless_turned_off():
    hardware = HardwareConfig(name="cpu", device=Device.cpu, mixed_precision=MixedPrecision.bf16)
    build_accelerator(hardware, report_to=[])
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is cpu_attention.fp32_cpu_sdpa
    build_accelerator(replace(hardware, cpu_attention_fp32=False), report_to=[])
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_attention_forward
