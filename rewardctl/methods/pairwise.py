"""Pairwise (Bradley-Terry) reward modelling.

Rows: ``prompt?``, ``chosen``, ``rejected``, optional ``margin``; strings or chat message lists, or
pre-tokenised ``chosen_ids``/``rejected_ids``. One forward over chosen and rejected stacked as 2B rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from rewardctl.config.schema import MethodConfig, RunConfig, Truncation
from rewardctl.data.packing import shared_prefix_length
from rewardctl.data.prepare import ROW_COLUMN, cells_are_text, featurize_split, list_lengths, require_columns
from rewardctl.data.text import Fit, SequenceEncoder, check_number, check_token_ids, is_conversational
from rewardctl.errors import ConfigError, RowError
from rewardctl.methods.base import Metric, PreparedSplit, StepOutput, feature_key, within_chance
from rewardctl.methods.calibration import calibration_table, expected_calibration_error
from rewardctl.methods.scalar import PREFIX_COLUMN, ScalarRewardMethod
from rewardctl.modeling.tokenizer import tokenizer_identity

PRETOKENIZED = (("chosen_ids", "rejected_ids"), ("chosen_input_ids", "rejected_input_ids"))


@dataclass
class PairwiseConfig(MethodConfig):
    """Bradley-Terry: L = -mean log sigma(r_c - r_r - m) + c * mean((r_c + r_r)^2)."""

    _target_: str = "rewardctl.methods.pairwise.PairwiseMethod"
    name: str = "pairwise"
    # c in the centering term (arXiv 2312.09244 recommends 0.01); null disables it.
    center_rewards_coefficient: Optional[float] = None
    # Use the per-row `margin` column when the data has one.
    use_margin: bool = True


def bradley_terry_loss(
    chosen: Tensor, rejected: Tensor, margin: Tensor | None = None, center_coefficient: float | None = None
) -> Tensor:
    """Per-pair loss ``-log sigma(r_c - r_r - m) + c * (r_c + r_r)^2``, shape (B,).

    Every input must be exactly (B,): a (B, 1) reward against a (B,) margin would broadcast to (B, B)
    and silently mix every margin with every pair (the bug of TRL before v0.24).
    """
    if chosen.ndim != 1 or rejected.shape != chosen.shape:
        raise ValueError(
            f"rewards must both have shape (B,); got chosen {tuple(chosen.shape)}, rejected {tuple(rejected.shape)}"
        )
    if margin is not None and margin.shape != chosen.shape:
        raise ValueError(f"margin must have shape {tuple(chosen.shape)}; got {tuple(margin.shape)}")
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin.to(diff.dtype)
    losses = -nn.functional.logsigmoid(diff)
    if center_coefficient:
        losses = losses + center_coefficient * (chosen + rejected).pow(2)
    return losses


class PairwiseMethod(ScalarRewardMethod):
    config_class = PairwiseConfig
    primary_metric = "accuracy"
    item_name = "pairs"
    report_metrics = ("margin",)

    def verdict(self, final: dict[str, Any]) -> str | None:
        accuracy, pairs = final.get("accuracy"), final.get("pairs", 0)
        if accuracy is not None and within_chance(accuracy, 0.5, pairs):
            return (
                f"held-out accuracy {accuracy:.3f} on {pairs:.0f} pairs is within chance (0.5): the model does not "
                "yet prefer the chosen answers (more steps, a higher train.lr, or a stronger model)"
            )
        return None

    cfg: PairwiseConfig

    @classmethod
    def check_config(cls, run: RunConfig) -> None:
        super().check_config(run)
        coefficient = run.method.center_rewards_coefficient
        if coefficient is not None and coefficient < 0:
            raise ConfigError(
                "method.center_rewards_coefficient",
                f"must be >= 0 or null (got {coefficient}); a "
                "negative centering term rewards pushing every reward apart without bound",
            )

    # ---- data -----------------------------------------------------------------------------------
    def prepare(self, dataset: Any, source: str, *, training: bool) -> PreparedSplit:  # noqa: ARG002 - same for both splits
        columns = require_columns(dataset, source, ("chosen", "rejected"), *PRETOKENIZED)
        use_margin = self.cfg.use_margin and "margin" in dataset.column_names
        encoder = SequenceEncoder(self.tokenizer, self.run.model.max_length, self.run.data.overlength)
        has_prompt = "prompt" in dataset.column_names
        truncation = self.run.data.truncation
        text_cells = cells_are_text(dataset)

        def featurize(row: dict[str, Any]) -> tuple[dict[str, Any], Fit]:
            if columns[0] == "chosen":
                prompt = row["prompt"] if has_prompt else None
                if has_prompt and prompt is None:
                    raise RowError("prompt", "is missing (null) in a dataset with a prompt column")
                if is_conversational(row["chosen"]) != is_conversational(row["rejected"]):
                    raise RowError(
                        "rejected",
                        "is not in the same format as 'chosen' (one is a message list, "
                        "the other a string); a pair must use one format",
                    )
                chosen = encoder.encode(prompt, row["chosen"], response_field="chosen")
                rejected = encoder.encode(prompt, row["rejected"], response_field="rejected")
            else:
                chosen = check_token_ids(row[columns[0]], columns[0], encoder.vocab_size)
                rejected = check_token_ids(row[columns[1]], columns[1], encoder.vocab_size)
            (chosen, rejected), fit = encoder.fit_group([chosen, rejected], truncation)
            if chosen == rejected:
                _refuse_identical(columns[1], truncation)
            features: dict[str, Any] = {
                "chosen_ids": chosen,
                "rejected_ids": rejected,
                PREFIX_COLUMN: shared_prefix_length([chosen, rejected]),
            }
            if use_margin:
                features["margin"] = check_number(row["margin"], "margin", text_cells=text_cells)
            return features, fit

        featurized, report = featurize_split(
            dataset,
            featurize,
            source=source,
            bad_rows=self.run.data.bad_rows,
            num_proc=self.run.data.num_proc,
            cache_key=feature_key(self.cfg, "use_margin")
            + (self.run.model.max_length, self.run.data.overlength, truncation, tokenizer_identity(self.tokenizer)),
        )
        report["margin"] = use_margin
        self.report_sharing(featurized, report, ("chosen_ids", "rejected_ids"))
        return PreparedSplit(featurized, report)

    def lengths(self, dataset: Any) -> list[int]:
        if self.shares_prefix:
            return self.packed_lengths(dataset, ("chosen_ids", "rejected_ids"))
        return list_lengths(dataset, "chosen_ids", "rejected_ids")

    def collate(self, features: list[dict[str, Any]]) -> dict[str, Tensor]:
        batch = self.response_batch([[f["chosen_ids"], f["rejected_ids"]] for f in features], response_major=True)
        if "margin" in features[0]:
            batch["margin"] = torch.tensor([f["margin"] for f in features], dtype=torch.float32)
        if ROW_COLUMN in features[0]:
            batch["row"] = torch.tensor([f[ROW_COLUMN] for f in features], dtype=torch.long)
        return batch

    # ---- steps ----------------------------------------------------------------------------------
    def batch_weight(self, batch: dict[str, Tensor]) -> Tensor:
        return torch.tensor(self.response_count(batch) // 2, dtype=torch.float32)

    def _rewards(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        chosen, rejected = self.rewards(model, batch).chunk(2)
        losses = bradley_terry_loss(chosen, rejected, batch.get("margin"), self.cfg.center_rewards_coefficient)
        return chosen, rejected, losses

    def train_step(self, model: nn.Module, batch: dict[str, Tensor]) -> StepOutput:
        chosen, rejected, losses = self._rewards(model, batch)
        rewards = torch.cat([chosen, rejected]).detach()
        metrics = {
            "loss": Metric.mean_of(losses),
            "accuracy": Metric.mean_of((chosen > rejected).float()),
            "margin": Metric.mean_of(chosen - rejected),
            "reward_mean": Metric.mean_of(rewards),
            "reward_min": Metric.min_of(rewards),
            "reward_max": Metric.max_of(rewards),
            "tokens": Metric.total(self.token_count(batch)),
            "pairs": Metric.total(chosen.shape[0]),
        }
        return StepOutput(loss_sum=losses.sum(), metrics=metrics)

    def eval_step(self, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        chosen, rejected, losses = self._rewards(model, batch)
        out = {"chosen_reward": chosen, "rejected_reward": rejected, "loss": losses}
        if "row" in batch:
            out["row"] = batch["row"]
        return out

    def eval_metrics(self, outputs: dict[str, Tensor]) -> dict[str, float]:
        chosen, rejected = outputs["chosen_reward"].double(), outputs["rejected_reward"].double()
        rewards = torch.cat([chosen, rejected])
        return {
            "loss": outputs["loss"].double().mean().item(),
            "accuracy": (chosen > rejected).double().mean().item(),
            "margin": (chosen - rejected).mean().item(),
            "reward_mean": rewards.mean().item(),
            "reward_std": rewards.std(unbiased=False).item(),
            "reward_min": rewards.min().item(),
            "reward_max": rewards.max().item(),
            # How far P(chosen wins) = sigma(r_c - r_r) is from the observed win rate (0: calibrated).
            "ece": expected_calibration_error(chosen, rejected),
            "pairs": float(chosen.numel()),
        }

    def figure_data(self, outputs: dict[str, Tensor]) -> dict[str, Any]:
        """Chosen against rejected rewards (how far apart the two sides sit, not only how often they
        are ordered right) and the reliability of sigma(r_c - r_r) as a win probability."""
        chosen, rejected = outputs["chosen_reward"].double(), outputs["rejected_reward"].double()
        pairs = chosen.numel()
        if pairs == 0:
            return {}
        won = (chosen > rejected).double().mean().item()
        return {
            "reward_histogram": {
                "title": f"Eval rewards, {pairs} pairs: chosen above rejected in {won:.1%}",
                "panels": [{"xlabel": "reward", "series": {"chosen": chosen.tolist(), "rejected": rejected.tolist()}}],
            },
            "calibration": {
                "bins": calibration_table(chosen, rejected),
                "ece": expected_calibration_error(chosen, rejected),
                "pairs": pairs,
            },
        }

    def predictions(self, outputs: dict[str, Tensor]) -> list[dict[str, Any]]:
        rows = outputs.get("row")
        records = []
        for i, (c, r) in enumerate(
            zip(outputs["chosen_reward"].tolist(), outputs["rejected_reward"].tolist(), strict=True)
        ):
            records.append(
                {
                    "row": int(rows[i]) + 1 if rows is not None else i + 1,
                    "chosen_reward": c,
                    "rejected_reward": r,
                    "correct": c > r,
                }
            )
        return sorted(records, key=lambda record: record["row"])

    def reward_stats(self, outputs: dict[str, Tensor]) -> tuple[float, float]:
        rewards = torch.cat([outputs["chosen_reward"], outputs["rejected_reward"]]).double()
        return rewards.mean().item(), rewards.std(unbiased=False).item()


def _refuse_identical(field: str, truncation: Truncation) -> None:
    """A pair whose two sides are one token sequence asks for r > r: refuse it, as ranklist refuses
    identical responses at different ranks."""
    hint = (
        " (or became so when data.truncation=sequence_end cut their starts; data.truncation=prompt_end keeps "
        "them apart)"
        if truncation == Truncation.sequence_end
        else ""
    )
    raise RowError(
        field,
        f"is identical to the chosen response after tokenisation{hint}, so the pair teaches "
        "nothing; data.bad_rows=skip leaves such pairs out",
    )
