"""PRM end to end: a training run that finds wrong steps, and its stock-transformers reload scoring
steps exactly as training did (tokenisation, loss and metrics by hand are in tests/unit/test_prm.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoModelForTokenClassification, AutoTokenizer

from rewardctl.methods.prm import score_steps

from ..conftest import SAMPLES, compose_eval, read_jsonl, run_training


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The embedded prm default (1,000 steps, about 13 s), with a smaller eval set."""
    return run_training(
        tmp_path_factory.mktemp("prm"), ["method=prm", "train.eval_every=500", "data.max_eval_rows=200"]
    )


def test_training_improves_step_accuracy_and_finds_wrong_steps(trained):
    summary, _ = trained
    first, final = summary["first_eval"], summary["final_eval"]
    assert first["error_f1"] == 0.0 and final["error_f1"] > 0.15
    assert final["step_accuracy"] > final["majority_baseline"] >= first["step_accuracy"]
    assert final["loss"] < first["loss"] - 0.2 and final["first_error_accuracy"] > first["first_error_accuracy"]


def test_stock_reload_scores_steps_exactly_as_training_did(trained, tmp_path: Path):

    from rewardctl.evaluate import evaluate_run

    summary, run_dir = trained
    cfg = compose_eval([f"run_dir={run_dir}", f"output_dir={tmp_path}", "max_rows=20"])
    result = evaluate_run(cfg)
    predictions = read_jsonl(tmp_path / "predictions.jsonl")
    rows = read_jsonl(SAMPLES / "prm" / "eval.jsonl")
    model = AutoModelForTokenClassification.from_pretrained(run_dir / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    assert model.config.id2label == {0: "incorrect", 1: "correct"} and model.config.rewardctl["step_separator"] == "\n"
    for prediction in predictions[:5]:
        row = rows[prediction["row"] - 1]
        probs = score_steps(model, tokenizer, row["prompt"], row["completions"])
        assert probs == pytest.approx(prediction["step_probs"], abs=1e-5)
        assert prediction["labels"] == [float(v) for v in row["labels"]]
    assert result["metrics"]["rows"] == 20
    full = evaluate_run(compose_eval([f"run_dir={run_dir}", f"output_dir={tmp_path / 'full'}"]))
    assert full["metrics"]["step_accuracy"] == pytest.approx(summary["final_eval"]["step_accuracy"])
