"""rewardctl's fused CPU kernels (rewardctl/kernels): SwiGLU bit for bit what autograd computes, the RMS
norm within fp32 rounding of torch's, the gathered decoder using both and still equal to the padded
forward, and the build cache, the run switch and the command around them."""

from __future__ import annotations

import os
import random
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F

from rewardctl import cli
from rewardctl.kernels import build, ops
from rewardctl.methods.pairwise import PairwiseMethod
from rewardctl.modeling import unpadded_decoder

from ..conftest import _features, _pair_rows
from . import test_unpadded_decoder
from .test_final_layer import _method, _step
from .test_packing import _model_dir
from .test_unpadded_decoder import _assert_gathered_equals_padded

every_batch = test_unpadded_decoder.every_batch  # its fixture: exact widths, the gathered forwards recorded


@pytest.fixture(scope="session")
def kernels() -> ModuleType:
    """The built extension (``make setup`` builds it; built here otherwise, about 30 s). Without a
    compiler the tests skip, except under ``REWARDCTL_REQUIRE_EXTRAS=1`` (CI), where they fail."""
    try:
        module, _ = build.build()
    except build.KernelBuildError as exc:
        if os.environ.get("REWARDCTL_REQUIRE_EXTRAS") == "1":
            pytest.fail(f"{exc} (REWARDCTL_REQUIRE_EXTRAS=1: the fused kernels must build)")
        pytest.skip(str(exc))
    return module


@pytest.fixture
def fused(kernels: ModuleType) -> ModuleType:
    ops.use(kernels)  # the conftest puts back what was loaded before
    return kernels


def _swiglu_both_ways(shape, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    gate, up, grad = (torch.randn(shape, generator=generator).mul(4).to(dtype) for _ in range(3))
    results = []
    for fn in (lambda g, u: F.silu(g) * u, ops.swiglu):
        g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
        out = fn(g, u)
        out.backward(grad)
        results.append((out.detach(), g.grad, u.grad))
    return results


# ---- the kernels -------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(64, 1536), (3, 37, 101), (5,)], ids=["blocks", "tail", "tiny"])
def test_swiglu_in_bf16_is_autograd_bit_for_bit(fused, shape):
    stock, fast = _swiglu_both_ways(shape, torch.bfloat16)
    for name, a, b in zip(("out", "d gate", "d up"), stock, fast, strict=False):
        assert a.dtype == b.dtype == torch.bfloat16
        assert torch.equal(a, b), name


def test_swiglu_in_fp32_is_autograd_bit_for_bit_and_within_an_ulp_on_a_scalar_tail(fused):
    stock, fast = _swiglu_both_ways((64, 1536), torch.float32)  # whole vector blocks for torch too
    for a, b in zip(stock, fast, strict=False):
        assert torch.equal(a, b)
    stock, fast = _swiglu_both_ways((37005,), torch.float32)  # torch's own kernel ends in scalar code
    for a, b in zip(stock, fast, strict=False):
        torch.testing.assert_close(b, a, rtol=3e-7, atol=1e-30)
        assert (a != b).sum() <= 8


def test_swiglu_saves_its_inputs_only(fused):
    gate = torch.randn(8, 16, requires_grad=True)
    up = torch.randn(8, 16, requires_grad=True)
    out = ops.swiglu(gate, up)
    saved = out.grad_fn.saved_tensors
    assert len(saved) == 2 and saved[0].data_ptr() == gate.data_ptr() and saved[1].data_ptr() == up.data_ptr()


@pytest.mark.parametrize("shape", [(1, 211, 384), (7, 64)], ids=["gathered-row", "2d"])
def test_rms_norm_equals_torch_within_fp32_rounding(fused, shape):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=generator) * 3
    weight = 1 + 0.1 * torch.randn(shape[-1], generator=generator)
    grad = torch.randn(shape, generator=generator)
    results = []
    for fn in (lambda a, w: F.rms_norm(a, w.shape, w, 1e-6), lambda a, w: ops.rms_norm(a, w, 1e-6)):
        a, w = x.clone().requires_grad_(), weight.clone().requires_grad_()
        out = fn(a, w)
        out.backward(grad)
        results.append((out.detach(), a.grad, w.grad))
    for name, a, b in zip(("out", "dx", "dweight"), *results, strict=False):
        assert a.shape == b.shape, name
        torch.testing.assert_close(b, a, rtol=2e-6, atol=2e-6 * float(a.abs().max()), msg=name)


def test_rms_norm_takes_a_non_contiguous_row(fused):
    x = torch.randn(64, 48).t()  # (48, 64), transposed
    weight = torch.rand(64) + 0.5
    torch.testing.assert_close(ops.rms_norm(x, weight, 1e-5), F.rms_norm(x, (64,), weight, 1e-5), rtol=2e-6, atol=1e-6)


def test_the_kernels_refuse_what_they_do_not_compute(fused):
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        fused.swiglu_forward(torch.ones(4, dtype=torch.float16), torch.ones(4, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="fp32"):
        fused.rms_norm_forward(torch.ones(2, 4, dtype=torch.bfloat16), torch.ones(4), 1e-6)


# ---- in the gathered decoder -------------------------------------------------------------------------
@pytest.fixture
def gathered_calls(monkeypatch: pytest.MonkeyPatch, every_batch) -> dict[str, int]:
    """Every test model may gather (they are narrower than MIN_HIDDEN), exact widths (``every_batch``,
    which also records the gathered forwards), and a count of the kernels' calls."""
    monkeypatch.setattr(unpadded_decoder, "MIN_HIDDEN", 0)
    calls = {"swiglu": 0, "rms_norm": 0, "rotary": 0}
    for name in calls:
        original = getattr(ops, name)

        def counted(*args, _name=name, _original=original):
            calls[_name] += 1
            return _original(*args)

        monkeypatch.setattr(ops, name, counted)
    return calls


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_the_gathered_decoder_runs_the_kernels_and_still_equals_the_padded_forward(
    tmp_path: Path, kind: str, fused, gathered_calls, every_batch
):
    method = _method(PairwiseMethod, _model_dir(tmp_path, kind), "data.share_prefix=true")
    torch.manual_seed(0)
    model = method.build_model()
    batch = method.collate(_features(method, _pair_rows(random.Random(kind), 6, conversational=False)))
    _step(method, model, batch)  # gathered: a training forward + backward, then an eval forward
    before_last = len(model.classifier.model.layers) - 1
    # Per forward: SwiGLU in every layer but the last (which runs at the reward tokens, as a module);
    # both norms of those layers and the last one's input norm; queries and keys of those layers and the
    # last one's keys (its queries at the reads rotate in final_layer.output_at_reads, stock).
    assert gathered_calls == {
        "swiglu": 2 * before_last,
        "rms_norm": 2 * (2 * before_last + 1),
        "rotary": 2 * (2 * before_last + 1),
    }
    every_batch.clear()  # the comparison below must see the gathered forward run again
    _assert_gathered_equals_padded(method, model, batch, ("chosen_reward", "rejected_reward"), every_batch)


def test_under_bf16_autocast_the_kernels_change_no_reward_beyond_fp32_rounding(tmp_path: Path, fused, gathered_calls):
    """The same gathered forward and backward under CPU bf16 autocast with the kernels and without: the
    norm's fp32 rounding differences pass through bf16 matmuls, so the rewards agree to bf16 precision."""
    method = _method(PairwiseMethod, _model_dir(tmp_path, "llama"), "data.share_prefix=true")
    torch.manual_seed(0)
    model = method.build_model()
    batch = method.collate(_features(method, _pair_rows(random.Random(3), 6, conversational=False)))
    results = []
    for module in (fused, None):
        ops.use(module)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(_step(method, model, batch))
    assert gathered_calls["swiglu"] > 0
    (fast, fast_loss, fast_grads), (stock, stock_loss, stock_grads) = results
    for key in ("chosen_reward", "rejected_reward"):
        torch.testing.assert_close(fast[key], stock[key], atol=2e-2, rtol=0)
    torch.testing.assert_close(fast_loss, stock_loss, atol=1e-2, rtol=0)
    for name, grad in stock_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, atol=1e-2, rtol=5e-2, msg=name)


def test_an_mlp_with_its_own_hook_runs_as_a_module(tmp_path: Path, fused, gathered_calls):
    method = _method(PairwiseMethod, _model_dir(tmp_path, "llama"), "data.share_prefix=true")
    model = method.build_model()
    batch = method.collate(_features(method, _pair_rows(random.Random(4), 4, conversational=False)))
    _step(method, model, batch)
    unhooked = dict(gathered_calls)
    seen = []
    handle = model.classifier.model.layers[0].mlp.register_forward_hook(lambda *_: seen.append(1))
    try:
        _step(method, model, batch)
    finally:
        handle.remove()
    assert len(seen) == 2  # the hook ran in both forwards: that MLP went through its module
    assert gathered_calls["swiglu"] - unhooked["swiglu"] == unhooked["swiglu"] - 2  # the other layers: the kernel
    assert gathered_calls["rms_norm"] == 2 * unhooked["rms_norm"]  # still the gathered forward


# ---- the cache, the switch, the command --------------------------------------------------------------
def test_the_cache_key_follows_the_source_torch_and_the_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    name = build.extension_name()
    edited = tmp_path / "cpu_fused.cpp"
    edited.write_bytes(build.SOURCE.read_bytes() + b"// edited\n")
    monkeypatch.setattr(build, "SOURCE", edited)
    assert build.extension_name() != name
    monkeypatch.undo()
    assert build.extension_name() == name
    monkeypatch.setattr(torch, "__version__", torch.__version__ + "+other")
    assert build.extension_name() != name
    monkeypatch.undo()
    monkeypatch.setattr(build, "BASE_FLAGS", [*build.BASE_FLAGS, "-DOTHER"])
    assert build.extension_name() != name
    assert build.compile_flags("AVX512")[-2:] == ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
    assert not any(f.startswith("-DCPU_CAPABILITY") for f in build.compile_flags("DEFAULT"))


def test_auto_uses_built_kernels_only_and_false_or_a_gpu_never(tmp_path: Path, monkeypatch, kernels):
    assert ops.configure("auto", cpu=True) == "fused CPU kernels: on" and ops.active()
    assert ops.configure("auto", cpu=False) is None and not ops.active()
    assert ops.configure("false", cpu=True) is None and not ops.active()
    monkeypatch.setenv("REWARDCTL_KERNELS_DIR", str(tmp_path / "empty"))
    line = ops.configure("auto", cpu=True)
    assert not ops.active() and "not built" in line and "rewardctl kernels build" in line
    assert not (tmp_path / "empty").exists()  # auto never builds


def test_a_failed_build_is_one_line_naming_its_log_and_the_switch(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("REWARDCTL_KERNELS_DIR", str(tmp_path))

    def no_compiler(**_kwargs):  # what torch's builder raises: the command line first, then the failure
        raise RuntimeError(
            "Error building extension 'x': [1/2] c++ -MMD -MF cpu_fused.o.d -O3 -c cpu_fused.cpp\n"
            "FAILED: cpu_fused.o\n/bin/sh: 1: c++: not found\nninja: build stopped: subcommand failed."
        )

    monkeypatch.setattr("torch.utils.cpp_extension.load", no_compiler)
    with pytest.raises(build.KernelBuildError) as info:
        ops.configure("true", cpu=True)
    message = str(info.value)
    assert "\n" not in message and "FAILED: cpu_fused.o" in message
    assert "hardware.cpu_fused_kernels=false" in message
    log = build.build_directory() / "build-error.log"
    assert str(log) in message and "c++: not found" in log.read_text()
    assert not [p for p in tmp_path.rglob("build-*") if p.is_dir()]  # the build's own folder is gone
    assert not ops.active()


def test_a_library_that_does_not_load_is_built_again_and_moved_into_place(tmp_path: Path, monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setenv("REWARDCTL_KERNELS_DIR", str(tmp_path))
    target = build.library_path()
    target.parent.mkdir(parents=True)
    target.write_bytes(b"not a shared library")  # e.g. a build killed while it wrote the file
    built = SimpleNamespace(name="fresh")

    def fake_load(*, name, build_directory, **_kwargs):
        assert Path(build_directory).parent == target.parent and Path(build_directory) != target.parent
        (Path(build_directory) / f"{name}.so").write_bytes(b"fresh library")
        return built

    monkeypatch.setattr("torch.utils.cpp_extension.load", fake_load)
    module, _ = build.build()
    assert module is built and target.read_bytes() == b"fresh library"
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # its build folder is gone


def test_the_kernels_command_says_where_they_are(kernels, capsys: pytest.CaptureFixture):
    assert cli.main(["kernels", "status"]) == 0
    assert str(build.library_path()) in capsys.readouterr().out
    assert cli.main(["kernels", "build"]) == 0
    assert "already built" in capsys.readouterr().out
    assert cli.main(["kernels", "nonsense"]) == 2
    assert "usage: rewardctl kernels build|status" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    ("head_dim", "table_batch"), [(64, 1), (128, 3), (6, 1)], ids=["64", "128-per-row", "6-scalar"]
)
def test_rotary_is_autograd_bit_for_bit(fused, dtype, head_dim, table_batch):
    from transformers.models.llama.modeling_llama import rotate_half

    generator = torch.Generator().manual_seed(2)
    x = torch.randn(3, 11, 4, head_dim, generator=generator).to(dtype)  # (B, L, heads, head_dim)
    cos, sin = (torch.randn(table_batch, 11, head_dim, generator=generator).to(dtype) for _ in range(2))
    grad = torch.randn(3, 4, 11, head_dim, generator=generator).to(dtype)
    results = []
    for fn in (
        lambda t: t.transpose(1, 2) * cos.unsqueeze(1) + rotate_half(t.transpose(1, 2)) * sin.unsqueeze(1),
        lambda t: ops.rotary(t, cos, sin).transpose(1, 2),
    ):
        t = x.clone().requires_grad_()
        out = fn(t)
        out.backward(grad)
        results.append((out.detach(), t.grad))
    (stock, stock_grad), (fast, fast_grad) = results
    assert torch.equal(stock, fast) and torch.equal(stock_grad, fast_grad)
