"""Registers the schemas in Hydra's ConfigStore and the `rewardctl.*` resolvers.

``run_schema`` types the whole run: ``model``, ``data``, ``hardware`` and ``train`` are validated while
Hydra composes. ``method`` and ``peft`` are polymorphic (each option has its own fields); they are
validated against the schema their ``_target_`` / ``name`` selects right after composition, still
before anything is loaded (see validate.py).
"""

from __future__ import annotations

from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from rewardctl.config import schema

PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def asset_path(name: str) -> str:
    """Absolute path of a bundled asset directory (e.g. the tiny model's config and tokenizer)."""
    path = PACKAGE_ROOT / "assets" / name
    if not path.exists():
        raise FileNotFoundError(f"rewardctl has no bundled asset named {name!r} (looked in {path})")
    return str(path)


def sample_path(name: str) -> str:
    """Absolute path of a bundled sample file or folder, e.g. ``pairwise/train.jsonl``."""
    path = PACKAGE_ROOT / "samples" / "data" / name
    if not path.exists():
        raise FileNotFoundError(f"rewardctl has no bundled sample named {name!r} (looked in {path})")
    return str(path)


def register() -> None:
    """Idempotent: safe to call from the CLI, the tests and user code."""
    store = ConfigStore.instance()
    store.store(name="run_schema", node=schema.RunConfig)
    store.store(name="eval_schema", node=schema.EvalConfig)
    store.store(name="export_schema", node=schema.ExportConfig)
    store.store(name="score_schema", node=schema.ScoreConfig)
    store.store(name="serve_schema", node=schema.ServeConfig)
    if not OmegaConf.has_resolver("rewardctl.asset"):
        OmegaConf.register_new_resolver("rewardctl.asset", asset_path)
    if not OmegaConf.has_resolver("rewardctl.sample"):
        OmegaConf.register_new_resolver("rewardctl.sample", sample_path)
