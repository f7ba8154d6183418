"""Autograd functions over the fused CPU kernels, and the process-wide switch that says whether to use them.

``swiglu(gate, up)`` is ``silu(gate) * up`` and ``rms_norm(x, weight, eps)`` is
``torch.nn.functional.rms_norm`` over the last dimension, ``rotary(x, cos, sin)`` the rotary position
embedding of transformers' Llama family. Callers check ``active()`` and fall back to
the stock expressions otherwise; both functions save only their inputs (SwiGLU recomputes silu in its
backward, where stock autograd keeps silu's output as a third tensor).
"""

from __future__ import annotations

import logging
from types import ModuleType
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from rewardctl.kernels import build

log = logging.getLogger("rewardctl.kernels")

#: The loaded extension while the run uses it (``configure``), else None.
_loaded: dict[str, ModuleType | None] = {"module": None}

#: The dtypes SwiGLU and the rotation take (fp16 runs stock); the RMS norm takes fp32 only (the stock
#: norms' dtype under autocast with fp32 weights).
KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def configure(mode: str, *, cpu: bool) -> str | None:
    """``hardware.cpu_fused_kernels`` for this process: ``auto`` uses the kernels when they are built,
    ``true`` builds them first when they are not (raising ``KernelBuildError`` if that fails),
    ``false`` never uses them; a GPU run never does. Returns a line for the run's log, or None."""
    _loaded["module"] = None
    if mode == "false" or not cpu:
        return None
    if mode == "true":
        module, seconds = build.build()
        _loaded["module"] = module
        return f"fused CPU kernels: built in {seconds:.0f} s" if seconds else "fused CPU kernels: on"
    try:
        _loaded["module"] = build.load_built()
    except (ImportError, OSError) as exc:  # a stale or foreign binary: run stock, say why
        return f"fused CPU kernels: off ({build.library_path()} did not load: {exc})"
    if _loaded["module"] is None:
        return (
            "fused CPU kernels: not built for this torch and CPU; `rewardctl kernels build` (once, about 30 s, "
            "needs a C++ compiler) makes a decoder's CPU steps faster"
        )
    return "fused CPU kernels: on"


def active() -> bool:
    return _loaded["module"] is not None


def use(module: ModuleType | None) -> None:
    """Set the extension directly (tests; ``None`` turns the kernels off)."""
    _loaded["module"] = module


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, gate: Tensor, up: Tensor) -> Tensor:
        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        return _loaded_module(ctx).swiglu_forward(gate, up)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor]:
        gate, up = ctx.saved_tensors
        grad_gate, grad_up = ctx.module.swiglu_backward(grad, gate, up)
        return grad_gate, grad_up


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        y, rstd = _loaded_module(ctx).rms_norm_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        x, weight, rstd = ctx.saved_tensors
        grad_x, grad_weight = ctx.module.rms_norm_backward(grad, x, weight, rstd)
        return grad_x.view_as(x), grad_weight, None


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        ctx.save_for_backward(cos, sin)
        return _loaded_module(ctx).rotary(x, cos, sin, False)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        return ctx.module.rotary(grad, cos, sin, True), None, None


def _loaded_module(ctx: Any) -> ModuleType:
    """The extension, remembered on ``ctx`` so a backward runs with the module its forward used."""
    module = _loaded["module"]
    if module is None:
        raise RuntimeError("rewardctl's fused CPU kernels are not loaded (check kernels.ops.active() first)")
    ctx.module = module
    return module


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up``, forward and gradients bit for bit what autograd computes (bf16; fp32 too but
    within an ulp on the few elements torch itself computes with its scalar exp, a kernel's tail). The
    backward's one multiply-add is fused as torch 2.13's CPU wheel compiles ``silu_backward``."""
    return _SwiGLU.apply(gate, up)


def rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x * cos + rotate_half(x) * sin`` for ``x`` (B, L, heads, head_dim) in fp32 or bf16 and tables
    (B or 1, L, head_dim) of its dtype that need no gradient, bit for bit what autograd computes on the
    (B, heads, L, head_dim) view, in x's own layout: the projection's output needs no transposed copy."""
    return _Rotary.apply(x, cos, sin)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``torch.nn.functional.rms_norm(x, weight.shape, weight, eps)`` for fp32 ``x`` and ``weight``,
    within fp32 rounding (its sums run in another order)."""
    return _RMSNorm.apply(x, weight, eps)
