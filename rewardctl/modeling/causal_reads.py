"""A causal LM policy's vocabulary logits at the positions its caller reads: the layers on a CPU
batch's real tokens only, the last layer and the vocabulary projection at those positions only.

A policy method (BCO) needs log pi(y_t | x, y_<t) at the completion tokens only, so its caller passes
the positions that predict them as ``logits_to_keep`` ((B, K) columns, made at collate time by
``rewardctl.data.packing.completion_logit_index``). The stock forward then projects only those
positions onto the vocabulary, but still runs every layer over every position of the padded batch, the
last layer's queries, output projection and MLP included, for the policy and again for the reference.
The policy's forward (swapped in with ``forward_swap``, so parameters, hooks and saved files stay
stock) instead, given (B, K) positions:

- runs every layer but the last on the batch's real tokens only (``unpadded_decoder``, where
  ``model.skip_padding`` is on, the model is wide enough and a CPU batch holds enough padding), else the
  stock layers over the padded batch;
- runs the last layer at the K positions of each row only (``model.final_layer_at_reads``): keys and
  values over every token, queries, output projection and MLP at the positions;
- projects those positions onto the vocabulary, as the stock forward does: (B, K, V) logits.

The positions are those a PRM reads in ``token_reads``, so both share ``read_slots``. Each logit is
the stock forward's within float rounding (tested in fp32 against the stock forward, gradients
included). Nothing is read back on the host, so the last layer at the positions serves GPU batches
too; a GPU's padding-free batches (one packed row, 1-D positions) keep the stock forward.

Where the stock forward runs instead: ``logits_to_keep`` not a (B, K) tensor of (non-negative) column
indices (an int, as the prompt embeddings of BCO's UDM pass, 1-D positions, a boolean mask); a cache
asked for (``use_cache``, or the config's when not given); ``train.compile``'s trace; labels,
explicit positions or embeddings, or any other keyword; hidden states or attentions requested (by
keyword or by the config); no 2-D attention mask; a class other than transformers' own Llama /
Mistral / Qwen2 causal LM (``positions_blocker``); a call where neither saving applies
(``read_slots.plan``: where ``unpadded_decoder.unpadded_blocker`` keeps the layers on the padded batch,
gradient checkpointing or FSDP2 among them, the last layer still runs at the positions unless
``final_layer.read_only_blocker`` names a reason).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from rewardctl.modeling import read_slots, unpadded_decoder
from rewardctl.modeling.common import transformers_model
from rewardctl.modeling.forward_swap import ForwardSwap, stock_class
from rewardctl.modeling.read_slots import ReadSettings

#: transformers' causal LMs whose forward is the backbone, then ``lm_head`` on the kept positions (no
#: logit scaling or soft-capping), over one of ``unpadded_decoder.BACKBONES``.
POLICIES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def positions_blocker(policy: nn.Module) -> str | None:
    """Why ``policy`` runs the stock forward at every position whatever its settings (None: one of the
    two savings may apply, as ``read_slots.enable`` and each call's ``read_slots.plan`` judge)."""
    hf = transformers_model(policy)
    cls = stock_class(type(hf))
    if cls.__name__ not in POLICIES or not cls.__module__.startswith("transformers.models."):
        return f"{cls.__name__} is not one of transformers' {', '.join(POLICIES)}"
    if not isinstance(getattr(hf, "lm_head", None), nn.Module):
        return f"{cls.__name__} has no lm_head"
    return unpadded_decoder.backbone_blocker(getattr(hf, hf.base_model_prefix))


def compute_positions_only(policy: nn.Module, settings: ReadSettings) -> None:
    """Let ``policy`` (``positions_blocker`` None) run its forward at (B, K) ``logits_to_keep`` with
    ``settings``; with neither saving on, its stock class again."""
    read_slots.apply_settings(transformers_model(policy), settings, _POSITIONS)


def computes_positions_only(policy: nn.Module) -> bool:
    return _POSITIONS.applied(transformers_model(policy))


def _positions_forward(policy: nn.Module, input_ids: Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
    """The causal LM's forward at (B, K) ``logits_to_keep`` (module docstring)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    stock = _POSITIONS.stock_forward(policy)
    columns = kwargs.get("logits_to_keep")
    use_cache = kwargs.get("use_cache")
    if (
        read_slots.needs_stock_forward(policy.config, input_ids, args, kwargs, (*read_slots.HANDLED, "logits_to_keep"))
        or not isinstance(columns, Tensor)
        or columns.dim() != 2
        or columns.dtype not in (torch.int64, torch.int32)  # a boolean mask of positions is another request
        or (use_cache if use_cache is not None else getattr(policy.config, "use_cache", False))  # a cache returned
    ):
        return stock(policy, input_ids, *args, **kwargs)
    hidden = read_slots.model_hidden_at_slots(policy, input_ids, kwargs["attention_mask"], columns)  # (B, K, H)
    if hidden is None:
        return stock(policy, input_ids, *args, **kwargs)
    return CausalLMOutputWithPast(logits=policy.lm_head(hidden))


#: The causal LM's class becomes a subclass with ``_positions_forward`` (``compute_positions_only``).
_POSITIONS = ForwardSwap(_positions_forward, "PositionsOnly", __name__)
