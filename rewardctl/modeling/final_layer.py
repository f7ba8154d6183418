"""The last decoder layer computed only at the tokens a reward is read from.

A scalar reward model keeps one hidden state per sequence: the last layer's output at the token its
reward is read from. Every other token still needs the last layer's *keys and values* (the read
token attends to them), but nothing else of that layer: its queries, attention output, output
projection and MLP are wasted work at every token but the read ones. For a row of L tokens read at
R of them (R = 2 for a shared-prefix pair, K for a list, 1 for a stacked sequence) the last layer
then costs its k/v projections over L tokens plus the rest over R tokens:

    full:       L * (q + k + v + o + mlp)
    read only:  L * (k + v) + R * (q + o + mlp)

On the benchmark's Llama shape (6 layers of 384, MLP 1536) the MLP and q/o are 87% of a layer's
matmuls, so this removes about 1/7 of the model's matmul work, forward and backward. The maths is
the stock layer's: the read token's query attends to the same keys under the same mask row, so
rewards equal the full forward within float rounding (tested in fp32 on Llama and Qwen2 shapes).

The hidden state entering the last layer, its attention mask and rotary embeddings are captured
from the model's own forward (a pre-hook on the last layer stops it there), so mask construction,
position handling and every layer before stay stock transformers. The last layer is recomputed
here, which needs its structure: the Llama-family layers listed in ``READ_ONLY_LAYERS`` (q/k/v/o
projections with rotary embeddings, two RMS norms, one MLP module), also under FSDP2's wrapper class:
its pre-forward hook gathers the weights before the stop, and its post-forward hook, which the stop
skips, is replayed on the read-only output (``close_stopped_call``; exact,
``tests/e2e/test_distributed_runs.py``). That serves the sequence reward models (pairwise, ranklist)
and the PRM's and BCO's read slots (``read_slots``) alike. Anything else, a ZeRO-3-partitioned last
layer, an attention implementation without a dense mask, or hooks whose calls this skips (forward
hooks on the backbone or the layer, any hook on the layer's attention module: ``hooks``), runs the
full layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from rewardctl.kernels import ops as fused_kernels
from rewardctl.modeling.forward_swap import fsdp_unwrapped_class
from rewardctl.modeling.hooks import hooked_module, sharding_forward_hooks

#: Decoder-layer classes whose forward is exactly: pre-norm, rotary self-attention over q/k/v/o
#: projections, residual, pre-norm, MLP, residual (transformers 5).
READ_ONLY_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer")
#: Attention implementations that take the dense (or absent = causal) mask this module slices.
READ_ONLY_ATTENTION = ("sdpa", "eager")
#: How the log names this module's forward where hooks stop it (``hooks.hooked_module``): the
#: backbone's and the last layer's pre-forward hooks run (the backbone's call is stopped inside, the
#: layer's after them), their post-forward hooks, the layer's forward and its attention module's call
#: do not (FSDP2's post-forward hook is replayed: ``close_stopped_call``).
READ_ONLY = "the last layer at the reads"


class _LastLayerInputs(Exception):  # noqa: N818 (control flow, never an error a caller sees)
    """Raised by the pre-hook to stop the model's forward at its last layer, carrying its inputs."""

    def __init__(self, hidden: Tensor, kwargs: dict[str, Any]) -> None:
        super().__init__("last layer reached")
        self.hidden, self.kwargs = hidden, kwargs


def additive_mask(visible: Tensor, hidden: float = torch.finfo(torch.float32).min) -> Tensor:
    """A boolean mask (True: may attend) as an fp32 mask added to the scores: 0 where visible and
    ``hidden`` elsewhere (the float32 minimum, as eager attention wants it; sdpa's own conversion
    uses -inf)."""
    return torch.zeros(visible.shape, dtype=torch.float32, device=visible.device).masked_fill(~visible, hidden)


def read_only_blocker(backbone: nn.Module) -> str | None:
    """Why the last layer of ``backbone`` must run in full, or None when it can run at reads only."""
    layers = getattr(backbone, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0 or not hasattr(backbone, "norm"):
        return f"{type(backbone).__name__} has no decoder layer list"
    last = layers[-1]
    if fsdp_unwrapped_class(last).__name__ not in READ_ONLY_LAYERS:
        return f"{type(last).__name__} is not a layer this module can recompute ({', '.join(READ_ONLY_LAYERS)})"
    config = backbone.config
    if config._attn_implementation not in READ_ONLY_ATTENTION:
        return f"attn_implementation={config._attn_implementation} takes no dense mask"
    if any(hasattr(p, "ds_id") for p in last.parameters()):
        return "the last layer is partitioned by DeepSpeed ZeRO-3"
    if getattr(last.self_attn, "sliding_window", None):
        return "the last layer attends through a sliding window"
    return (
        hooked_module((backbone,), READ_ONLY, pre_hooks_run=True)
        or hooked_module((last,), READ_ONLY, pre_hooks_run=True, sharding_replayed=True)
        or hooked_module((last.self_attn,), READ_ONLY)
    )


def last_layer_inputs(backbone: nn.Module, **inputs: Any) -> tuple[Tensor, Tensor | None, tuple[Tensor, Tensor]]:
    """What the backbone's own forward hands its last layer: the hidden state (B, L, H), the attention
    mask (None: plain causal) and the rotary (cos, sin). The forward stops there (a pre-hook raises),
    so mask construction, positions and every earlier layer stay stock transformers."""
    last = backbone.layers[-1]

    def stop(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        raise _LastLayerInputs(hidden, kwargs)

    handle = last.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        backbone(**inputs)
    except _LastLayerInputs as captured:
        return captured.hidden, captured.kwargs.get("attention_mask"), captured.kwargs["position_embeddings"]
    finally:
        handle.remove()
    raise RuntimeError(f"{type(backbone).__name__} never called its last layer")  # pragma: no cover


def hidden_at_reads(backbone: nn.Module, rows: Tensor, cols: Tensor, **inputs: Any) -> Tensor:
    """The backbone's final hidden states (after its last norm) at tokens ``(rows[n], cols[n])``,
    shape (N, hidden): what ``backbone(**inputs).last_hidden_state[rows, cols]`` returns, with the
    last layer computed at those tokens only. ``inputs`` are the backbone's forward arguments."""
    hidden, mask, position_embeddings = last_layer_inputs(backbone, **inputs)
    last = backbone.layers[-1]
    out = close_stopped_call(last, hidden, last_layer_at(last, hidden, mask, position_embeddings, rows, cols))
    return backbone.norm(out)


def close_stopped_call(layer: nn.Module, hidden: Tensor, output: Tensor) -> Tensor:
    """The read-only ``output`` of the last ``layer`` after the post-forward hooks that its stopped call
    skipped and that shard its weights (FSDP2's: ``hooks.sharding_forward_hooks``): they reshard the
    weights the pre-forward hook gathered, hook their re-gathering onto the output's backward and close
    the layer's forward. Without them a forward with no backward after it (an evaluation between a
    backward and the optimizer step) left the weights gathered, and the step never reached the copy
    the next forward used (a review found rewards 0.2 off the full layer's, two gloo processes)."""
    for hook, with_kwargs in sharding_forward_hooks(layer):
        output = output.clone() if output._is_view() else output  # FSDP2 warns on a view (in-place risk)
        result = hook(layer, (hidden,), {}, output) if with_kwargs else hook(layer, (hidden,), output)
        output = output if result is None else result
    return output


def keys_values(attention: nn.Module, normed: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """A Llama-family attention's rotated keys and its values over every token of ``normed`` (B, L, H),
    each (B, kv_heads, L, head_dim); ``cos``/``sin`` (B or 1, L, head_dim) as the rotary module gives."""
    batch, length, _ = normed.shape
    key = rotated(attention.k_proj(normed).view(batch, length, -1, attention.head_dim), cos, sin)
    value = attention.v_proj(normed).view(batch, length, -1, attention.head_dim).transpose(1, 2)
    return key, value


def rotated(heads: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """A projection's output viewed as (B, L, heads, head_dim), rotated and returned as (B, heads, L,
    head_dim): ``x * cos + rotate_half(x) * sin`` (transformers' ``apply_rotary_pos_emb``). In
    rewardctl's fused CPU kernel where the run uses them (one pass each way, bit for bit the same),
    else as transformers writes it."""
    from transformers.models.llama.modeling_llama import rotate_half

    if (
        fused_kernels.active()
        and heads.device.type == "cpu"
        and heads.dtype in fused_kernels.KERNEL_DTYPES
        and cos.dtype == sin.dtype == heads.dtype
        and not (cos.requires_grad or sin.requires_grad)
    ):
        return fused_kernels.rotary(heads, cos, sin).transpose(1, 2)
    heads = heads.transpose(1, 2)
    return heads * cos.unsqueeze(1) + rotate_half(heads) * sin.unsqueeze(1)


def attention_function(attention: nn.Module) -> Callable[..., tuple[Tensor, Any]]:
    """A Llama-family attention module's own attention function from transformers' registry (sdpa:
    rewardctl's fp32 CPU attention under bf16 autocast, ``cpu_attention``; eager where configured so)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import eager_attention_forward

    return ALL_ATTENTION_FUNCTIONS.get_interface(attention.config._attn_implementation, eager_attention_forward)


def output_at_reads(
    layer: nn.Module,
    hidden: Tensor,
    normed: Tensor,
    cos: Tensor,
    sin: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Tensor,
) -> Tensor:
    """The layer's output (B, R, H) at R read tokens of each of B rows of keys and values, given the
    reads' hidden states and normed hidden states (B, R, H), their rotary rows (B, R, head_dim), the
    keys and values they attend over (B, kv_heads, L, head_dim) and their mask rows (B, 1, R, L),
    boolean or additive. One read per row (R = 1) takes each read's own copy of its row's keys."""
    from transformers.models.llama.modeling_llama import rotate_half

    attn = layer.self_attn
    batch, reads, _ = hidden.shape
    query = attn.q_proj(normed).view(batch, reads, -1, attn.head_dim).transpose(1, 2)  # (B, heads, R, head_dim)
    cos, sin = cos[:, None], sin[:, None]
    query = query * cos + rotate_half(query) * sin
    if attn.config._attn_implementation == "eager" and mask.dtype == torch.bool:
        mask = additive_mask(mask)
    output, _ = attention_function(attn)(
        attn,
        query,
        key,
        value,
        mask,
        dropout=0.0 if not attn.training else attn.attention_dropout,
        scaling=attn.scaling,
    )  # (B, R, heads, head_dim)
    out = hidden + attn.o_proj(output.reshape(batch, reads, -1))
    return out + layer.mlp(layer.post_attention_layernorm(out))


def last_layer_at(
    layer: nn.Module,
    hidden: Tensor,
    mask: Tensor | None,
    position_embeddings: tuple[Tensor, Tensor],
    rows: Tensor,
    cols: Tensor,
) -> Tensor:
    """A Llama-family decoder layer's output at tokens ``(rows[n], cols[n])`` of ``hidden`` (B, L, H):
    keys and values over every token, everything else over the N read tokens. ``mask`` is what the
    model hands the layer: (B, 1, L, L) boolean or additive, or None for plain causal attention."""
    batch, length, _ = hidden.shape
    normed = layer.input_layernorm(hidden)
    cos, sin = position_embeddings  # (B or 1, L, head_dim)
    key, value = keys_values(layer.self_attn, normed, cos, sin)
    if mask is None:  # the model left causality to the kernel: key j is visible from query i iff j <= i
        row_mask = (torch.arange(length, device=hidden.device)[None, :] <= cols[:, None])[:, None, None, :]
    else:
        row_mask = mask[rows, :, cols, :].unsqueeze(2)  # (N, 1, 1, L)
    return output_at_reads(
        layer,
        hidden[rows, cols][:, None],
        normed[rows, cols][:, None],
        cos.expand(batch, -1, -1)[rows, cols][:, None],
        sin.expand(batch, -1, -1)[rows, cols][:, None],
        rows_of(key, rows),
        rows_of(value, rows),
        row_mask,
    )[:, 0]


def rows_of(tensor: Tensor, rows: Tensor) -> Tensor:
    """``tensor[rows]`` (rows of dim 0). On a CPU as ``index_select``, whose backward (``index_add``) ran 1.6x faster
    than advanced indexing's (``index_put`` with accumulation) at the benchmark decoder's keys. On a
    GPU ``index_add`` accumulates with atomics, so a row read K times (a list) could sum in a varying
    order: the GPU path keeps advanced indexing, as before."""
    return tensor.index_select(0, rows) if tensor.device.type == "cpu" else tensor[rows]
