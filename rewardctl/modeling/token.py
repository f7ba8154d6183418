"""Token classifiers (PRM): two labels per token, 1 = the step ending here is correct.

The saved directory is a stock ``AutoModelForTokenClassification`` with ``id2label`` naming the
classes and the step separator recorded in ``config.json`` (``rewardctl.step_separator``), so any
scorer can rebuild sequences exactly as training did.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor
from transformers import AutoModelForTokenClassification, PreTrainedModel, PreTrainedTokenizerBase

from rewardctl import __version__
from rewardctl.config.schema import ModelConfig, TrainConfig
from rewardctl.errors import ConfigError
from rewardctl.modeling.common import instantiate, load_config, load_kwargs
from rewardctl.utils.fs import atomic_directory

LABELS = {0: "incorrect", 1: "correct"}


def build_token_classifier(model_cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, train_cfg: TrainConfig | None) -> PreTrainedModel:
    if model_cfg.config_overrides.get("num_labels", 2) != 2:
        raise ConfigError("model.config_overrides.num_labels", "a process reward model has exactly 2 labels")
    config = load_config(model_cfg)
    config.num_labels = 2
    config.id2label = dict(LABELS)
    config.label2id = {v: k for k, v in LABELS.items()}
    return instantiate(AutoModelForTokenClassification, config, model_cfg, tokenizer, train_cfg)


def load_token_classifier(path: Path, model_cfg: ModelConfig) -> PreTrainedModel:
    model = AutoModelForTokenClassification.from_pretrained(str(path), **load_kwargs(model_cfg))
    if model.config.num_labels != 2:
        raise ConfigError("run_dir", f"{path} holds a {model.config.num_labels}-label token classifier, not a PRM")
    return model


def save_token_classifier(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path, *,
                          meta: dict[str, Any], state_dict: dict[str, Tensor] | None = None) -> None:
    model.config.rewardctl = {"version": __version__, **meta}
    with atomic_directory(path) as tmp:
        model.save_pretrained(str(tmp), state_dict=state_dict)
        tokenizer.save_pretrained(str(tmp))
