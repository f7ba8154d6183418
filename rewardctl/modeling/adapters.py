"""PEFT adapters: wrapping a freshly built model, saving it so stock peft reloads it, reloading it.

The head of a reward model (``score`` / ``classifier``) is always in ``modules_to_save``: the most
common complaint about every peer is a head lost (left random) when a LoRA run is reloaded. A model
built from a config alone (``model.from_scratch``) has no base weights anywhere, so its adapter
directory also carries them under ``base/`` and points ``base_model_name_or_path`` there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn

from rewardctl.config.schema import LoraConfig, ModelConfig

BASE_DIR = "base"


def uses_adapter(peft_cfg: Any) -> bool:
    return isinstance(peft_cfg, LoraConfig)


def wrap_with_adapter(model: nn.Module, peft_cfg: Any, *, head: list[str], task_type: str) -> nn.Module:
    """``model`` unchanged for peft=none; else a PeftModel with the head trained in full."""
    if not uses_adapter(peft_cfg):
        return model
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets: Any = list(peft_cfg.target_modules)
    if targets == ["all-linear"]:
        targets = "all-linear"
    keep = list(dict.fromkeys([*head, *peft_cfg.modules_to_save]))
    config = PeftLoraConfig(
        r=peft_cfg.r, lora_alpha=peft_cfg.alpha, lora_dropout=peft_cfg.dropout, target_modules=targets,
        modules_to_save=keep or None, exclude_modules=keep or None, task_type=task_type, bias="none",
    )
    return get_peft_model(model, config)


def is_adapter_model(model: nn.Module) -> bool:
    return callable(getattr(model, "disable_adapter", None)) and hasattr(model, "peft_config")


def save_adapter(
    model: nn.Module, path: Path, model_cfg: ModelConfig, state_dict: dict[str, Tensor] | None, *, final_path: Path
) -> None:
    """Adapter files into ``path`` (a temporary directory renamed to ``final_path`` when complete),
    plus the base weights under base/ for a from-scratch model."""
    model.save_pretrained(str(path), state_dict=state_dict)
    if model_cfg.from_scratch:
        model.get_base_model().save_pretrained(str(path / BASE_DIR), state_dict=_base_state(model))
        _point_base_to(path, final_path)


def _base_state(model: nn.Module) -> dict[str, Tensor]:
    """The base model's own weights (no LoRA matrices, original modules under their plain names)."""
    state = {}
    for key, value in model.get_base_model().state_dict().items():
        if "lora_" in key or ".modules_to_save." in key:
            continue
        state[key.replace(".base_layer.", ".").replace(".original_module.", ".")] = value
    return state


def _point_base_to(path: Path, final_path: Path) -> None:
    import json

    config_path = path / "adapter_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = str((final_path / BASE_DIR).resolve())
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")


def base_location(path: Path, model_cfg: ModelConfig) -> str:
    """Where an adapter directory's base weights are: its own base/ or the configured model."""
    return str(path / BASE_DIR) if (path / BASE_DIR).is_dir() else model_cfg.name_or_path


def has_adapter(path: Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()
