"""method=regression: the loss and metrics by hand, its data errors, an end-to-end run whose saved
model is a stock multi-output classifier, and the proof that it is one module + one YAML."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rewardctl.errors import ConfigError, DataError
from rewardctl.methods.regression import (
    average_ranks,
    pearson,
    regression_loss,
    same_prompt_pair_accuracy,
    spearman,
)

from .conftest import REPO, assert_eval_reproduces, compose_export, read_jsonl, run_training, write_jsonl


def test_the_loss_is_squared_or_huber_error_weighted_over_attributes():
    predictions = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
    targets = torch.tensor([[0.0, 0.0], [2.0, 1.0]])
    # errors: row 0 (1, 0), row 1 (-2, 3)
    torch.testing.assert_close(regression_loss(predictions, targets), torch.tensor([0.5, 6.5]))
    weighted = regression_loss(predictions, targets, weights=torch.tensor([3.0, 1.0]))
    torch.testing.assert_close(weighted, torch.tensor([3 * 1 / 4, (3 * 4 + 9) / 4]))
    # Huber, delta 1: e^2/2 inside, |e| - 1/2 beyond
    huber = regression_loss(predictions, targets, kind="huber", huber_delta=1.0)
    torch.testing.assert_close(huber, torch.tensor([(0.5 + 0) / 2, (1.5 + 2.5) / 2]))
    with pytest.raises(ValueError, match=r"\(N, A\)"):
        regression_loss(torch.zeros(3), torch.zeros(3))


def test_ranks_correlations_and_same_prompt_pairs_by_hand():
    assert average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist() == [2.5, 0.0, 2.5, 1.0]
    x, y = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, 3.0, 2.0, 4.0])
    assert pearson(x, y) == pytest.approx(0.8) and spearman(x, y) == pytest.approx(0.8)
    assert spearman(torch.tensor([1.0, 10.0, 100.0]), torch.tensor([1.0, 2.0, 3.0])) == pytest.approx(1.0)
    assert math.isnan(pearson(torch.ones(3), x[:3]))
    # prompt 7: targets 3 > 1 > 0, predictions order (a, b) right and (b, c) wrong, (a, c) right; a tie in
    # the targets forms no pair; prompt -1 (no prompt column) forms none; prompt 9 has one response.
    predictions = torch.tensor([0.9, 0.1, 0.5, 0.0, 0.3, 0.2, 0.4])
    targets = torch.tensor([3.0, 1.0, 0.0, 1.0, 2.0, 5.0, 4.0])
    groups = torch.tensor([7, 7, 7, 7, -1, -1, 9])
    accuracy, pairs = same_prompt_pair_accuracy(predictions, targets, groups)
    # pairs of prompt 7 with different targets: (a,b) (a,c) (a,d) (b,c) (c,d); right: ab ac ad (b,d tie excluded)
    assert pairs == 5 and accuracy == pytest.approx(3 / 5)


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


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_the_method_is_one_module_and_one_yaml_on_the_public_api():
    """Its module imports nothing of rewardctl but the public method API, and nothing else in the
    package names it: besides its module and YAML, only its sample data (the data preset, the
    generator's builder and the files) mentions it."""
    module = REPO / "rewardctl" / "methods" / "regression.py"
    ours = {m for m in _imported_modules(module) if m.startswith("rewardctl")}
    assert ours == {"rewardctl.methods.api"}
    markers = ("RegressionMethod", "methods.regression", "regression_sample", "sample:regression", "regression_rows")
    allowed = {
        "rewardctl/methods/regression.py",
        "conf/method/regression.yaml",
        "conf/data/regression_sample.yaml",
        "rewardctl/samples/generate.py",
    }
    mentions = set()
    for path in [*(REPO / "rewardctl").rglob("*"), *(REPO / "conf").rglob("*")]:
        if path.is_file() and path.suffix in (".py", ".yaml", ".json") and "samples/data" not in str(path):
            if any(marker in path.read_text(encoding="utf-8") for marker in markers):
                mentions.add(str(path.relative_to(REPO)))
    assert mentions == allowed
