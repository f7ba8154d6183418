"""method=regression end to end: runs whose saved model is a stock multi-output classifier scoring as
eval did, a single score column, and data errors met by a real run (the loss, the metrics and the
one-module check are in tests/unit/test_regression.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rewardctl.errors import ConfigError, DataError

from ..conftest import REPO, assert_eval_reproduces, compose_export, read_jsonl, run_training, write_jsonl

RUN = [
    "method=regression",
    "experiment=smoke",
    "train.max_steps=60",
    "train.eval_every=30",
    "train.lr=1e-3",
    "train.per_device_batch_size=16",
    "data.max_train_rows=960",
    "data.max_eval_rows=60",
]


@pytest.mark.parametrize("standardize", [False, True])
def test_a_run_saves_a_stock_multi_output_model_that_scores_as_eval_did(tmp_path: Path, standardize: bool):
    summary, run_dir = run_training(tmp_path, [*RUN, f"method.standardize={str(standardize).lower()}"])
    assert summary["status"] == "completed" and summary["primary_metric"] == "spearman"
    first, final = summary["first_eval"], summary["final_eval"]
    assert final["loss"] < first["loss"] / 2 and final["spearman"] > first["spearman"] + 0.2
    assert {"mse_verbosity", "pearson_helpfulness", "pairwise_accuracy_helpfulness", "mae"} <= set(final)

    model_dir = run_dir / "model"
    config = json.loads((model_dir / "config.json").read_text())
    assert config["num_labels"] == 2 if "num_labels" in config else len(config["id2label"]) == 2
    assert config["id2label"] == {"0": "helpfulness", "1": "verbosity"}
    facts = config["rewardctl"]
    assert facts["method"] == "regression" and facts["attributes"] == ["helpfulness", "verbosity"]
    assert ("score_mean" in facts) == standardize

    result = assert_eval_reproduces(run_dir, tmp_path / "eval", final, ("loss", "mse", "spearman", "pearson"), rel=1e-5)
    predictions = read_jsonl(tmp_path / "eval" / "predictions.jsonl")
    rows = read_jsonl(REPO / "rewardctl" / "samples" / "data" / "regression" / "eval.jsonl")
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()  # stock transformers alone
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for record in predictions[:5]:
        row = rows[record["row"] - 1]
        ids = tokenizer(row["prompt"] + row["response"])["input_ids"] + [tokenizer.eos_token_id]
        with torch.no_grad():
            output = model(input_ids=torch.tensor([ids])).logits[0].double()
        if standardize:
            output = output * torch.tensor(facts["score_std"]) + torch.tensor(facts["score_mean"])
        assert output.tolist() == pytest.approx(list(record["prediction"].values()), abs=1e-4)
        assert record["target"] == row["scores"]
    assert result["report"]["attributes"] == ["helpfulness", "verbosity"]

    if not standardize:
        from rewardctl.export import export_run

        export_run(compose_export([f"run_dir={run_dir}", f"output_dir={tmp_path / 'exported'}"]))
        exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "exported")
        assert exported.config.id2label == {0: "helpfulness", 1: "verbosity"}
        # A checkpoint rebuilds its outputs from its method state, without reading any data.
        export_run(compose_export([f"run_dir={run_dir}", "checkpoint=step-60", f"output_dir={tmp_path / 'step60'}"]))
        from_checkpoint = AutoModelForSequenceClassification.from_pretrained(tmp_path / "step60")
        assert from_checkpoint.config.id2label == {0: "helpfulness", 1: "verbosity"}
        ids = torch.tensor([tokenizer("User: hi\nAssistant: hello")["input_ids"]])
        with torch.no_grad():
            torch.testing.assert_close(from_checkpoint(input_ids=ids).logits, exported(input_ids=ids).logits)


def test_a_single_score_column_and_rows_with_a_bad_score(tmp_path: Path):
    rows = [{"prompt": "Q: ", "response": f"answer {i}", "score": float(i % 3)} for i in range(24)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    summary, run_dir = run_training(
        tmp_path,
        [
            "method=regression",
            "experiment=smoke",
            f"data.train={train}",
            "data.eval=null",
            "data.holdout_fraction=0.25",
        ],
    )
    assert summary["status"] == "completed"
    assert json.loads((run_dir / "model" / "config.json").read_text())["id2label"] == {"0": "score"}

    bad = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            {"response": "a", "scores": {"helpfulness": 1, "verbosity": 2}},
            {"response": "b", "scores": {"helpfulness": 3}},
        ],
    )
    with pytest.raises(DataError) as info:
        run_training(
            tmp_path, ["method=regression", "experiment=smoke", f"data.train={bad}", "data.eval=null"], name="bad"
        )
    assert str(info.value) == (
        f"{bad}, row 2, field 'scores.verbosity': is missing; data.bad_rows=skip leaves such rows out"
    )
    with pytest.raises(
        ConfigError,
        match=r"^method.weights: names no attribute of the data \(helpfulness, "
        r"verbosity\): \['helpfullness'\]",
    ):
        run_training(tmp_path, ["method=regression", "experiment=smoke", "+method.weights.helpfullness=2"], name="w")
