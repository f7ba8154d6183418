"""The saved tokenizer truncates as training did: a stock ``tokenizer(text, truncation=True)`` on an
over-long text keeps its end (the saved ``truncation_side`` is left, ``model_max_length`` the budget).
That is training's ``data.truncation=sequence_end`` exactly, and the default ``prompt_end`` whenever
the answer fits in half the budget (then only the prompt's start is cut, by both)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from ..conftest import SAMPLES, compose_eval, read_jsonl, run_training, write_jsonl


@pytest.mark.parametrize("rule", ["sequence_end", "prompt_end"])
def test_stock_truncation_of_over_long_texts_scores_like_training(tmp_path: Path, rule: str):
    """Rows with long prompts (the sample's prompt four times) and the sample's answers: at 48 tokens
    both rules cut every row; answers of up to 24 tokens keep all of themselves under prompt_end."""
    from rewardctl.evaluate import evaluate_run

    budget = 48
    sample = read_jsonl(SAMPLES / "pairwise" / "eval.jsonl")[:64]
    rows = [{**r, "prompt": r["prompt"] * 4} for r in sample]
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    _, run_dir = run_training(
        tmp_path,
        [
            "experiment=smoke",
            f"data.train={data}",
            f"data.eval={data}",
            f"model.max_length={budget}",
            f"data.truncation={rule}",
            "data.max_eval_rows=64",
        ],
    )
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    assert (tokenizer.truncation_side, tokenizer.model_max_length) == ("left", budget)
    evaluate_run(compose_eval([f"run_dir={run_dir}", f"output_dir={tmp_path / 'eval'}"]))
    predictions = {p["row"]: p["chosen_reward"] for p in read_jsonl(tmp_path / "eval" / "predictions.jsonl")}
    texts = [r["prompt"] + r["chosen"] + tokenizer.eos_token for r in rows]
    # prompt_end measures the answer as what follows the chosen/rejected shared prefix (BPE may merge
    # across the prompt's end): a few tokens of slack keep the comparison to answers that surely fit.
    fits = [len(tokenizer(r["chosen"] + tokenizer.eos_token)["input_ids"]) <= budget // 2 - 4 for r in rows]
    comparable = [i for i in range(len(rows)) if rule == "sequence_end" or fits[i]]
    assert len(comparable) >= 8
    assert all(len(tokenizer(texts[i], truncation=False)["input_ids"]) > budget for i in comparable)  # all cut
    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "model").eval()
    with torch.no_grad():
        encoded = tokenizer([texts[i] for i in comparable], padding=True, truncation=True, return_tensors="pt")
        stock = model(**encoded).logits.squeeze(-1)
    ours = torch.tensor([predictions[i + 1] for i in comparable])  # predictions.jsonl rows are 1-based
    torch.testing.assert_close(stock, ours, atol=1e-5, rtol=1e-5)


def test_a_token_classifier_keeps_its_tokenizers_truncation(tmp_path: Path):
    """prm keeps the start of its steps (and bco its completion's): no left truncation is saved for them."""
    _, run_dir = run_training(tmp_path, ["method=prm", "experiment=smoke"])
    assert AutoTokenizer.from_pretrained(run_dir / "model").truncation_side == "right"
