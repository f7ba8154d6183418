"""The method registry: from ``method._target_`` to the Method class, its schema and its checks.

It lives with the methods, not in ``rewardctl.config`` (which knows no method code): typing the
``method`` group against the class's own dataclass and running the class's ``check_config`` are the
two steps a run config needs beyond the generic checks of ``rewardctl.config.validate``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rewardctl.config.schema import RunConfig
from rewardctl.config.validate import check_run_config, explain_value_error, read_run_config
from rewardctl.errors import ConfigError
from rewardctl.machine import check_machine
from rewardctl.methods.base import Method


def method_class(target: str) -> type:
    """The Method subclass named by ``method._target_``."""
    try:
        cls = get_class(target)
    except Exception as exc:  # noqa: BLE001 - hydra wraps import errors in several types
        raise ConfigError("method._target_", f"cannot import {target!r}: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise ConfigError("method._target_", f"{target!r} is not a subclass of rewardctl.methods.base.Method")
    return cls


def _typed_method(cfg: DictConfig) -> Any:
    """Validates ``method`` against the method class's own schema (also for a user's own method)."""
    node = cfg.method
    target = node.get("_target_") if isinstance(node, DictConfig) else None
    if not target:
        raise ConfigError("method._target_", "every method config must name its class in _target_")
    cls = method_class(target)
    if OmegaConf.get_type(node) is not cls.config_class:
        try:
            merged = OmegaConf.merge(OmegaConf.structured(cls.config_class), node)
        except OmegaConfBaseException as exc:
            key = f"method.{getattr(exc, 'key', '')}".rstrip(".")
            raise ConfigError(key, explain_value_error(key, str(exc).splitlines()[0])) from None
        cfg.method = merged
    return cls


def to_run_config(cfg: DictConfig, *, for_training: bool = True) -> RunConfig:
    """The typed, checked run config of a composed ``cfg`` (see ``check_run_config``), with the
    method's schema applied to ``method`` and the method's own ``check_config`` run. A run about to
    train here (``for_training``) is also checked against this machine (``check_machine``: devices,
    precision, compile), which resolves ``hardware.mixed_precision=auto``."""
    cls = _typed_method(cfg)
    run = check_run_config(cfg, for_training=for_training)
    if for_training:
        check_machine(run, cfg)
    if getattr(run.peft, "name", None) is not None and run.peft.name.value != "none" and not cls.supports_adapters:
        raise ConfigError(
            "peft",
            f"method {run.method.name} does not support adapters yet (peft={run.peft.name.value}); use peft=none",
        )
    cls.check_config(run)
    return run


def load_run_config(path: Path) -> RunConfig:
    """Reads a run's saved config.yaml back through the schemas (used by eval, export and resume)."""
    return to_run_config(read_run_config(path), for_training=False)


def build_method(run: RunConfig) -> Any:
    """The method object of a checked run config."""
    return method_class(run.method._target_)(run.method, run)
