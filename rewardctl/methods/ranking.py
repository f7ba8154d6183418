"""Listwise losses and metrics over ragged ranked lists, vectorised (no Python loop over pairs).

A batch of B lists is held as (B, K) tensors, K the longest list of the batch: ``rewards``,
``ranks`` (0 = best; equal ranks are ties; -1 marks padding) and optional ``scores``. Every
function here is pure tensor code, so it is unit-tested by hand and shared by training and eval.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

PAD_RANK = -1


def _check(rewards: Tensor, ranks: Tensor) -> Tensor:
    if rewards.ndim != 2 or ranks.shape != rewards.shape:
        raise ValueError(
            f"rewards and ranks must both be (lists, K); got {tuple(rewards.shape)} and {tuple(ranks.shape)}"
        )
    return ranks != PAD_RANK


def ordered_pairs(ranks: Tensor) -> Tensor:
    """(B, K, K) mask of pairs (i, j) where response i is ranked strictly above response j."""
    valid = ranks != PAD_RANK
    return valid[:, :, None] & valid[:, None, :] & (ranks[:, :, None] < ranks[:, None, :])


def pair_count(ranks: Tensor) -> Tensor:
    """Ordered pairs per list, shape (B,): K(K-1)/2 for a list without ties."""
    return ordered_pairs(ranks).sum(dim=(1, 2))


def ranked_pair_loss(
    rewards: Tensor, ranks: Tensor, scores: Tensor | None = None, margin_scale: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Per-list sum of ``-log sigma(r_i - r_j - m_ij)`` over every pair i ranked above j, and the
    per-list pair count. Dividing the batch's summed losses by its summed counts gives the mean over
    all valid pairs of the batch; with K = 2 this is exactly the Bradley-Terry pairwise loss."""
    _check(rewards, ranks)
    pairs = ordered_pairs(ranks)
    diff = rewards[:, :, None] - rewards[:, None, :]
    if scores is not None:
        diff = diff - margin_scale * (scores[:, :, None] - scores[:, None, :]).to(diff.dtype)
    losses = torch.where(pairs, -nn.functional.logsigmoid(diff), torch.zeros_like(diff))
    return losses.sum(dim=(1, 2)), pairs.sum(dim=(1, 2))


def listmle_loss(rewards: Tensor, ranks: Tensor) -> Tensor:
    """Plackett-Luce negative log-likelihood of the given order, per list, shape (B,).

    ``sum_i [logsumexp_{j ranked at or below i} r_j - r_i]``. Tied responses share their risk set
    (Breslow's handling of ties in the Cox partial likelihood, which Plackett-Luce mirrors): a tie
    asks for equal rewards instead of an arbitrary order between the two.
    """
    valid = _check(rewards, ranks)
    # Padding has rank -1, so a padded row i sees every real response and stays finite (no NaN
    # gradients through an all -inf logsumexp); its term is then zeroed.
    remaining = valid[:, None, :] & (ranks[:, None, :] >= ranks[:, :, None])
    logits = rewards[:, None, :].expand_as(remaining).masked_fill(~remaining, float("-inf"))
    terms = torch.logsumexp(logits, dim=2) - rewards
    return torch.where(valid, terms, torch.zeros_like(terms)).sum(dim=1)


def list_metrics(rewards: Tensor, ranks: Tensor) -> dict[str, Tensor]:
    """Per-list ranking quality, shape (B,) each (a tie in predicted rewards never counts as right).

    - ``pairs``/``correct_pairs``: ordered pairs, and those whose rewards are strictly in order;
    - ``top1``: every best-ranked response scores strictly above every other response;
    - ``exact``: every ordered pair is right (the predicted order equals the given one);
    - ``kendall_tau``: Kendall's tau-b between ranks and rewards (tau-a without ties; 0 when the
      rewards are all equal).
    """
    valid = _check(rewards, ranks)
    rewards = rewards.detach().float()
    pairs = ordered_pairs(ranks)
    correct = pairs & (rewards[:, :, None] > rewards[:, None, :])
    n_pairs = pairs.sum(dim=(1, 2))
    n_correct = correct.sum(dim=(1, 2))

    best = valid & (ranks == ranks.masked_fill(~valid, torch.iinfo(ranks.dtype).max).min(dim=1, keepdim=True).values)
    lowest_best = rewards.masked_fill(~best, math.inf).min(dim=1).values
    highest_rest = rewards.masked_fill(~(valid & ~best), -math.inf).max(dim=1).values
    top1 = lowest_best > highest_rest

    both = valid[:, :, None] & valid[:, None, :] & torch.ones_like(pairs).triu(diagonal=1)
    gold = torch.sign(ranks[:, None, :] - ranks[:, :, None]).float()  # +1 when i is ranked above j
    pred = torch.sign(rewards[:, :, None] - rewards[:, None, :])
    concordance = (gold * pred * both).sum(dim=(1, 2))
    n0 = both.sum(dim=(1, 2)).float()
    gold_ties = (both & (gold == 0)).sum(dim=(1, 2)).float()
    pred_ties = (both & (pred == 0)).sum(dim=(1, 2)).float()
    denominator = ((n0 - gold_ties) * (n0 - pred_ties)).sqrt()
    tau = torch.where(denominator > 0, concordance / denominator.clamp_min(1e-12), torch.zeros_like(denominator))
    return {
        "pairs": n_pairs,
        "correct_pairs": n_correct,
        "top1": top1,
        "exact": n_correct == n_pairs,
        "kendall_tau": tau,
    }
