"""Gradient-norm clipping at the cost of one read of the gradients, where the optimizer is fused.

``torch.nn.utils.clip_grad_norm_`` reads every gradient twice and writes it once: a norm per tensor
(CPU has no foreach norm kernel, so one ``linalg.vector_norm`` per tensor), then a multiply by the
clipping coefficient, applied even when it is 1 so that nothing waits on the host. On the CPU
benchmark decoder (26M parameters, 47 MB of them its embedding) that is 10 ms of norms and 6 ms of
multiplies a step (docs/benchmarks.md). Here, with the same result:

- the squared norms are ``torch.dot(g, g)`` on CPU, which runs as one vectorised, threaded BLAS
  reduction (6.9 against 13.8 ms for those 26M gradients), and torch's foreach norm on GPUs;
- the coefficient ``c = min(1, max_norm / (norm + 1e-6))`` (torch's) is not multiplied into the
  gradients but handed to the fused AdamW as its ``grad_scale``, the divisor (``1 / c``) its kernel
  already applies for mixed-precision loss scaling, so each gradient is scaled as the update reads it.
  The update equals clip-then-step within fp32 rounding (``g / (1 / c)`` against ``g * c``; tested).

Only where that is exact: a fused torch Adam/AdamW with no fp16 loss scaler (the scaler owns
``grad_scale``) and gradients that are whole on every process (one process or DDP). FSDP and
DeepSpeed keep accelerate's ``clip_grad_norm_``, which knows their sharded gradients. A skipped
(non-finite) update never reaches the optimizer, so its coefficient is never applied.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import Tensor, nn

#: Distributed types whose gradients are whole (not sharded) on every process after ``backward``.
_WHOLE_GRADIENTS = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)


def total_norm(grads: list[Tensor]) -> Tensor:
    """The 2-norm of all ``grads`` together, as an fp32 tensor on their device (no host read)."""
    if not grads:
        return torch.zeros(())
    if grads[0].device.type != "cpu":
        return torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=None).float()
    squares = [
        torch.dot(g.reshape(-1), g.reshape(-1)) if g.dtype == torch.float32 else g.float().pow(2).sum() for g in grads
    ]
    return torch.stack(squares).sum().sqrt()


def clip_coefficient(norm: Tensor, max_norm: float) -> Tensor:
    """torch's ``clip_grad_norm_`` coefficient: what the gradients are multiplied by (at most 1)."""
    return (max_norm / (norm + 1e-6)).clamp(max=1.0)


def fused_target(accelerator: Accelerator, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer | None:
    """The torch optimizer that can take the clipping coefficient as its ``grad_scale``, or None."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
    fused = isinstance(inner, torch.optim.Adam | torch.optim.AdamW) and bool(inner.defaults.get("fused"))
    if not fused or accelerator.scaler is not None:
        return None
    return inner if accelerator.distributed_type in _WHOLE_GRADIENTS else None


class GradientClipper:
    """Clips the gradients of one run and returns their norm (before clipping), like accelerate's
    ``clip_grad_norm_``, folding the coefficient into the fused optimizer's step where it can."""

    def __init__(self, accelerator: Accelerator, optimizer: torch.optim.Optimizer) -> None:
        self.accelerator = accelerator
        self.target = fused_target(accelerator, optimizer)

    @property
    def folded(self) -> bool:
        return self.target is not None

    def __call__(self, parameters: Iterable[nn.Parameter], max_norm: float) -> Tensor | float | None:
        if self.target is None:
            return self.accelerator.clip_grad_norm_(parameters, max_norm)
        grads = [p.grad for p in parameters if p.grad is not None]
        norm = total_norm(grads)
        # No clipping (max_norm = inf): no divisor, so the kernel reads the gradients as they are.
        self.target.grad_scale = None if max_norm == float("inf") else clip_coefficient(norm, max_norm).reciprocal()
        return norm
