"""Causal-LM policies (BCO): construction, sequence log-probabilities, prompt embeddings, saving.

The final model is a plain ``AutoModelForCausalLM`` directory (or a PEFT adapter), loadable with
stock transformers; rewardctl's own facts (method, beta, delta) ride along in ``config.json``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from rewardctl.config.schema import ModelConfig, TrainConfig
from rewardctl.data.packing import completion_logit_index
from rewardctl.modeling import read_slots
from rewardctl.modeling.adapters import load_model_dir
from rewardctl.modeling.causal_reads import compute_positions_only, positions_blocker
from rewardctl.modeling.common import (
    instantiate,
    load_config,
    load_kwargs,
    logits_at_positions,
    takes_logit_positions,
    takes_logits_to_keep,
    token_logits,
)


def build_causal_lm(
    model_cfg: ModelConfig,
    tokenizer: PreTrainedTokenizerBase,
    train_cfg: TrainConfig | None,
    *,
    disable_dropout: bool,
    quantization: Any = None,
) -> PreTrainedModel:
    """The policy from a checkpoint, or randomly initialised from a config alone (``from_scratch``)."""
    model_cfg = dataclasses.replace(model_cfg, disable_dropout=disable_dropout)
    return instantiate(AutoModelForCausalLM, load_config(model_cfg), model_cfg, tokenizer, train_cfg, quantization)


def load_causal_lm(path: str | Path, model_cfg: ModelConfig, *, disable_dropout: bool) -> nn.Module:
    """A saved policy: a plain directory, or an adapter directory over its base weights."""

    def plain(location: str) -> PreTrainedModel:
        model = AutoModelForCausalLM.from_pretrained(location, **load_kwargs(model_cfg))
        if disable_dropout:
            for module in model.modules():
                if isinstance(module, nn.Dropout):
                    module.p = 0.0
        return model

    return load_model_dir(Path(path), model_cfg, plain)


def compute_predicting_positions_only(model: nn.Module, model_cfg: ModelConfig, *, compiled: bool = False) -> nn.Module:
    """Let the policy ``model`` run its layers on a CPU batch's real tokens (``model.skip_padding``)
    and its last layer at the completion-predicting positions only (``model.final_layer_at_reads``)
    when ``completion_logps`` asks for those positions (``causal_reads``), wherever that is exact for
    it; the log says which."""
    return read_slots.enable(
        model,
        model_cfg,
        blocker=positions_blocker(model),
        apply=compute_positions_only,
        subject="policy",
        reads="the completion-predicting positions",
        compiled=compiled,
    )


def wants_router_logits(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return bool(getattr(config, "output_router_logits", False))


def completion_logps(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
    """Sum of log pi(token) over completion tokens, shape (B,), in float32; plus the MoE auxiliary
    loss when the model emits router logits (else None). Token t is predicted by logits at t - 1:

        log pi(y | x) = sum_{t in completion} (z_{t-1}[y_t] - logsumexp(z_{t-1}))

    ``batch`` holds ``input_ids``, ``attention_mask`` and ``completion_mask`` (rows, L), and the
    padding-free index when the collator made one. Where the model can (``takes_logit_positions``),
    only the positions that predict a completion token are projected onto the vocabulary
    (``logit_columns``, made at collate time, or here for a hand-built batch): a prompt's positions
    and the padding never get a row of V logits, nor its float32 copy."""
    kwargs: dict[str, Any] = {"use_cache": False}
    if wants_router_logits(_config_holder(model)):
        kwargs["output_router_logits"] = True
    if takes_logit_positions(model):
        if "logit_columns" not in batch:
            batch = {**batch, **_logit_index(batch)}
        logits, out = logits_at_positions(model, batch, **kwargs)  # (B, K, V), or (N, V) padding-free
        logits = logits.float()
        valid = batch["logit_valid"]
        if "flat_index" in batch:  # the N predicting positions of the one row; the next token is the target
            index = batch["flat_index"]
            targets = batch["input_ids"].flatten()[index[(batch["logit_packed"] + 1).clamp(max=index.shape[0] - 1)]]
        else:
            last = batch["input_ids"].shape[1] - 1
            targets = batch["input_ids"].gather(1, (batch["logit_columns"] + 1).clamp(max=last))
        picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
        if "flat_index" in batch:
            picked = picked[batch["logit_slots"]]  # (N,) -> each row's (K,) slots
        return (picked * valid.to(picked.dtype)).sum(-1), _aux_loss(out, kwargs)
    logits, out = token_logits(model, batch, **kwargs)
    logits = logits[:, :-1].float()
    targets = batch["input_ids"][:, 1:]
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    mask = batch["completion_mask"][:, 1:].to(picked.dtype)
    logps = (picked * mask).sum(-1)
    return logps, _aux_loss(out, kwargs)


def _aux_loss(out: Any, kwargs: dict[str, Any]) -> Tensor | None:
    return getattr(out, "aux_loss", None) if "output_router_logits" in kwargs else None


def _logit_index(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """``completion_logit_index`` for a batch built without the collator (tests, scripts)."""
    device = batch["input_ids"].device
    flat_index = batch.get("flat_index")
    found = completion_logit_index(batch["completion_mask"].cpu(), None if flat_index is None else flat_index.cpu())
    return {key: value.to(device) for key, value in found.items()}


def _config_holder(model: nn.Module) -> nn.Module:
    """DDP / accelerate wrappers keep the transformers model in ``.module``."""
    return getattr(model, "module", model)


def mean_pooled_prompt(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of the last hidden states over attended tokens, shape (B, hidden), float32."""
    # A causal LM would project every position onto its vocabulary; the last one is the least it allows.
    extra = {"logits_to_keep": 1} if takes_logits_to_keep(model) else {}
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False, **extra)
    hidden = (out.hidden_states[-1] if getattr(out, "hidden_states", None) else out.last_hidden_state).float()
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A detached copy of the starting weights: the reference when nothing cheaper is available."""
    import copy

    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    return ref.eval()
