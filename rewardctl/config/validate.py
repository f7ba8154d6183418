"""Turns a composed DictConfig into typed objects and checks what types alone cannot express.

Everything here runs before any model or dataset is loaded, so a bad value costs milliseconds.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from dataclasses import is_dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from rewardctl.config.schema import Device, DType, EvalConfig, ExportConfig, MixedPrecision, RunConfig
from rewardctl.errors import ConfigError

SWITCH_VALUES = ("auto", "true", "false")
KNOWN_TRACKERS = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "mlflow": "mlflow",
    "comet_ml": "comet_ml",
    "aim": "aim",
    "clearml": "clearml",
    "trackio": "trackio",
}


def _to_object(cfg: DictConfig) -> Any:
    try:
        return OmegaConf.to_object(cfg)
    except MissingMandatoryValue as exc:
        raise ConfigError(exc.full_key, "a value is required but none was given (set it on the command line)") from None
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "config"
        raise ConfigError(key, str(exc).splitlines()[0]) from None


def _typed_peft(cfg: DictConfig) -> None:
    """Validates ``peft`` against the schema of the adapter kind it names."""
    from rewardctl.config.schema import PEFT_SCHEMAS

    node = cfg.peft
    name = node.get("name") if isinstance(node, DictConfig) else None
    if name not in PEFT_SCHEMAS:
        raise ConfigError("peft.name", f"unknown adapter kind {name!r} (known: {', '.join(PEFT_SCHEMAS)})")
    schema_cls = PEFT_SCHEMAS[name]
    if OmegaConf.get_type(node) is not schema_cls:
        try:
            cfg.peft = OmegaConf.merge(OmegaConf.structured(schema_cls), node)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"peft.{getattr(exc, 'key', '')}".rstrip("."), str(exc).splitlines()[0]) from None


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(key, message)


# Below this hidden size bf16 autocast costs more in casts than it saves in matmuls on a CPU: the
# bundled 64-wide model trains 1.4-1.8x slower under it, the 384-wide MiniLM-L6 1.4-1.5x faster with
# the same held-out accuracy (docs/benchmarks.md, "CPU precision and compilation").
CPU_BF16_MIN_HIDDEN = 256


def model_hidden_size(model: Any) -> int | None:
    """The backbone's width from its config (a cheap read), or None when it cannot be read here."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(
            model.name_or_path, revision=model.revision, trust_remote_code=model.trust_remote_code
        )
    except (OSError, ValueError):
        return None
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


FSDP_SHARDING = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD")


def check_hardware(hw: Any, *, for_training: bool, peft_name: str = "none") -> None:
    """Process counts, strategy and its optional dependency: refused before any model loads."""
    from rewardctl.config.schema import Strategy

    _require(
        hw.num_processes >= 0,
        "hardware.num_processes",
        f"must be >= 0 (0: one per visible GPU); got {hw.num_processes}",
    )
    _require(hw.num_machines >= 1, "hardware.num_machines", f"must be >= 1 (got {hw.num_machines})")
    _require(
        0 <= hw.machine_rank < hw.num_machines,
        "hardware.machine_rank",
        f"must be in [0, {hw.num_machines}) (got {hw.machine_rank})",
    )
    _require(hw.zero_stage in (1, 2, 3), "hardware.zero_stage", f"must be 1, 2 or 3 (got {hw.zero_stage})")
    _require(
        hw.fsdp_sharding_strategy in FSDP_SHARDING,
        "hardware.fsdp_sharding_strategy",
        f"must be one of {', '.join(FSDP_SHARDING)} (got {hw.fsdp_sharding_strategy!r})",
    )
    _require(
        hw.num_machines == 1 or bool(hw.main_process_ip),
        "hardware.main_process_ip",
        "a multi-machine run needs rank 0's address",
    )
    if not for_training:
        return
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


def use_precision(run: RunConfig, cfg: DictConfig, precision: MixedPrecision) -> None:
    """Every later reader (the accelerator, the launcher's workers' flags, config.yaml written from
    ``cfg``, trackers, the summary) sees the resolved precision, never ``auto``."""
    run.hardware.mixed_precision = precision
    cfg.hardware.mixed_precision = precision


def has_cxx_compiler() -> bool:
    """Inductor builds CPU kernels with the C++ compiler named by $CXX (default g++)."""
    return shutil.which(os.environ.get("CXX", "g++")) is not None


def check_compile(run: RunConfig) -> None:
    """train.compile combinations refused before anything loads (they would fail at the first step)."""
    from rewardctl.config.schema import Strategy

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


def check_weights_dtype(run: RunConfig) -> None:
    """float16 master weights on a CPU: no loss scaler guards them there, so a run overflows to NaN
    (and CPU float16 kernels are slow); refused like ``mixed_precision=fp16`` on CPU."""
    on_cpu = run.hardware.device == Device.cpu or not torch.cuda.is_available()
    _require(
        not (run.model.dtype == DType.float16 and on_cpu),
        "model.dtype",
        "float16 weights need a GPU; use float32 (with hardware.mixed_precision=bf16 if you want) on CPU",
    )


def check_run_config(cfg: DictConfig, *, for_training: bool = True) -> RunConfig:
    """Typed, fully resolved and checked run config, or a ConfigError naming the key: everything but
    the method's own checks (``rewardctl.methods.registry.to_run_config`` adds those, and types
    ``cfg.method`` against the method's schema before calling this).

    ``for_training=False`` (re-reading a finished run for eval) skips what only matters to start
    training on this machine: the resume path, installed trackers, the device and precision, compile.
    With ``for_training`` a ``hardware.mixed_precision=auto`` is resolved here, in ``cfg`` too.
    """
    _typed_peft(cfg)
    run: RunConfig = _to_object(cfg)
    t, m, d = run.train, run.model, run.data
    _require(m.max_length >= 8, "model.max_length", f"must be >= 8 (got {m.max_length})")
    _require(
        t.per_device_batch_size >= 1, "train.per_device_batch_size", f"must be >= 1 (got {t.per_device_batch_size})"
    )
    if t.per_device_eval_batch_size is not None:
        _require(t.per_device_eval_batch_size >= 1, "train.per_device_eval_batch_size", "must be >= 1")
    _require(t.grad_accum >= 1, "train.grad_accum", f"must be >= 1 (got {t.grad_accum})")
    _require(t.lr > 0, "train.lr", f"must be > 0 (got {t.lr})")
    _require(t.max_steps > 0 or t.epochs > 0, "train.epochs", "must be > 0 when train.max_steps is not set")
    _require(t.log_every >= 1, "train.log_every", "must be >= 1")
    _require(t.eval_every >= 0, "train.eval_every", "must be >= 0 (0 evaluates only at the end)")
    _require(t.save_every >= 0, "train.save_every", "must be >= 0 (0 saves only at the end)")
    _require(0.0 <= t.warmup_ratio < 1.0, "train.warmup_ratio", "must be in [0, 1)")
    _require(t.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
    _require(t.max_grad_norm >= 0, "train.max_grad_norm", "must be >= 0 (0 disables clipping)")
    _require(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    for key in ("adam_beta1", "adam_beta2"):
        _require(0.0 <= getattr(t, key) < 1.0, f"train.{key}", f"must be in [0, 1) (got {getattr(t, key)})")
    _require(t.adam_eps > 0, "train.adam_eps", f"must be > 0 (got {t.adam_eps})")
    _require(t.num_workers >= 0, "train.num_workers", "must be >= 0")
    if t.stop_after_steps is not None:
        _require(t.stop_after_steps >= 1, "train.stop_after_steps", "must be >= 1")
    _require(
        t.max_bad_steps >= 0,
        "train.max_bad_steps",
        f"must be >= 0 (0: never stop on skipped updates); got {t.max_bad_steps}",
    )
    _require(
        t.divergence_factor == 0 or t.divergence_factor > 1,
        "train.divergence_factor",
        f"must be 0 (off) or > 1 (got {t.divergence_factor})",
    )
    if for_training and t.resume not in ("auto", "off"):
        _require(
            Path(t.resume).is_dir(),
            "train.resume",
            f"must be auto, off or a checkpoint directory; {t.resume!r} does not exist",
        )
        _require(
            (Path(t.resume) / "trainer_state.json").is_file(),
            "train.resume",
            f"{t.resume!r} is not a rewardctl checkpoint (no trainer_state.json); pass checkpoints/step-N",
        )
    for tracker in t.report_to if for_training else ():
        _require(
            tracker in KNOWN_TRACKERS,
            "train.report_to",
            f"unknown tracker {tracker!r} (known: {', '.join(KNOWN_TRACKERS)})",
        )
        _require(
            importlib.util.find_spec(KNOWN_TRACKERS[tracker]) is not None,
            "train.report_to",
            f"{tracker} is not installed (pip install {tracker})",
        )
    _require(0.0 <= d.holdout_fraction < 1.0, "data.holdout_fraction", "must be in [0, 1)")
    for key in ("max_train_rows", "max_eval_rows", "num_proc", "pad_to_multiple_of", "length_group_batches"):
        value = getattr(d, key)
        _require(value is None or value >= 1, f"data.{key}", f"must be >= 1 or null (got {value})")
    _require(bool(str(d.train).strip()), "data.train", "must name a file, folder or hub dataset")
    for key in ("share_prefix", "padding_free"):  # str fields: OmegaConf turns true/false into 'True'/'False'
        value = str(getattr(d, key)).lower()
        _require(value in SWITCH_VALUES, f"data.{key}", f"must be auto, true or false (got {getattr(d, key)!r})")
        setattr(d, key, value)
    check_hardware(
        run.hardware, for_training=for_training, peft_name=getattr(getattr(run.peft, "name", None), "value", "none")
    )
    if for_training:
        width = model_hidden_size(run.model) if run.hardware.mixed_precision == MixedPrecision.auto else None
        use_precision(
            run,
            cfg,
            check_precision(run.hardware.device, run.hardware.mixed_precision, "hardware.mixed_precision", width),
        )
        check_weights_dtype(run)
        check_compile(run)
    if not is_dataclass(run.method):
        raise ConfigError("method", "the method config did not validate against its schema")
    return run


def _check_run_dir(run_dir: str) -> None:
    _require(Path(run_dir).is_dir(), "run_dir", f"{run_dir!r} is not a directory")
    _require(
        (Path(run_dir) / "config.yaml").is_file(), "run_dir", f"{run_dir!r} has no config.yaml (not a rewardctl run)"
    )


def to_eval_config(cfg: DictConfig) -> EvalConfig:
    ev: EvalConfig = _to_object(cfg)
    _check_run_dir(ev.run_dir)
    if ev.batch_size is not None:
        _require(ev.batch_size >= 1, "batch_size", "must be >= 1")
    if ev.max_rows is not None:
        _require(ev.max_rows >= 1, "max_rows", "must be >= 1")
    if ev.device is not None and ev.mixed_precision is not None:
        check_precision(ev.device, ev.mixed_precision, "mixed_precision")
    return ev


def to_export_config(cfg: DictConfig) -> ExportConfig:
    ex: ExportConfig = _to_object(cfg)
    _check_run_dir(ex.run_dir)
    _require(ex.dtype != DType.auto, "dtype", "must be float32, bfloat16 or float16 (or null: as trained)")
    return ex


def read_run_config(path: Path) -> DictConfig:
    """A run's saved config.yaml merged onto the schema (``method`` and ``peft`` as written: their
    schemas are chosen by their content); ``rewardctl.methods.registry.load_run_config`` checks it."""
    from rewardctl.config.store import register

    register()
    raw = OmegaConf.load(path)
    base = OmegaConf.structured(RunConfig)
    try:
        merged = OmegaConf.merge(
            base, OmegaConf.masked_copy(raw, [k for k in raw.keys() if k not in ("method", "peft")])
        )
    except OmegaConfBaseException as exc:
        raise ConfigError(str(getattr(exc, "full_key", path)), str(exc).splitlines()[0]) from None
    merged.method = raw.method
    merged.peft = raw.peft
    return merged


def wants_gpu(hardware: Any) -> bool:
    """Whether this run computes on a CUDA device (``hardware.device`` gpu, or auto with one present)."""
    return hardware.device != Device.cpu and torch.cuda.is_available()
