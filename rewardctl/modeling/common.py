"""Model-construction steps every method shares: config overrides, dropout, dtype, checkpointing."""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from rewardctl.config.schema import DType, ModelConfig, TrainConfig
from rewardctl.errors import ConfigError
from rewardctl.modeling.forward_swap import forward_owner, stock_class

DTYPES = {DType.float32: torch.float32, DType.bfloat16: torch.bfloat16, DType.float16: torch.float16}


def load_config(model_cfg: ModelConfig, **updates: Any) -> PretrainedConfig:
    try:
        config = AutoConfig.from_pretrained(
            model_cfg.name_or_path, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        detail = str(exc).strip().splitlines()[0]
        raise ConfigError(
            "model.name_or_path", f"cannot load a model config from {model_cfg.name_or_path!r}: {detail}"
        ) from None
    for key, value in model_cfg.config_overrides.items():
        if not hasattr(config, key):
            raise ConfigError(f"model.config_overrides.{key}", f"{type(config).__name__} has no attribute {key!r}")
        setattr(config, key, value)
    if model_cfg.disable_dropout:
        for key, value in config.to_dict().items():
            if "dropout" in key and isinstance(value, float):
                setattr(config, key, 0.0)
        if getattr(config, "classifier_dropout", None) is None:
            # Classification heads whose config lacks this (Llama's token classifier) fall back to 0.1:
            # written out, a stock reload followed by .train() keeps the head as it trained.
            config.classifier_dropout = 0.0
    for key, value in updates.items():
        setattr(config, key, value)
    return config


def check_max_length(model_cfg: ModelConfig) -> None:
    """``model.max_length`` must fit the position table of models with learned absolute positions
    (BERT, GPT-2: an overflow only surfaces as a shape error mid-training); RoPE models can run
    past their trained length, so they only get a warning."""
    config = load_config(model_cfg)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(text_config, "max_position_embeddings", None)
    if not limit or model_cfg.max_length <= limit:
        return
    rotary = any(getattr(text_config, key, None) for key in ("rope_theta", "rope_parameters", "rope_scaling"))
    message = f"{model_cfg.max_length} exceeds the {limit} positions of {model_cfg.name_or_path!r}"
    if not rotary:
        raise ConfigError("model.max_length", f"{message}, which has learned absolute positions; use <= {limit}")
    logging.getLogger(__name__).warning("model.max_length %s (rotary positions: allowed, quality may drop)", message)


def load_kwargs(model_cfg: ModelConfig) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"dtype": "auto" if model_cfg.dtype == DType.auto else DTYPES[model_cfg.dtype]}
    if model_cfg.attn_implementation:
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    return kwargs


def finish_model(
    model: PreTrainedModel, model_cfg: ModelConfig, train_cfg: TrainConfig | None, vocab_size: int
) -> None:
    """Steps after construction: embeddings for added tokens, dropout off, activation checkpointing."""
    if vocab_size > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(vocab_size, mean_resizing=False)
    if model_cfg.disable_dropout:
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
    if train_cfg is not None and train_cfg.gradient_checkpointing:
        if not model.supports_gradient_checkpointing:
            raise ConfigError("train.gradient_checkpointing", f"{type(model).__name__} does not support it")
        model.activation_checkpointing_enable({"use_reentrant": train_cfg.gradient_checkpointing_reentrant})
        if train_cfg.gradient_checkpointing_reentrant:
            model.enable_input_require_grads()


def instantiate(
    auto_class: Any,
    config: PretrainedConfig,
    model_cfg: ModelConfig,
    tokenizer: Any,
    train_cfg: TrainConfig | None,
    quantization: Any = None,
) -> PreTrainedModel:
    """``auto_class`` from a checkpoint, or randomly initialised from ``config`` alone (``from_scratch``),
    with the tokenizer's pad token and the shared finishing steps."""
    vocab_size = getattr(config, "vocab_size", None)
    if vocab_size is None or tokenizer.pad_token_id < vocab_size:  # an added pad token exists only after resizing
        config.pad_token_id = tokenizer.pad_token_id
    kwargs = load_kwargs(model_cfg)
    if quantization is not None:
        if model_cfg.from_scratch:
            raise ConfigError(
                "peft", "qlora quantises pretrained weights; a from-scratch model has none (use peft=lora)"
            )
        kwargs["quantization_config"] = quantization
    if model_cfg.from_scratch:
        model = auto_class.from_config(config, trust_remote_code=model_cfg.trust_remote_code, **kwargs)
    else:
        model = auto_class.from_pretrained(
            model_cfg.name_or_path,
            config=config,
            revision=model_cfg.revision,
            trust_remote_code=model_cfg.trust_remote_code,
            **kwargs,
        )
    finish_model(model, model_cfg, train_cfg, len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def parameter_count(param: torch.Tensor) -> int:
    """Real element count: ZeRO-3 (``zero.Init``) leaves ``numel() == 0`` and keeps the size in
    ``ds_numel``; bitsandbytes packs two 4-bit values per byte of its storage dtype."""
    count = getattr(param, "ds_numel", 0) or param.numel()
    if type(param).__name__ == "Params4bit":
        storage = getattr(param, "quant_storage", torch.uint8)
        count *= 2 * (storage.itemsize if isinstance(storage, torch.dtype) else 1)
    return count


def count_parameters(model: nn.Module) -> dict[str, int]:
    params = list(model.parameters())
    return {
        "total": sum(parameter_count(p) for p in params),
        "trainable": sum(parameter_count(p) for p in params if p.requires_grad),
    }


# The attention implementations whose cost follows the real tokens of a padding-free row (sdpa and
# eager would build a dense (T, T) mask over the whole concatenation).
PADDING_FREE_ATTENTION = ("flash_attention_2", "flash_attention_3", "flex_attention")


def resolved_architecture(model_cfg: ModelConfig, auto_class: Any) -> tuple[nn.Module, bool, str]:
    """(model, causal, attention implementation) as transformers resolves them for ``auto_class``,
    built on the meta device (no memory, no weights read). Causal: every attention module that
    declares ``is_causal`` is causal (decoders), none for BERT-style encoders."""
    config = load_config(model_cfg)
    kwargs = {"attn_implementation": model_cfg.attn_implementation} if model_cfg.attn_implementation else {}
    with torch.device("meta"):
        model = auto_class.from_config(config, trust_remote_code=model_cfg.trust_remote_code, **kwargs)
    flags = {bool(module.is_causal) for module in model.modules() if hasattr(module, "is_causal")}
    causal = flags == {True} and not getattr(config, "is_encoder_decoder", False)
    return model, causal, model.config._attn_implementation


def padding_free_blocker(model_cfg: ModelConfig, auto_class: Any, *, on_gpu: bool, forced: bool) -> str | None:
    """Why rows should not be concatenated padding-free, or None. Exact for any causal decoder (the
    position ids mark the sequences); worth it only on a GPU with an attention whose cost follows the
    real tokens (``forced``, i.e. ``data.padding_free=true``, skips that speed condition)."""
    if not forced and not on_gpu:
        return "on CPU the length-grouped padded batches are faster (a dense mask grows with the packed length)"
    requested = model_cfg.attn_implementation
    if not forced and requested and requested not in PADDING_FREE_ATTENTION:
        return f"attn_implementation={requested} would build a dense mask (use flash_attention_2 or flex_attention)"
    model, causal, attention = resolved_architecture(model_cfg, auto_class)
    if not causal:
        return f"{type(model).__name__} is not a causal decoder (its tokens attend both ways across a packed row)"
    if not forced and attention not in PADDING_FREE_ATTENTION:
        return f"attn_implementation={attention} would build a dense mask (use flash_attention_2 or flex_attention)"
    return None


def token_logits(model: nn.Module, batch: dict[str, Tensor], **kwargs: Any) -> tuple[Tensor, Any]:
    """Per-token logits in the batch's padded (rows, L, ...) layout, and the model output.

    With ``flat_index`` in the batch (``rewardctl.data.packing.unpad_index``) the model runs on the
    real tokens only, concatenated in one row with restarting position ids, and its logits are put
    back in the padded layout (zeros at padding, which every loss masks), so the method's loss code
    is the same either way. With ``read_columns`` / ``read_valid`` in a padded batch
    (``rewardctl.data.packing.token_read_index``), a token classifier built for it (``token_reads``)
    computes the logits at those tokens only where it takes that path; the others are then zeros.
    """
    from rewardctl.modeling.token_reads import READS_KEY, computes_reads_only

    kwargs["use_cache"] = False  # with a cache, transformers would not read sequence boundaries from positions
    if "flat_index" not in batch:
        if "read_columns" in batch and computes_reads_only(model):
            kwargs[READS_KEY] = (batch["read_columns"], batch["read_valid"])
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
        return out.logits, out
    index = batch["flat_index"]
    out = model(input_ids=batch["input_ids"].flatten()[index][None], position_ids=batch["flat_position_ids"], **kwargs)
    flat = out.logits[0]
    full = flat.new_zeros((batch["input_ids"].numel(), *flat.shape[1:])).index_copy(0, index, flat)
    return full.view(*batch["input_ids"].shape, *flat.shape[1:]), out


def transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model inside its wrappers: DDP / DeepSpeed / FSDP1 (``.module``), torch.compile
    (``._orig_mod``), PEFT (``get_base_model()``)."""
    for _ in range(16):  # wrappers nest a few deep; a bound rules out a cycle
        if isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif callable(getattr(model, "get_base_model", None)) and model.get_base_model() is not model:
            model = model.get_base_model()
        else:
            break
    return model


@functools.cache
def _slicer_takes_positions() -> bool:
    """Whether this transformers' ``slice_logits_to_keep`` takes (rows, K) integer positions."""
    from transformers import modeling_utils

    slicer = getattr(modeling_utils, "slice_logits_to_keep", None)
    if slicer is None:
        return False
    # An older slicer indexes every row's columns with the whole tensor: (2, 2, 1, 1), [2, 0, 5, 3].
    # torch.equal, not .tolist(): the first call comes inside a training step (tests/unit/test_host_sync.py).
    kept = slicer(torch.arange(6.0).view(2, 3, 1), torch.tensor([[2], [0]]))
    return kept.shape == (2, 1, 1) and torch.equal(kept.flatten(), torch.tensor([2.0, 3.0]))


def takes_logit_positions(model: nn.Module) -> bool:
    """Whether ``model``'s forward projects onto the vocabulary only at given positions
    (``logits_to_keep`` as (rows, K) positions, or 1-D positions of its one row): the forward that
    runs (the first class defining one, so a subclass overriding it is judged by its own) belongs to
    transformers and slices its hidden states with ``modeling_utils.slice_logits_to_keep`` before
    ``lm_head``. Remote code, hand-written slicing and other heads get every position's logits."""
    return _slicer_takes_positions() and _forward_slices_positions(type(transformers_model(model)))


@functools.cache
def _forward_slices_positions(cls: type) -> bool:
    """``takes_logit_positions`` for a class: judged once per class, not on every forward."""
    owner = forward_owner(cls)  # a swapped forward (``causal_reads``) honours what the stock one takes
    if owner is None or not owner.__module__.startswith("transformers.models."):
        return False
    forward = inspect.unwrap(owner.forward)
    code = getattr(forward, "__code__", None)
    return (
        code is not None
        and "slice_logits_to_keep" in code.co_names
        and "logits_to_keep" in inspect.signature(forward).parameters
    )


def takes_logits_to_keep(model: nn.Module) -> bool:
    """Whether ``model.forward`` takes ``logits_to_keep`` at all (``logits_to_keep=1``: the last position only)."""
    return _forward_takes_logits_to_keep(type(transformers_model(model)))


@functools.cache
def _forward_takes_logits_to_keep(cls: type) -> bool:
    """``takes_logits_to_keep`` for a class: its signature is read once, not on every batch."""
    return "logits_to_keep" in inspect.signature(stock_class(cls).forward).parameters


def logits_at_positions(model: nn.Module, batch: dict[str, Tensor], **kwargs: Any) -> tuple[Tensor, Any]:
    """Logits at the batch's completion-predicting positions (``rewardctl.data.packing.completion_logit_index``),
    the vocabulary projection computed there only, and the model output: (rows, K, V) at
    ``logit_columns`` for a padded batch; (N, V) at ``logit_packed`` for a padding-free batch
    (``flat_index``), which runs as one row. Needs ``takes_logit_positions(model)``."""
    kwargs["use_cache"] = False  # with a cache, transformers would not read sequence boundaries from positions
    if "flat_index" not in batch:
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            logits_to_keep=batch["logit_columns"],
            **kwargs,
        )
        return out.logits, out
    index = batch["flat_index"]
    out = model(
        input_ids=batch["input_ids"].flatten()[index][None],
        position_ids=batch["flat_position_ids"],
        logits_to_keep=batch["logit_packed"],
        **kwargs,
    )
    return out.logits[0], out
