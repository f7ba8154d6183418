"""Rotary position tables in the autocast dtype, so the rotation runs in bf16 as in a bf16 model.

transformers' rotary-embedding modules return their cos/sin tables in the dtype of the hidden
states. A bf16 model gets bf16 tables; fp32 master weights under bf16 autocast get fp32 tables,
and then ``q * cos + rotate_half(q) * sin`` promotes the bf16 query and key projections to fp32:
five element-wise passes over every query and key (and as many in the backward) at twice the bytes.
Casting the tables to the autocast dtype makes the rotation what it is in a bf16 model.

It is not a free choice of precision: stock sdpa under autocast casts the rotated q/k to bf16 anyway
(rewardctl's fp32 CPU attention then computes with those bf16 values in fp32). Measured on the
benchmark's 6-layer decoder on CPU (forward + backward of a packed batch of 8 x 180 tokens): 6-9%
faster; the rewards' largest deviation from an fp32 forward went from 0.0057 to 0.0081 (reward
spread 0.33).

``hardware.rotary_in_autocast_dtype=false`` keeps the fp32 tables. Nothing is saved with the model:
a hook on each module, active only inside an autocast region.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

_enabled = {"value": True}


def configure(enabled: bool) -> None:
    """``hardware.rotary_in_autocast_dtype`` for this process (read at every call of a hooked module)."""
    _enabled["value"] = enabled


def _tables_in_autocast_dtype(_module: nn.Module, _args: Any, output: Any) -> Any:
    """Forward hook: (cos, sin) cast to the active autocast dtype; anything else left as it is."""
    if not _enabled["value"] or not isinstance(output, tuple) or len(output) != 2:
        return None
    cos, sin = output
    if not (isinstance(cos, torch.Tensor) and isinstance(sin, torch.Tensor) and cos.dtype == torch.float32):
        return None  # a bf16/fp16 model's tables are in its dtype already
    device = cos.device.type
    if not torch.is_autocast_enabled(device):
        return None
    dtype = torch.get_autocast_dtype(device)
    return (cos.to(dtype), sin.to(dtype)) if dtype in (torch.bfloat16, torch.float16) else None


def attach(model: nn.Module) -> int:
    """Hook every rotary-embedding module of ``model`` (once); returns how many are hooked."""
    hooked = 0
    for module in model.modules():
        if type(module).__name__.endswith("RotaryEmbedding"):
            if not getattr(module, "_rewardctl_autocast_tables", False):
                module.register_forward_hook(_tables_in_autocast_dtype)
                module._rewardctl_autocast_tables = True
            hooked += 1
    return hooked
