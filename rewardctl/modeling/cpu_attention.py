"""bf16 attention computed in fp32 on CPU: same maths, more precise, and ~2-7x faster there.

Under bf16 autocast, PyTorch casts the inputs of ``scaled_dot_product_attention`` to bf16, and its CPU
flash-attention kernel is much slower in bf16 than in fp32, backward above all (torch 2.13, 2 cores
with AVX-512 BF16/AMX, 16 rows x 12 heads of 32, forward + backward, boolean padding mask):

    tokens per row     48      140     256
    bf16              34 ms    82 ms   72 ms
    fp32               5 ms    25 ms   49 ms

On MiniLM-L6 at 256 tokens that kernel was 43% of a bf16 training step (``make bench``'s profile),
while every matmul around it runs in bf16. So on CPU the query, key, value (and a float mask) are
cast to fp32, attention runs in fp32 with autocast off, and the output is cast to the dtype stock
sdpa would have returned (autocast's, else the query's): the same function computed with fp32 accumulation instead of bf16 rounding of its inputs.
On GPUs (and for fp32 inputs) nothing changes.

It is installed through transformers' own ``AttentionInterface`` for the name ``sdpa``, the default
attention of every model rewardctl trains, so the masks, the prefix-sharing and padding-free
checks and the saved model (its config never records the function) stay exactly as with stock sdpa.
``hardware.cpu_attention_fp32=false`` turns it off.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from rewardctl.modeling.final_layer import additive_mask

#: transformers' own sdpa function, kept so the wrapper can call it and ``uninstall`` restore it.
_stock: dict[str, Callable[..., Any]] = {}


def low_precision_dtype(query: Tensor) -> torch.dtype | None:
    """The dtype stock sdpa would attend in on CPU when it is below fp32 (bf16 autocast casts fp32
    inputs inside the op: Llama's rotary embedding hands it fp32 queries), else None."""
    if query.device.type != "cpu":
        return None
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        return dtype if dtype in (torch.bfloat16, torch.float16) else None
    return query.dtype if query.dtype in (torch.bfloat16, torch.float16) else None


def fp32_cpu_sdpa(
    module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, **kwargs: Any
) -> tuple[Tensor, Any]:
    """transformers' sdpa attention, in fp32 where it would run in bf16/fp16 on CPU, returned in that
    dtype (what stock sdpa returns there; see the module docstring)."""
    stock = _stock["sdpa"]
    dtype = low_precision_dtype(query)
    if dtype is None:
        return stock(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    with torch.autocast("cpu", enabled=False):
        output, weights = stock(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)
    return output.to(dtype), weights


def fp32_mask_once(mask: Tensor, attn_implementation: str) -> Tensor:
    """A boolean (True: may attend) mask as the fp32 additive mask sdpa turns it into at every call
    (0 where visible, -inf elsewhere: ``convert_boolean_attn_mask``'s values, so outputs and gradients
    are bit-identical), built once for every layer of a forward; the mask as given elsewhere.

    Only where every sdpa call attends in fp32 on CPU (``fp32_cpu_sdpa`` installed: fp32 queries, or
    low-precision ones it casts), so the mask's dtype always matches the query's. Why: at 8 rows of 300
    columns each conversion took 1.3 ms, once per layer in the forward, and each layer saved its own
    2.9 MB copy for the backward.
    """
    if mask.dtype != torch.bool or mask.device.type != "cpu" or attn_implementation != "sdpa":
        return mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if ALL_ATTENTION_FUNCTIONS["sdpa"] is not fp32_cpu_sdpa:
        return mask
    return additive_mask(mask, float("-inf"))


def install() -> None:
    """Route ``attn_implementation="sdpa"`` through ``fp32_cpu_sdpa`` in this process (idempotent)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if ALL_ATTENTION_FUNCTIONS["sdpa"] is not fp32_cpu_sdpa:
        _stock["sdpa"] = ALL_ATTENTION_FUNCTIONS["sdpa"]
        ALL_ATTENTION_FUNCTIONS["sdpa"] = fp32_cpu_sdpa


def uninstall() -> None:
    """transformers' own sdpa again (a later command in the same process may turn the option off)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if ALL_ATTENTION_FUNCTIONS["sdpa"] is fp32_cpu_sdpa:
        ALL_ATTENTION_FUNCTIONS["sdpa"] = _stock["sdpa"]


def configure(enabled: bool) -> None:
    """``hardware.cpu_attention_fp32``: install or remove the fp32 CPU attention for this process."""
    if enabled:
        install()
    else:
        uninstall()
