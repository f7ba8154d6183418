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

The per-call decision and the hidden states at the read slots are ``read_slots``' (shared with a BCO
policy's ``causal_reads``).

Where the stock forward runs instead: no reads given; ``train.compile``'s trace; hidden states,
attentions (by keyword or by the config), a loss or a tuple requested; any other keyword the stock
forward would hand its backbone (explicit position ids, embeddings, a cache); no 2-D attention mask;
every model ``reads_blocker`` names; a call where neither saving applies (``read_slots.plan``). The
two are judged apart: where the layers run on the padded batch (a GPU batch, or what
``unpadded_decoder.unpadded_blocker`` finds: gradient checkpointing in training, FSDP2's sharded layers,
hooks on a layer), the last layer and head still run at the reads unless
``final_layer.read_only_blocker`` names a reason (a sliding window, ZeRO-3, hooks on the last layer that
the stop would skip).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from rewardctl.modeling import read_slots, unpadded_decoder
from rewardctl.modeling.common import transformers_model
from rewardctl.modeling.forward_swap import ForwardSwap, forward_owner, stock_class
from rewardctl.modeling.read_slots import ReadSettings

#: The keyword the swapped forward takes the reads under: ``(read_columns, read_valid)``, each (B, R), as
#: ``rewardctl.data.packing.token_read_index`` makes them at collate time (PEFT passes it through).
READS_KEY = "rewardctl_reads"


def reads_blocker(classifier: nn.Module) -> str | None:
    """Why ``classifier`` computes every position whatever its settings (None: one of the two savings
    may apply, as ``read_slots.enable`` and each call's ``read_slots.plan`` judge): the forward must be
    transformers' generic token classifier (backbone, dropout, ``score``) over one of
    ``unpadded_decoder.BACKBONES``."""
    hf = transformers_model(classifier)
    cls = stock_class(type(hf))
    owner = forward_owner(cls)
    if owner is None or owner.__name__ != "GenericForTokenClassification":
        return f"{cls.__name__} has its own forward (not transformers' generic token classifier)"
    if not owner.__module__.startswith("transformers.") or not cls.__module__.startswith("transformers.models."):
        return f"{cls.__name__} is not transformers' own class"
    if not isinstance(getattr(hf, "score", None), nn.Module):
        return f"{cls.__name__} has no score head"
    backbone = getattr(hf, hf.base_model_prefix, None)
    if backbone is None:
        return f"{cls.__name__} has no backbone"
    return unpadded_decoder.backbone_blocker(backbone)


def compute_reads_only(classifier: nn.Module, settings: ReadSettings) -> None:
    """Let ``classifier`` (``reads_blocker`` None) honour ``READS_KEY`` with ``settings``; with
    neither saving on, its stock class again."""
    read_slots.apply_settings(transformers_model(classifier), settings, _READS)


def computes_reads_only(classifier: nn.Module) -> bool:
    """Whether ``classifier``'s forward takes ``READS_KEY``."""
    return _READS.applied(transformers_model(classifier))


def _reads_forward(classifier: nn.Module, input_ids: Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
    """The token classifier's forward, at the reads of ``kwargs[READS_KEY]`` (module docstring)."""
    from transformers.modeling_outputs import TokenClassifierOutput

    reads: tuple[Tensor, Tensor] | None = kwargs.pop(READS_KEY, None)
    stock = _READS.stock_forward(classifier)
    if read_slots.needs_stock_forward(classifier.config, input_ids, args, kwargs) or reads is None:
        return stock(classifier, input_ids, *args, **kwargs)
    columns, valid = reads
    hidden = read_slots.model_hidden_at_slots(classifier, input_ids, kwargs["attention_mask"], columns)  # (B, R, H)
    if hidden is None:
        return stock(classifier, input_ids, *args, **kwargs)
    logits = classifier.score(classifier.dropout(hidden))  # (B, R, labels)
    # Back to (B, L, labels): each valid slot to its position, each spare slot to a row of its own past
    # the end (dropped), so no position is written twice and nothing is read back on the host.
    batch, width = input_ids.shape
    rows = torch.arange(batch, device=columns.device)[:, None]
    spare = batch * width + torch.arange(columns.numel(), device=columns.device).view(columns.shape)
    target = torch.where(valid, rows * width + columns, spare).flatten()
    full = logits.new_zeros(batch * width + columns.numel(), logits.shape[-1])
    full = full.index_copy(0, target, logits.flatten(0, 1))
    # Not a view of ``full``: FSDP2 warns on a root module returning a view (in-place ops on it would
    # skip its backward hook); (B, L, labels) is a few kilobytes.
    return TokenClassifierOutput(logits=full[: batch * width].view(batch, width, -1).clone())


#: The classifier's class becomes a subclass with ``_reads_forward`` (``compute_reads_only``).
_READS = ForwardSwap(_reads_forward, "ReadsOnly", __name__)
