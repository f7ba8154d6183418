"""Ranklist end to end: training on the sample raises every ranking metric, the saved model reloads with
stock transformers and eval reproduces training, ListMLE and conversational lists train (losses, metrics
and collated tensors by hand are in tests/unit/test_ranklist.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from ..conftest import SAMPLES, assert_eval_reproduces, read_jsonl, run_training

SHORT = ["method=ranklist", "train.max_steps=80", "train.eval_every=40", "train.log_every=20", "data.max_eval_rows=120"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("ranklist")
    return run_training(tmp_path, SHORT)


def test_training_on_the_sample_raises_every_ranking_metric(trained):
    summary, run_dir = trained
    first, final = summary["first_eval"], summary["final_eval"]
    assert final["accuracy"] > first["accuracy"] + 0.2
    assert final["kendall_tau"] > first["kendall_tau"] + 0.3
    assert final["exact_order_accuracy"] > first["exact_order_accuracy"]
    assert final["top1_accuracy"] > first["top1_accuracy"]
    assert summary["totals"]["lists"] == 80 * 16
    report = json.loads((run_dir / "data_report.json").read_text())
    assert report["train"]["list_sizes"] == {"2": 625, "3": 625, "4": 625, "5": 625}


def test_save_reload_gives_the_same_scores_and_eval_reproduces_training(trained, tmp_path: Path):
    summary, run_dir = trained
    assert_eval_reproduces(
        run_dir,
        tmp_path,
        summary["final_eval"],
        ("loss", "accuracy", "top1_accuracy", "exact_order_accuracy", "kendall_tau", "lists"),
        rel=1e-6,
    )
    predictions = read_jsonl(tmp_path / "predictions.jsonl")
    rows = read_jsonl(SAMPLES / "ranklist" / "eval.jsonl")[:3]
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "model").eval()
    for row, prediction in zip(rows, predictions, strict=False):
        texts = [row["prompt"] + r + tokenizer.eos_token for r in row["responses"]]
        with torch.no_grad():
            stock = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits.squeeze(-1)
        torch.testing.assert_close(stock, torch.tensor(prediction["rewards"]), atol=1e-5, rtol=1e-5)
        assert prediction["ranks"] == list(range(len(texts)))


def test_listmle_and_conversational_lists_train(tmp_path: Path):
    summary, _ = run_training(
        tmp_path,
        [
            "method=ranklist",
            "method.loss=listmle",
            "data=ranklist_sample_chat",
            "train.max_steps=40",
            "train.eval_every=0",
            "data.max_eval_rows=80",
        ],
    )
    assert summary["final_eval"]["accuracy"] > summary["first_eval"]["accuracy"] + 0.1
