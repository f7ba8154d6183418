"""Calibration (reliability table, ECE), the reward statistics carried by checkpoints, and the
row layout of scored responses: pure functions checked against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from rewardctl.methods.calibration import calibration_table, expected_calibration_error
from rewardctl.methods.registry import build_method, to_run_config
from rewardctl.methods.scoring import ResponseLayout, records_from_outputs, rows_of_rewards

from ..conftest import compose_train


def test_ece_reads_each_pair_in_both_orders():
    # p = sigma(2) = 0.8808 (bin 8) and sigma(0) = 0.5 (bin 5); mirrored: 0.1192 (bin 1), 0.5 (bin 5).
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0])
    p = 1 / (1 + math.exp(-2))
    table = calibration_table(chosen, rejected)
    assert [row["count"] for row in table] == [0, 1, 0, 0, 0, 2, 0, 0, 1, 0]
    assert table[8]["predicted"] == pytest.approx(p) and table[8]["observed"] == 1.0
    assert table[5]["predicted"] == pytest.approx(0.5) and table[5]["observed"] == 0.5
    assert table[1]["observed"] == 0.0 and table[0]["predicted"] is None
    assert expected_calibration_error(chosen, rejected) == pytest.approx(2 * (1 - p) / 4)


def test_a_perfectly_uncertain_model_is_calibrated_and_a_confident_wrong_one_is_not():
    ties = torch.zeros(5)
    assert expected_calibration_error(ties, ties) == 0.0
    wrong = expected_calibration_error(torch.zeros(4), torch.full((4,), 5.0))  # says 0.0067 for the winner
    assert wrong == pytest.approx(1 / (1 + math.exp(-5)))
    with pytest.raises(ValueError, match="both be"):
        calibration_table(torch.zeros(2, 1), torch.zeros(2, 1))


def test_reward_statistics_travel_in_checkpoint_state():
    run = to_run_config(compose_train(["method=regression"]), for_training=False)
    method = build_method(run)
    method.attributes = ("score",)
    method.record_reward_stats({"prediction": torch.tensor([[1.0], [3.0]])})
    assert method.reward_normalization == {"reward_mean": 2.0, "reward_std": 1.0}
    state = method.checkpoint_state()
    again = build_method(run)
    again.restore_checkpoint_state(state)
    assert again.reward_normalization == {"reward_mean": 2.0, "reward_std": 1.0}
    assert again.attributes == ("score",)  # the method's own state still restored
    several = build_method(run)
    several.record_reward_stats({"prediction": torch.tensor([[1.0, 2.0], [3.0, 4.0]])})
    assert several.reward_normalization is None  # several attributes: no single scale


def test_responses_are_laid_out_row_by_row_and_back_into_columns():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    scores, present = rows_of_rewards(values, torch.tensor([1, 3, 2]))
    assert scores.tolist() == [[1.0, 0.0, 0.0], [2.0, 3.0, 4.0], [5.0, 6.0, 0.0]]
    assert present.tolist() == [[True, False, False], [True, True, True], [True, True, False]]
    outputs = {"scores": scores, "present": present.long(), "row": torch.tensor([4, 0, 2])}
    records = records_from_outputs(outputs, ResponseLayout(("responses",)), float)
    assert records == {4: {"rewards": [1.0]}, 0: {"rewards": [2.0, 3.0, 4.0]}, 2: {"rewards": [5.0, 6.0]}}
    pair = records_from_outputs(
        {"scores": torch.tensor([[1.0, -1.0]]), "present": torch.ones(1, 2), "row": torch.tensor([0])},
        ResponseLayout(("chosen", "rejected")),
        float,
    )
    assert pair == {0: {"chosen_reward": 1.0, "rejected_reward": -1.0}}
