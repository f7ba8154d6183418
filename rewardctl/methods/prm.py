"""Process reward models: step-wise supervision as token classification.

Rows: ``prompt`` (text or chat messages), ``completions`` (the steps) and ``labels`` (per step: a
bool, 1 = correct, or a probability of being correct in [0, 1]); or pre-tokenised ``input_ids`` +
token-level ``labels``. The sequence is BOS (or [CLS] for encoders; nothing if the tokenizer has neither) + prompt, then each step
followed by ``step_separator``; a step's label sits on the last token of its separator and -100
everywhere else. Soft labels train with soft-target cross-entropy; the loss is normalised by the
labelled-token count of the whole accumulation window (``batch_weight``), across processes.
``score_steps`` builds inference sequences with the very same encoder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from rewardctl.config.schema import MethodConfig, Overlength, RunConfig
from rewardctl.data.collate import long_tensor, pad_sequences
from rewardctl.data.packing import token_read_index, unpad_index
from rewardctl.data.prepare import ROW_COLUMN, featurize_split, list_lengths, require_columns
from rewardctl.data.text import (
    Fit,
    apply_chat_template,
    check_messages,
    check_text,
    check_token_ids,
    describe_number,
    fit_prompt_completion,
    is_conversational,
    json_kind,
)
from rewardctl.errors import ConfigError, RowError
from rewardctl.methods.base import (
    Method,
    Metric,
    PreparedSplit,
    StepOutput,
    budget_label,
    check_token_budget,
    feature_key,
    token_budget,
)
from rewardctl.modeling.adapters import quantization_config, wants_merged_copy, wrap_with_adapter
from rewardctl.modeling.common import token_logits
from rewardctl.modeling.sequence import head_name
from rewardctl.modeling.token import (
    build_token_classifier,
    compute_labelled_tokens_only,
    load_token_classifier,
    save_token_classifier,
)
from rewardctl.modeling.tokenizer import load_tokenizer, tokenizer_identity

IGNORE = -100


@dataclass
class PrmConfig(MethodConfig):
    """Process reward model: token classification with each step's label on its separator's last token."""

    _target_: str = "rewardctl.methods.prm.PrmMethod"
    name: str = "prm"
    # Appended after every step (the last one too); multi-token separators work.
    step_separator: str = "\n"
    # Training labels only the last step (eval always labels every step).
    train_on_last_step_only: bool = False
    # Token budget of prompt + steps; null: model.max_length.
    max_length: Optional[int] = None
    # An over-long row's prompt is cut to this (keeping its end; null: half of max_length), the steps
    # to max_completion_length and then to what is left (keeping their start; later steps' labels go).
    max_prompt_length: Optional[int] = None
    max_completion_length: Optional[int] = None


def check_step_label(value: Any, index: int) -> float:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= 1.0:
        return float(value)
    raise RowError(f"labels[{index}]", f"must be true/false or a probability in [0, 1], got {describe_number(value)}")


class StepEncoder:
    """(input_ids, labels, targets) for a row, identical for training, eval and ``score_steps``."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, cfg: PrmConfig, max_length: int, overlength: Overlength
    ) -> None:
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.max_length = max_length
        self.overlength = overlength
        # Encoders (BERT family) have no BOS but were pretrained with [CLS] first: it takes BOS's place.
        self.bos = (
            tokenizer.bos_token_id if tokenizer.bos_token_id is not None else getattr(tokenizer, "cls_token_id", None)
        )
        self.separator = list(tokenizer.encode(cfg.step_separator, add_special_tokens=False))
        if not self.separator:
            raise ConfigError(
                "method.step_separator",
                f"{cfg.step_separator!r} tokenises to nothing with this tokenizer "
                "(BERT-style tokenizers drop whitespace); choose a visible one, e.g. method.step_separator='\"[SEP]\"' "
                "or method.step_separator='\" ; \"' (quoted twice: once for the shell, once for Hydra)",
            )

    def prompt_ids(self, prompt: Any) -> list[int]:
        if is_conversational(prompt):
            messages = check_messages(prompt, "prompt")
            return apply_chat_template(self.tokenizer, messages, "prompt", add_generation_prompt=True)
        ids = list(
            self.tokenizer(check_text(prompt, "prompt", allow_empty=True), add_special_tokens=False)["input_ids"]
        )
        return [self.bos, *ids] if self.bos is not None else ids

    def encode(
        self, prompt: Any, steps: Any, labels: Any, *, training: bool
    ) -> tuple[list[int], list[int], list[float], Fit]:
        if not isinstance(steps, list) or not steps:
            raise RowError("completions", "must be a non-empty list of steps")
        if not isinstance(labels, list) or len(labels) != len(steps):
            size = len(labels) if isinstance(labels, list) else json_kind(labels)
            raise RowError("labels", f"must hold one label per step: {len(steps)} steps, got {size}")
        targets = [check_step_label(v, k) for k, v in enumerate(labels)]
        last_only = self.cfg.train_on_last_step_only and training
        completion: list[int] = []
        label_at: dict[int, float] = {}
        for k, step in enumerate(steps):
            completion += list(
                self.tokenizer(check_text(step, f"completions[{k}]"), add_special_tokens=False)["input_ids"]
            )
            completion += self.separator
            if not last_only or k == len(steps) - 1:
                label_at[len(completion) - 1] = targets[k]
        prompt = self.prompt_ids(prompt)
        prompt, completion, fit = fit_prompt_completion(
            prompt,
            completion,
            max_length=self.max_length,
            max_prompt_length=self.cfg.max_prompt_length,
            max_completion_length=self.cfg.max_completion_length,
            overlength=self.overlength,
            bos_id=self.bos,
        )
        kept = {i: t for i, t in label_at.items() if i < len(completion)}
        if not kept:
            first_step = min(label_at) + 1
            raise RowError(
                "completions",
                f"no step label survives truncation to {self.max_length} tokens: the first "
                f"labelled step ends at token {first_step} of the steps, {len(completion)} are "
                f"left after the {len(prompt)}-token prompt; raise the budget or skip such rows "
                "(data.bad_rows=skip)",
            )
        offset = len(prompt)
        hard = [IGNORE] * (offset + len(completion))
        soft = [0.0] * (offset + len(completion))
        for i, t in kept.items():
            hard[offset + i] = 1 if t >= 0.5 else 0
            soft[offset + i] = t
        return prompt + completion, hard, soft, fit


class PrmMethod(Method):
    config_class = PrmConfig
    primary_metric = "step_accuracy"
    item_name = "steps"
    report_metrics = ("majority_baseline", "error_f1", "first_error_accuracy")

    def verdict(self, final: dict[str, Any]) -> str | None:
        accuracy, majority = final.get("step_accuracy"), final.get("majority_baseline")
        if accuracy is None or majority is None:
            return None
        if final.get("error_f1", 0.0) == 0.0 and final.get("wrong_steps", 1.0) > 0:
            called = " (every step called correct)" if abs(accuracy - majority) < 1e-9 else ""
            return (
                f"no wrong step is found (wrong-step F1 0): step accuracy {accuracy:.4f} against the majority "
                f"baseline {majority:.4f}{called}"
            )
        if accuracy <= majority and accuracy < 1.0:
            return f"step accuracy {accuracy:.4f} does not beat the majority baseline {majority:.4f}"
        return None

    supports_adapters = True
    padding_free_model = "AutoModelForTokenClassification"
    cfg: PrmConfig

    @property
    def max_length(self) -> int:
        return token_budget(self.cfg, self.run)

    @classmethod
    def check_config(cls, run: RunConfig) -> None:
        super().check_config(run)
        m: PrmConfig = run.method
        check_token_budget(m, run)
        if not m.step_separator:
            raise ConfigError("method.step_separator", "must not be empty: each step's label sits on its separator")

    # ---- tokenizer and model --------------------------------------------------------------------
    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        tokenizer = load_tokenizer(self.run.model)
        tokenizer.padding_side = "right"
        return tokenizer

    def build_model(self) -> nn.Module:
        model = build_token_classifier(
            self.run.model, self.tokenizer, self.run.train, quantization_config(self.run.peft)
        )
        model = wrap_with_adapter(model, self.run.peft, head=[head_name(model)], task_type="TOKEN_CLS")
        return compute_labelled_tokens_only(model, self.run.model, compiled=self.run.train.compile)

    def load_trained(self, path: Path) -> nn.Module:
        return compute_labelled_tokens_only(load_token_classifier(path, self.run.model), self.run.model)

    def save_model(self, model: nn.Module, path: Path, state_dict: dict[str, Tensor] | None = None) -> None:
        meta = {"method": self.cfg.name, "step_separator": self.cfg.step_separator}
        save_token_classifier(
            model,
            self.tokenizer,
            path,
            self.run.model,
            meta=meta,
            state_dict=state_dict,
            save_merged=wants_merged_copy(self.run.peft),
        )

    # ---- data -----------------------------------------------------------------------------------
    def encoder(self) -> StepEncoder:
        return StepEncoder(self.tokenizer, self.cfg, self.max_length, self.run.data.overlength)

    def prepare(self, dataset: Any, source: str, *, training: bool) -> PreparedSplit:
        columns = require_columns(dataset, source, ("prompt", "completions", "labels"), ("input_ids", "labels"))
        encoder = self.encoder()

        def featurize(row: dict[str, Any]) -> tuple[dict[str, Any], Fit]:
            if columns[0] == "prompt":
                if row["prompt"] is None:
                    raise RowError("prompt", "is missing (null)")
                ids, hard, soft, fit = encoder.encode(
                    row["prompt"], row["completions"], row["labels"], training=training
                )
            else:
                ids, hard, soft, fit = self._pretokenised(row, encoder)
            return {"input_ids": ids, "labels": hard, "targets": soft}, fit

        featurized, report = featurize_split(
            dataset,
            featurize,
            source=source,
            bad_rows=self.run.data.bad_rows,
            num_proc=self.run.data.num_proc,
            cache_key=self.feature_cache_key(training=training),
        )
        labels = featurized.with_format("arrow")[:]["labels"].combine_chunks().flatten().to_numpy()
        labelled = labels[labels != IGNORE]
        report["row_name"] = "rows"
        report["labelled_steps"] = int(labelled.size)
        report["correct_steps"] = int((labelled == 1).sum())
        report["budget"] = budget_label(self.cfg, self.run)
        report["truncation_note"] = "prompt end and first steps kept; cut steps lose their labels"
        report["details"] = f"{report['labelled_steps']} labelled steps, {report['correct_steps']} correct"
        return PreparedSplit(featurized, report)

    def feature_cache_key(self, *, training: bool) -> tuple[Any, ...]:
        """What shapes the features (``StepEncoder``, ``_pretokenised``): the separator, the
        truncation settings, the effective budget, ``data.overlength`` and the tokenizer.
        ``train_on_last_step_only`` moves labels in training splits only, so it enters the key as
        whether the last-step rule applies here; eval splits are shared across its values."""
        return (
            feature_key(self.cfg, "step_separator", "max_prompt_length", "max_completion_length"),
            self.cfg.train_on_last_step_only and training,
            self.max_length,
            self.run.data.overlength,
            tokenizer_identity(self.tokenizer),
        )

    def _pretokenised(self, row: dict[str, Any], encoder: StepEncoder) -> tuple[list[int], list[int], list[float], Fit]:
        ids = check_token_ids(row["input_ids"], "input_ids", len(self.tokenizer))
        labels = row["labels"]
        if not isinstance(labels, list) or len(labels) != len(ids):
            raise RowError(
                "labels", f"pre-tokenised rows need one label per token ({len(ids)}), with -100 where unlabelled"
            )
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) or v not in (IGNORE, 0, 1) for v in labels):
            bad = next(
                v for v in labels if isinstance(v, bool) or not isinstance(v, (int, float)) or v not in (IGNORE, 0, 1)
            )
            raise RowError("labels", f"pre-tokenised labels must be -100, 0 or 1, got {describe_number(bad)}")
        labels = [int(v) for v in labels]  # a float column (one odd row widens it) holds -100.0 for -100
        fit = Fit.fits
        if len(ids) > self.max_length:
            if encoder.overlength == Overlength.drop:
                fit = Fit.too_long
            else:
                ids, labels, fit = ids[: self.max_length], labels[: self.max_length], Fit.truncated
        if all(v == IGNORE for v in labels):
            raise RowError("labels", "no labelled token (every label is -100)")
        return ids, list(labels), [float(max(v, 0)) for v in labels], fit

    def lengths(self, dataset: Any) -> list[int]:
        return list_lengths(dataset, "input_ids")

    def collate(self, features: list[dict[str, Any]]) -> dict[str, Tensor]:
        input_ids, attention_mask = pad_sequences(
            [f["input_ids"] for f in features],
            self.tokenizer.pad_token_id,
            side="right",
            **self.padding,
        )
        width = input_ids.shape[1]
        labels = long_tensor([list(f["labels"]) + [IGNORE] * (width - len(f["labels"])) for f in features])
        targets = [list(f["targets"]) + [0.0] * (width - len(f["targets"])) for f in features]
        targets = torch.from_numpy(np.array(targets, dtype=np.float32))
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "targets": targets}
        if self.padding_free:
            batch.update(unpad_index(attention_mask))
        else:  # where the logits are read: a model that can computes those only (modeling/token_reads.py)
            batch.update(token_read_index(labels != IGNORE, attention_mask))
        if ROW_COLUMN in features[0]:
            batch["row"] = torch.tensor([f[ROW_COLUMN] for f in features], dtype=torch.long)
        return batch

    # ---- steps ----------------------------------------------------------------------------------
    def batch_weight(self, batch: dict[str, Tensor]) -> Tensor:
        """Labelled tokens: the loop divides by their count over the accumulation window and processes."""
        return (batch["labels"] != IGNORE).sum().float()

    def _forward(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """(log p(correct), log p(incorrect), per-token soft cross-entropy), each (B, L), float32."""
        logits = token_logits(model, batch)[0].float()
        log_probs = logits.log_softmax(-1)
        t = batch["targets"]
        losses = -(t * log_probs[..., 1] + (1 - t) * log_probs[..., 0])
        losses = torch.where(batch["labels"] != IGNORE, losses, torch.zeros_like(losses))
        return log_probs[..., 1], log_probs[..., 0], losses

    def train_step(self, model: nn.Module, batch: dict[str, Tensor]) -> StepOutput:
        log_correct, log_incorrect, losses = self._forward(model, batch)
        mask = batch["labels"] != IGNORE
        right = ((log_correct > log_incorrect).long() == batch["labels"]) & mask
        count = mask.sum().float()
        metrics = {
            "loss": Metric(losses.detach().sum(), count),
            "step_accuracy": Metric(right.sum().float(), count),
            "tokens": Metric.total(batch["attention_mask"].sum()),
            "steps": Metric.total(count),
            "rows": Metric.total(batch["labels"].shape[0]),
        }
        return StepOutput(loss_sum=losses.sum(), metrics=metrics)

    def eval_step(self, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per row, its labelled steps packed to the left: (rows, steps) tensors with a ``present`` mask."""
        log_correct, _, losses = self._forward(model, batch)
        mask = batch["labels"] != IGNORE
        counts = mask.sum(1)
        present = torch.arange(int(counts.max()), device=mask.device)[None, :] < counts[:, None]

        def pack(values: Tensor) -> Tensor:
            return torch.zeros(present.shape, dtype=values.dtype, device=values.device).masked_scatter(
                present, values[mask]
            )

        out = {
            "step_prob": pack(log_correct.exp()),
            "step_label": pack(batch["labels"]),
            "step_target": pack(batch["targets"]),
            "present": present.long(),
            "loss_sum": losses.sum(1),
        }
        if "row" in batch:
            out["row"] = batch["row"]
        return out

    def eval_metrics(self, outputs: dict[str, Tensor]) -> dict[str, float]:
        return step_metrics(outputs)

    #: Step indices drawn one by one in step_accuracy.png; later steps share the last point (readable).
    figure_steps = 30

    def figure_data(self, outputs: dict[str, Tensor]) -> dict[str, Any]:
        """Accuracy of step k over the rows that have a step k, beside how many do and the majority
        baseline at k: where in a chain the model stops telling right from wrong, which one overall
        step accuracy hides (later steps are rarer and more often wrong)."""
        present = outputs["present"].bool()
        if not present.any():
            return {}
        gold = (outputs["step_label"] == 1) & present
        right = ((outputs["step_prob"] > 0.5) == (outputs["step_label"] == 1)) & present
        width = int(present.sum(1).max())
        shown = min(width, self.figure_steps)
        series: dict[str, list[Any]] = {"steps": [], "accuracy": [], "count": [], "majority": []}
        for k in range(shown):
            last = k == shown - 1 and width > shown
            columns = slice(k, None) if last else slice(k, k + 1)
            steps = int(present[:, columns].sum())
            share = int(gold[:, columns].sum()) / steps
            series["steps"].append(f"{k + 1}+" if last else str(k + 1))
            series["accuracy"].append(int(right[:, columns].sum()) / steps)
            series["count"].append(int(present[:, k].sum()))  # rows that have this step (1-based k + 1)
            series["majority"].append(max(share, 1 - share))
        total = int(present.sum())
        share = int(gold.sum()) / total
        title = (
            f"Per-step eval accuracy, {present.shape[0]} rows / {total} steps: {int(right.sum()) / total:.1%} "
            f"overall (majority baseline {max(share, 1 - share):.1%})"
        )
        return {"step_accuracy": {"title": title, **series}}

    def predictions(self, outputs: dict[str, Tensor]) -> list[dict[str, Any]]:
        present = outputs["present"].bool()
        first_gold, first_pred = first_errors(outputs)
        rows = outputs.get("row")
        records = []
        for b in range(present.shape[0]):
            n = int(present[b].sum())
            records.append(
                {
                    "row": int(rows[b]) + 1 if rows is not None else b + 1,
                    "step_probs": [float(p) for p in outputs["step_prob"][b, :n]],
                    "labels": [float(t) for t in outputs["step_target"][b, :n]],
                    "first_error": _one_based(first_gold[b]),
                    "predicted_first_error": _one_based(first_pred[b]),
                }
            )
        return sorted(records, key=lambda record: record["row"])

    def score_prepare(self, dataset: Any, source: str) -> PreparedSplit:
        """Rows of ``prompt`` + ``completions`` (steps), labels optional: unlabelled steps are scored
        with placeholder labels, which only mark where each step ends."""
        if "labels" not in dataset.column_names and {"prompt", "completions"} <= set(dataset.column_names):
            placeholders = [[True] * len(c) if isinstance(c, list) else None for c in dataset["completions"]]
            dataset = dataset.add_column("labels", placeholders)
        return self.prepare(dataset, source, training=False)

    def score_records(self, outputs: dict[str, Tensor]) -> dict[int, dict[str, Any]]:
        """P(step correct) of every step within the budget, and the first step the model calls wrong
        (1-based; null: none)."""
        present = outputs["present"].bool()
        _, first_pred = first_errors(outputs)
        return {
            int(outputs["row"][b]): {
                "step_probs": [float(p) for p in outputs["step_prob"][b, : int(present[b].sum())]],
                "predicted_first_error": _one_based(first_pred[b]),
            }
            for b in range(present.shape[0])
        }


def _one_based(index: Tensor) -> int | None:
    return None if int(index) < 0 else int(index) + 1


def first_errors(outputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Index of the first wrong step per row, gold and predicted (-1: no wrong step)."""
    present = outputs["present"].bool()
    wrong_gold = present & (outputs["step_label"] == 0)
    wrong_pred = present & ~(outputs["step_prob"] > 0.5)

    def first(flags: Tensor) -> Tensor:
        positions = torch.arange(flags.shape[1]).expand_as(flags)
        return torch.where(
            flags.any(1),
            positions.masked_fill(~flags, flags.shape[1]).min(1).values,
            torch.full_like(flags[:, 0], -1, dtype=torch.long),
        )

    return first(wrong_gold), first(wrong_pred)


def step_metrics(outputs: dict[str, Tensor]) -> dict[str, float]:
    """Step accuracy; precision / recall / F1 for *detecting wrong steps*; first-error accuracy (the
    model finds the earliest wrong step, or says none is wrong, as ProcessBench scores it)."""
    present = outputs["present"].bool()
    labels = outputs["step_label"][present]
    correct_pred = outputs["step_prob"][present] > 0.5
    gold_wrong, pred_wrong = labels == 0, ~correct_pred
    tp = (gold_wrong & pred_wrong).sum().item()
    fp = (~gold_wrong & pred_wrong).sum().item()
    fn = (gold_wrong & ~pred_wrong).sum().item()
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    first_gold, first_pred = first_errors(outputs)
    found = first_gold == first_pred
    with_error, without_error = first_gold >= 0, first_gold < 0
    on_erroneous = found[with_error].double().mean().item() if with_error.any() else 0.0
    on_correct = found[without_error].double().mean().item() if without_error.any() else 0.0
    steps = labels.numel()
    share_correct = (labels == 1).double().mean().item()
    return {
        "loss": (outputs["loss_sum"].double().sum() / steps).item(),
        "step_accuracy": (correct_pred == (labels == 1)).double().mean().item(),
        "error_precision": precision,
        "error_recall": recall,
        "error_f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "first_error_accuracy": found.double().mean().item(),
        # ProcessBench's score: harmonic mean of the accuracy on rows with and without a wrong step.
        "processbench_f1": 2 * on_erroneous * on_correct / (on_erroneous + on_correct)
        if on_erroneous + on_correct
        else 0.0,
        "majority_baseline": max(share_correct, 1 - share_correct),
        "wrong_steps": float(tp + fn),
        "steps": float(steps),
        "rows": float(present.shape[0]),
    }


def score_steps(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt: Any,
    steps: list[str],
    *,
    step_separator: str | None = None,
    max_length: int | None = None,
) -> list[float]:
    """P(step correct) for each step of one row, with the sequence built exactly as in training.

    ``model`` is a stock ``AutoModelForTokenClassification`` (e.g. from a run's ``model/``); the step
    separator defaults to the one recorded in its config. Steps cut by ``max_length`` get no score.
    """
    saved = getattr(model.config, "rewardctl", None) or {}
    separator = step_separator if step_separator is not None else saved.get("step_separator")
    if separator is None:
        raise ValueError(
            "the model's config does not record its step separator (an adapter over a hub base keeps it "
            "in rewardctl.json); pass step_separator= as trained"
        )
    cfg = PrmConfig(step_separator=separator)
    budget = max_length or getattr(model.config, "max_position_embeddings", None) or 10**9
    encoder = StepEncoder(tokenizer, cfg, budget, Overlength.truncate)
    ids, labels, _, _ = encoder.encode(prompt, steps, [True] * len(steps), training=False)
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids], device=device)).logits[0].float()
    probs = logits.softmax(-1)[:, 1]
    return [float(probs[i]) for i, label in enumerate(labels) if label != IGNORE]
