"""An encoder's last layer computed only at the first token, the one its classifier pools.

BERT-family sequence classifiers (``BertForSequenceClassification``'s pooler, RoBERTa's and
ELECTRA's classification heads) read the final hidden state of the first token ([CLS] / <s>) and
nothing else. Every other token still needs the last layer's *keys and values* (the first token
attends to them), but not its query, attention output, output projection, or feed-forward block. For a
row of L tokens the last layer then costs

    full:         L * (q + k + v + o + ffn)
    first token:  L * (k + v) + 1 * (q + o + ffn)

With MiniLM-L6's shape (6 layers of 384, feed-forward 1536), q, o and the feed-forward block are 10 of a
layer's 12 h^2-sized matmuls, so this removes about 10/72 (14%) of the encoder's matmul work,
forward and backward. The result is the stock layer's at that token: the same query row attends to
the same keys under the same mask row, and every other op of a post-norm BERT layer is per token.

``first_token_only(classifier)`` swaps the last layer's class for a subclass whose ``forward`` returns
the (B, 1, H) output at the first token (``forward_swap``: the subclass keeps the stock class's
``__name__``, which accelerate's FSDP auto-wrap looks layer classes up by). The model's
other layers, its mask construction and its head stay stock transformers, and so do the parameters and
the saved files. It applies to the layer classes in ``FIRST_TOKEN_LAYERS`` under sdpa or eager
attention. The result equals the stock layer's without dropout (both trainers' default,
``train.disable_dropout``); with dropout it is the same in distribution only.

What the in-memory model no longer gives: its ``last_hidden_state`` (and ``hidden_states[-1]``) holds the
first token only, and the last layer records no attention weights. rewardctl reads only the logits.
Under FSDP the layer runs on unsharded weights, so the first-token forward still applies. A
ZeRO-3-partitioned layer runs the stock forward, and so does one whose attention modules carry hooks
(``hooks``: their calls are skipped here).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from rewardctl.modeling.forward_swap import ForwardSwap, fsdp_unwrapped_class
from rewardctl.modeling.hooks import hooked_module

#: Classifiers whose head reads only the first token's final hidden state (transformers 5).
FIRST_TOKEN_CLASSIFIERS = (
    "BertForSequenceClassification",
    "RobertaForSequenceClassification",
    "XLMRobertaForSequenceClassification",
    "ElectraForSequenceClassification",
)
#: Layer classes whose forward is exactly: self-attention over query/key/value, output dense + residual
#: LayerNorm, feed-forward (``feed_forward_chunk``), with no cross-attention.
FIRST_TOKEN_LAYERS = ("BertLayer", "RobertaLayer", "XLMRobertaLayer", "ElectraLayer")
#: Attention implementations that take the (B, 1, L, L) mask (or None) this module slices to row 0.
FIRST_TOKEN_ATTENTION = ("sdpa", "eager")


def first_token_blocker(classifier: nn.Module) -> str | None:
    """Why the last layer of ``classifier`` (a transformers sequence classifier) must run at every
    token, or None when its head reads only the first token and the layer can be recomputed there."""
    if type(classifier).__name__ not in FIRST_TOKEN_CLASSIFIERS:
        return f"{type(classifier).__name__} is not a classifier known to read only its first token"
    layers = encoder_layers(classifier)
    if isinstance(layers, str):
        return layers
    reason = layer_blocker(layers[-1]) or _attention_hooked(layers[-1])
    if reason is not None:
        return reason
    attention = classifier.config._attn_implementation
    if attention not in FIRST_TOKEN_ATTENTION:
        return f"attn_implementation={attention} takes no dense mask"
    return None


def encoder_of(classifier: nn.Module) -> nn.Module | None:
    """The classifier's encoder (``classifier.<base_model_prefix>.encoder``), or None."""
    return getattr(getattr(classifier, getattr(classifier, "base_model_prefix", ""), None), "encoder", None)


def encoder_layers(classifier: nn.Module) -> nn.ModuleList | str:
    """The encoder's layer list, or why there is none to work on."""
    layers = getattr(encoder_of(classifier), "layer", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        return f"{type(classifier).__name__} has no encoder layer list"
    return layers


def layer_blocker(layer: nn.Module) -> str | None:
    """Why ``layer`` is not a BERT-family encoder layer this package can run in parts, or None."""
    if fsdp_unwrapped_class(layer).__name__ not in FIRST_TOKEN_LAYERS:
        return f"{type(layer).__name__} is not a layer this module can recompute ({', '.join(FIRST_TOKEN_LAYERS)})"
    if getattr(layer, "add_cross_attention", False) or getattr(layer, "is_decoder", False):
        return f"{type(layer).__name__} is a decoder layer (causal or cross-attention)"
    return None


def last_encoder_layer(classifier: nn.Module) -> nn.Module:
    return encoder_of(classifier).layer[-1]


#: How the log names the first-token forward where hooks stop it (``hooks.hooked_module``).
FIRST_TOKEN = "the last layer at the first token"


def bypassed(layer: nn.Module) -> tuple[nn.Module, ...]:
    """The modules of a BERT-family layer whose ``__call__`` a forward calling the layer's parts
    directly skips (their hooks would not run): the layer and its attention modules."""
    return layer, layer.attention, layer.attention.self


def _attention_hooked(layer: nn.Module) -> str | None:
    """Why the first-token forward must not run on ``layer``: hooks on its attention modules, whose calls
    it skips (the layer's own call runs, hooks included), or None."""
    return hooked_module(bypassed(layer)[1:], FIRST_TOKEN)


def sharded(layer: nn.Module) -> bool:
    """Whether ``layer``'s weights are partitioned (ZeRO-3) or sharded (FSDP2 DTensors) right now."""
    weight = layer.attention.self.query.weight
    return hasattr(weight, "ds_id") or type(weight).__name__ == "DTensor"


def encoder_attention_function(attention: nn.Module) -> Callable[..., tuple[Tensor, Any]]:
    """A BERT-family self-attention's own attention function from transformers' registry (sdpa:
    rewardctl's fp32 CPU attention under bf16 autocast, ``cpu_attention``; eager where configured so)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.bert.modeling_bert import eager_attention_forward

    return ALL_ATTENTION_FUNCTIONS.get_interface(attention.config._attn_implementation, eager_attention_forward)


def _first_token_forward(
    layer: nn.Module, hidden: Tensor, attention_mask: Tensor | None = None, *args: Any, **kwargs: Any
) -> Tensor:
    """The output of BERT-family ``layer`` at token 0 of ``hidden`` (B, L, H), shape (B, 1, H): keys and
    values over every token, the rest at the first only. ``attention_mask`` is what the encoder hands
    its layers: (B, 1, L, L) boolean or additive, or None. A sharded layer, or one whose attention
    modules carry hooks (called directly here, so they would be skipped), runs its stock forward."""
    if sharded(layer) or _attention_hooked(layer) is not None:
        return _FIRST_TOKEN.stock_forward(layer)(layer, hidden, attention_mask, *args, **kwargs)
    attn = layer.attention.self
    batch, length, _ = hidden.shape
    head = attn.attention_head_size
    first = hidden[:, :1]
    query = attn.query(first).view(batch, 1, -1, head).transpose(1, 2)
    key = attn.key(hidden).view(batch, length, -1, head).transpose(1, 2)
    value = attn.value(hidden).view(batch, length, -1, head).transpose(1, 2)
    mask = attention_mask[:, :, :1, :] if attention_mask is not None and attention_mask.dim() == 4 else attention_mask
    attend = encoder_attention_function(attn)
    dropout = attn.dropout.p if attn.training else 0.0
    output, _ = attend(attn, query, key, value, mask, dropout=dropout, scaling=attn.scaling)
    attention_output = layer.attention.output(output.reshape(batch, 1, -1), first)
    return layer.feed_forward_chunk(attention_output)


#: The last layer's class becomes a subclass with ``_first_token_forward`` (``first_token_only``).
_FIRST_TOKEN = ForwardSwap(_first_token_forward, "FirstToken", __name__)


def is_first_token_only(layer: nn.Module) -> bool:
    return _FIRST_TOKEN.applied(layer)


def first_token_only(classifier: nn.Module) -> None:
    """Make ``classifier``'s last encoder layer compute only its first token (``first_token_blocker``
    must be None). The layer's class becomes a subclass of its own that overrides ``forward``
    (``forward_swap``); parameters and saved files stay stock."""
    _FIRST_TOKEN.apply(last_encoder_layer(classifier))


def every_token(classifier: nn.Module) -> None:
    """Undo ``first_token_only``: the last layer's stock class (and forward) again. A layer whose class
    was wrapped again since (FSDP2's ``fully_shard``) keeps it: the first-token forward is exact there."""
    _FIRST_TOKEN.undo(last_encoder_layer(classifier))
