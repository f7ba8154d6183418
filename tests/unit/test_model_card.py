"""The model card builder on hand-made configs and records: Hub front matter, every section, each
method's usage snippet and reference wording; no model is loaded."""

from __future__ import annotations

import re

import pytest
import yaml

from rewardctl.methods.registry import to_run_config
from rewardctl.model_card import CardFacts, format_number, looks_like_hub_id, python_blocks, render_model_card

from ..conftest import compose_train

SECTIONS = (
    "## Method and loss",
    "## Base model",
    "## Data",
    "## Budget",
    "## Training",
    "## Final metrics",
    "## Reward normalisation",
    "## Usage",
)
QWEN = "Qwen/Qwen2.5-0.5B-Instruct"
SUMMARY = {"status": "completed", "step": 100, "max_steps": 100, "processes": 2, "train_seconds": 12.5}


def run_config(*overrides: str):
    return to_run_config(compose_train(list(overrides)), for_training=False)


def card_of(run, architecture: str, meta: dict, **facts) -> str:
    saved = {"architectures": [architecture], "rewardctl": meta, **facts.pop("saved", {})}
    hub = frozenset({QWEN, "trl-lib/kto-mix-14k", "HuggingFaceH4/ultrafeedback_binarized"})
    return render_model_card(CardFacts(run=run, saved_config=saved, summary=SUMMARY, hub_ids=hub, **facts))


def header_of(card: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", card, flags=re.DOTALL)
    assert match
    return yaml.safe_load(match.group(1))


def assert_complete(card: str) -> None:
    positions = [card.index(section) for section in SECTIONS]
    assert positions == sorted(positions)
    (snippet,) = python_blocks(card)
    compile(snippet, "card", "exec")  # valid Python as written


def test_a_bco_card_names_the_policy_its_reference_and_delta():
    run = run_config("method=bco", "model=qwen2.5-0.5b", "data=kto_mix", "method.beta=0.2", "method.max_length=512")
    final = {"step": 100, "split": "eval", "accuracy": 0.75, "auc": 0.8123456789, "delta": 0.031, "rows": 64.0}
    card = card_of(run, "Qwen2ForCausalLM", {"method": "bco", "beta": 0.2, "delta": 0.031}, metrics=final)
    header = header_of(card)
    assert header == {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "base_model": QWEN,
        "datasets": ["trl-lib/kto-mix-14k"],
        "tags": ["reward-model", "rewardctl", "bco"],
    }
    assert_complete(card)
    assert "r = beta * (log pi(y|x) - log pi_ref(y|x))" in card  # BcoConfig's docstring: the loss
    assert "| `method.beta` | `0.2` |" in card and "| `method.udm.enabled` | `false` |" in card
    assert "`method.max_length=512`" in card and "max_completion_length" in card
    assert "| `auc` | 0.812346 |" in card and "| `rows` | 64 |" in card
    assert f'REFERENCE = "{QWEN}"  # reference: the starting weights of training (model.name_or_path)' in card
    assert "No reward statistics were saved" in card
    assert "2 process(es)" in card and "= 16 per step" in card  # 8 x 2 x 1


@pytest.mark.parametrize(
    ("overrides", "reference"),
    [
        (["method.ref_model=my-org/ref"], '"my-org/ref"  # the reference model of training (method.ref_model)'),
        (["peft=lora"], f'"{QWEN}"  # reference: the base model under the LoRA adapter (the adapter disabled)'),
    ],
)
def test_the_bco_reference_follows_the_runs_choice(overrides: list[str], reference: str):
    run = run_config("method=bco", "model=qwen2.5-0.5b", *overrides)
    card = card_of(run, "Qwen2ForCausalLM", {"method": "bco", "beta": 0.1, "delta": 0.0})
    assert reference in card
    assert ("merged into the base by `rewardctl export`" in card) == ("peft=lora" in overrides)


def test_a_from_scratch_policy_says_its_reference_is_not_a_stock_directory():
    card = card_of(run_config("method=bco"), "LlamaForCausalLM", {"method": "bco", "beta": 0.1, "delta": 0.0})
    assert "randomly initialised from this config with train.seed=42" in card
    assert "base_model" not in header_of(card)  # a local, randomly initialised config is no base


def test_a_prm_card_is_token_classification_with_its_separator():
    run = run_config("method=prm", "model=qwen2.5-0.5b", "method.max_length=2048", "method.max_prompt_length=256")
    card = card_of(run, "Qwen2ForTokenClassification", {"method": "prm", "step_separator": "\n"})
    assert header_of(card)["pipeline_tag"] == "token-classification"
    assert_complete(card)
    assert "SEPARATOR = model.config.rewardctl[\"step_separator\"]  # '\\n'" in card
    assert "`method.max_length=2048`" in card and "`max_prompt_length=256`" in card
    assert "score_steps(..., max_length=2048)" in card
    assert "No eval set was scored for these weights." in card


def test_a_regression_card_reports_every_output_on_the_datas_scale():
    run = run_config("method=regression", "method.standardize=true")
    meta = {"method": "regression", "attributes": ["helpfulness", "verbosity"], "score_mean": [2.0, 1.5]}
    meta["score_std"] = [1.0, 0.5]
    saved = {"id2label": {"0": "helpfulness", "1": "verbosity"}}
    card = card_of(run, "LlamaForSequenceClassification", meta, saved=saved)
    assert header_of(card)["pipeline_tag"] == "text-classification"
    assert_complete(card)
    assert "`output * score_std + score_mean` is on the data's scale" in card
    assert "print(scores(" in card and "def reward(" not in card  # several outputs: no single reward
    assert "keeps its end (the response and its EOS)" in card


def test_a_ranklist_card_with_normalisation_stats_and_a_first_eval():
    run = run_config("method=ranklist", "method.loss=listmle", "data.truncation=sequence_end")
    meta = {"method": "ranklist", "pooling": "last_token", "reward_mean": 0.5, "reward_std": 2.0}
    first, final = {"step": 0, "accuracy": 0.5, "kendall_tau": 0.0}, {"step": 9, "accuracy": 0.9, "kendall_tau": 0.7}
    card = card_of(
        run,
        "LlamaForSequenceClassification",
        meta,
        saved={"id2label": {"0": "reward"}},
        metrics=final,
        first_metrics=first,
    )
    assert_complete(card)
    assert "| metric | step 9 | start (step 0) |" in card and "| `kendall_tau` | 0.7 | 0 |" in card
    alone = card_of(run, "LlamaForSequenceClassification", meta, metrics=final, first_metrics=dict(final))
    assert "| metric | step 9 |\n" in alone  # one eval only: no start column
    assert "`reward_mean = 0.5`, `reward_std = 2.0`" in card and "def normalized_reward(" in card
    assert "| `method.loss` | `listmle` |" in card and "data.truncation=sequence_end" in card


def test_hub_ids_and_numbers():
    assert looks_like_hub_id(QWEN) and looks_like_hub_id("gpt2")
    assert not looks_like_hub_id("/data/train.jsonl") and not looks_like_hub_id("train.jsonl")
    assert not looks_like_hub_id("../shared/data") and not looks_like_hub_id(None)
    assert [format_number(v) for v in (32.0, 0.6182946050539613, 1e-7, float("nan"), None)] == [
        "32",
        "0.618295",
        "1e-07",
        "nan",
        "null",
    ]
