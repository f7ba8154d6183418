"""The reward statistics saved with a model when the run had no eval set: from a sample of train rows.

``rewardctl score normalize=true`` and ``rewardctl serve`` return ``(r - mean) / std``; the mean and
std come from the last eval (``Method.record_reward_stats`` after every eval). A run without an eval
set still gets them: one no-grad pass of the final model over a fixed, seeded sample of its training
rows, taken with the same eval code path (so the statistic is the same one an eval would give).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from rewardctl.config.schema import RunConfig
from rewardctl.methods.base import Method
from rewardctl.training.evaluation import eval_loader, run_evaluation

log = logging.getLogger(__name__)

#: Rows of the train set read for the statistics: a standard error of the mean of ~4% of a std.
TRAIN_SAMPLE_ROWS = 512


def stats_from_train_sample(method: Method, run: RunConfig, accelerator: Any, model: nn.Module, dataset: Any) -> None:
    """Collective (every process calls it): the final model scores a seeded sample of train rows and
    the method keeps the reward mean / std (``Method.record_reward_stats``)."""
    if not method.reward_columns:  # no scalar reward to normalise (prm's step probabilities)
        return
    sample = dataset.shuffle(seed=run.train.seed).select(range(min(len(dataset), TRAIN_SAMPLE_ROWS)))
    loader = eval_loader(method, run, accelerator, sample)
    try:
        _, outputs = run_evaluation(accelerator, method, model, loader)
    except torch.cuda.OutOfMemoryError:
        raise
    except RuntimeError as exc:  # e.g. BCO with precomputed reference tables and no eval split
        log.warning("no reward statistics saved with the model (%s); scores cannot be normalised", exc)
        return
    method.record_reward_stats(outputs)
    if method.reward_normalization is not None:
        stats = method.reward_normalization
        log.info(
            "reward statistics from %d train rows (no eval set): mean %.4g, std %.4g",
            len(sample),
            stats["reward_mean"],
            stats["reward_std"],
        )
