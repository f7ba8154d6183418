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
from rewardctl.data.packing import PAD_SEGMENT, segment_attention_mask
from rewardctl.errors import ConfigError, ModelMismatchError
from rewardctl.modeling import unpadded_decoder
from rewardctl.modeling.adapters import load_model_dir, save_model_dir
from rewardctl.modeling.common import instantiate, load_config, load_kwargs, resolved_architecture
from rewardctl.modeling.final_layer import additive_mask, hidden_at_reads, read_only_blocker
from rewardctl.modeling.first_token_layer import every_token, first_token_blocker, first_token_only
from rewardctl.modeling.unpadded_decoder import DecoderLayout, unpadded_blocker
from rewardctl.modeling.unpadded_encoder import (
    LAYOUT_KEY,
    keep_padding,
    skip_padding,
    skip_padding_blocker,
    token_layout,
)

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
    """``forward(input_ids, attention_mask) -> rewards`` of shape (N,), float32; (N, L) for a head
    with L > 1 outputs (a regression model's attributes)."""

    def __init__(self, classifier: nn.Module, final_layer_at_reads: bool = True, skip_padding: bool = True) -> None:
        super().__init__()
        self.classifier = classifier
        hf = _unwrap_hf(classifier)
        backbone = getattr(hf, getattr(hf, "base_model_prefix", ""), None)
        self.pooling = (
            "last_token" if isinstance(getattr(hf, "score", None), nn.Module) and backbone is not None else "native"
        )
        self.final_layer_at_reads = final_layer_at_reads
        self.skip_padding = skip_padding

    @property
    def final_layer_at_reads(self) -> bool:
        """``model.final_layer_at_reads``: the last layer only where the reward is read, at the read
        tokens of a decoder (final_layer.py) or the pooled first token of an encoder
        (first_token_layer.py), wherever that is exact for the model."""
        return self._final_layer_at_reads

    @final_layer_at_reads.setter
    def final_layer_at_reads(self, enabled: bool) -> None:
        self._final_layer_at_reads = enabled
        if self.pooling == "native":  # the encoder's last layer is switched once, not per call
            hf = _unwrap_hf(self.classifier)
            if enabled and first_token_blocker(hf) is None:
                first_token_only(hf)
            elif not enabled:
                every_token(hf)

    @property
    def skip_padding(self) -> bool:
        """``model.skip_padding``: the layers run on the real tokens of a padded CPU batch only, wherever
        that is exact for the model: a BERT-family encoder's (unpadded_encoder.py), a Llama-family
        decoder's with attention in the padded layout (unpadded_decoder.py)."""
        return self._skip_padding

    @skip_padding.setter
    def skip_padding(self, enabled: bool) -> None:
        if self.pooling == "last_token":  # a decoder's blockers are checked per batch (_decoder_layout)
            self._skip_padding = enabled
            return
        hf = _unwrap_hf(self.classifier)
        self._skip_padding = enabled and self.pooling == "native" and skip_padding_blocker(hf) is None
        if self._skip_padding:
            skip_padding(hf)
        else:
            keep_padding(hf)

    def skip_padding_blocker(self) -> str | None:
        """Why this model's layers run over the padding too (None: over the real tokens, on a CPU)."""
        hf = _unwrap_hf(self.classifier)
        if self.pooling == "last_token":
            backbone = getattr(hf, hf.base_model_prefix)
            blocker = unpadded_blocker(backbone, training_setup=True) or unpadded_decoder.too_narrow(backbone)
            return "model.skip_padding=false" if blocker is None and not self._skip_padding else blocker
        blocker = skip_padding_blocker(hf)
        if blocker is None and not self._skip_padding:
            return "model.skip_padding=false"
        if blocker is None and getattr(hf, "is_activation_checkpointing", False):
            return "gradient checkpointing (the layers run their own checkpointed call)"
        return blocker

    @property
    def _no_split_modules(self) -> list[str]:
        """The backbone's layer classes. accelerate's FSDP transformer auto-wrap reads this attribute
        of the module it prepares: without it the wrapper would be sharded as one unit (every
        parameter gathered at once) instead of one decoder layer at a time."""
        return list(getattr(_unwrap_hf(self.classifier), "_no_split_modules", None) or [])

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        segment_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        reward_index: Tensor | None = None,
    ) -> Tensor:
        """Rewards of shape (N,). Stacked: one sequence per response, ``attention_mask`` 2-D. Packed
        (``rewardctl.data.packing``): ``segment_ids``, ``position_ids`` and ``reward_index``, shape (N,):
        the flat position (row * L + column) of each response's last token, in output order."""
        if reward_index is not None:
            return self._packed(input_ids, segment_ids, position_ids, reward_index)
        if self.pooling == "native":  # its last layer at the pooled first token only, where exact
            extra = {}
            if self._skip_padding and attention_mask is not None and not torch.compiler.is_compiling():
                layout = token_layout(attention_mask)
                if layout is not None:
                    extra[LAYOUT_KEY] = layout
            logits = self.classifier(input_ids=input_ids, attention_mask=attention_mask, **extra).logits
            return rewards_of(logits)
        hf = _unwrap_hf(self.classifier)
        backbone = getattr(hf, hf.base_model_prefix)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        cols = last_attended_index(attention_mask)
        real = attention_mask.bool()
        layout = self._decoder_layout(backbone, real)
        if layout is not None:  # each row: causal over its own real tokens
            mask = segment_attention_mask(torch.where(real, 0, PAD_SEGMENT))
            pooled = self._hidden_unpadded(backbone, input_ids, position_ids, mask, layout, rows, cols)
        else:
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
            pooled = self._hidden_at(backbone, rows, cols, inputs)
        return rewards_of(hf.score(pooled))

    def read_only_blocker(self) -> str | None:
        """Why this model's last layer runs at every token (None: at the read tokens only)."""
        if not self.final_layer_at_reads:
            return "model.final_layer_at_reads=false"
        hf = _unwrap_hf(self.classifier)
        if self.pooling != "last_token":
            return first_token_blocker(hf)
        return read_only_blocker(getattr(hf, hf.base_model_prefix))

    def _hidden_at(self, backbone: nn.Module, rows: Tensor, cols: Tensor, inputs: dict[str, Any]) -> Tensor:
        """Final hidden states at tokens (rows[n], cols[n]), the last layer computed there only
        where that is exact for this model (``final_layer.py``), else from the full forward. Under
        ``torch.compile`` the full forward is traced: the read-only path stops the model with a hook and
        an exception, which would break the graph inside the layer loop and leave every layer eager."""
        if self.read_only_blocker() is None and not torch.compiler.is_compiling():  # the check _wrap logs
            return hidden_at_reads(backbone, rows, cols, **inputs, use_cache=False)
        return backbone(**inputs, use_cache=False).last_hidden_state[rows, cols]

    def _decoder_layout(self, backbone: nn.Module, real: Tensor) -> DecoderLayout | None:
        """The ``DecoderLayout`` of a decoder batch whose real tokens are ``real`` (B, L), or None where
        its layers run on the padded batch (``model.skip_padding=false``, ``unpadded_blocker``, a model
        narrower than ``unpadded_decoder.MIN_HIDDEN``, a traced forward, a GPU batch, little padding, a
        sliding window narrower than the batch)."""
        if not self._skip_padding or torch.compiler.is_compiling() or unpadded_blocker(backbone) is not None:
            return None
        return unpadded_decoder.layout_for(backbone, real)

    def _hidden_unpadded(
        self,
        backbone: nn.Module,
        input_ids: Tensor,
        position_ids: Tensor,
        mask: Tensor,
        layout: DecoderLayout,
        rows: Tensor,
        cols: Tensor,
    ) -> Tensor:
        """Final hidden states at tokens (rows[n], cols[n]) from the layers on the real tokens only."""
        reads = rows * input_ids.shape[1] + cols
        at_reads = self.read_only_blocker() is None
        return unpadded_decoder.hidden_at_reads(backbone, input_ids, position_ids, mask, layout, reads, at_reads)

    def _packed(
        self, input_ids: Tensor, segment_ids: Tensor | None, position_ids: Tensor, reward_index: Tensor
    ) -> Tensor:
        """Shared-prefix rows (``segment_ids`` given: a 4-D mask) or padding-free rows (no mask: the
        position ids' restarts mark the sequences); the reward is read at each ``reward_index``."""
        if self.pooling != "last_token":
            raise ValueError("packed batches need a causal decoder; this model pools its first token")
        hf = _unwrap_hf(self.classifier)
        backbone = getattr(hf, hf.base_model_prefix)
        length = input_ids.shape[1]
        rows, cols = reward_index // length, reward_index % length
        layout = None if segment_ids is None else self._decoder_layout(backbone, segment_ids != PAD_SEGMENT)
        if layout is not None:
            mask = segment_attention_mask(segment_ids)
            pooled = self._hidden_unpadded(backbone, input_ids, position_ids, mask, layout, rows, cols)
            return rewards_of(hf.score(pooled))
        mask = None
        if segment_ids is not None:
            mask = segment_attention_mask(segment_ids)
            if hf.config._attn_implementation == "eager":  # eager adds the mask to the scores
                mask = additive_mask(mask)
        inputs = {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids}
        return rewards_of(hf.score(self._hidden_at(backbone, rows, cols, inputs)))


def rewards_of(scores: Tensor) -> Tensor:
    """The head's (N, 1) output as (N,) float32 rewards, or (N, K) as is for a multi-output head, in a
    tensor of its own rather than a view of ``scores``: FSDP2 warns when the module it wraps at the root
    returns a view (an in-place op on it would skip FSDP2's backward hook)."""
    return scores.squeeze(-1).to(torch.float32, copy=True)


PREFIX_SHARING_ATTENTION = ("eager", "sdpa")  # the implementations that take a 4-D mask as is


def prefix_sharing_blocker(model_cfg: ModelConfig) -> str | None:
    """Why a shared-prefix forward would not be exact for this model, or None when it is: it needs a
    causal decoder read at its last token (an encoder's prompt would see the answers) and an
    attention implementation that takes a 4-D mask."""
    requested = model_cfg.attn_implementation
    if requested and requested not in PREFIX_SHARING_ATTENTION:
        return f"attn_implementation={requested} takes no 4-D attention mask (use sdpa or eager)"
    classifier, causal, attention = resolved_architecture(model_cfg, AutoModelForSequenceClassification)
    if not causal or SequenceRewardModel(classifier).pooling != "last_token":
        return f"{type(classifier).__name__} is not a causal decoder (the prompt would see the answers)"
    if attention not in PREFIX_SHARING_ATTENTION:
        return f"attn_implementation={attention} takes no 4-D attention mask (use sdpa or eager)"
    return None


REWARD_LABELS = ("reward",)  # one output: the reward of pairwise and ranklist models


def _outputs(count: int) -> str:
    return "exactly one output" if count == 1 else f"{count} outputs"


def check_output_count(num_labels: int, architectures: list[str] | None, name: str, expected: int = 1) -> None:
    """A starting checkpoint that already has a classification head must have the outputs we train."""
    heads = [a for a in (architectures or []) if a.endswith("ForSequenceClassification")]
    if heads and num_labels != expected:
        raise ConfigError(
            "model.name_or_path",
            f"{name!r} has a {num_labels}-output classification head ({heads[0]}); "
            f"this reward model needs {_outputs(expected)}. Start from a base or causal-LM checkpoint "
            "instead",
        )


def build_sequence_classifier(
    model_cfg: ModelConfig,
    tokenizer: PreTrainedTokenizerBase,
    train_cfg: TrainConfig | None,
    quantization: Any = None,
    labels: tuple[str, ...] = REWARD_LABELS,
) -> PreTrainedModel:
    """A classifier with one output per name in ``labels`` (a reward, or a regression model's
    attributes), from a checkpoint (head newly initialised) or from a config alone. The names are
    saved as ``id2label``, so a stock reload knows what each output means."""
    count = len(labels)
    if model_cfg.config_overrides.get("num_labels", count) != count:
        raise ConfigError(
            "model.config_overrides.num_labels",
            f"this reward model has {_outputs(count)} ({', '.join(labels)}); leave num_labels out",
        )
    config = load_config(model_cfg)
    check_output_count(
        getattr(config, "num_labels", 1), getattr(config, "architectures", None), model_cfg.name_or_path, count
    )
    config.num_labels = count
    config.problem_type = "regression"  # pipeline() then returns the raw reward, not sigmoid(reward)
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}
    return instantiate(AutoModelForSequenceClassification, config, model_cfg, tokenizer, train_cfg, quantization)


def head_name(model: nn.Module) -> str:
    """The classification head's attribute: ``score`` (decoders) or ``classifier`` (encoders)."""
    return "score" if isinstance(getattr(_unwrap_hf(model), "score", None), nn.Module) else "classifier"


def load_saved_classifier(path: Path, model_cfg: ModelConfig, labels: tuple[str, ...] = REWARD_LABELS) -> nn.Module:
    """A saved reward model: a stock directory, or a LoRA adapter (with its trained head) over its base.
    Its outputs must be ``labels``, by count and (for several) by name and order."""

    def plain(location: str) -> PreTrainedModel:
        # A stock directory loads with the outputs it was saved with (then checked below, by name); an
        # adapter's base gets the head the adapter's trained copy fills.
        outputs = {} if Path(location) == Path(path) else {"num_labels": len(labels)}
        return AutoModelForSequenceClassification.from_pretrained(location, **outputs, **load_kwargs(model_cfg))

    model = load_model_dir(path, model_cfg, plain)
    config = _unwrap_hf(model).config
    saved = tuple(config.id2label[i] for i in range(config.num_labels))
    if config.num_labels != len(labels) or (len(labels) > 1 and saved != tuple(labels)):
        raise ModelMismatchError(
            f"{path} holds a classifier with outputs {list(saved)}, not the expected {list(labels)}"
        )
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
    facts: dict[str, Any] | None = None,
) -> None:
    """Write ``path`` atomically: config, safetensors weights (or the adapter), tokenizer; ``facts``
    join the method and pooling under ``rewardctl`` in config.json."""
    if state_dict is not None:
        state_dict = {k.removeprefix("classifier."): v for k, v in state_dict.items()}
    save_model_dir(
        model.classifier,
        tokenizer,
        path,
        model_cfg,
        meta={"method": method, "pooling": model.pooling, **(facts or {})},
        state_dict=state_dict,
        save_merged=save_merged,
        truncate_end=True,
    )
