"""PEFT adapters: wrapping a freshly built model, saving it so stock peft reloads it, reloading it.

The head of a reward model (``score`` / ``classifier``) is always in ``modules_to_save``: the most
common complaint about every peer is a head lost (left random) when a LoRA run is reloaded. A model
built from a config alone (``model.from_scratch``) has no base weights anywhere, so its adapter
directory also carries them under ``base/`` and points ``base_model_name_or_path`` there.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from rewardctl import __version__
from rewardctl.config.schema import LoraConfig, ModelConfig, QLoraConfig
from rewardctl.utils.fs import atomic_directory

BASE_DIR = "base"
log = logging.getLogger(__name__)
META_FILE = "rewardctl.json"


def uses_adapter(peft_cfg: Any) -> bool:
    return isinstance(peft_cfg, LoraConfig)


def quantization_config(peft_cfg: Any) -> Any:
    """The bitsandbytes 4-bit config of peft=qlora (None otherwise); validated to need CUDA before."""
    if not isinstance(peft_cfg, QLoraConfig):
        return None
    import torch
    from transformers import BitsAndBytesConfig

    dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=peft_cfg.quant_type,
        bnb_4bit_use_double_quant=peft_cfg.double_quant,
        bnb_4bit_compute_dtype=dtypes.get(peft_cfg.compute_dtype.value, torch.bfloat16),
    )


def wrap_with_adapter(model: nn.Module, peft_cfg: Any, *, head: list[str], task_type: str) -> nn.Module:
    """``model`` unchanged for peft=none; else a PeftModel with the head trained in full."""
    if not uses_adapter(peft_cfg):
        return model
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training

    if isinstance(peft_cfg, QLoraConfig):  # norms in fp32, inputs requiring grads for checkpointing
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)

    targets: Any = list(peft_cfg.target_modules)
    if targets == ["all-linear"]:
        targets = "all-linear"
    keep = list(dict.fromkeys([*head, *peft_cfg.modules_to_save]))
    config = PeftLoraConfig(
        r=peft_cfg.r,
        lora_alpha=peft_cfg.alpha,
        lora_dropout=peft_cfg.dropout,
        target_modules=targets,
        modules_to_save=keep or None,
        exclude_modules=keep or None,
        task_type=task_type,
        bias="none",
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


def save_model_dir(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    path: Path,
    model_cfg: ModelConfig,
    *,
    meta: dict[str, Any],
    state_dict: dict[str, Tensor] | None = None,
    save_merged: bool = False,
    truncate_end: bool = False,
) -> None:
    """Write ``path`` atomically: a stock transformers directory (rewardctl's facts under ``rewardctl``
    in config.json) or a PEFT adapter directory (facts in rewardctl.json), plus the tokenizer. With
    ``save_merged`` an adapter is also merged into its base and written to ``<path>-merged``.
    ``truncate_end``: the tokenizer is saved to cut over-long text as a sequence classifier trained on
    it (``truncate_as_trained``); token classifiers and policies keep the tokenizer's own setting."""
    meta = {"version": __version__, **meta}
    with atomic_directory(path) as tmp:
        if is_adapter_model(model):
            model.get_base_model().config.rewardctl = meta  # base/config.json and stock peft reloads carry it too
            save_adapter(model, tmp, model_cfg, state_dict, final_path=path)
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        else:
            model.config.rewardctl = meta
            model.save_pretrained(str(tmp), state_dict=state_dict)
        tokenizer.save_pretrained(str(tmp))
        if truncate_end:
            truncate_as_trained(tmp, model_cfg.max_length)
    if save_merged and is_adapter_model(model) and state_dict is not None:
        log.warning(
            "the weights were gathered from FSDP / DeepSpeed: no model-merged/ copy is written during "
            "training; write it with: rewardctl export run_dir=%s",
            path.parent,
        )
    elif save_merged and is_adapter_model(model):
        merged = model.merge_and_unload()  # the last use of the model: merging in place saves a copy
        save_model_dir(
            merged, tokenizer, path.with_name(f"{path.name}-merged"), model_cfg, meta=meta, truncate_end=truncate_end
        )


def truncate_as_trained(path: Path, max_length: int) -> None:
    """The saved tokenizer cuts an over-long text as training did: to ``model.max_length`` tokens,
    keeping its end (training keeps the prompt's end and the response, where the reward is read), so
    a stock ``tokenizer(text, truncation=True)`` or ``pipeline`` scores the text training would."""
    config_path = Path(path) / "tokenizer_config.json"
    if not config_path.is_file():
        return
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.update(truncation_side="left", model_max_length=max_length)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def merge_adapters(model: nn.Module) -> nn.Module:
    """``model`` with every PEFT adapter folded into its base weights (in place): the model itself,
    or a direct child of a wrapper such as the reward model's ``classifier``. The trained head (a
    ``modules_to_save`` copy) replaces the original, so the result scores exactly as the adapter did."""
    if is_adapter_model(model):
        return model.merge_and_unload()
    for name, child in list(model.named_children()):
        if is_adapter_model(child):
            setattr(model, name, child.merge_and_unload())
    return model


def contains_adapter(model: nn.Module) -> bool:
    return is_adapter_model(model) or any(is_adapter_model(child) for child in model.children())


def load_model_dir(path: Path, model_cfg: ModelConfig, load_plain: Callable[[str], nn.Module]) -> nn.Module:
    """A directory written by ``save_model_dir``: ``load_plain`` reads a stock directory (or the base
    of an adapter directory), then the adapter goes on top."""
    if not has_adapter(path):
        return load_plain(str(path))
    from peft import PeftModel

    return PeftModel.from_pretrained(load_plain(base_location(Path(path), model_cfg)), str(path))


def read_saved_meta(path: Path) -> dict[str, Any]:
    """rewardctl's facts about a saved model directory, read before (or without) loading it."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return json.loads((path / META_FILE).read_text(encoding="utf-8"))
    config = path / "config.json"
    return dict(json.loads(config.read_text(encoding="utf-8")).get("rewardctl") or {}) if config.is_file() else {}


def wants_merged_copy(peft_cfg: Any) -> bool:
    return uses_adapter(peft_cfg) and bool(getattr(peft_cfg, "save_merged", False))
