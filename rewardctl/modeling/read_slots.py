"""The final hidden states of a decoder at given read slots of a padded batch: the layers on a CPU
batch's real tokens only, the last layer at the read slots only.

Two heads read a decoder at a few positions of each row: a PRM's token classifier at its labelled
tokens (``token_reads``) and a policy's vocabulary projection at the positions that predict its
completion tokens (``causal_reads``). Both swap their model's forward for one that calls
``model_hidden_at_slots`` with each row's read columns, (B, R), made at collate time, and apply their
own head there (or run the stock forward where it returns None). This module holds what the two
share: the settings a model was built with, the per-call decision (``plan``) and the hidden states
themselves.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from rewardctl.data.packing import PAD_SEGMENT, segment_attention_mask
from rewardctl.modeling import unpadded_decoder
from rewardctl.modeling.common import transformers_model
from rewardctl.modeling.final_layer import (
    close_stopped_call,
    keys_values,
    last_layer_inputs,
    output_at_reads,
    read_only_blocker,
)
from rewardctl.modeling.forward_swap import ForwardSwap

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReadSettings:
    """Which of the two savings a model's forward may make (``model.skip_padding``,
    ``model.final_layer_at_reads`` where ``final_layer.read_only_blocker`` allows it when the model is
    built); each forward still checks that its batch and the model allow them (``plan``)."""

    skip_padding: bool
    last_at_reads: bool


_SETTINGS_ATTRIBUTE = "_rewardctl_read_settings"


def apply_settings(hf: nn.Module, settings: ReadSettings, swap: ForwardSwap) -> None:
    """Give the transformers model ``hf`` the forward of ``swap`` with ``settings``; with neither
    saving on, its stock class again."""
    if not (settings.skip_padding or settings.last_at_reads):
        swap.undo(hf)
        hf.__dict__.pop(_SETTINGS_ATTRIBUTE, None)
        return
    setattr(hf, _SETTINGS_ATTRIBUTE, settings)
    swap.apply(hf)


#: Keywords both swapped forwards take as their stock forward does; any other one set (labels,
#: positions, embeddings, a cache) sends the call to the stock forward.
HANDLED = ("attention_mask", "use_cache", "return_dict", "output_attentions", "output_hidden_states")


def needs_stock_forward(
    config: Any,
    input_ids: Tensor | None,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    handled: tuple[str, ...] = HANDLED,
) -> bool:
    """Whether a call must run the stock forward whatever the model's settings: under
    ``train.compile``'s trace (checked first: dynamo then traces none of the rest), with positional
    arguments past the ids, no ids, no 2-D attention mask, any keyword outside ``handled``, or hidden
    states, attentions or a tuple asked for, by keyword or by the model's ``config``."""

    def asked(flag: str) -> bool:  # the keyword, else the config's setting (as the stock forward reads them)
        value = kwargs.get(flag)
        return bool(getattr(config, flag, flag == "return_dict") if value is None else value)

    attention_mask = kwargs.get("attention_mask")
    return bool(
        torch.compiler.is_compiling()
        or args
        or input_ids is None
        or not isinstance(attention_mask, Tensor)
        or attention_mask.dim() != 2
        or any(value is not None for key, value in kwargs.items() if key not in handled)
        or asked("output_hidden_states")
        or asked("output_attentions")
        or not asked("return_dict")
    )


def plan(
    hf: nn.Module, backbone: nn.Module, attention_mask: Tensor
) -> tuple[unpadded_decoder.DecoderLayout | None, bool] | None:
    """For one forward: the real-tokens layout (None: the stock layers over the padding) and whether
    the last layer runs at the reads only; None where neither saving applies (then the stock forward
    runs). Each is judged on its own, as the sequence reward models' forward does: the layout where
    ``unpadded_decoder.unpadded_blocker`` finds nothing now (a CPU batch; no hooks on the layers, no
    checkpointing in training, no sharding), the last layer at the reads where
    ``final_layer.read_only_blocker`` finds nothing (so under gradient checkpointing or FSDP2 too)."""
    settings: ReadSettings | None = getattr(hf, _SETTINGS_ATTRIBUTE, None)
    if settings is None:
        return None
    layout = None
    if settings.skip_padding and unpadded_decoder.unpadded_blocker(backbone) is None:
        layout = real_tokens_layout(backbone, attention_mask.bool())  # CPU only
    last_at_reads = settings.last_at_reads and read_only_blocker(backbone) is None
    if layout is None and not last_at_reads:
        return None
    return layout, last_at_reads


def model_hidden_at_slots(hf: nn.Module, input_ids: Tensor, attention_mask: Tensor, columns: Tensor) -> Tensor | None:
    """The final hidden states (B, R, H) of transformers model ``hf``'s backbone at ``columns`` (B, R),
    as this call's ``plan`` allows; None where neither saving applies (the caller runs the stock
    forward)."""
    backbone = getattr(hf, hf.base_model_prefix)
    found = plan(hf, backbone, attention_mask)
    return None if found is None else hidden_at_slots(backbone, input_ids, attention_mask, columns, *found)


def hidden_at_slots(
    backbone: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    columns: Tensor,
    layout: unpadded_decoder.DecoderLayout | None,
    last_at_reads: bool,
) -> Tensor:
    """The backbone's final hidden states (after its last norm) at ``columns`` (B, R): (B, R, H), the
    layers on the real tokens only given a ``layout``, the last layer at the reads only if
    ``last_at_reads`` (one of the two at least)."""
    batch, width = input_ids.shape
    real = attention_mask.bool()
    flat = torch.arange(batch, device=columns.device)[:, None] * width + columns  # (B, R) padded positions
    if layout is not None:
        position_ids = torch.arange(width, device=input_ids.device).expand(batch, width)  # the stock forward's
        mask = segment_attention_mask(torch.where(real, 0, PAD_SEGMENT))  # causal over each row's real tokens
        if not last_at_reads:
            reads = unpadded_decoder.hidden_at_reads(
                backbone, input_ids, position_ids, mask, layout, flat.flatten(), False
            )
            return reads.view(*columns.shape, -1)
        hidden, cos, sin, mask = unpadded_decoder.layers_before_last(backbone, input_ids, position_ids, mask, layout)
        last = backbone.layers[backbone.config.num_hidden_layers - 1]
        out = unpadded_decoder.last_layer_at_slots(last, hidden, cos, sin, mask, layout, flat)
        return backbone.norm(out)
    # the stock layers over the padded batch, stopped at the last one (last_at_reads is set here)
    hidden, mask, (cos, sin) = last_layer_inputs(
        backbone, input_ids=input_ids, attention_mask=attention_mask, use_cache=False
    )
    stopped_at, last = hidden, backbone.layers[-1]
    normed = last.input_layernorm(hidden)
    key, value = keys_values(last.self_attn, normed, cos, sin)
    cos, sin = cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)
    hidden, normed, cos, sin = (unpadded_decoder.at_slots(t, flat) for t in (hidden, normed, cos, sin))
    if mask is None:  # the model left causality to the kernel: key j is visible from query i iff j <= i
        rows_mask = torch.arange(width, device=columns.device)[None, None, :] <= columns[:, :, None]
    else:
        rows_mask = unpadded_decoder.at_slots(mask[:, 0], flat)  # (B, R, L)
    out = output_at_reads(last, hidden, normed, cos, sin, key, value, rows_mask.unsqueeze(1))
    return backbone.norm(close_stopped_call(last, stopped_at, out))


def real_tokens_layout(backbone: nn.Module, real: Tensor) -> unpadded_decoder.DecoderLayout | None:
    """The real-tokens layout of a CPU batch (None on a GPU, where ``decoder_layout`` reads nothing),
    or None where ``unpadded_decoder.layout_for`` gives none, or a row has no real token (its spare
    slots would have no gathered position)."""
    layout = unpadded_decoder.layout_for(backbone, real)
    if layout is None:
        return None
    # ``real`` is a CPU tensor here (decoder_layout gives GPU batches no layout): nothing to wait for.
    every_row_real = torch.equal(real.any(1), torch.ones(real.shape[0], dtype=torch.bool))
    return layout if every_row_real else None


def enable(
    model: nn.Module,
    model_cfg: Any,
    *,
    blocker: str | None,
    apply: Callable[[nn.Module, ReadSettings], None],
    subject: str,
    reads: str,
    compiled: bool = False,
) -> nn.Module:
    """Give ``model`` the savings ``model_cfg`` asks for (``model.skip_padding``,
    ``model.final_layer_at_reads``) wherever they are exact for it, through ``apply`` (its swap's
    ``compute_*_only``), and log which, or why not: ``blocker`` is why the model cannot read at slots
    at all (its swap's ``*_blocker``), ``subject`` names the model in the log ("token classifier") and
    ``reads`` what it is read at ("the labelled tokens")."""
    if blocker is not None:
        log.info("%s: every layer over every position: %s", subject, blocker)
        return model
    hf = transformers_model(model)
    backbone = getattr(hf, hf.base_model_prefix)
    if model_cfg.skip_padding:
        layers_blocker = unpadded_decoder.layers_blocker(backbone)  # in training and evaluation alike
        in_training = unpadded_decoder.checkpointing_blocker(backbone, training_setup=True)
    else:
        layers_blocker, in_training = "model.skip_padding=false", None
    last_blocker = read_only_blocker(backbone) if model_cfg.final_layer_at_reads else "model.final_layer_at_reads=false"
    # The layout is judged again at each call (``plan``): an evaluation of a checkpointed model uses it.
    # Where both are blocked for good, neither: the stock class.
    settings = ReadSettings(
        skip_padding=model_cfg.skip_padding and (layers_blocker is None or last_blocker is None),
        last_at_reads=last_blocker is None,
    )
    apply(model, settings)  # with neither saving on: the stock class again, if it was swapped before
    if not (settings.skip_padding or settings.last_at_reads):
        log.info("%s: every layer over every position: %s; %s", subject, layers_blocker, last_blocker)
        return model
    narrow = unpadded_decoder.too_narrow(backbone)
    if layers_blocker is not None:
        parts = [f"layers over the padding: {layers_blocker}"]
    elif narrow is not None:
        parts = [f"layers over the padding: {narrow}"]
    elif in_training is not None:
        parts = [f"layers on the real tokens of CPU batches in evaluation, over the padding in training: {in_training}"]
    else:
        parts = ["layers on the real tokens of CPU batches"]
    parts.append(
        f"last layer and head at {reads} only (GPU batches too)"
        if settings.last_at_reads
        else f"last layer at every position: {last_blocker}"
    )
    note = " (train.compile traces the stock forward in training)" if compiled else ""
    log.info("%s: %s%s", subject, "; ".join(parts), note)
    return model
