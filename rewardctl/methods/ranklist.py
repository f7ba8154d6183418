"""Listwise reward modelling: per prompt, K >= 2 responses ranked best first, K free per row.

Rows: ``prompt?`` + ``responses`` (best first; strings or chat message lists), optionally with
``scores`` (then responses are ordered by score, high first, and equal scores form no pair), or
pre-tokenised ``responses_ids``. The tab-separated text form of the RLHF_GLM article is read by
``data.layout=ranked_tsv``. One forward runs over every response of the batch (B lists flattened
into sum(K) rows); losses and metrics run on padded (B, K) tensors with a rank of -1 as padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn

from rewardctl.config.schema import MethodConfig, RunConfig, Truncation
from rewardctl.data.packing import shared_prefix_length
from rewardctl.data.prepare import ROW_COLUMN, featurize_split, require_columns
from rewardctl.data.text import Fit, SequenceEncoder, check_number, check_token_ids, is_conversational, json_kind
from rewardctl.errors import ConfigError, DataError, RowError
from rewardctl.methods.base import Metric, PreparedSplit, StepOutput, feature_key, within_chance
from rewardctl.methods.ranking import PAD_RANK, list_metrics, listmle_loss, pair_count, ranked_pair_loss
from rewardctl.methods.scalar import PREFIX_COLUMN, ScalarRewardMethod
from rewardctl.modeling.tokenizer import tokenizer_identity


class RankLoss(str, Enum):
    pairwise = "pairwise"  # mean over every ordered pair i above j of -log sigma(r_i - r_j)
    listmle = "listmle"  # Plackett-Luce negative log-likelihood of the given order


@dataclass
class RanklistConfig(MethodConfig):
    """Listwise: K >= 2 responses per prompt ranked best first; one forward over all of them."""

    _target_: str = "rewardctl.methods.ranklist.RanklistMethod"
    name: str = "ranklist"
    loss: RankLoss = RankLoss.pairwise
    # With a `scores` column, subtract margin_scale * (s_i - s_j) inside each pair's sigmoid
    # (loss=pairwise only): pairs far apart in score must be separated further.
    score_margin: bool = False
    margin_scale: float = 1.0


def rank_by_scores(scores: Any, size: int) -> tuple[list[int], list[int]]:
    """(order, ranks): response indices sorted by score, high first (stable), and dense ranks in that
    order, so equal scores share a rank and form no pair."""
    if not isinstance(scores, list):
        raise RowError("scores", f"must be a list of numbers, got {json_kind(scores)}")
    if len(scores) != size:
        raise RowError("scores", f"holds {len(scores)} scores for {size} responses; give one score per response")
    scores = [check_number(value, f"scores[{index}]") for index, value in enumerate(scores)]
    order = sorted(range(size), key=lambda k: -scores[k])
    distinct = sorted({float(s) for s in scores}, reverse=True)
    if len(distinct) < 2:
        raise RowError("scores", "are all equal, so the list orders nothing (no pair to learn from)")
    rank_of = {score: rank for rank, score in enumerate(distinct)}
    return order, [rank_of[float(scores[k])] for k in order]


class RanklistMethod(ScalarRewardMethod):
    config_class = RanklistConfig
    primary_metric = "accuracy"
    item_name = "lists"
    report_metrics = ("kendall_tau", "top1_accuracy")

    def verdict(self, final: dict[str, Any]) -> str | None:
        accuracy, pairs = final.get("accuracy"), final.get("pairs", 0)
        if accuracy is not None and within_chance(accuracy, 0.5, pairs):
            return (
                f"held-out pairwise accuracy {accuracy:.3f} on {pairs:.0f} ordered pairs is within chance (0.5), "
                f"Kendall's tau {final.get('kendall_tau', 0.0):.3f}: the model does not yet order the lists"
            )
        return None

    cfg: RanklistConfig

    @classmethod
    def check_config(cls, run: RunConfig) -> None:
        super().check_config(run)
        method: RanklistConfig = run.method
        if method.score_margin and method.loss != RankLoss.pairwise:
            raise ConfigError("method.score_margin", "margins apply to loss=pairwise only (ListMLE has no pairs)")
        if method.margin_scale < 0:
            raise ConfigError("method.margin_scale", f"must be >= 0 (got {method.margin_scale})")

    # ---- data -----------------------------------------------------------------------------------
    def prepare(self, dataset: Any, source: str, *, training: bool) -> PreparedSplit:  # noqa: ARG002 - same for both splits
        columns = require_columns(dataset, source, ("responses",), ("responses_ids",))
        names = set(dataset.column_names)
        has_prompt, has_scores = "prompt" in names, "scores" in names
        if self.cfg.score_margin and not has_scores:
            raise DataError(source, "method.score_margin=true needs a 'scores' column (one number per response)")
        encoder = SequenceEncoder(self.tokenizer, self.run.model.max_length, self.run.data.overlength)
        keep_scores = self.cfg.score_margin
        truncation = self.run.data.truncation

        def featurize(row: dict[str, Any]) -> tuple[dict[str, Any], Fit]:
            field = columns[0]
            responses = row[field]
            if not isinstance(responses, list):
                raise RowError(field, f"must be a list of responses ranked best first, got {json_kind(responses)}")
            if len(responses) < 2:
                raise RowError(field, f"holds {len(responses)} response(s); a ranked list needs at least 2")
            if field == "responses":
                prompt = row["prompt"] if has_prompt else None
                if has_prompt and prompt is None:
                    raise RowError("prompt", "is missing (null) in a dataset with a prompt column")
                if len({is_conversational(r) for r in responses}) > 1:
                    raise RowError(field, "mixes strings and chat message lists; a list must use one format")
                encoded = [encoder.encode(prompt, r, response_field=f"{field}[{k}]") for k, r in enumerate(responses)]
            else:
                encoded = [check_token_ids(r, f"{field}[{k}]", encoder.vocab_size) for k, r in enumerate(responses)]
            if has_scores:
                order, ranks = rank_by_scores(row["scores"], len(encoded))
            else:
                order, ranks = list(range(len(encoded))), list(range(len(encoded)))
            fitted, fit = encoder.fit_group([encoded[k] for k in order], truncation)
            # After truncation: two responses that differ only where it cut are one text to the model.
            _refuse_contradictions({k: fitted[slot] for slot, k in enumerate(order)}, order, ranks, field, truncation)
            features: dict[str, Any] = {
                "responses_ids": fitted,
                "ranks": ranks,
                "order": order,
                PREFIX_COLUMN: shared_prefix_length(fitted),
            }
            if keep_scores:
                features["scores"] = [float(row["scores"][k]) for k in order]
            return features, fit

        featurized, report = featurize_split(
            dataset,
            featurize,
            source=source,
            bad_rows=self.run.data.bad_rows,
            num_proc=self.run.data.num_proc,
            cache_key=feature_key(self.cfg, "score_margin")
            + (self.run.model.max_length, self.run.data.overlength, truncation, tokenizer_identity(self.tokenizer)),
        )
        sizes = featurized.with_format("arrow")[:]["ranks"].combine_chunks().value_lengths().to_pylist()
        histogram = {k: sizes.count(k) for k in sorted(set(sizes))}
        report["responses"] = sum(sizes)
        report["list_sizes"] = histogram
        report["details"] = f"{sum(sizes)} responses; lists by size: " + ", ".join(
            f"K={k}: {n}" for k, n in histogram.items()
        )
        self.report_sharing(featurized, report, ("responses_ids",))
        return PreparedSplit(featurized, report)

    def lengths(self, dataset: Any) -> list[int]:
        """What a list costs in a batch: its packed length with a shared prefix, else its longest
        response (every response is padded to the batch's longest)."""
        if self.shares_prefix:
            return self.packed_lengths(dataset, ("responses_ids",))
        import numpy as np
        import pyarrow.compute as pc

        column = dataset.with_format("arrow")[:]["responses_ids"].combine_chunks()
        token_counts = pc.list_value_length(column.flatten()).to_numpy(zero_copy_only=False)
        starts = column.offsets.to_numpy()[:-1]
        return np.maximum.reduceat(token_counts, starts).tolist()

    def collate(self, features: list[dict[str, Any]]) -> dict[str, Tensor]:
        """``input_ids``/``attention_mask``: every response of every list, list by list, best first;
        ``ranks``: (lists, K) with -1 padding, from which rewards are put back into lists."""
        width = max(len(f["ranks"]) for f in features)
        ranks = torch.full((len(features), width), PAD_RANK, dtype=torch.long)
        order = torch.full((len(features), width), -1, dtype=torch.long)
        for b, f in enumerate(features):
            ranks[b, : len(f["ranks"])] = torch.tensor(f["ranks"], dtype=torch.long)
            order[b, : len(f["order"])] = torch.tensor(f["order"], dtype=torch.long)
        batch = {
            **self.response_batch([f["responses_ids"] for f in features], response_major=False),
            "ranks": ranks,
            "order": order,
        }
        if "scores" in features[0]:
            scores = torch.zeros((len(features), width), dtype=torch.float32)
            for b, f in enumerate(features):
                scores[b, : len(f["scores"])] = torch.tensor(f["scores"], dtype=torch.float32)
            batch["scores"] = scores
        if ROW_COLUMN in features[0]:
            batch["row"] = torch.tensor([f[ROW_COLUMN] for f in features], dtype=torch.long)
        return batch

    # ---- steps ----------------------------------------------------------------------------------
    def batch_weight(self, batch: dict[str, Tensor]) -> Tensor:
        """Pairs for the pairwise loss (the mean runs over all valid pairs), lists for ListMLE."""
        if self.cfg.loss == RankLoss.pairwise:
            return pair_count(batch["ranks"]).sum().float()
        return torch.tensor(float(batch["ranks"].shape[0]))

    def _forward(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """(rewards as (lists, K), per-list loss sums, per-list loss weights)."""
        flat = self.rewards(model, batch)
        ranks = batch["ranks"]
        valid = ranks != PAD_RANK
        rewards = torch.zeros(ranks.shape, dtype=flat.dtype, device=flat.device).masked_scatter(valid, flat)
        if self.cfg.loss == RankLoss.pairwise:
            scores = batch.get("scores") if self.cfg.score_margin else None
            losses, weights = ranked_pair_loss(rewards, ranks, scores, self.cfg.margin_scale)
        else:
            losses, weights = listmle_loss(rewards, ranks), torch.ones(ranks.shape[0], device=flat.device)
        return rewards, losses, weights

    def train_step(self, model: nn.Module, batch: dict[str, Tensor]) -> StepOutput:
        rewards, losses, weights = self._forward(model, batch)
        ranks = batch["ranks"]
        quality = list_metrics(rewards, ranks)
        flat = rewards.detach()[ranks != PAD_RANK]
        metrics = {
            "loss": Metric(losses.detach().float().sum(), weights.float().sum()),
            "accuracy": Metric(quality["correct_pairs"].sum().float(), quality["pairs"].sum().float()),
            "top1_accuracy": Metric.mean_of(quality["top1"].float()),
            "exact_order_accuracy": Metric.mean_of(quality["exact"].float()),
            "kendall_tau": Metric.mean_of(quality["kendall_tau"]),
            "reward_mean": Metric.mean_of(flat),
            "reward_min": Metric.min_of(flat),
            "reward_max": Metric.max_of(flat),
            "tokens": Metric.total(self.token_count(batch)),
            "lists": Metric.total(ranks.shape[0]),
            "responses": Metric.total(flat.numel()),
        }
        return StepOutput(loss_sum=losses.sum(), metrics=metrics)

    def eval_step(self, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        rewards, losses, weights = self._forward(model, batch)
        ranks = batch["ranks"]
        # Zero padding marks absent responses after gathering (processes pad with zeros too).
        out = {
            "rewards": rewards,
            "present": (ranks != PAD_RANK).long(),
            "ranks": ranks,
            "order": batch["order"],
            "loss_sum": losses,
            "loss_weight": weights.float(),
        }
        if "row" in batch:
            out["row"] = batch["row"]
        return out

    @staticmethod
    def _ranks(outputs: dict[str, Tensor]) -> Tensor:
        return outputs["ranks"].masked_fill(outputs["present"] == 0, PAD_RANK)

    def eval_metrics(self, outputs: dict[str, Tensor]) -> dict[str, float]:
        ranks = self._ranks(outputs)
        rewards = outputs["rewards"].double()
        quality = list_metrics(rewards, ranks)
        flat = rewards[ranks != PAD_RANK]
        return {
            "loss": (outputs["loss_sum"].double().sum() / outputs["loss_weight"].double().sum()).item(),
            "accuracy": (quality["correct_pairs"].sum().double() / quality["pairs"].sum()).item(),
            "top1_accuracy": quality["top1"].double().mean().item(),
            "exact_order_accuracy": quality["exact"].double().mean().item(),
            "kendall_tau": quality["kendall_tau"].double().mean().item(),
            "reward_mean": flat.mean().item(),
            "reward_std": flat.std(unbiased=False).item(),
            "reward_min": flat.min().item(),
            "reward_max": flat.max().item(),
            "lists": float(ranks.shape[0]),
            "pairs": float(quality["pairs"].sum().item()),
        }

    #: Ranks drawn one by one in reward_histogram.png; lower ranks share the last series (readable).
    figure_ranks = 5

    def figure_data(self, outputs: dict[str, Tensor]) -> dict[str, Any]:
        """Rewards per gold rank (1 = best): well-ranked lists show the series stacked left to right."""
        ranks = self._ranks(outputs)
        rewards = outputs["rewards"].double()
        lowest = int(ranks.max()) if ranks.numel() else PAD_RANK
        if lowest == PAD_RANK:
            return {}
        series = {}
        for rank in range(min(lowest + 1, self.figure_ranks)):
            merged = rank == self.figure_ranks - 1 and lowest > rank
            members = ranks >= rank if merged else ranks == rank
            label = (
                f"ranks {rank + 1}-{lowest + 1}" if merged else f"rank {rank + 1}" + (" (best)" if rank == 0 else "")
            )
            series[label] = rewards[members].tolist()
        quality = list_metrics(rewards, ranks)
        accuracy = (quality["correct_pairs"].sum().double() / quality["pairs"].sum().clamp(min=1)).item()
        return {
            "reward_histogram": {
                "title": f"Eval rewards by gold rank, {ranks.shape[0]} lists: pairs ordered right {accuracy:.1%}",
                "panels": [{"xlabel": "reward", "series": series}],
            }
        }

    def predictions(self, outputs: dict[str, Tensor]) -> list[dict[str, Any]]:
        """Per list: rewards in the file's response order, and how well they rank the list."""
        ranks = self._ranks(outputs)
        quality = list_metrics(outputs["rewards"].double(), ranks)
        rows = outputs.get("row")
        records = []
        for b in range(ranks.shape[0]):
            size = int((ranks[b] != PAD_RANK).sum())
            order = outputs["order"][b, :size].tolist()
            rewards = [0.0] * size
            gold = [0] * size
            for slot, index in enumerate(order):
                rewards[index] = float(outputs["rewards"][b, slot])
                gold[index] = int(ranks[b, slot])
            records.append(
                {
                    "row": int(rows[b]) + 1 if rows is not None else b + 1,
                    "rewards": rewards,
                    "ranks": gold,
                    "pairwise_accuracy": float(quality["correct_pairs"][b] / quality["pairs"][b]),
                    "top1": bool(quality["top1"][b]),
                    "exact_order": bool(quality["exact"][b]),
                    "kendall_tau": float(quality["kendall_tau"][b]),
                }
            )
        return sorted(records, key=lambda record: record["row"])

    def reward_stats(self, outputs: dict[str, Tensor]) -> tuple[float, float]:
        flat = outputs["rewards"].double()[self._ranks(outputs) != PAD_RANK]
        return flat.mean().item(), flat.std(unbiased=False).item()


def _refuse_contradictions(
    encoded: dict[int, list[int]], order: list[int], ranks: list[int], field: str, truncation: Truncation
) -> None:
    """The same text at two different ranks asks the model for r > r: refuse it by name."""
    seen: dict[tuple[int, ...], tuple[int, int]] = {}
    for slot, index in enumerate(order):
        key = tuple(encoded[index])
        if key in seen and seen[key][1] != ranks[slot]:
            hint = (
                " (or became so when data.truncation=sequence_end cut their starts; data.truncation=prompt_end "
                "keeps them)"
                if truncation == Truncation.sequence_end
                else ""
            )
            raise RowError(
                field,
                f"responses {seen[key][0]} and {index} are identical but ranked differently{hint}; "
                "data.bad_rows=skip leaves such lists out",
            )
        seen.setdefault(key, (index, ranks[slot]))
