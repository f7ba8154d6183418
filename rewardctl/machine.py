"""What this machine can run, probed with torch: devices, native bf16, compilation.

Kept out of ``rewardctl.config`` (a leaf: schemas and checks of values, no torch, no methods), and
run only when a run is about to start here (``rewardctl.methods.registry.to_run_config`` with
``for_training``; ``rewardctl eval`` for its own device and precision), never when a finished run's
config is re-read on another machine.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from typing import Any

import torch
from omegaconf import DictConfig

from rewardctl.config.schema import Device, DType, MixedPrecision, RunConfig, Strategy
from rewardctl.errors import ConfigError


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(key, message)


def check_machine(run: RunConfig, cfg: DictConfig) -> None:
    """Everything a run needs from this machine, refused by key before anything loads; resolves
    ``hardware.mixed_precision=auto`` in ``run`` and ``cfg`` (config.yaml then records what ran)."""
    peft_name = getattr(getattr(run.peft, "name", None), "value", "none")
    check_devices(run.hardware, peft_name)
    width = model_hidden_size(run.model) if run.hardware.mixed_precision == MixedPrecision.auto else None
    precision = check_precision(run.hardware.device, run.hardware.mixed_precision, "hardware.mixed_precision", width)
    run.hardware.mixed_precision = precision
    cfg.hardware.mixed_precision = precision
    check_weights_dtype(run)
    check_compile(run)
    check_attention(run)


def check_devices(hw: Any, peft_name: str = "none") -> None:
    """GPUs, the strategy's optional dependency and qlora's bitsandbytes, as this machine has them."""
    has_cuda = torch.cuda.is_available()
    if peft_name == "qlora":
        _require(
            has_cuda and hw.device != Device.cpu,
            "peft",
            "qlora loads the base in 4 bits with bitsandbytes, which needs a CUDA GPU; on CPU use peft=lora",
        )
        _require(
            importlib.util.find_spec("bitsandbytes") is not None,
            "peft",
            "qlora needs bitsandbytes (pip install bitsandbytes)",
        )
    gpus = torch.cuda.device_count() if has_cuda else 0
    if hw.strategy == Strategy.deepspeed:
        _require(
            importlib.util.find_spec("deepspeed") is not None,
            "hardware.strategy",
            "deepspeed is not installed (pip install deepspeed), or choose hardware=fsdp",
        )
    if hw.strategy in (Strategy.fsdp, Strategy.deepspeed):
        _require(
            has_cuda and hw.device != Device.cpu,
            "hardware.strategy",
            f"{hw.strategy.value} shards over CUDA GPUs and torch sees none; use hardware=ddp hardware.device=cpu on CPU",
        )
    _require(
        hw.num_processes > 0 or gpus > 0,
        "hardware.num_processes",
        "0 means one process per visible GPU and torch sees none; give a number (CPU processes use gloo)",
    )
    if hw.device != Device.cpu and hw.num_processes > 1 and has_cuda:
        _require(
            hw.num_processes <= gpus,
            "hardware.num_processes",
            f"{hw.num_processes} processes but only {gpus} GPUs are visible",
        )


# Below this hidden size bf16 autocast costs more in casts than it saves in matmuls on a CPU: the
# bundled 64-wide model trains 1.4-1.8x slower under it, the 384-wide MiniLM-L6 1.4-1.5x faster with
# the same held-out accuracy (docs/benchmarks.md, "CPU precision and compilation").
CPU_BF16_MIN_HIDDEN = 256


def model_hidden_size(model: Any) -> int | None:
    """The backbone's width from its config (a cheap read), with ``model.config_overrides`` applied
    as ``load_config`` applies them (so a composite config's text width is read where the model takes
    it from), or None when it cannot be read here. Offline, an overridden width is taken as given."""
    from transformers import AutoConfig

    overrides = getattr(model, "config_overrides", None) or {}
    try:
        config = AutoConfig.from_pretrained(
            model.name_or_path, revision=model.revision, trust_remote_code=model.trust_remote_code
        )
    except (OSError, ValueError):
        widths = [overrides.get(key) for key in ("hidden_size", "d_model")]
        return next((w for w in widths if isinstance(w, int)), None)
    for key, value in overrides.items():
        if hasattr(config, key):  # an unknown key is load_config's error to raise, with its name
            setattr(config, key, value)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    width = text.to_dict().get("hidden_size") or text.to_dict().get("d_model")
    return width if isinstance(width, int) else None


def resolve_precision(device: Device, precision: MixedPrecision, hidden_size: int | None = None) -> MixedPrecision:
    """The one place ``auto`` gets its meaning: bf16 autocast where this machine computes bf16
    natively (emulated bf16 on a CPU is slower than fp32) and, on a CPU, where the model is wide
    enough for bf16 matmuls to repay the casts (``CPU_BF16_MIN_HIDDEN``); else no. Other values
    pass through."""
    if precision != MixedPrecision.auto:
        return precision
    if device == Device.cpu or not torch.cuda.is_available():
        native = cpu_has_native_bf16() and (hidden_size is None or hidden_size >= CPU_BF16_MIN_HIDDEN)
    else:
        native = torch.cuda.is_bf16_supported()
    return MixedPrecision.bf16 if native else MixedPrecision.no


def check_precision(
    device: Device, precision: MixedPrecision, key: str, hidden_size: int | None = None
) -> MixedPrecision:
    """Refuses what this machine cannot run; returns the precision to use (``auto`` resolved)."""
    has_cuda = torch.cuda.is_available()
    _require(
        not (device == Device.gpu and not has_cuda),
        key.replace("mixed_precision", "device"),
        "gpu requested but torch sees no CUDA device (use hardware=cpu)",
    )
    on_cpu = device == Device.cpu or not has_cuda
    if precision == MixedPrecision.auto:
        precision = resolve_precision(device, precision, hidden_size)
        reason = f"{'this CPU' if on_cpu else 'this GPU'} {'has' if cpu_has_native_bf16() or not on_cpu else 'lacks'} native bf16"
        if on_cpu and hidden_size is not None:
            reason += f"; hidden size {hidden_size} {'>=' if hidden_size >= CPU_BF16_MIN_HIDDEN else '<'} {CPU_BF16_MIN_HIDDEN}"
        logging.getLogger(__name__).info("%s=auto: using %s (%s)", key, precision.value, reason)
    _require(
        not (precision == MixedPrecision.fp16 and on_cpu),
        key,
        "fp16 mixed precision needs a GPU; use bf16 or no on CPU",
    )
    if precision == MixedPrecision.bf16 and on_cpu and not cpu_has_native_bf16():
        logging.getLogger(__name__).warning(
            "%s=bf16: this CPU has no native bf16 (AVX512-BF16 / AMX); autocast "
            "will emulate it and run slower than fp32 (use %s=no)",
            key,
            key,
        )
    if precision == MixedPrecision.bf16 and not on_cpu:
        _require(torch.cuda.is_bf16_supported(), key, "this GPU has no bf16 support; use fp16 (loss-scaled) or no")
    return precision


def cpu_has_native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# /proc/cpuinfo flags that decide how a CPU computes bf16, most capable first.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_description(cpuinfo: str | None = None) -> str:
    """This CPU in one line for benchmark records: its model name and how it computes bf16 (AMX,
    AVX512-BF16, or not natively). Hosts of one name differ in exactly this (an AVX2-only EPYC and an
    AVX-512 BF16 EPYC both report "AMD EPYC"), and it decides which precision a benchmark runs.
    ``cpuinfo``: the text of /proc/cpuinfo (read here when None; absent off Linux)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
                cpuinfo = handle.read()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or fields.get("Model name") or "unknown CPU"
    flags = set(fields.get("flags", "").split())
    found = [flag for flag in BF16_CPU_FLAGS if flag in flags]
    return f"{name} ({', '.join(found) if found else 'no native bf16 flags'})"


def has_cxx_compiler() -> bool:
    """Inductor builds CPU kernels with the C++ compiler named by $CXX (default g++)."""
    return shutil.which(os.environ.get("CXX", "g++")) is not None


def check_compile(run: RunConfig) -> None:
    """train.compile combinations refused before anything loads (they would fail at the first step)."""
    if not run.train.compile:
        return
    _require(
        run.hardware.strategy != Strategy.deepspeed,
        "train.compile",
        "not supported with hardware.strategy=deepspeed (its engine compiles only through its own "
        "engine.compile(), which rewardctl does not drive); use hardware=ddp or hardware=fsdp",
    )
    try:
        supported = torch._dynamo.is_dynamo_supported()
    except AttributeError:  # a torch without this probe: let torch.compile speak for itself
        supported = True
    _require(supported, "train.compile", f"torch.compile does not support this Python/torch ({torch.__version__})")
    on_cpu = run.hardware.device == Device.cpu or not torch.cuda.is_available()
    _require(
        not on_cpu or has_cxx_compiler(),
        "train.compile",
        f"inductor needs a C++ compiler on CPU and {os.environ.get('CXX', 'g++')} is not on PATH (set $CXX)",
    )


def check_attention(run: RunConfig) -> None:
    """Training with ``model.attn_implementation=flex_attention`` on a CPU: refused before anything
    loads, not a traceback from inside the first step's forward. transformers runs flex_attention
    compiled, and torch's compiled CPU flex kernel has no backward pass (torch 2.13 says so in a
    NotImplementedError; older releases fail inside the compile). Eval and score (no backward) on a
    CPU keep flex_attention."""
    if run.model.attn_implementation != "flex_attention" or wants_gpu(run.hardware):
        return
    raise ConfigError(
        "model.attn_implementation",
        f"flex_attention has no backward pass on CPU (torch {torch.__version__}); train with sdpa "
        "(the default) here, or flex_attention on a CUDA GPU (eval and score on CPU can use it)",
    )


def check_weights_dtype(run: RunConfig) -> None:
    """float16 master weights on a CPU: no loss scaler guards them there, so a run overflows to NaN
    (and CPU float16 kernels are slow); refused like ``mixed_precision=fp16`` on CPU."""
    on_cpu = run.hardware.device == Device.cpu or not torch.cuda.is_available()
    _require(
        not (run.model.dtype == DType.float16 and on_cpu),
        "model.dtype",
        "float16 weights need a GPU; use float32 (with hardware.mixed_precision=bf16 if you want) on CPU",
    )


def wants_gpu(hardware: Any) -> bool:
    """Whether this run computes on a CUDA device (``hardware.device`` gpu, or auto with one present)."""
    return hardware.device != Device.cpu and torch.cuda.is_available()
