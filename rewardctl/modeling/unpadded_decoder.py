"""A decoder's layers on the real tokens of a padded CPU batch only; attention in the padded layout.

A batch of B rows padded to L columns holds T real tokens. Every per-token op of a Llama-family layer
(the q/k/v and output projections, the MLP, the RMS norms, the rotary rotation) computed over all
B * L positions spends (B * L - T) / (B * L) of its work on padding: 8% on the benchmark's
shared-prefix pairs (length-grouped, padded to ``data.pad_buckets`` widths). In fp32 on a CPU the
matmuls are 73% of that decoder's step and already run at the machine's peak, so only less work makes
the step faster.

``hidden_at_reads(backbone, ...)`` embeds the T real tokens (gathered once, as a (1, T') row with the
batch's own position ids), and runs every layer on that row: norms, projections and MLP over T'
tokens. Attention alone goes back to the padded layout, cut to the batch's span of real columns (S
of the L, ``ATTENTION_WIDTH_MULTIPLE``): the rotated queries, keys and values are scattered into
(B, heads, S, head_dim) zeros and attend under the batch's own mask cut to (B, 1, S, S) (the
shared-prefix mask of ``rewardctl.data.packing``, or causal over each row's real tokens for a stacked
batch) through the model's own attention function (sdpa, with rewardctl's fp32 CPU attention under
bf16, or eager); the output is gathered back to the T' tokens. Why not attend per row on the gathered
tokens as ``unpadded_encoder`` does: one batched masked call over (B, L) measured 1.3-2x faster than
B calls over each row's real tokens (fp32, 8 rows of 64-288 columns, forward and backward), and a
causal kernel skipping the masked blocks was no faster than the masked call. The last layer runs at
the reward tokens only where ``final_layer`` allows it, else on every token: each row's reads
(R of them: 2 for a shared-prefix pair, K for a list) attend together over the row's keys in the
attention layout (``last_layer_at_slots``), with no copy of a row's keys per read.

Every real token's keys, values and outputs are those of the stock padded forward (padding keys get
zero weight there, and here they are zeros under the same mask), so rewards and gradients equal the
stock forward's within fp32 rounding (tested). T' rounds T up to a multiple of ``TOKEN_ROWS_MULTIPLE``
with copies of a padding position, for the allocator's sake: those rows are never scattered into the
attention, never read, and get zero gradient.

Measured on the benchmark decoder's own 60 training batches, each trained forward + backward both
ways: 1.045x faster for shared-prefix rows (92.4% real), 1.20x for stacked rows (80.4% real). The
span cut, the grouped reads and the fused RMS norms (``rms_norm``) took a further 1.4-2.8% off those
batches in bf16 (four paired replays, seventeenth session).

Where the stock padded forward runs instead (``unpadded_blocker``, ``decoder_layout``): anything but
transformers' own ``BACKBONES`` and ``final_layer.READ_ONLY_LAYERS`` (this module reproduces their
forward), attention other than sdpa or eager, sharded weights, hooks on the backbone, its layers or
their attention (called directly here, so hooks would be skipped), gradient checkpointing, a sliding
window narrower than the batch, a GPU batch (padding-free batches cover GPUs), too little padding to
pay for the rounding, and ``train.compile``'s traced forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from rewardctl.kernels import ops as fused_kernels
from rewardctl.modeling import cpu_attention
from rewardctl.modeling.final_layer import (
    READ_ONLY_ATTENTION,
    READ_ONLY_LAYERS,
    additive_mask,
    attention_function,
    keys_values,
    output_at_reads,
    rotated,
    rows_of,
)
from rewardctl.modeling.hooks import GATHERED, hooked, hooked_module
from rewardctl.modeling.unpadded_encoder import any_checkpointed, real_token_index

#: The gathered row gets a multiple of this many tokens (copies of a padding position after the real
#: ones), so its buffers come in few sizes. A decoder batch holds less padding than an encoder's (8%
#: against 15% on the benchmark's pairs), so the encoder's 128 would leave most batches padded: of the
#: benchmark's 60 decoder batches, 57 / 52 / 23 skip their padding at multiples of 16 / 32 / 128, and
#: 40-step runs peaked at 1716-1735 / 1723-1733 / 1741-1807 MiB (padded: 1725-1758).
TOKEN_ROWS_MULTIPLE = 32


#: Attention runs over the batch's span of real columns (from the first column any row has a real token
#: in to the last), rounded up to a multiple of this, rather than the bucketed batch width: the
#: ``data.pad_buckets`` widths add up to 1/8 of columns to each row, and attention's work grows with
#: the width squared (the benchmark decoder's 60 batches: 9.7% more attention work at the bucketed
#: widths than at their spans).
ATTENTION_WIDTH_MULTIPLE = 8


class _RowsInto(torch.autograd.Function):
    """``zeros(rows, ...).index_copy(0, index, source)`` whose backward keeps the index only. autograd's
    own ``index_copy`` keeps ``source`` alive until the backward (for its shape): a (T, heads,
    head_dim) copy of every layer's queries, keys and values, 23 MiB of the 301 MiB a benchmark-shaped
    batch of 8 x 256 tokens keeps for its backward, which made the gathered forward hold more than the
    padded one on batches with little padding. The gradient is the same ``index_select``."""

    @staticmethod
    def forward(ctx: Any, source: Tensor, index: Tensor, rows: int) -> Tensor:
        ctx.save_for_backward(index)
        return source.new_zeros(rows, *source.shape[1:]).index_copy_(0, index, source)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (index,) = ctx.saved_tensors
        return grad.index_select(0, index), None, None


@dataclass(frozen=True)
class DecoderLayout:
    """Where the real tokens of a (B, L) batch are: ``index`` (T',) their flat positions (row * L +
    column) row by row, then ``T' - tokens`` copies of a padding position (see the module docstring).
    Attention sees columns ``[first, first + span)`` of the batch only (``ATTENTION_WIDTH_MULTIPLE``);
    ``attention_index`` (T,) holds the real tokens' flat positions in that (B, span) layout."""

    index: Tensor
    tokens: int
    rows: int
    width: int
    first: int
    span: int
    attention_index: Tensor

    def gathered(self, flat: Tensor) -> Tensor:
        """The gathered positions of real tokens given by their flat padded positions."""
        return torch.searchsorted(self.index[: self.tokens], flat)

    def attention_positions(self, flat: Tensor) -> Tensor:
        """Flat padded positions (row * L + column) -> their flat positions in the (B, span) attention
        layout (row * span + column - first). A column outside the span (a spare slot at a padding
        column, which nothing reads) is moved to the span's edge: its mask row there is finite, as
        every row of the mask sees at least its own position."""
        return _span_positions(flat, self.width, self.first, self.span)

    def crop(self, mask: Tensor) -> Tensor:
        """The batch's (B, 1, L, L) mask cut to the attention layout's (B, 1, span, span)."""
        if self.first == 0 and self.span == self.width:
            return mask
        end = self.first + self.span
        return mask[:, :, self.first : end, self.first : end].contiguous()

    def pad(self, heads: Tensor) -> Tensor:
        """(1, heads, T', head_dim) gathered -> (B, heads, span, head_dim): every real token at its own
        place in the attention layout, zeros at the padding; the spare rows are left out."""
        _, count, _, size = heads.shape
        real = heads[0, :, : self.tokens].transpose(0, 1)  # (T, heads, head_dim)
        padded = _RowsInto.apply(real, self.attention_index, self.rows * self.span)
        return padded.view(self.rows, self.span, count, size).transpose(1, 2)

    def unpad(self, padded: Tensor) -> Tensor:
        """(B, span, H) attention layout -> (1, T', H): the real tokens' rows, then zeros for the spare
        rows."""
        flat = padded.reshape(self.rows * self.span, -1)
        real = flat.index_select(0, self.attention_index)
        spare = self.index.numel() - self.tokens
        if spare:
            real = torch.cat([real, real.new_zeros(spare, real.shape[1])])
        return real[None]


def _span_positions(flat: Tensor, width: int, first: int, span: int) -> Tensor:
    """Flat positions in a (B, width) batch -> flat positions in its (B, span) attention layout of
    columns ``[first, first + span)``; columns outside are clamped onto the span's edge."""
    column = (flat % width).clamp(first, first + span - 1) - first
    return torch.div(flat, width, rounding_mode="floor") * span + column


def decoder_layout(real: Tensor) -> DecoderLayout | None:
    """The layout of a (B, L) batch's real tokens (``real`` True there), or None where the padded
    forward should run: a GPU batch (reading the token count would stall its queue; padding-free
    batches skip a GPU's padding) or too little padding to pay for the rounding."""
    if real.device.type != "cpu" or real.dim() != 2:
        return None
    found = real_token_index(real, TOKEN_ROWS_MULTIPLE)
    if found is None:
        return None
    index, tokens = found
    if not tokens:  # nothing real to attend
        return None
    rows, width = real.shape
    columns = real.any(0).nonzero().squeeze(1)
    first = int(columns[0])
    span = min(-(-(int(columns[-1]) + 1 - first) // ATTENTION_WIDTH_MULTIPLE) * ATTENTION_WIDTH_MULTIPLE, width - first)
    attention_index = _span_positions(index[:tokens], width, first, span)
    return DecoderLayout(
        index=index, tokens=tokens, rows=rows, width=width, first=first, span=span, attention_index=attention_index
    )


def _sharded(layer: nn.Module) -> bool:
    weight = layer.self_attn.q_proj.weight
    return hasattr(weight, "ds_id") or type(weight).__name__ == "DTensor"


#: The backbones whose forward ``hidden_at_reads`` reproduces: embeddings, rotary tables, the layers, the
#: final norm, nothing else (transformers 5's own classes, not remote code reusing their names).
BACKBONES = ("LlamaModel", "MistralModel", "Qwen2Model")


def _stock_class(module: nn.Module, names: tuple[str, ...]) -> bool:
    cls = type(module)
    return cls.__name__ in names and cls.__module__.startswith("transformers.models.")


def backbone_blocker(backbone: nn.Module) -> str | None:
    """Why neither faster forward can stand in for ``backbone``'s (None: it is transformers' own Llama,
    Mistral or Qwen2 backbone, whose forward ends with its layers and its final norm)."""
    if not _stock_class(backbone, BACKBONES):
        return f"{type(backbone).__name__} is not one of transformers' {', '.join(BACKBONES)}"
    return None


def unpadded_blocker(backbone: nn.Module, *, training_setup: bool = False) -> str | None:
    """Why ``backbone``'s layers must run on the padded batch, or None when they can run on the real
    tokens only: transformers' own Llama / Mistral / Qwen2 backbone and layers, sdpa or eager
    attention, unsharded, unhooked (``layers_blocker``), and no gradient checkpointing while training
    (``checkpointing_blocker``; ``training_setup``: judge the setting itself, whatever mode the model
    is in now, as the run's log does)."""
    return layers_blocker(backbone) or checkpointing_blocker(backbone, training_setup=training_setup)


def layers_blocker(backbone: nn.Module) -> str | None:
    """Why ``backbone``'s layers must run on the padded batch in training and evaluation alike (None:
    only gradient checkpointing, in training, may still keep them there)."""
    reason = backbone_blocker(backbone)
    if reason is not None:
        return reason
    for layer in backbone.layers:
        if not _stock_class(layer, READ_ONLY_LAYERS):
            return f"{type(layer).__name__} is not one of transformers' {', '.join(READ_ONLY_LAYERS)}"
        if _sharded(layer):
            return "sharded weights (FSDP or DeepSpeed ZeRO-3)"
        reason = hooked_module((layer, layer.self_attn), GATHERED)
        if reason is not None:
            return reason
    reason = hooked_module((backbone,), GATHERED)
    if reason is not None:
        return reason
    attention = backbone.config._attn_implementation
    if attention not in READ_ONLY_ATTENTION:
        return f"attn_implementation={attention} is not sdpa or eager"
    return None


def checkpointing_blocker(backbone: nn.Module, *, training_setup: bool = False) -> str | None:
    """Gradient checkpointing while training (or set at all, ``training_setup``): each layer then runs
    its own checkpointed call, which the gathered forward would bypass."""
    if any_checkpointed(backbone.layers) and (backbone.training or training_setup):
        return "gradient checkpointing (the layers run their own checkpointed call)"
    return None


#: Below this width the gathered forward costs more than the padding it skips: its extra operations
#: (the gather, and per layer the scatter into the padded attention layout and back) cost the same at
#: any width, while the work on padding shrinks with the width squared. Measured paired per batch over
#: a run's own batches (``benchmarks/skip_padding_replay.py``), forward + backward, fp32 unless said:
#: the bundled 2-layer model at 64 wide 0.935-0.960x (shared prompts, 94% real) and 0.973x (stacked,
#: 78% real); widened to 128: 0.978x; to 256: 1.019x; the benchmark decoder (6 layers of 384) 1.045x
#: in fp32, 1.033x in bf16.
MIN_HIDDEN = 256


def too_narrow(backbone: nn.Module) -> str | None:
    """Why gathering the real tokens would not pay for ``backbone`` (``MIN_HIDDEN``), or None."""
    width = getattr(backbone.config, "hidden_size", None)
    if isinstance(width, int) and width < MIN_HIDDEN:
        return f"hidden size {width} < {MIN_HIDDEN} (at this width the gather costs more than the padding)"
    return None


def layout_for(backbone: nn.Module, real: Tensor) -> DecoderLayout | None:
    """``decoder_layout`` of a batch for ``backbone``, or None where gathering would not pay for it
    (``too_narrow``) or not be exact (a sliding window narrower than the batch). The caller judges
    the model's own blockers (``unpadded_blocker``)."""
    if too_narrow(backbone) is not None:
        return None
    layout = decoder_layout(real)
    window = narrowest_window(backbone)
    return None if layout is None or (window is not None and window < layout.width) else layout


def narrowest_window(backbone: nn.Module) -> int | None:
    """The smallest sliding window of any layer (Qwen2's sliding layers, Mistral's config), or None."""
    windows = [getattr(layer.self_attn, "sliding_window", None) for layer in backbone.layers]
    windows.append(
        getattr(backbone.config, "sliding_window", None) if type(backbone).__name__.startswith("Mistral") else None
    )
    found = [w for w in windows if w]
    return min(found) if found else None


#: transformers' RMS norms of the ``BACKBONES`` layers: fp32 in, fp32 weight, ``torch.nn.functional.rms_norm``
#: computes them bit for bit (forward and both gradients, checked at 64-896 wide, under bf16 autocast
#: too) in one call instead of six operators: 0.5 ms less per norm of the benchmark decoder's gathered
#: rows (1600 x 384, forward + backward), 11 norms a step.
RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")


def rms_norm(norm: nn.Module, hidden: Tensor) -> Tensor:
    """``norm(hidden)`` for a gathered CPU row: one fused call where that is the stock norm's maths (a
    stock RMS norm, fp32 input and weight, no hooks), rewardctl's C++ kernel when the run uses them
    (``rewardctl.kernels``: one pass forward and one backward, within fp32 rounding of the stock norm),
    else ``torch.nn.functional.rms_norm``; anything else runs the module itself."""
    weight = getattr(norm, "weight", None)
    if (
        hidden.dtype == torch.float32
        and isinstance(weight, Tensor)
        and weight.dtype == torch.float32
        and _stock_class(norm, RMS_NORMS)
        and not hooked(norm)
    ):
        if fused_kernels.active():
            return fused_kernels.rms_norm(hidden, weight, norm.variance_epsilon)
        return torch.nn.functional.rms_norm(hidden, weight.shape, weight, norm.variance_epsilon)
    return norm(hidden)


#: transformers' gated MLPs of the ``BACKBONES`` layers: ``down(act(gate(x)) * up(x))``.
GATED_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP")
#: What ``hidden_act="silu"`` (transformers' ``SiLUActivation``) and ``"swish"`` (``nn.SiLU``) build:
#: both ``torch.nn.functional.silu``.
SILU_ACTIVATIONS = ("SiLUActivation", "SiLU")


def _silu(module: Any) -> bool:
    cls = type(module)
    return cls.__name__ in SILU_ACTIVATIONS and cls.__module__.split(".")[0] in ("transformers", "torch")


def mlp(module: nn.Module, hidden: Tensor) -> Tensor:
    """``module(hidden)`` for a gathered CPU row, with ``silu(gate) * up`` in rewardctl's fused kernel
    (one pass forward, one backward; bit for bit the stock result) when the run uses the kernels and
    the MLP is a stock SiLU-gated one without hooks of its own; its projections run as modules, so
    their hooks (LoRA's too) still apply."""
    if not (
        fused_kernels.active()
        and _stock_class(module, GATED_MLPS)
        and _silu(getattr(module, "act_fn", None))
        and not hooked(module)
        and not hooked(module.act_fn)
    ):
        return module(hidden)
    gate, up = module.gate_proj(hidden), module.up_proj(hidden)
    if gate.dtype not in fused_kernels.KERNEL_DTYPES or up.dtype != gate.dtype:
        return module.down_proj(module.act_fn(gate) * up)
    return module.down_proj(fused_kernels.swiglu(gate, up))


def _layer_on_tokens(
    layer: nn.Module, hidden: Tensor, mask: Tensor, cos: Tensor, sin: Tensor, layout: DecoderLayout
) -> Tensor:
    """A Llama-family decoder layer (``LlamaDecoderLayer.forward``) on the gathered row (1, T', H)."""
    attn = layer.self_attn
    normed = rms_norm(layer.input_layernorm, hidden)
    query = rotated(attn.q_proj(normed).view(1, normed.shape[1], -1, attn.head_dim), cos, sin)
    key, value = keys_values(attn, normed, cos, sin)
    output, _ = attention_function(attn)(
        attn,
        layout.pad(query),
        layout.pad(key),
        layout.pad(value),
        mask,
        dropout=0.0 if not attn.training else attn.attention_dropout,
        scaling=attn.scaling,
    )  # (B, span, heads, head_dim)
    hidden = hidden + attn.o_proj(layout.unpad(output))
    return hidden + mlp(layer.mlp, rms_norm(layer.post_attention_layernorm, hidden))


def layers_before_last(
    backbone: nn.Module, input_ids: Tensor, position_ids: Tensor, mask: Tensor, layout: DecoderLayout
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Every layer but the last on the batch's real tokens: the hidden state entering the last layer
    (1, T', H), its rotary cos and sin (1, T', head_dim) and the mask as the layers take it, cut to
    the attention layout (``DecoderLayout.crop``), additive for eager attention and for sdpa's fp32
    CPU attention (``cpu_attention.fp32_mask_once``). ``mask`` and
    ``position_ids`` as ``hidden_at_reads`` takes them."""
    mask = layout.crop(mask)
    if backbone.config._attn_implementation == "eager" and mask.dtype == torch.bool:
        mask = additive_mask(mask)
    mask = cpu_attention.fp32_mask_once(mask, backbone.config._attn_implementation)
    ids = input_ids.flatten().index_select(0, layout.index)[None]
    positions = position_ids.flatten().index_select(0, layout.index)[None]
    hidden = backbone.embed_tokens(ids)
    cos, sin = backbone.rotary_emb(hidden, positions)  # (1, T', head_dim)
    for layer in backbone.layers[: backbone.config.num_hidden_layers - 1]:
        hidden = _layer_on_tokens(layer, hidden, mask, cos, sin, layout)
    return hidden, cos, sin, mask


def at_slots(tensor: Tensor, flat: Tensor) -> Tensor:
    """``tensor`` (B, L, ...) at the (B, R) flat positions ``flat`` (row * L + column): (B, R, ...)."""
    rows = tensor.reshape(tensor.shape[0] * tensor.shape[1], *tensor.shape[2:])
    return rows_of(rows, flat.flatten()).view(*flat.shape, *tensor.shape[2:])


def last_layer_at_slots(
    last: nn.Module, hidden: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, layout: DecoderLayout, slots: Tensor
) -> Tensor:
    """The last layer's output (B, R, H), before the final norm, at the real tokens whose flat padded
    positions are ``slots`` (B, R), R of each row: keys and values over every real token, in the
    attention layout each row's reads attend in (no copy of a row's keys per read), the rest at the
    reads only. ``hidden``, ``cos``, ``sin`` and ``mask`` as ``layers_before_last`` returns them."""
    normed = rms_norm(last.input_layernorm, hidden)
    key, value = keys_values(last.self_attn, normed, cos, sin)
    at = layout.gathered(slots)  # (B, R) positions in the gathered row
    picked = [at_slots(t, at) for t in (hidden, normed, cos, sin)]
    rows_mask = at_slots(mask[:, 0], layout.attention_positions(slots))  # (B, R, span)
    return output_at_reads(last, *picked, layout.pad(key), layout.pad(value), rows_mask.unsqueeze(1))


def reads_by_row(reads: Tensor, layout: DecoderLayout) -> tuple[Tensor, Tensor]:
    """N reads (flat padded positions) as (B, R) slots, R the most reads of any row, and where each
    read's output lands in the flattened (B * R) slots. A row's spare slots repeat one of its reads
    (a row without reads, which no reward batch has, repeats another row's: its slot attends over its
    own row's keys under that read's mask row, finite and never read)."""
    rows = torch.div(reads, layout.width, rounding_mode="floor")
    counts = torch.bincount(rows, minlength=layout.rows)
    width = int(counts.max())  # a CPU tensor: nothing to wait for
    order = torch.sort(rows, stable=True).indices
    starts = counts.cumsum(0) - counts
    rank = torch.arange(reads.numel(), device=reads.device) - starts[rows[order]]
    slots = reads[order[starts.clamp(max=reads.numel() - 1)]][:, None].repeat(1, width)
    place = rows[order] * width + rank
    slots.view(-1)[place] = reads[order]
    landing = torch.empty_like(place)
    landing[order] = place
    return slots, landing


def hidden_at_reads(
    backbone: nn.Module,
    input_ids: Tensor,
    position_ids: Tensor,
    mask: Tensor,
    layout: DecoderLayout,
    reads: Tensor,
    last_at_reads: bool,
) -> Tensor:
    """The backbone's final hidden states (after its last norm) at the real tokens whose flat padded
    positions (row * L + column) are ``reads``, shape (N, H): what the stock forward over the padded
    (B, L) batch returns there. ``mask`` is the batch's (B, 1, L, L) mask, boolean (True: may attend)
    or additive; ``last_at_reads`` computes the last layer at the read tokens only (``final_layer``)."""
    hidden, cos, sin, mask = layers_before_last(backbone, input_ids, position_ids, mask, layout)
    last = backbone.layers[backbone.config.num_hidden_layers - 1]
    if not last_at_reads:
        return backbone.norm(_layer_on_tokens(last, hidden, mask, cos, sin, layout)[0, layout.gathered(reads)])
    slots, landing = reads_by_row(reads, layout)
    out = last_layer_at_slots(last, hidden, cos, sin, mask, layout, slots)
    return backbone.norm(rows_of(out.flatten(0, 1), landing))
