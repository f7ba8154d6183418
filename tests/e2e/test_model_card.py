"""`rewardctl export` writes a model card: Hub front matter, the run's facts and final metrics, and a
usage snippet that, run as written with stock transformers, gives the rewards `rewardctl eval` gives."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from datasets import Dataset
from transformers import set_seed

from rewardctl.evaluate import evaluate_run
from rewardctl.export import export_run
from rewardctl.methods.registry import build_method, to_run_config
from rewardctl.model_card import CardFacts, python_blocks, render_model_card

from ..conftest import SAMPLES, compose_eval, compose_export, compose_train, read_jsonl, run_training


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One short pairwise run (6 steps, checkpoints at 3 and 6) and its export: (run_dir, exported directory)."""
    _, run_dir = run_training(tmp_path_factory.mktemp("card"), ["experiment=smoke"])
    result = export_run(compose_export([f"run_dir={run_dir}"]))
    return run_dir, Path(result["output_dir"])


def front_matter(card: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", card, flags=re.DOTALL)
    assert match, card[:200]
    return yaml.safe_load(match.group(1))


def metric_table(card: str) -> dict[str, float]:
    section = card.split("## Final metrics", 1)[1].split("\n## ", 1)[0]
    return {key: float(value) for key, value in re.findall(r"^\| `([\w/]+)` \| ([^|]+?) \|", section, flags=re.M)}


def test_export_writes_a_card_with_hub_front_matter_and_the_runs_final_metrics(exported):
    run_dir, out = exported
    card = (out / "README.md").read_text(encoding="utf-8")
    header = front_matter(card)
    assert header["library_name"] == "transformers" and header["pipeline_tag"] == "text-classification"
    assert header["tags"] == ["reward-model", "rewardctl", "pairwise"]
    assert "base_model" not in header  # the tiny model is a local, randomly initialised config
    assert "`method=pairwise`" in card and "L = -mean log sigma(r_c - r_r - m)" in card
    assert "`model.max_length=128`" in card and "data.truncation=prompt_end" in card
    assert "samples/data/pairwise/train.jsonl" in card and "first 64 rows" in card
    assert "| optimizer steps | 6 of 6 (completed) |" in card
    final = json.loads((run_dir / "summary.json").read_text())["final_eval"]
    table = metric_table(card)
    expected = {k: v for k, v in final.items() if k not in ("step", "split", "epoch", "eval_seconds")}
    assert set(table) == set(expected) and "accuracy" in table
    for key, value in expected.items():
        assert table[key] == pytest.approx(value, rel=1e-5, abs=1e-12), key
    saved = json.loads((out / "config.json").read_text())["rewardctl"]
    assert f"`reward_mean = {saved['reward_mean']!r}`" in card and f"`reward_std = {saved['reward_std']!r}`" in card


def run_snippet(card: str, model_dir: Path) -> dict:
    (snippet,) = python_blocks(card)
    assert '"path/to/model-merged"' in snippet
    namespace: dict = {}
    exec(compile(snippet.replace('"path/to/model-merged"', repr(str(model_dir))), "card", "exec"), namespace)
    return namespace


@pytest.mark.parametrize("data", ["pairwise", "pairwise_chat"])
def test_the_cards_snippet_scores_exactly_as_eval(exported, tmp_path: Path, data: str):
    """Standard text (EOS appended) and chat messages (the template) alike, within 1e-5 of eval."""
    run_dir, out = exported
    rows_file = SAMPLES / data / "eval.jsonl"
    evaluate_run(compose_eval([f"run_dir={run_dir}", f"dataset={rows_file}", f"output_dir={tmp_path}", "max_rows=12"]))
    predictions = read_jsonl(tmp_path / "predictions.jsonl")
    rows = read_jsonl(rows_file)
    snippet = run_snippet((out / "README.md").read_text(encoding="utf-8"), out)
    reward = snippet["reward"]
    for prediction in predictions:
        row = rows[prediction["row"] - 1]
        prompt = row.get("prompt")
        assert reward(prompt, row["chosen"]) == pytest.approx(prediction["chosen_reward"], abs=1e-5)
        assert reward(prompt, row["rejected"]) == pytest.approx(prediction["rejected_reward"], abs=1e-5)
    assert len(predictions) == 12
    normalized = snippet["normalized_reward"](rows[0].get("prompt"), rows[0]["chosen"])
    saved = json.loads((out / "config.json").read_text())["rewardctl"]
    expected = (reward(rows[0].get("prompt"), rows[0]["chosen"]) - saved["reward_mean"]) / saved["reward_std"]
    assert normalized == pytest.approx(expected)


def test_a_checkpoints_card_shows_the_eval_of_that_step(exported, tmp_path: Path):
    """A checkpoint's weights are described by the eval logged at its step, not the final one."""
    run_dir, _ = exported
    out = tmp_path / "step-3"
    export_run(compose_export([f"run_dir={run_dir}", "checkpoint=step-3", "dtype=bfloat16", f"output_dir={out}"]))
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "exported from checkpoint `step-3`" in card and "weights: bfloat16 (cast by `rewardctl export`)" in card
    (at_3,) = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["split"] == "eval" and r["step"] == 3]
    table = metric_table(card)
    assert table["accuracy"] == pytest.approx(at_3["accuracy"], rel=1e-5)
    assert table["loss"] == pytest.approx(at_3["loss"], rel=1e-5)
    assert "On the eval set (step 3," in card


# ---- the other model kinds' snippets, on untrained tiny models (no training needed) -------------------
def card_snippet(run, model_dir: Path) -> dict:
    """Run the usage snippet of ``model_dir``'s card (as rendered for ``run``) on ``model_dir``."""
    saved = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    card = render_model_card(CardFacts(run=run, saved_config=saved, model_dir_name=model_dir.name))
    (snippet,) = python_blocks(card)
    placeholder = f'"path/to/{model_dir.name}"'
    assert placeholder in snippet
    namespace: dict = {}
    exec(compile(snippet.replace(placeholder, repr(str(model_dir))), "card", "exec"), namespace)
    return namespace


def eval_outputs(method, model, rows: list[dict]) -> dict:
    prepared = method.prepare(Dataset.from_list(rows), "rows.jsonl", training=False).dataset
    with torch.no_grad():
        return method.eval_step(model.eval(), method.collate([prepared[i] for i in range(len(prepared))]))


CHAT_STEPS = [
    {
        "prompt": [{"role": "user", "content": "Start from 5, then -1."}],
        "completions": ["5-1=4.", "answer=4."],
        "labels": [True, True],
    }
]


@pytest.mark.parametrize("rows", ["sample", "chat"])
def test_the_prm_snippet_gives_evals_step_probabilities(tmp_path: Path, rows: str):
    run = to_run_config(compose_train(["method=prm", "model.max_length=512"]))
    method = build_method(run)
    set_seed(3)
    model = method.build_model()
    method.save_model(model, tmp_path / "prm-model")
    step_probabilities = card_snippet(run, tmp_path / "prm-model")["step_probabilities"]
    data = read_jsonl(SAMPLES / "prm" / "eval.jsonl")[:5] if rows == "sample" else CHAT_STEPS
    out = eval_outputs(method, model, data)
    for b, row in enumerate(data):
        expected = out["step_prob"][b, : int(out["present"][b].sum())].tolist()
        assert step_probabilities(row["prompt"], row["completions"]) == pytest.approx(expected, abs=1e-5)


def test_the_regression_snippet_gives_evals_predictions_on_the_datas_scale(tmp_path: Path):
    run = to_run_config(compose_train(["method=regression", "method.standardize=true"]))
    method = build_method(run)
    method.prepare(Dataset.from_list(read_jsonl(SAMPLES / "regression" / "train.jsonl")[:40]), "t", training=True)
    assert method.target_mean is not None  # standardised: the snippet must map outputs back
    set_seed(4)
    model = method.build_model()
    method.save_model(model, tmp_path / "reg-model")
    scores = card_snippet(run, tmp_path / "reg-model")["scores"]
    rows = read_jsonl(SAMPLES / "regression" / "eval.jsonl")[:6]
    predictions = eval_outputs(method, model, rows)["prediction"]
    for row, expected in zip(rows, predictions.tolist(), strict=True):
        got = scores(row.get("prompt"), row["response"])
        assert list(got) == list(method.output_labels)
        assert list(got.values()) == pytest.approx(expected, abs=1e-5)


CHAT_COMPLETIONS = [
    {
        "prompt": [{"role": "user", "content": "hi"}],
        "completion": [{"role": "assistant", "content": "Hello!"}],
        "label": True,
    },
    {
        "prompt": [{"role": "user", "content": "tips?"}],
        "completion": [{"role": "assistant", "content": "No."}],
        "label": False,
    },
]


@pytest.mark.parametrize("rows", ["sample", "chat"])
def test_the_bco_snippet_gives_the_implicit_reward_minus_delta(tmp_path: Path, rows: str):
    """Policy and reference differ (two seeds), so the log-prob ratio is really measured."""
    from rewardctl.modeling.causal import completion_logps

    reference_dir = tmp_path / "reference"
    run = to_run_config(compose_train(["method=bco", "method.beta=0.5", "model.max_length=512"]))
    run.method.ref_model = str(reference_dir)  # the reference the card names
    method = build_method(run)
    set_seed(1)
    policy = method.build_model()
    set_seed(2)
    reference = method.build_model()
    reference.save_pretrained(reference_dir)
    method.delta.total, method.delta.count = (
        torch.tensor(0.3, dtype=torch.float64),
        torch.tensor(2.0, dtype=torch.float64),
    )
    method.save_model(policy, tmp_path / "bco-model")
    reward = card_snippet(run, tmp_path / "bco-model")["reward"]
    data = read_jsonl(SAMPLES / "bco" / "eval.jsonl")[:6] if rows == "sample" else CHAT_COMPLETIONS
    prepared = method.prepare(Dataset.from_list(data), "rows.jsonl", training=False).dataset
    batch = method.collate([prepared[i] for i in range(len(prepared))])
    with torch.no_grad():
        ratio = completion_logps(policy.eval(), batch)[0] - completion_logps(reference.eval(), batch)[0]
    expected = (0.5 * ratio - 0.15).tolist()
    # float32 sums of ~100 log-probs of an untrained model (about -6 each) agree to ~1e-5 relative between
    # a padded batch and one sequence; a token more or less in the completion would move r by ~3
    assert [reward(row["prompt"], row["completion"]) for row in data] == pytest.approx(expected, abs=1e-4)
