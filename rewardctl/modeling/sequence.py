"""A scalar-reward sequence model that stock transformers can load and score identically.

The trainable module wraps an ``AutoModelForSequenceClassification`` with one output. Decoder
classifiers (a ``score`` head over the backbone) read the reward at the last attended token, found
from the attention mask, with position ids derived from the mask too: left and right padding give the
same reward. Encoder classifiers (BERT family) keep their own [CLS] pooler, which is what the
architecture defines. Either way the saved directory is a plain sequence classifier: stock
``from_pretrained`` + ``forward`` (or ``pipeline``) reproduces the training-time reward.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoModelForSequenceClassification, PreTrainedModel, PreTrainedTokenizerBase

from rewardctl.config.schema import ModelConfig, TrainConfig
from rewardctl.errors import ConfigError
from rewardctl.modeling.adapters import load_model_dir, save_model_dir
from rewardctl.modeling.common import instantiate, load_config, load_kwargs

log = logging.getLogger(__name__)


def last_attended_index(attention_mask: Tensor) -> Tensor:
    """Index of the rightmost 1 in each row, whatever the padding side."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * attention_mask.to(positions.dtype)).argmax(-1)


def _unwrap_hf(model: nn.Module) -> PreTrainedModel:
    """The transformers model inside a PEFT wrapper (adapters stay injected and active)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


class SequenceRewardModel(nn.Module):
    """``forward(input_ids, attention_mask) -> rewards`` of shape (N,), float32."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier
        hf = _unwrap_hf(classifier)
        backbone = getattr(hf, getattr(hf, "base_model_prefix", ""), None)
        self.pooling = "last_token" if isinstance(getattr(hf, "score", None), nn.Module) and backbone is not None else "native"

    @property
    def _no_split_modules(self) -> list[str]:
        """The backbone's layer classes. accelerate's FSDP transformer auto-wrap reads this attribute
        of the module it prepares: without it the wrapper would be sharded as one unit (every
        parameter gathered at once) instead of one decoder layer at a time."""
        return list(getattr(_unwrap_hf(self.classifier), "_no_split_modules", None) or [])

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        if self.pooling == "native":
            logits = self.classifier(input_ids=input_ids, attention_mask=attention_mask).logits
            return logits.squeeze(-1).float()
        hf = _unwrap_hf(self.classifier)
        backbone = getattr(hf, hf.base_model_prefix)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        last = last_attended_index(attention_mask)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return hf.score(pooled).squeeze(-1).float()


def check_single_output(num_labels: int, architectures: list[str] | None, name: str) -> None:
    heads = [a for a in (architectures or []) if a.endswith("ForSequenceClassification")]
    if heads and num_labels != 1:
        raise ConfigError("model.name_or_path", f"{name!r} has a {num_labels}-output classification head ({heads[0]}); "
                          "a reward model needs exactly one output. Start from a base or causal-LM checkpoint instead")


def build_sequence_classifier(model_cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, train_cfg: TrainConfig | None,
                              quantization: Any = None) -> PreTrainedModel:
    """A one-output classifier from a checkpoint (head newly initialised) or from a config alone."""
    if model_cfg.config_overrides.get("num_labels", 1) != 1:
        raise ConfigError("model.config_overrides.num_labels", "a reward model has exactly one output")
    config = load_config(model_cfg)
    check_single_output(getattr(config, "num_labels", 1), getattr(config, "architectures", None), model_cfg.name_or_path)
    config.num_labels = 1
    config.problem_type = "regression"  # pipeline() then returns the raw reward, not sigmoid(reward)
    config.id2label = {0: "reward"}
    config.label2id = {"reward": 0}
    return instantiate(AutoModelForSequenceClassification, config, model_cfg, tokenizer, train_cfg, quantization)


def head_name(model: nn.Module) -> str:
    """The classification head's attribute: ``score`` (decoders) or ``classifier`` (encoders)."""
    return "score" if isinstance(getattr(_unwrap_hf(model), "score", None), nn.Module) else "classifier"


def load_saved_classifier(path: Path, model_cfg: ModelConfig) -> nn.Module:
    """A saved reward model: a stock directory, or a LoRA adapter (with its trained head) over its base."""

    def plain(location: str) -> PreTrainedModel:
        return AutoModelForSequenceClassification.from_pretrained(location, num_labels=1, **load_kwargs(model_cfg))

    model = load_model_dir(path, model_cfg, plain)
    if _unwrap_hf(model).config.num_labels != 1:
        raise ConfigError("run_dir", f"{path} holds a {_unwrap_hf(model).config.num_labels}-output classifier, not a reward model")
    return model


def save_sequence_classifier(
    model: SequenceRewardModel,
    tokenizer: PreTrainedTokenizerBase,
    path: Path,
    model_cfg: ModelConfig,
    *,
    method: str,
    state_dict: dict[str, Tensor] | None = None,
    save_merged: bool = False,
) -> None:
    """Write ``path`` atomically: config, safetensors weights (or the adapter), tokenizer."""
    if state_dict is not None:
        state_dict = {k.removeprefix("classifier."): v for k, v in state_dict.items()}
    save_model_dir(model.classifier, tokenizer, path, model_cfg, meta={"method": method, "pooling": model.pooling},
                   state_dict=state_dict, save_merged=save_merged)
