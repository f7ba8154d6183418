"""Token classifiers (PRM): two labels per token, 1 = the step ending here is correct.

The saved directory is a stock ``AutoModelForTokenClassification`` with ``id2label`` naming the
classes and the step separator recorded in ``config.json`` (``rewardctl.step_separator``), so any
scorer can rebuild sequences exactly as training did.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn
from transformers import AutoModelForTokenClassification, PreTrainedModel, PreTrainedTokenizerBase

from rewardctl.config.schema import ModelConfig, TrainConfig
from rewardctl.errors import ConfigError, ModelMismatchError
from rewardctl.modeling import read_slots
from rewardctl.modeling.adapters import load_model_dir, save_model_dir
from rewardctl.modeling.common import instantiate, load_config, load_kwargs
from rewardctl.modeling.token_reads import compute_reads_only, reads_blocker

LABELS = {0: "incorrect", 1: "correct"}


def build_token_classifier(
    model_cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, train_cfg: TrainConfig | None, quantization: Any = None
) -> PreTrainedModel:
    if model_cfg.config_overrides.get("num_labels", 2) != 2:
        raise ConfigError("model.config_overrides.num_labels", "a process reward model has exactly 2 labels")
    config = load_config(model_cfg)
    config.num_labels = 2
    config.id2label = dict(LABELS)
    config.label2id = {v: k for k, v in LABELS.items()}
    return instantiate(AutoModelForTokenClassification, config, model_cfg, tokenizer, train_cfg, quantization)


def load_token_classifier(path: Path, model_cfg: ModelConfig) -> nn.Module:
    def plain(location: str) -> PreTrainedModel:
        return AutoModelForTokenClassification.from_pretrained(location, num_labels=2, **load_kwargs(model_cfg))

    model = load_model_dir(path, model_cfg, plain)
    labels = getattr(getattr(model, "config", None), "num_labels", 2)
    if labels != 2:
        raise ModelMismatchError(f"{path} holds a {labels}-label token classifier, not a PRM")
    return model


def save_token_classifier(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    path: Path,
    model_cfg: ModelConfig,
    *,
    meta: dict[str, Any],
    state_dict: dict[str, Tensor] | None = None,
    save_merged: bool = False,
) -> None:
    save_model_dir(model, tokenizer, path, model_cfg, meta=meta, state_dict=state_dict, save_merged=save_merged)


def compute_labelled_tokens_only(model: nn.Module, model_cfg: ModelConfig, *, compiled: bool = False) -> nn.Module:
    """Let ``model`` compute the logits a PRM reads only (``token_reads``): its layers on a CPU batch's
    real tokens (``model.skip_padding``), its last layer and head at the labelled tokens
    (``model.final_layer_at_reads``), wherever that is exact for it; the log says which."""
    return read_slots.enable(
        model,
        model_cfg,
        blocker=reads_blocker(model),
        apply=compute_reads_only,
        subject="token classifier",
        reads="the labelled tokens",
        compiled=compiled,
    )
