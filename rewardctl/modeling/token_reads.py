"""A decoder token classifier's logits at the tokens its caller reads: the layers on a CPU batch's
real tokens only, the last layer and the head at the read tokens only.

A process reward model is trained and scored at its labelled tokens only (each step's separator;
with ``method.train_on_last_step_only``, one per row), yet the stock token classifier runs every layer
over every position of the padded batch, the last layer's queries, output projection and MLP included,
and projects every position onto its labels. Given the reads (``READS_KEY``: each row's read columns,
made at collate time by ``rewardctl.data.packing.token_read_index``), the classifier's forward (swapped
in with ``forward_swap``, so parameters, hooks and saved files stay stock) instead:

- runs every layer but the last on the batch's real tokens only (``unpadded_decoder``, where
  ``model.skip_padding`` is on and a CPU batch holds enough padding), else the stock layers over the
  padded batch (``final_layer.last_layer_inputs``);
- runs the last layer at the read tokens only (``model.final_layer_at_reads``): keys and values over
  every token, the rest over the R read slots of each row, which attend over their row's keys at once
  ((B, heads, R, head_dim) queries: no copy of a row's keys per read);
- applies the head (dropout, ``score``) at the read slots only.

The logits come back in the stock (B, L, labels) layout with zeros where nothing was read, as the
padding-free path (``common.token_logits``) leaves zeros at padding: every PRM loss and metric reads
the labelled positions only. Each read logit is the stock forward's within float rounding (tested in
fp32 against the stock forward, gradients included): position ids are the stock ``arange`` and every
real token attends over the real tokens before it, as under the stock causal-and-padding mask. Nothing
in it reads a tensor back on the host (the slots' width comes from the collator), so the last layer
at the reads serves GPU batches too; the real-tokens layout is CPU-only (``unpadded_decoder``).

Where the stock forward runs instead: no reads given; ``train.compile``'s trace; hidden states,
attentions, a loss or a tuple requested; any other keyword the stock forward would hand its backbone
(explicit position ids, embeddings, a cache); no 2-D attention mask; every model ``reads_blocker``
names, and what ``unpadded_decoder.unpadded_blocker`` finds at call time (hooks, gradient checkpointing
in training, sharded weights); a batch where neither saving applies (a GPU batch whose last layer cannot
run at its reads, ``final_layer.read_only_blocker``: a sliding window, ZeRO-3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from rewardctl.data.packing import PAD_SEGMENT, segment_attention_mask
from rewardctl.modeling import unpadded_decoder
from rewardctl.modeling.common import transformers_model
from rewardctl.modeling.final_layer import (
    keys_values,
    last_layer_inputs,
    output_at_reads,
    read_only_blocker,
    rows_of,
)
from rewardctl.modeling.forward_swap import ForwardSwap

#: The keyword the swapped forward takes the reads under: ``(read_columns, read_valid)``, each (B, R), as
#: ``rewardctl.data.packing.token_read_index`` makes them at collate time (PEFT passes it through).
READS_KEY = "rewardctl_reads"


@dataclass(frozen=True)
class ReadSettings:
    """Which of the two savings a classifier's forward may make (``model.skip_padding``,
    ``model.final_layer_at_reads`` where ``final_layer.read_only_blocker`` allows it when the model is
    built); each forward still checks that its batch and the model allow them."""

    skip_padding: bool
    last_at_reads: bool


_SETTINGS_ATTRIBUTE = "_rewardctl_read_settings"


def _stock_forward_owner(cls: type) -> type | None:
    return next((c for c in cls.__mro__ if "forward" in vars(c)), None)


def reads_blocker(classifier: nn.Module) -> str | None:
    """Why ``classifier`` computes every position (None: it can compute the read ones only): the
    forward must be transformers' generic token classifier (backbone, dropout, ``score``) over one of
    ``unpadded_decoder.BACKBONES``, with sdpa or eager attention, unsharded, unhooked and without
    gradient checkpointing."""
    hf = transformers_model(classifier)
    cls = _READS.stock_class(type(hf))
    owner = _stock_forward_owner(cls)
    if owner is None or owner.__name__ != "GenericForTokenClassification":
        return f"{cls.__name__} has its own forward (not transformers' generic token classifier)"
    if not owner.__module__.startswith("transformers.") or not cls.__module__.startswith("transformers.models."):
        return f"{cls.__name__} is not transformers' own class"
    if not isinstance(getattr(hf, "score", None), nn.Module):
        return f"{cls.__name__} has no score head"
    backbone = getattr(hf, hf.base_model_prefix, None)
    if backbone is None:
        return f"{cls.__name__} has no backbone"
    return unpadded_decoder.unpadded_blocker(backbone, training_setup=True)


def compute_reads_only(classifier: nn.Module, settings: ReadSettings) -> None:
    """Let ``classifier`` (``reads_blocker`` None) honour ``READS_KEY`` with ``settings``; with
    neither saving on, its stock class again."""
    hf = transformers_model(classifier)
    if not (settings.skip_padding or settings.last_at_reads):
        _READS.undo(hf)
        hf.__dict__.pop(_SETTINGS_ATTRIBUTE, None)
        return
    setattr(hf, _SETTINGS_ATTRIBUTE, settings)
    _READS.apply(hf)


def computes_reads_only(classifier: nn.Module) -> bool:
    """Whether ``classifier``'s forward takes ``READS_KEY``."""
    return _READS.applied(transformers_model(classifier))


def _at_slots(tensor: Tensor, flat: Tensor) -> Tensor:
    """``tensor`` (B, L, ...) at the (B, R) flat positions ``flat`` (row * L + column): (B, R, ...)."""
    rows = tensor.reshape(tensor.shape[0] * tensor.shape[1], *tensor.shape[2:])
    return rows_of(rows, flat.flatten()).view(*flat.shape, *tensor.shape[2:])


def _hidden_at_slots(
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
        normed = last.input_layernorm(hidden)
        key, value = keys_values(last.self_attn, normed, cos, sin)
        key, value = layout.pad(key), layout.pad(value)
        at = layout.gathered(flat)  # (B, R) positions in the gathered row
        hidden, normed, cos, sin = (_at_slots(t, at) for t in (hidden, normed, cos, sin))
    else:  # the stock layers over the padded batch, stopped at the last one (last_at_reads is set here)
        hidden, mask, (cos, sin) = last_layer_inputs(
            backbone, input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        )
        last = backbone.layers[-1]
        normed = last.input_layernorm(hidden)
        key, value = keys_values(last.self_attn, normed, cos, sin)
        cos, sin = cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)
        hidden, normed, cos, sin = (_at_slots(t, flat) for t in (hidden, normed, cos, sin))
    if mask is None:  # the model left causality to the kernel: key j is visible from query i iff j <= i
        rows_mask = torch.arange(width, device=columns.device)[None, None, :] <= columns[:, :, None]
    else:
        rows_mask = _at_slots(mask[:, 0], flat)  # (B, R, L)
    out = output_at_reads(last, hidden, normed, cos, sin, key, value, rows_mask.unsqueeze(1))
    return backbone.norm(out)


def _layout(backbone: nn.Module, real: Tensor) -> unpadded_decoder.DecoderLayout | None:
    """The real-tokens layout of a CPU batch (None on a GPU, where ``decoder_layout`` reads nothing),
    or None where ``unpadded_decoder.layout_for`` gives none, or a row has no real token (its spare
    slots would have no gathered position)."""
    layout = unpadded_decoder.layout_for(backbone, real)
    if layout is None:
        return None
    # ``real`` is a CPU tensor here (decoder_layout gives GPU batches no layout): nothing to wait for.
    every_row_real = torch.equal(real.any(1), torch.ones(real.shape[0], dtype=torch.bool))
    return layout if every_row_real else None


#: Keywords the reads path takes as the stock forward does (the rest of ``_reads_forward``'s checks).
_HANDLED = ("attention_mask", "use_cache", "return_dict", "output_attentions", "output_hidden_states")


def _reads_forward(classifier: nn.Module, input_ids: Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
    """The token classifier's forward, at the reads of ``kwargs[READS_KEY]`` (module docstring)."""
    from transformers.modeling_outputs import TokenClassifierOutput

    reads: tuple[Tensor, Tensor] | None = kwargs.pop(READS_KEY, None)
    stock = _READS.stock_forward(classifier)
    attention_mask = kwargs.get("attention_mask")
    settings: ReadSettings | None = getattr(classifier, _SETTINGS_ATTRIBUTE, None)
    backbone = getattr(classifier, classifier.base_model_prefix)
    if (
        torch.compiler.is_compiling()  # first: dynamo then traces none of the checks below
        or reads is None
        or settings is None
        or args
        or input_ids is None
        or attention_mask is None
        or attention_mask.dim() != 2
        or any(value is not None for key, value in kwargs.items() if key not in _HANDLED)  # labels, positions...
        or kwargs.get("output_hidden_states")
        or kwargs.get("output_attentions")
        or kwargs.get("return_dict") is False
        or unpadded_decoder.unpadded_blocker(backbone) is not None
    ):
        return stock(classifier, input_ids, *args, **kwargs)
    layout = _layout(backbone, attention_mask.bool()) if settings.skip_padding else None  # CPU batches only
    last_at_reads = settings.last_at_reads and read_only_blocker(backbone) is None
    if layout is None and not last_at_reads:
        return stock(classifier, input_ids, *args, **kwargs)
    columns, valid = reads
    hidden = _hidden_at_slots(backbone, input_ids, attention_mask, columns, layout, last_at_reads)  # (B, R, H)
    logits = classifier.score(classifier.dropout(hidden))  # (B, R, labels)
    # Back to (B, L, labels): each valid slot to its position, each spare slot to a row of its own past
    # the end (dropped), so no position is written twice and nothing is read back on the host.
    batch, width = input_ids.shape
    rows = torch.arange(batch, device=columns.device)[:, None]
    spare = batch * width + torch.arange(columns.numel(), device=columns.device).view(columns.shape)
    target = torch.where(valid, rows * width + columns, spare).flatten()
    full = logits.new_zeros(batch * width + columns.numel(), logits.shape[-1])
    full = full.index_copy(0, target, logits.flatten(0, 1))
    return TokenClassifierOutput(logits=full[: batch * width].view(batch, width, -1))


#: The classifier's class becomes a subclass with ``_reads_forward`` (``compute_reads_only``).
_READS = ForwardSwap(_reads_forward, "ReadsOnly", __name__)
