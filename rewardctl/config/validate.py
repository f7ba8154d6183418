"""Turns a composed DictConfig into typed objects and checks what types alone cannot express.

Everything here runs before any model or dataset is loaded, so a bad value costs milliseconds.
"""

from __future__ import annotations

import importlib.util
from dataclasses import is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from rewardctl.config.schema import (
    DType,
    EvalConfig,
    ExportConfig,
    RunConfig,
    ScoreConfig,
    ServeConfig,
    TrainedModelSource,
)
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


def explain_value_error(key: str, text: str) -> str:
    """OmegaConf's conversion error, with the fix when a list reached a text key: on the command line
    Hydra reads ``[SEP]`` as a list, so text in brackets is quoted twice (shell, then Hydra)."""
    if any(f"Cannot convert '{kind}' to string" in text for kind in ("ListConfig", "DictConfig", "list", "dict")):
        example = "[SEP]" if "separator" in key else "<text>"
        return (
            f"a list or mapping was given where text is expected ({text.split(': ', 1)[-1]}); Hydra reads "
            f"[...] as a list: quote the text for the shell and for Hydra, e.g. {key}='\"{example}\"'"
        )
    return text


def _to_object(cfg: DictConfig) -> Any:
    try:
        return OmegaConf.to_object(cfg)
    except MissingMandatoryValue as exc:
        raise ConfigError(exc.full_key, "a value is required but none was given (set it on the command line)") from None
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "config"
        raise ConfigError(key, explain_value_error(key, str(exc).splitlines()[0])) from None


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


FSDP_SHARDING = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD")


def _check_switch(section: Any, where: str, key: str) -> None:
    """An auto / true / false str field, stored lower-case (OmegaConf turns true/false into 'True'/'False')."""
    value = str(getattr(section, key)).lower()
    _require(value in SWITCH_VALUES, f"{where}.{key}", f"must be auto, true or false (got {getattr(section, key)!r})")
    setattr(section, key, value)


def check_hardware(hw: Any) -> None:
    """Process counts, machines and sharding values (what this machine has: ``rewardctl.machine``)."""
    _check_switch(hw, "hardware", "cpu_fused_kernels")
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
    _require(
        hw.collective_timeout_s >= 1,
        "hardware.collective_timeout_s",
        f"must be >= 1 second (got {hw.collective_timeout_s})",
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


def check_run_config(cfg: DictConfig, *, for_training: bool = True) -> RunConfig:
    """Typed, fully resolved and checked run config, or a ConfigError naming the key: everything but
    the method's own checks (``rewardctl.methods.registry.to_run_config`` adds those, and types
    ``cfg.method`` against the method's schema before calling this).

    ``for_training=False`` (re-reading a finished run for eval) skips what only matters to start
    training here: the resume path and installed trackers. What this machine can run (devices,
    precision, compile) is ``rewardctl.machine.check_machine``'s, not this module's.
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
    _require(t.curves_every_s >= 0, "train.curves_every_s", "must be >= 0 (0 redraws curves.png after every eval)")
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
    _require(d.pad_buckets >= 0, "data.pad_buckets", f"must be >= 0 (0: pad to the longest row; got {d.pad_buckets})")
    _require(bool(str(d.train).strip()), "data.train", "must name a file, folder or hub dataset")
    for key in ("share_prefix", "padding_free"):
        _check_switch(d, "data", key)
    check_hardware(run.hardware)
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
    return ev


def _check_model_source(source: TrainedModelSource) -> None:
    _require(
        (source.run_dir is None) != (source.model_dir is None),
        "run_dir",
        "name one of run_dir=<run directory> or model_dir=<saved model directory>",
    )
    if source.run_dir is not None:
        _check_run_dir(source.run_dir)
    _require(
        source.checkpoint is None or source.run_dir is not None,
        "checkpoint",
        "needs run_dir= (a model_dir is one model)",
    )
    _require(source.max_length is None or source.max_length >= 1, "max_length", "must be >= 1")


def to_score_config(cfg: DictConfig) -> ScoreConfig:
    sc: ScoreConfig = _to_object(cfg)
    _check_model_source(sc)
    for key in ("batch_size", "max_rows"):
        value = getattr(sc, key)
        _require(value is None or value >= 1, key, "must be >= 1")
    if sc.output not in (None, "-"):
        _require(Path(sc.output).suffix in (".jsonl", ".parquet"), "output", "must end in .jsonl or .parquet (or be -)")
    return sc


def to_serve_config(cfg: DictConfig) -> ServeConfig:
    sv: ServeConfig = _to_object(cfg)
    _check_model_source(sv)
    _require(0 <= sv.port <= 65535, "port", f"must be in [0, 65535] (got {sv.port})")
    for key in ("max_batch_rows", "max_request_rows", "max_body_bytes"):
        _require(getattr(sv, key) >= 1, key, "must be >= 1")
    _require(sv.max_wait_ms >= 0, "max_wait_ms", "must be >= 0")
    return sv


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
    return run_config_node(OmegaConf.load(path), str(path))


def run_config_node(raw: DictConfig, origin: str) -> DictConfig:
    """``raw`` (a saved or synthesized run config) merged onto the schema, as ``read_run_config``."""
    base = OmegaConf.structured(RunConfig)
    try:
        merged = OmegaConf.merge(
            base, OmegaConf.masked_copy(raw, [k for k in raw.keys() if k not in ("method", "peft")])
        )
    except OmegaConfBaseException as exc:
        raise ConfigError(str(getattr(exc, "full_key", origin)), str(exc).splitlines()[0]) from None
    merged.method = raw.method
    merged.peft = raw.peft
    return merged
