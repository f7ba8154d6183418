"""How well a preference model's probabilities match what happens: the reliability table and its ECE.

A Bradley-Terry reward model predicts ``P(a beats b) = sigma(r_a - r_b)``. On labelled pairs the
chosen side always wins, so each pair is read in both orders: (chosen over rejected, predicted
``p = sigma(r_c - r_r)``, outcome 1) and (rejected over chosen, predicted ``1 - p``, outcome 0).
The predictions are cut into ``bins`` equal-width bins of [0, 1]; in bin b, with ``n_b`` of the
``N = 2 * pairs`` predictions,

    ECE = sum_b (n_b / N) * | mean outcome_b - mean prediction_b |

0 is perfect calibration; a model that says 0.9 and is right 60% of the time scores about 0.3.
Reading both orders makes the table symmetric about 0.5 and the ECE equal to the usual binary
classifier's (confidence = max(p, 1 - p), correct = p > 0.5) computed on mirrored bins. Pure
tensor code: unit-tested on hand-computed values, shared by eval metrics and the calibration plot.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

DEFAULT_BINS = 10


def _both_orders(chosen: Tensor, rejected: Tensor) -> tuple[Tensor, Tensor]:
    if chosen.shape != rejected.shape or chosen.ndim != 1:
        raise ValueError(
            f"chosen and rejected must both be (pairs,); got {tuple(chosen.shape)}, {tuple(rejected.shape)}"
        )
    p = torch.sigmoid(chosen.double() - rejected.double())
    predicted = torch.cat([p, 1 - p])
    outcome = torch.cat([torch.ones_like(p), torch.zeros_like(p)])
    return predicted, outcome


def calibration_table(chosen: Tensor, rejected: Tensor, bins: int = DEFAULT_BINS) -> list[dict[str, Any]]:
    """One record per bin of ``sigma(r_a - r_b)``: its range, how many predictions fall in it, their
    mean prediction and the observed share of wins (None for an empty bin)."""
    predicted, outcome = _both_orders(chosen, rejected)
    index = torch.clamp((predicted * bins).long(), max=bins - 1)
    table = []
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        table.append(
            {
                "low": b / bins,
                "high": (b + 1) / bins,
                "count": count,
                "predicted": predicted[members].mean().item() if count else None,
                "observed": outcome[members].mean().item() if count else None,
            }
        )
    return table


def expected_calibration_error(chosen: Tensor, rejected: Tensor, bins: int = DEFAULT_BINS) -> float:
    """The count-weighted mean gap between observed and predicted win rates over the bins."""
    table = calibration_table(chosen, rejected, bins)
    total = sum(row["count"] for row in table)
    if total == 0:
        return 0.0
    return sum(row["count"] * abs(row["observed"] - row["predicted"]) for row in table if row["count"]) / total
