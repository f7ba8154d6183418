"""Token classifiers (PRM): two labels per token, 1 = the step ending here is correct.

The saved directory is a stock ``AutoModelForTokenClassification`` with ``id2label`` naming the
classes and the step separator recorded in ``config.json`` (``rewardctl.step_separator``), so any
scorer can rebuild sequences exactly as training did.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from transformers import AutoModelForTokenClassification, PreTrainedModel, PreTrainedTokenizerBase

from rewardctl.config.schema import ModelConfig, TrainConfig
from rewardctl.errors import ConfigError, ModelMismatchError
from rewardctl.modeling import unpadded_decoder
from rewardctl.modeling.adapters import load_model_dir, save_model_dir
from rewardctl.modeling.common import instantiate, load_config, load_kwargs, transformers_model
from rewardctl.modeling.final_layer import read_only_blocker
from rewardctl.modeling.token_reads import ReadSettings, compute_reads_only, reads_blocker

log = logging.getLogger(__name__)

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
    blocker = reads_blocker(model)
    if blocker is not None:
        log.info("token classifier: every layer over every position: %s", blocker)
        return model
    hf = transformers_model(model)
    backbone = getattr(hf, hf.base_model_prefix)
    last_blocker = read_only_blocker(backbone)
    if model_cfg.final_layer_at_reads and last_blocker is not None:
        log.info("token classifier: last layer at every position: %s", last_blocker)
    settings = ReadSettings(
        skip_padding=model_cfg.skip_padding, last_at_reads=model_cfg.final_layer_at_reads and last_blocker is None
    )
    if not (settings.skip_padding or settings.last_at_reads):
        why = "model.skip_padding=false" + ("" if last_blocker else " and model.final_layer_at_reads=false")
        log.info("token classifier: every layer over every position: %s", why)
        compute_reads_only(model, settings)  # the stock class again, if it was swapped before
        return model
    compute_reads_only(model, settings)
    narrow = unpadded_decoder.too_narrow(backbone)
    if not settings.skip_padding:
        parts = ["layers over the padding"]
    elif narrow is not None:
        parts = [f"layers over the padding: {narrow}"]
    else:
        parts = ["layers on the real tokens of CPU batches"]
    parts.append(
        "last layer and head at the labelled tokens only (GPU batches too)"
        if settings.last_at_reads
        else "last layer in full"
    )
    note = " (train.compile traces the stock forward in training)" if compiled else ""
    log.info("token classifier: %s%s", "; ".join(parts), note)
    return model
