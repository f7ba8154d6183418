"""An encoder's layers on the real tokens of a padded batch only, on a CPU.

A batch of B sequences padded to L tokens holds T = sum(lengths) real tokens. Every per-token op of a
BERT-family layer (the query/key/value and output projections, the feed-forward block, the residual
LayerNorms) computed over all B * L positions spends (B * L - T) / (B * L) of its work on padding:
15% on the benchmark's HH-RLHF pairs (length-grouped, padded to ``data.pad_buckets`` widths). In fp32
on a CPU those matmuls are 73% of a MiniLM step and run at the machine's peak, so only less work
makes the step faster.

``skip_padding(classifier)`` swaps the encoder's class for a subclass whose ``forward``, given a
``TokenLayout`` (``token_layout(attention_mask)``) under the keyword ``LAYOUT_KEY``, gathers the real
tokens once into a (T, H) matrix, runs every layer on it, and attends per sequence: each sequence's
queries against its own keys, with no mask, through the model's own attention function (sdpa, with
rewardctl's fp32 CPU attention under bf16, or eager). That is what the stock padded attention computes
for the real tokens, since a padding key gets zero weight. The last layer returns the (B, L, H) layout
(padding positions hold zeros) or, where the last layer is computed at the first token only
(``first_token_layer``), the (B, 1, H) output at [CLS]. The embeddings, the pooler and the head stay
stock, and so do the parameters and the saved files.

Cost: one gather of the embeddings, one concatenation of the per-sequence attention outputs per layer,
and one attention call per sequence per layer (about 20 us each). The attention itself also skips the
padding (sum of l_i^2 against B * L^2).

Where the stock encoder runs instead: no ``TokenLayout`` given (no padding, left padding, a GPU batch,
``train.compile``'s traced forward: see ``token_layout`` and ``SequenceRewardModel``), gradient
checkpointing on (the layers must run through their own checkpointed ``__call__``), hooks on a layer
or its attention modules (their calls are skipped here: ``hooks``), sharded weights, or hidden states
/ attention weights requested (transformers collects them with hooks on the stock layers). The result
equals the stock encoder's for every real token within fp32 rounding, without dropout (both trainers'
default, ``model.disable_dropout``); with dropout it is the same in distribution only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

from rewardctl.modeling.first_token_layer import (
    FIRST_TOKEN_ATTENTION,
    FIRST_TOKEN_CLASSIFIERS,
    bypassed,
    encoder_attention_function,
    encoder_layers,
    encoder_of,
    is_first_token_only,
    layer_blocker,
    sharded,
)
from rewardctl.modeling.forward_swap import ForwardSwap
from rewardctl.modeling.hooks import GATHERED, hooked_module

#: The keyword under which the reward model hands the encoder its ``TokenLayout`` (transformers passes
#: unknown keywords from the classifier's forward down to the encoder's).
LAYOUT_KEY = "rewardctl_token_layout"
#: The gathered (T, H) matrices get a multiple of this many rows. With exact token counts every batch
#: asks glibc for buffers of new sizes and the heap fragments: a 60-step MiniLM run peaked at 1949 MiB
#: against 1734 MiB with multiples of 128 (and 1740 for the padded stock encoder), for at most 127
#: rows of extra work in about 3000.
TOKEN_ROWS_MULTIPLE = 128


@dataclass(frozen=True)
class TokenLayout:
    """Where the real tokens of a right-padded (B, L) batch are.

    ``index``: (T,) flat positions (row * L + column) of the real tokens, row by row; ``starts``:
    (B,) the position in that (T,) order of each row's first token; ``lengths``: each row's real
    tokens, as Python ints (the per-sequence attention slices by them)."""

    index: Tensor
    starts: Tensor
    lengths: tuple[int, ...]
    rows: int
    width: int
    #: Extra rows after the real tokens (copies of a padding position, never attended to): the gathered
    #: matrix has a multiple of ``TOKEN_ROWS_MULTIPLE`` rows, so its buffers come in few sizes.
    spare: int = 0

    @property
    def tokens(self) -> int:
        """The real tokens, T."""
        return sum(self.lengths)

    @property
    def split_sizes(self) -> list[int]:
        return [*self.lengths, self.spare] if self.spare else list(self.lengths)


def token_layout(attention_mask: Tensor) -> TokenLayout | None:
    """The layout of a padded batch's real tokens, or None where the stock padded encoder should run:
    no padding (nothing to skip) or too little to pay for the rounding up to ``TOKEN_ROWS_MULTIPLE``,
    a row whose first column is padding (left padding: the pooler reads column 0 whatever it holds),
    or a batch off the CPU (reading the lengths would stop a GPU's queue, and one attention call per
    sequence would add launches to a step that is already launch-bound)."""
    if attention_mask.device.type != "cpu" or attention_mask.dim() != 2:
        return None
    mask = attention_mask.bool()
    if bool(mask.all()) or not bool(mask[:, 0].all()):
        return None
    found = real_token_index(mask)
    if found is None:
        return None
    index, tokens = found
    lengths = mask.sum(1)
    return TokenLayout(
        index=index,
        starts=lengths.cumsum(0) - lengths,
        lengths=tuple(lengths.tolist()),
        rows=mask.shape[0],
        width=mask.shape[1],
        spare=index.numel() - tokens,
    )


def real_token_index(real: Tensor, multiple: int | None = None) -> tuple[Tensor, int] | None:
    """(index, T): the flat positions (row * L + column) of the T True entries of ``real`` (B, L), row
    by row, then as many copies of a padding position as round T up to ``multiple`` (default
    ``TOKEN_ROWS_MULTIPLE``); None where that is no fewer positions than B * L (nothing to gain)."""
    flat = real.flatten()
    index = flat.nonzero().squeeze(1)
    tokens = index.numel()
    spare = -tokens % (multiple or TOKEN_ROWS_MULTIPLE)
    if tokens + spare >= flat.numel():
        return None
    if spare:
        index = torch.cat([index, (~flat).nonzero()[0].expand(spare)])
    return index, tokens


def skip_padding_blocker(classifier: nn.Module) -> str | None:
    """Why ``classifier``'s encoder must run on the padded batch, or None when its layers can run on
    the real tokens only (the BERT-family layers of ``first_token_layer``, sdpa or eager attention)."""
    name = type(classifier).__name__
    if name not in FIRST_TOKEN_CLASSIFIERS:
        return f"{name} is not a BERT-family classifier"
    layers = encoder_layers(classifier)
    if isinstance(layers, str):
        return layers
    for layer in layers:
        reason = layer_blocker(layer) or hooked_module(bypassed(layer), GATHERED)
        if reason is not None:
            return reason
    attention = classifier.config._attn_implementation
    if attention not in FIRST_TOKEN_ATTENTION:
        return f"attn_implementation={attention} is not sdpa or eager"
    return None


def _heads(x: Tensor, head_size: int) -> Tensor:
    """(l, H) -> (1, heads, l, head_size), a view."""
    return x.view(1, x.shape[0], -1, head_size).transpose(1, 2)


def _attend(attend: Callable[..., tuple[Tensor, Any]], attention: nn.Module, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """One sequence's queries (l_q, H) over its keys and values (l, H), no mask; (l_q, H) out."""
    head = attention.attention_head_size
    dropout = attention.dropout.p if attention.training else 0.0
    out, _ = attend(
        attention, _heads(q, head), _heads(k, head), _heads(v, head), None, dropout=dropout, scaling=attention.scaling
    )
    return out.reshape(q.shape[0], -1)  # the functions return (1, l_q, heads, head_size)


def _per_sequence(tokens: Tensor, layout: TokenLayout) -> tuple[Tensor, ...]:
    """(T', ...) cut into each sequence's rows, the spare rows left out. ``split``'s backward is one
    concatenation: slicing would give each slice's gradient a zero-filled full-size buffer, summed
    over the sequences (16 passes over every (T, H) matrix for 16 sequences)."""
    return tokens.split(layout.split_sizes)[: len(layout.lengths)]


def _attend_per_sequence(
    attention: nn.Module, query: Tensor, key: Tensor, value: Tensor, layout: TokenLayout
) -> Tensor:
    """Self-attention of each sequence over its own tokens; (T', H) in, (T', H) out (the rows past the
    real tokens, ``TokenLayout.spare``, come out as zeros)."""
    attend = encoder_attention_function(attention)
    outputs = [
        _attend(attend, attention, q, k, v)
        for q, k, v in zip(
            _per_sequence(query, layout), _per_sequence(key, layout), _per_sequence(value, layout), strict=True
        )
    ]
    if layout.spare:
        outputs.append(query.new_zeros(layout.spare, outputs[0].shape[-1]))
    return torch.cat(outputs)


def _layer_on_tokens(layer: nn.Module, tokens: Tensor, layout: TokenLayout) -> Tensor:
    """A BERT-family layer (``BertLayer.forward``) on the real tokens (T', H)."""
    attention = layer.attention.self
    attended = _attend_per_sequence(
        attention, attention.query(tokens), attention.key(tokens), attention.value(tokens), layout
    )
    return layer.feed_forward_chunk(layer.attention.output(attended, tokens))


def _first_token_on_tokens(layer: nn.Module, tokens: Tensor, layout: TokenLayout) -> Tensor:
    """The layer's output at each sequence's first token only (``first_token_layer``), (B, 1, H):
    keys and values over every real token, the query and the rest at the first."""
    attention = layer.attention.self
    attend = encoder_attention_function(attention)
    first = tokens.index_select(0, layout.starts)
    keys, values = _per_sequence(attention.key(tokens), layout), _per_sequence(attention.value(tokens), layout)
    attended = torch.cat(
        [
            _attend(attend, attention, q, k, v)
            for q, k, v in zip(attention.query(first).split(1), keys, values, strict=True)
        ]
    )[:, None]
    return layer.feed_forward_chunk(layer.attention.output(attended, first[:, None]))


def _outputs_requested() -> bool:
    """Whether the caller asked for hidden states or attention weights: transformers collects them
    with hooks on the stock layers' calls, which this forward does not make."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # an older layout of transformers: requests come as keywords, checked below
        return False
    return bool(_active_collector.get())


def any_checkpointed(layers: Iterable[nn.Module]) -> bool:
    """Whether transformers' per-layer gradient-checkpointing flag is set on any of ``layers``: such a
    layer must run its own checkpointed ``__call__``, which a forward calling its parts would bypass."""
    return any(getattr(layer, "gradient_checkpointing", False) for layer in layers)


def _runs_stock(encoder: nn.Module) -> bool:
    """Whether the layers must run their own ``__call__``: checkpointed, or hooks on a layer or its
    attention modules (``hooks``: this forward calls their parts directly), or sharded weights."""
    checkpointed = encoder.training and any_checkpointed(encoder.layer)
    hooks = hooked_module((module for layer in encoder.layer for module in bypassed(layer)), GATHERED)
    return checkpointed or hooks is not None or any(sharded(layer) for layer in encoder.layer)


def _skip_padding_forward(
    encoder: nn.Module, hidden_states: Tensor, attention_mask: Tensor | None = None, *args: Any, **kwargs: Any
) -> Any:
    """The encoder's forward on the real tokens of ``kwargs[LAYOUT_KEY]``; stock without one, and
    wherever the layout does not apply (see the module docstring)."""
    layout: TokenLayout | None = kwargs.pop(LAYOUT_KEY, None)
    stock = _SKIP_PADDING.stock_forward(encoder)
    if (
        layout is None
        or tuple(hidden_states.shape[:2]) != (layout.rows, layout.width)
        or kwargs.get("output_hidden_states")
        or kwargs.get("output_attentions")
        or _outputs_requested()
        or _runs_stock(encoder)
    ):
        return stock(encoder, hidden_states, attention_mask, *args, **kwargs)
    batch, width, size = hidden_states.shape
    tokens = hidden_states.reshape(batch * width, size).index_select(0, layout.index)
    *layers, last = encoder.layer
    for layer in layers:
        tokens = _layer_on_tokens(layer, tokens, layout)
    if is_first_token_only(last):
        output = _first_token_on_tokens(last, tokens, layout)
    else:
        tokens = _layer_on_tokens(last, tokens, layout)[: layout.tokens]  # the spare rows are dropped
        output = tokens.new_zeros(batch * width, size).index_copy(0, layout.index[: layout.tokens], tokens)
        output = output.view(batch, width, size)
    return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=output)


#: The encoder's class becomes a subclass with ``_skip_padding_forward`` (``skip_padding``).
_SKIP_PADDING = ForwardSwap(_skip_padding_forward, "SkipPadding", __name__)


def skips_padding(classifier: nn.Module) -> bool:
    encoder = encoder_of(classifier)
    return encoder is not None and _SKIP_PADDING.applied(encoder)


def skip_padding(classifier: nn.Module) -> None:
    """Let ``classifier``'s encoder run on the real tokens when given a ``TokenLayout``
    (``skip_padding_blocker`` must be None). The encoder's class becomes a subclass of its own
    (``forward_swap``); parameters and saved files stay stock."""
    _SKIP_PADDING.apply(encoder_of(classifier))


def keep_padding(classifier: nn.Module) -> None:
    """Undo ``skip_padding``: the encoder's stock class again."""
    encoder = encoder_of(classifier)
    if encoder is not None:
        _SKIP_PADDING.undo(encoder)
