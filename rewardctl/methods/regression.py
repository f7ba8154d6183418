"""Pointwise reward regression on scalar scores (one file: the proof that a method is one module + one YAML).

Rows: ``prompt?``, ``response`` (a string or a chat message list) and either ``score`` (a number) or
``scores`` (an object of named attributes, HelpSteer2-style: ``{"helpfulness": 3, "verbosity": 1}``).
The model is a stock ``AutoModelForSequenceClassification`` with one output per attribute, the
attribute names in ``id2label``. The loss is MSE or Huber per attribute, weighted and averaged;
``standardize`` trains on z-scores of the train set (its mean and std are saved in the model's
config.json under ``rewardctl``, so ``output * std + mean`` is back on the data's scale).

This module imports only ``rewardctl.methods.api``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn

from rewardctl.methods.api import (
    ROW_COLUMN,
    ConfigError,
    DataError,
    MethodConfig,
    Metric,
    PreparedSplit,
    RowError,
    RunConfig,
    ScalarRewardMethod,
    SequenceEncoder,
    StepOutput,
    cells_are_text,
    check_number,
    feature_key,
    featurize_split,
    list_lengths,
    read_saved_meta,
    require_columns,
    tokenizer_identity,
)

log = logging.getLogger(__name__)
NO_GROUP = -1  # a row without a prompt column forms no same-prompt pairs


class RegressionLoss(str, Enum):
    mse = "mse"
    huber = "huber"


@dataclass
class RegressionConfig(MethodConfig):
    """Pointwise regression: L = mean over rows of sum_a w_a * rho(pred_a - y_a) / sum_a w_a."""

    _target_: str = "rewardctl.methods.regression.RegressionMethod"
    name: str = "regression"
    # The outputs, in order. null: one output `score` from a `score` column, or the keys of the
    # `scores` objects (sorted, so train and eval agree whatever order a file writes them in).
    attributes: list[str] | None = None
    loss: RegressionLoss = RegressionLoss.mse
    # Huber's delta, in the units the loss sees (z-scores with standardize=true).
    huber_delta: float = 1.0
    # Per-attribute loss weights; an attribute not named weighs 1.
    weights: dict[str, float] = field(default_factory=dict)
    # Train on (y - mean) / std of the train set per attribute: attributes on different scales weigh alike.
    standardize: bool = False


# ---- the loss and the metrics: pure functions ---------------------------------------------------
def regression_loss(
    predictions: Tensor,
    targets: Tensor,
    *,
    kind: RegressionLoss | str = RegressionLoss.mse,
    huber_delta: float = 1.0,
    weights: Tensor | None = None,
) -> Tensor:
    """Per-row loss, shape (N,), from predictions and targets of shape (N, A):

        l_i = sum_a w_a * rho(p_ia - y_ia) / sum_a w_a
        rho(e) = e^2                                  (mse)
        rho(e) = e^2 / 2 if |e| <= d, else d * (|e| - d / 2)   (huber, d = huber_delta)

    Typical values: on standardised targets a model that predicts the mean has an MSE of 1; a useful
    reward model reaches 0.3-0.7 on held-out rows of real preference data. Huber grows linearly past
    ``d``, so a few mislabelled rows pull less on the fit.
    """
    if predictions.shape != targets.shape or predictions.ndim != 2:
        raise ValueError(
            f"predictions and targets must both be (N, A); got {tuple(predictions.shape)} and {tuple(targets.shape)}"
        )
    error = predictions.float() - targets.float()
    if RegressionLoss(kind) == RegressionLoss.huber:
        per = nn.functional.huber_loss(predictions.float(), targets.float(), reduction="none", delta=huber_delta)
    else:
        per = error.pow(2)
    if weights is None:
        return per.mean(dim=1)
    weights = weights.to(per)
    return (per * weights).sum(dim=1) / weights.sum()


def average_ranks(values: Tensor) -> Tensor:
    """0-based ranks of a 1-D tensor, ties sharing their mean rank (what Spearman's rho needs)."""
    ordered, order = torch.sort(values.double())
    _, inverse, counts = torch.unique_consecutive(ordered, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    mean_rank = ends - (counts.double() + 1) / 2
    ranks = torch.empty_like(ordered)
    ranks[order] = mean_rank[inverse]
    return ranks


def pearson(x: Tensor, y: Tensor) -> float:
    """Pearson's r of two 1-D tensors; NaN when either is constant (no linear relation to measure)."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denominator = (x.pow(2).sum() * y.pow(2).sum()).sqrt()
    return (x * y).sum().item() / denominator.item() if denominator > 0 else math.nan


def spearman(x: Tensor, y: Tensor) -> float:
    """Spearman's rho: Pearson's r of the average ranks."""
    return pearson(average_ranks(x), average_ranks(y))


def same_prompt_pair_accuracy(predictions: Tensor, targets: Tensor, groups: Tensor) -> tuple[float, int]:
    """Over every pair of responses to the same prompt (same group >= 0) with different targets, the
    share the predictions order the same way (strictly); and the number of such pairs."""
    correct, pairs = 0, 0
    order = torch.argsort(groups, stable=True)
    groups, predictions, targets = groups[order], predictions[order].double(), targets[order].double()
    _, counts = torch.unique_consecutive(groups, return_counts=True)
    for start, count in zip((counts.cumsum(0) - counts).tolist(), counts.tolist(), strict=True):
        if count < 2 or groups[start] < 0:
            continue
        p, t = predictions[start : start + count], targets[start : start + count]
        upper = torch.triu(torch.ones(count, count, dtype=torch.bool), diagonal=1)
        t_diff, p_diff = (t[:, None] - t[None, :])[upper], (p[:, None] - p[None, :])[upper]
        ranked = t_diff != 0
        pairs += int(ranked.sum())
        correct += int(((p_diff * t_diff.sign()) > 0)[ranked].sum())
    return (correct / pairs if pairs else math.nan), pairs


def prompt_group(prompt: Any) -> int:
    """A stable id of a prompt (the same in every process and run): its text's hash, 63 bits."""
    digest = hashlib.blake2b(repr(prompt).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# ---- the method -----------------------------------------------------------------------------------
class RegressionMethod(ScalarRewardMethod):
    config_class = RegressionConfig
    primary_metric = "spearman"
    item_name = "responses"
    report_metrics = ("pearson", "mae", "pairwise_accuracy")

    def verdict(self, final: dict[str, Any]) -> str | None:
        spearman, responses = final.get("spearman"), final.get("responses", 0)
        if spearman is not None and math.isnan(spearman):
            return "the predictions are constant (Spearman undefined): the head has collapsed to one value"
        # Spearman's rho under independence has a standard error of about 1 / sqrt(n - 1).
        if spearman is not None and responses > 1 and abs(spearman) <= 2 / (responses - 1) ** 0.5:
            return (
                f"held-out Spearman {spearman:.3f} on {responses:.0f} responses is within chance (0): the "
                "predictions do not yet order the scores"
            )
        return None

    shares_prefix = False  # one response per row: no prefix to share
    cfg: RegressionConfig

    def __init__(self, cfg: RegressionConfig, run: RunConfig) -> None:
        super().__init__(cfg, run)
        self.attributes: tuple[str, ...] | None = tuple(cfg.attributes) if cfg.attributes else None
        self.target_mean: Tensor | None = None
        self.target_std: Tensor | None = None
        self._loss_weights: Tensor | None = None

    @classmethod
    def check_config(cls, run: RunConfig) -> None:
        super().check_config(run)
        cfg = run.method
        if run.data.share_prefix == "true":
            raise ConfigError(
                "data.share_prefix",
                "regression scores one response per row: there is no prefix to share; use auto or false",
            )
        if cfg.attributes is not None and (not cfg.attributes or len(set(cfg.attributes)) != len(cfg.attributes)):
            raise ConfigError(
                "method.attributes", f"must be distinct names, at least one, or null (got {cfg.attributes})"
            )
        if cfg.huber_delta <= 0:
            raise ConfigError("method.huber_delta", f"must be > 0 (got {cfg.huber_delta})")
        if any(w < 0 or not math.isfinite(w) for w in cfg.weights.values()) or (
            cfg.weights and not any(cfg.weights.values())
        ):
            raise ConfigError("method.weights", f"must be finite, >= 0 and not all 0 (got {dict(cfg.weights)})")
        unknown = set(cfg.weights) - set(cfg.attributes or cfg.weights)
        if unknown:
            raise ConfigError("method.weights", f"names no attribute in method.attributes: {sorted(unknown)}")

    # ---- outputs ----------------------------------------------------------------------------------
    @property
    def output_labels(self) -> tuple[str, ...]:
        if self.attributes is None:
            raise RuntimeError("the attributes are known once a split is prepared")
        return self.attributes

    def _resolve_attributes(self, dataset: Any, source: str) -> tuple[str, ...]:
        if self.attributes is not None:
            return self.attributes
        if "scores" in dataset.column_names:
            feature = dataset.features["scores"]
            keys = (
                list(feature)
                if isinstance(feature, dict)
                else next((list(v) for v in dataset["scores"] if isinstance(v, dict) and v), [])
            )
            if not keys:
                raise DataError(
                    source,
                    "column 'scores' holds no attribute names; write objects such as "
                    '{"helpfulness": 3} or set method.attributes',
                    field="scores",
                )
            return tuple(sorted(keys))
        require_columns(dataset, source, ("response", "score"), ("response", "scores"))
        return ("score",)

    def _weights(self) -> Tensor:
        """Per-attribute loss weights in output order, built once the attributes are known (not per step)."""
        if self._loss_weights is None:
            unknown = set(self.cfg.weights) - set(self.output_labels)
            if unknown:
                raise ConfigError(
                    "method.weights",
                    f"names no attribute of the data ({', '.join(self.output_labels)}): {sorted(unknown)}",
                )
            self._loss_weights = torch.tensor(
                [self.cfg.weights.get(a, 1.0) for a in self.output_labels], dtype=torch.float32
            )
        return self._loss_weights

    # ---- data ---------------------------------------------------------------------------------------
    def prepare(self, dataset: Any, source: str, *, training: bool) -> PreparedSplit:
        self.attributes = attributes = self._resolve_attributes(dataset, source)
        self._weights()  # unknown weight names fail before tokenising
        single = attributes == ("score",) and "score" in dataset.column_names
        require_columns(dataset, source, ("response", "score") if single else ("response", "scores"))
        has_prompt = "prompt" in dataset.column_names
        encoder = SequenceEncoder(self.tokenizer, self.run.model.max_length, self.run.data.overlength)
        text_cells = cells_are_text(dataset)

        def targets(row: dict[str, Any]) -> list[float]:
            if single:
                return [check_number(row["score"], "score", text_cells=text_cells)]
            scores = row["scores"]
            if not isinstance(scores, dict):
                raise RowError("scores", f"must be an object of attribute -> number, got {type(scores).__name__}")
            missing = [a for a in attributes if scores.get(a) is None]
            if missing:
                raise RowError(f"scores.{missing[0]}", "is missing")
            return [check_number(scores[a], f"scores.{a}", text_cells=text_cells) for a in attributes]

        def featurize(row: dict[str, Any]) -> tuple[dict[str, Any], Any]:
            prompt = row["prompt"] if has_prompt else None
            if has_prompt and prompt is None:
                raise RowError("prompt", "is missing (null) in a dataset with a prompt column")
            values = targets(row)
            ids, fit = encoder.fit(encoder.encode(prompt, row["response"], response_field="response"))
            return {"input_ids": ids, "targets": values, "group": prompt_group(prompt) if has_prompt else NO_GROUP}, fit

        featurized, report = featurize_split(
            dataset,
            featurize,
            source=source,
            bad_rows=self.run.data.bad_rows,
            num_proc=self.run.data.num_proc,
            cache_key=feature_key(self.cfg, "attributes")
            + (attributes, self.run.model.max_length, self.run.data.overlength, tokenizer_identity(self.tokenizer)),
        )
        values = torch.tensor(featurized["targets"], dtype=torch.float64).reshape(len(featurized), len(attributes))
        if training and self.cfg.standardize:
            self.target_mean, self.target_std = values.mean(0), values.std(0, unbiased=False)
            constant = [a for a, s in zip(attributes, self.target_std.tolist(), strict=True) if s == 0]
            if constant:
                log.warning("attribute(s) %s are constant in %s: not scaled", ", ".join(constant), source)
                self.target_std = torch.where(self.target_std == 0, torch.ones_like(self.target_std), self.target_std)
        report["attributes"] = list(attributes)
        report["score_mean"] = [round(v, 4) for v in values.mean(0).tolist()]
        report["score_std"] = [round(v, 4) for v in values.std(0, unbiased=False).tolist()]
        report["details"] = "attributes " + ", ".join(
            f"{a} (mean {m:.3g}, std {s:.3g})"
            for a, m, s in zip(attributes, report["score_mean"], report["score_std"], strict=True)
        )
        return PreparedSplit(featurized, report)

    def lengths(self, dataset: Any) -> list[int]:
        return list_lengths(dataset, "input_ids")

    def collate(self, features: list[dict[str, Any]]) -> dict[str, Tensor]:
        batch = self.response_batch([[f["input_ids"]] for f in features], response_major=False)
        batch["targets"] = torch.tensor([f["targets"] for f in features], dtype=torch.float32)
        batch["group"] = torch.tensor([f["group"] for f in features], dtype=torch.long)
        if ROW_COLUMN in features[0]:
            batch["row"] = torch.tensor([f[ROW_COLUMN] for f in features], dtype=torch.long)
        return batch

    # ---- scale ----------------------------------------------------------------------------------------
    def _scaled(self, targets: Tensor) -> Tensor:
        """Targets in the units the model learns (z-scores with standardize=true)."""
        if self.target_mean is None:
            return targets
        return (targets - self.target_mean.to(targets)) / self.target_std.to(targets)

    def _unscaled(self, outputs: Tensor) -> Tensor:
        """Model outputs back on the data's scale."""
        if self.target_mean is None:
            return outputs
        return outputs * self.target_std.to(outputs) + self.target_mean.to(outputs)

    # ---- steps ------------------------------------------------------------------------------------------
    def batch_weight(self, batch: dict[str, Tensor]) -> Tensor:
        return torch.tensor(float(batch["targets"].shape[0]))

    def _forward(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        outputs = self.rewards(model, batch).reshape(batch["targets"].shape)
        if self._weights().device != outputs.device:
            self._loss_weights = self._loss_weights.to(outputs.device)
        losses = regression_loss(
            outputs,
            self._scaled(batch["targets"]),
            kind=self.cfg.loss,
            huber_delta=self.cfg.huber_delta,
            weights=self._loss_weights,
        )
        return outputs, losses

    def train_step(self, model: nn.Module, batch: dict[str, Tensor]) -> StepOutput:
        outputs, losses = self._forward(model, batch)
        error = self._unscaled(outputs.detach()) - batch["targets"]
        metrics = {
            "loss": Metric.mean_of(losses),
            "mse": Metric.mean_of(error.pow(2)),
            "mae": Metric.mean_of(error.abs()),
            "tokens": Metric.total(self.token_count(batch)),
            "responses": Metric.total(outputs.shape[0]),
        }
        return StepOutput(loss_sum=losses.sum(), metrics=metrics)

    def eval_step(self, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        outputs, losses = self._forward(model, batch)
        out = {
            "prediction": self._unscaled(outputs),
            "target": batch["targets"],
            "group": batch["group"],
            "loss": losses,
        }
        if "row" in batch:
            out["row"] = batch["row"]
        return out

    def eval_metrics(self, outputs: dict[str, Tensor]) -> dict[str, float]:
        predictions, targets, groups = outputs["prediction"].double(), outputs["target"].double(), outputs["group"]
        per_attribute: dict[str, list[float]] = {
            "mse": [],
            "mae": [],
            "pearson": [],
            "spearman": [],
            "pairwise_accuracy": [],
        }
        metrics: dict[str, float] = {"loss": outputs["loss"].double().mean().item()}
        pairs = 0
        for a, name in enumerate(self.output_labels):
            p, t = predictions[:, a], targets[:, a]
            accuracy, pairs = same_prompt_pair_accuracy(p, t, groups)
            values = {
                "mse": (p - t).pow(2).mean().item(),
                "mae": (p - t).abs().mean().item(),
                "pearson": pearson(p, t),
                "spearman": spearman(p, t),
                "pairwise_accuracy": accuracy,
            }
            for key, value in values.items():
                per_attribute[key].append(value)
                if len(self.output_labels) > 1:
                    metrics[f"{key}_{name}"] = value
            if len(self.output_labels) > 1:  # ties differ per attribute, and so do the pairs they leave
                metrics[f"pairs_{name}"] = float(pairs)
        for key, values in per_attribute.items():  # several attributes: the mean over them
            metrics[key] = sum(values) / len(values)
        metrics["prediction_mean"] = predictions.mean().item()
        metrics["prediction_std"] = predictions.std(unbiased=False).item()
        metrics["responses"] = float(predictions.shape[0])
        metrics["pairs"] = float(pairs)  # of the last attribute (each one's count: pairs_<name>)
        return metrics

    def figure_data(self, outputs: dict[str, Tensor]) -> dict[str, Any]:
        """Per attribute, predicted against target scores on the data's scale: their distributions
        (a head squeezed to the mean shows as a narrow spike) and each response as a point."""
        predictions, targets = outputs["prediction"].double(), outputs["target"].double()
        responses = predictions.shape[0]
        if responses == 0:
            return {}
        histograms, scatters = [], []
        for a, name in enumerate(self.output_labels):
            p, t = predictions[:, a], targets[:, a]
            histograms.append(
                {"title": name, "xlabel": "score", "series": {"target": t.tolist(), "prediction": p.tolist()}}
            )
            scatters.append(
                {
                    "title": f"{name}: Spearman {spearman(p, t):.3f}, MAE {(p - t).abs().mean().item():.3g}",
                    "target": t.tolist(),
                    "prediction": p.tolist(),
                }
            )
        return {
            "reward_histogram": {
                "title": f"Eval predictions against targets, {responses} responses",
                "panels": histograms,
            },
            "prediction_scatter": {
                "title": f"Predicted against target scores, {responses} responses",
                "panels": scatters,
            },
        }

    def predictions(self, outputs: dict[str, Tensor]) -> list[dict[str, Any]]:
        rows = outputs.get("row")
        records = []
        for i, (p, t) in enumerate(zip(outputs["prediction"].tolist(), outputs["target"].tolist(), strict=True)):
            records.append(
                {
                    "row": int(rows[i]) + 1 if rows is not None else i + 1,
                    "prediction": dict(zip(self.output_labels, p, strict=True)),
                    "target": dict(zip(self.output_labels, t, strict=True)),
                }
            )
        return sorted(records, key=lambda record: record["row"])

    scores_responses_alone = True  # trained on one response at a time, each fitted by itself

    def scored_values(self, rewards: Tensor) -> Tensor:
        """Scores on the data's scale, one column per attribute."""
        return self._unscaled(rewards.double()).float()

    def reward_stats(self, outputs: dict[str, Tensor]) -> tuple[float, float] | None:
        """Of the one predicted attribute; None with several (each keeps its own scale)."""
        predictions = outputs["prediction"].double().reshape(outputs["prediction"].shape[0], -1)
        if predictions.shape[1] != 1:
            return None
        return predictions.mean().item(), predictions.std(unbiased=False).item()

    # ---- what travels with the model and the checkpoints ------------------------------------------------
    def load_trained(self, path: Any) -> nn.Module:
        if self.attributes is None:  # export: no split was prepared; the saved model names its outputs
            self.attributes = tuple(read_saved_meta(path).get("attributes") or ("score",))
        return super().load_trained(path)

    def saved_facts(self) -> dict[str, Any]:
        facts: dict[str, Any] = {"attributes": list(self.output_labels), "standardize": self.cfg.standardize}
        if self.target_mean is not None:  # output * std + mean is on the data's scale
            facts["score_mean"] = self.target_mean.tolist()
            facts["score_std"] = self.target_std.tolist()
        return facts

    def restore_facts(self, facts: dict[str, Any]) -> None:
        if "score_mean" in facts:
            self.target_mean = torch.tensor(facts["score_mean"], dtype=torch.float64)
            self.target_std = torch.tensor(facts["score_std"], dtype=torch.float64)

    def state_dict(self) -> dict[str, Tensor]:
        # The attribute names as UTF-8 bytes of a JSON list: a checkpoint rebuilds the model's outputs
        # (rewardctl export checkpoint=step-N) without reading any data.
        state = {
            "attributes_json": torch.tensor(list(json.dumps(list(self.output_labels)).encode()), dtype=torch.uint8)
        }
        if self.target_mean is not None:
            state.update(target_mean=self.target_mean, target_std=self.target_std)
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if "attributes_json" in state and self.attributes is None:
            self.attributes = tuple(json.loads(bytes(state["attributes_json"].tolist()).decode()))
        if "target_mean" in state:
            self.target_mean, self.target_std = state["target_mean"].double(), state["target_std"].double()
