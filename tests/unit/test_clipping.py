"""Gradient clipping folded into the fused AdamW step equals torch's clip-then-step."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from torch import nn

from rewardctl.training.clipping import GradientClipper, clip_coefficient, fused_target, total_norm

PLAIN = SimpleNamespace(scaler=None, distributed_type=DistributedType.NO)


def _params(seed: int = 0) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(300, 24), (24, 96), (96,), (1,)]
    return [nn.Parameter(torch.randn(*s, generator=gen)) for s in shapes]


def _grads(params: list[nn.Parameter], step: int, size: float) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return [size * torch.randn(p.shape, generator=gen) for p in params]


def test_total_norm_is_the_norm_of_all_gradients_concatenated():
    grads = [g for g in _grads(_params(), 0, 3.0)] + [torch.randn(7, 5).to(torch.bfloat16)]
    expected = torch.linalg.vector_norm(torch.cat([g.float().reshape(-1) for g in grads]))
    got = total_norm(grads)
    assert got.dtype == torch.float32 and got.shape == ()
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    assert total_norm([]).item() == 0.0


def test_the_coefficient_is_torchs_and_never_above_one():
    assert clip_coefficient(torch.tensor(4.0), 1.0).item() == pytest.approx(1.0 / (4.0 + 1e-6), rel=1e-7)
    assert clip_coefficient(torch.tensor(0.25), 1.0).item() == 1.0
    assert clip_coefficient(torch.tensor(0.0), 1.0).item() == 1.0


@pytest.mark.parametrize("max_norm", [1.0, 1e9, math.inf])
def test_folded_clipping_steps_as_torch_clip_grad_norm_then_fused_adamw(max_norm: float):
    """Three steps with gradients whose norm is above max_norm, below it, and above it again (so
    the divisor must change and be reset each step): same norm reported, same weights (1e-6)."""
    ours, reference = _params(), _params()
    opt_ours = torch.optim.AdamW(ours, lr=1e-2, weight_decay=0.1, fused=True)
    opt_ref = torch.optim.AdamW(reference, lr=1e-2, weight_decay=0.1, fused=True)
    clipper = GradientClipper(PLAIN, opt_ours)
    assert clipper.folded
    for step, size in enumerate([5.0, 0.001, 2.0]):
        for p, g in zip(ours, _grads(ours, step, size), strict=True):
            p.grad = g.clone()
        for p, g in zip(reference, _grads(reference, step, size), strict=True):
            p.grad = g.clone()
        norm = clipper(ours, max_norm)
        ref_norm = torch.nn.utils.clip_grad_norm_(reference, max_norm)
        assert norm.item() == pytest.approx(ref_norm.item(), rel=1e-6)
        if max_norm == math.inf:
            assert opt_ours.grad_scale is None  # no divisor: the kernel reads the gradients as they are
        opt_ours.step()
        opt_ref.step()
        for a, b in zip(ours, reference, strict=True):
            if max_norm == math.inf:
                assert torch.equal(a, b)
            else:
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_a_large_gradient_is_actually_clipped():
    """The folded divisor is applied: the step equals one on gradients pre-scaled to norm max_norm,
    and the optimizer's moments are those of the clipped gradients, not of the raw ones."""
    params, unclipped, prescaled = _params(), _params(), _params()
    grads = _grads(params, 0, 50.0)
    norm = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads]))
    opt = torch.optim.Adam(params, lr=0.1, fused=True)
    opts = [torch.optim.Adam(unclipped, lr=0.1, fused=True), torch.optim.Adam(prescaled, lr=0.1, fused=True)]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    for p, q, g in zip(unclipped, prescaled, grads, strict=True):
        p.grad = g.clone()
        q.grad = g * (0.5 / (norm + 1e-6))
    GradientClipper(PLAIN, opt)(params, 0.5)
    for o in [opt, *opts]:
        o.step()
    for a, b in zip(params, prescaled, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # Adam's first update is nearly scale-free per element, so the moments show the clipping: the
    # second moment scales with the gradient's square.
    ratio = opt.state[params[0]]["exp_avg_sq"].sum() / opts[0].state[unclipped[0]]["exp_avg_sq"].sum()
    assert ratio.item() == pytest.approx((0.5 / norm.item()) ** 2, rel=1e-4)


def test_accelerate_keeps_clipping_where_folding_would_not_be_exact():
    params = _params()
    fused = torch.optim.AdamW(params, fused=True)
    assert fused_target(PLAIN, fused) is fused
    wrapped = SimpleNamespace(optimizer=fused)  # accelerate's AcceleratedOptimizer
    assert fused_target(PLAIN, wrapped) is fused
    assert fused_target(SimpleNamespace(scaler=None, distributed_type=DistributedType.MULTI_CPU), fused) is fused
    assert fused_target(PLAIN, torch.optim.AdamW(params, foreach=True)) is None  # no grad_scale outside fused
    assert fused_target(PLAIN, torch.optim.SGD(params, lr=0.1)) is None
    assert fused_target(SimpleNamespace(scaler=object(), distributed_type=DistributedType.NO), fused) is None
    for sharded in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        assert fused_target(SimpleNamespace(scaler=None, distributed_type=sharded), fused) is None

    calls = []
    accelerator = SimpleNamespace(
        scaler=None,
        distributed_type=DistributedType.FSDP,
        clip_grad_norm_=lambda parameters, max_norm: calls.append(max_norm) or torch.tensor(3.0),
    )
    clipper = GradientClipper(accelerator, fused)
    assert not clipper.folded
    assert clipper(params, 1.0).item() == 3.0 and calls == [1.0]
