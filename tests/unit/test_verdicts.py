"""The end-of-run report says in words when a model is degenerate: at chance, or the majority class only."""

from __future__ import annotations

import pytest

from rewardctl.methods.base import within_chance
from rewardctl.methods.bco import BcoMethod
from rewardctl.methods.pairwise import PairwiseMethod
from rewardctl.methods.prm import PrmMethod
from rewardctl.methods.ranklist import RanklistMethod
from rewardctl.methods.regression import RegressionMethod
from rewardctl.training.summary import summary_lines


def verdict(cls: type, final: dict) -> str | None:
    return cls.verdict(object.__new__(cls), final)  # the verdict reads the metrics only


def test_within_chance_is_two_binomial_standard_errors():
    assert within_chance(0.54, 0.5, 500) and not within_chance(0.55, 0.5, 500)  # 2 * sqrt(.25 / 500) = 0.0447
    assert within_chance(0.9, 0.5, 0)


def test_the_prm800k_run_that_only_called_steps_correct_is_named_for_what_it_is():
    """The run a user met: 0.4792 -> 0.9312, exactly the majority baseline, wrong-step F1 0."""
    final = {"step_accuracy": 0.9312, "majority_baseline": 0.9312, "error_f1": 0.0, "first_error_accuracy": 0.0}
    assert "no wrong step is found (wrong-step F1 0)" in verdict(PrmMethod, final)
    assert "does not beat the majority baseline 0.9200" in verdict(
        PrmMethod, {"step_accuracy": 0.91, "majority_baseline": 0.92, "error_f1": 0.2}
    )
    assert verdict(PrmMethod, {"step_accuracy": 0.95, "majority_baseline": 0.92, "error_f1": 0.4}) is None
    # an eval set without a wrong step: F1 0 says nothing about the model
    assert (
        verdict(PrmMethod, {"step_accuracy": 1.0, "majority_baseline": 1.0, "error_f1": 0.0, "wrong_steps": 0}) is None
    )
    # steps flagged, all wrongly: not "every step called correct"
    flagged = verdict(PrmMethod, {"step_accuracy": 0.8, "majority_baseline": 0.9, "error_f1": 0.0, "wrong_steps": 10})
    assert flagged.startswith("no wrong step is found") and "every step called correct" not in flagged


def test_a_collapsed_regression_head_and_an_imbalanced_bco_auc_are_judged_right():
    assert "constant" in verdict(RegressionMethod, {"spearman": float("nan"), "responses": 800})
    # 180 desirable, 20 undesirable: AUC's null standard error is sqrt(201 / 43200) = 0.068, not 0.035
    assert verdict(BcoMethod, {"auc": 0.6, "rows": 200, "desirable": 180}) is not None
    assert verdict(BcoMethod, {"auc": 0.6, "rows": 200, "desirable": 100}) is None


@pytest.mark.parametrize(
    ("cls", "chance", "useful", "expected"),
    [
        (PairwiseMethod, {"accuracy": 0.51, "pairs": 500}, {"accuracy": 0.6, "pairs": 500}, "within chance (0.5)"),
        (
            RanklistMethod,
            {"accuracy": 0.5, "pairs": 1800, "kendall_tau": 0.0},
            {"accuracy": 0.67, "pairs": 1800, "kendall_tau": 0.4},
            "Kendall's tau 0.000",
        ),
        (BcoMethod, {"auc": 0.52, "rows": 200}, {"auc": 0.7, "rows": 200}, "no better than chance (AUC 0.520"),
        (
            RegressionMethod,
            {"spearman": 0.05, "responses": 800},
            {"spearman": 0.43, "responses": 800},
            "Spearman 0.050",
        ),
    ],
)
def test_at_chance_is_said_and_a_useful_model_gets_no_warning(cls, chance, useful, expected):
    assert expected in verdict(cls, chance)
    assert verdict(cls, useful) is None


def test_the_report_shows_the_telling_metrics_and_the_warning():
    method = object.__new__(PrmMethod)
    first = {
        "step": 0,
        "step_accuracy": 0.4792,
        "loss": 0.7,
        "majority_baseline": 0.9312,
        "error_f1": 0.12,
        "first_error_accuracy": 0.1,
    }
    final = {
        "step": 100,
        "step_accuracy": 0.9312,
        "loss": 0.3,
        "majority_baseline": 0.9312,
        "error_f1": 0.0,
        "first_error_accuracy": 0.0,
    }
    summary = {
        "status": "completed",
        "method": "prm",
        "step": 100,
        "max_steps": 100,
        "train_seconds": 10.0,
        "steps_per_sec": 50.0,
        "first_eval": first,
        "final_eval": final,
        "run_dir": "r",
        "model_dir": "r/model",
    }
    lines = summary_lines(summary, method)
    assert "  eval step_accuracy: 0.4792 (step 0) -> 0.9312 (step 100)" in lines
    assert "  eval error_f1: 0.1200 (step 0) -> 0.0000 (step 100)" in lines
    assert "  eval majority_baseline: 0.9312 (step 0) -> 0.9312 (step 100)" in lines
    assert any(line.startswith("  WARNING: no wrong step is found") for line in lines)
