"""The input embedding's gradient written into one warm buffer, on the rows a step touched only.

A dense embedding backward allocates a zero-filled ``vocab x hidden`` gradient at every step and
scatters the step's token gradients into it, though a step touches a few thousand rows at most. On
the CPU benchmark decoder (30522 x 384, 47 MB) that zero fill was 15 ms of every step in the profile
(3% of it), against 4-5 ms to zero the same tensor again in a loop; the step's page-fault count is
the same with or without this module, so it is not the pages being new.

Here the embedding computes a sparse gradient (``nn.Embedding.sparse``: the step's rows only), and a
hook on its weight hands autograd one persistent dense buffer as ``weight.grad`` before the sparse
gradient is added into it. The buffer is zeroed only on the rows the previous window touched. What
the clipping and the optimizer then see is the same dense tensor, bit for bit, as the stock backward
builds (the sum over a row's tokens runs in the same order), so AdamW, its state and checkpoints do
not change. A dense gradient reaching the same weight (a tied output layer) is summed with the rows in
another order (equal within fp32 rounding) and marks the whole buffer for zeroing at the next window.

It relies on the loop's ``zero_grad(set_to_none=True)``: a ``None`` gradient is how a new window is
recognised. A window that ended without an optimizer step (its step post-hook did not run) is zeroed
everywhere: a skipped non-finite update's clipping may have written NaN into every row. Only one
process may use it (DDP reduces sparse gradients differently, FSDP and DeepSpeed own the
gradients), and not under ``torch.compile``; ``hardware.cpu_warm_embedding_grad`` turns it off.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

_ATTRIBUTE = "_rewardctl_warm_gradient"


@dataclass
class WarmEmbeddingGradient:
    """The persistent gradient of one embedding weight and the rows it holds non-zero values in."""

    weight: nn.Parameter
    buffer: Tensor | None = None
    rows: list[Tensor] = field(default_factory=list)
    # Every row may be non-zero: a dense gradient was added, or the last window ended without an
    # optimizer step (a skipped non-finite update: accelerate's clipping, where the loop uses it,
    # multiplies the whole buffer by NaN; the folded clipping writes nothing into it).
    dirty: bool = False
    stepped: bool = True

    def _fresh_window(self) -> Tensor:
        """The buffer, zero again on the rows the last window wrote (everywhere when ``dirty``)."""
        if self.buffer is None:
            self.buffer = torch.zeros_like(self.weight, memory_format=torch.contiguous_format)
        elif self.dirty or not self.stepped:
            self.buffer.zero_()
        elif self.rows:
            self.buffer.index_fill_(0, torch.cat(self.rows), 0.0)
        self.rows, self.dirty, self.stepped = [], False, False
        return self.buffer

    def __call__(self, grad: Tensor) -> Tensor:
        """Tensor hook, run before autograd accumulates ``grad`` into ``weight.grad``."""
        if self.weight.grad is None:
            if not grad.is_sparse:
                self.dirty = True  # the stock path takes this dense gradient; our buffer is stale
                return grad
            self.weight.grad = self._fresh_window()
        if grad.is_sparse:
            if self.weight.grad is self.buffer:
                self.rows.append(grad._indices()[0])
        elif self.weight.grad is self.buffer:
            self.dirty = True
        return grad

    def optimizer_stepped(self, *_: object) -> None:
        """Optimizer step post-hook: the window's clipping coefficient was finite."""
        self.stepped = True


def input_embedding(model: nn.Module) -> nn.Module | None:
    """The token embedding of the first transformers model inside ``model`` (rewardctl's reward
    models wrap one; PEFT wraps it again)."""
    for module in model.modules():
        get = getattr(module, "get_input_embeddings", None)
        if callable(get):
            try:
                return get()
            except (AttributeError, NotImplementedError):
                continue
    return None


def attach(model: nn.Module, optimizer: torch.optim.Optimizer) -> WarmEmbeddingGradient | None:
    """Sparse backward plus the warm buffer on ``model``'s input embedding, for the windows that
    ``optimizer`` steps; None (nothing changed) when it has none, it is frozen (LoRA), not an
    ``nn.Embedding``, or not on the CPU. The caller decides whether the run allows it (one process,
    no sharding, no compilation)."""
    embedding = input_embedding(model)
    if not isinstance(embedding, nn.Embedding) or not embedding.weight.requires_grad:
        return None
    if embedding.weight.device.type != "cpu" or embedding.max_norm is not None or embedding.scale_grad_by_freq:
        return None
    attached = getattr(embedding, _ATTRIBUTE, None)
    if attached is not None:
        return attached  # idempotent: a second hook would hand autograd a second buffer
    warm = WarmEmbeddingGradient(embedding.weight)
    embedding.sparse = True
    embedding.weight.register_hook(warm)
    optimizer.register_step_post_hook(warm.optimizer_stepped)
    setattr(embedding, _ATTRIBUTE, warm)
    return warm
