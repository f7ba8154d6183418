"""BCO end to end: training runs (accuracy up, a stock causal LM saved), eval reproducing training,
delta and the UDM classifier surviving resume exactly, and LoRA (the reference is the adapter disabled)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rewardctl.methods.bco import BcoMethod
from rewardctl.methods.registry import to_run_config

from ..conftest import (
    assert_eval_reproduces,
    completion_logp,
    compose_eval,
    compose_export,
    compose_train,
    read_jsonl,
    run_training,
)


def make_method(*overrides: str) -> BcoMethod:
    run = to_run_config(compose_train(["method=bco", *overrides]))
    return BcoMethod(run.method, run)


SHORT = ["method=bco", "train.max_steps=120", "train.eval_every=60", "train.log_every=20", "data.max_eval_rows=200"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return run_training(tmp_path_factory.mktemp("bco"), SHORT)


def test_training_moves_classifier_accuracy_up_and_saves_a_stock_causal_lm(trained):
    summary, run_dir = trained
    first, final = summary["first_eval"], summary["final_eval"]
    assert final["accuracy"] > 0.65 and final["auc"] > first["auc"] + 0.15
    assert final["rewards/margin"] > 0 and final["delta"] != 0
    model = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    saved = model.config.rewardctl
    assert saved["method"] == "bco" and saved["delta"] == pytest.approx(final["delta"])
    assert (run_dir / "model" / "tokenizer.json").is_file() and not (run_dir / "model" / "adapter_config.json").exists()


def test_eval_command_reproduces_the_end_of_training_eval(trained, tmp_path: Path):
    summary, run_dir = trained
    assert_eval_reproduces(
        run_dir,
        tmp_path,
        summary["final_eval"],
        ("loss", "accuracy", "delta", "rewards/chosen", "rewards/rejected", "auc"),
        rel=1e-5,
    )
    predictions = read_jsonl(tmp_path / "predictions.jsonl")
    assert len(predictions) == 200 and {"reward", "logp", "ref_logp", "label", "correct"} <= set(predictions[0])


RESUMABLE = [
    "method=bco",
    "experiment=smoke",
    "train.max_steps=8",
    "train.save_every=4",
    "train.eval_every=4",
    "train.log_every=2",
    "method.udm.enabled=true",
    "method.prompt_sample_size=16",
    "method.precompute_ref_log_probs=true",
]


def test_delta_and_the_udm_classifier_survive_resume_exactly(tmp_path: Path, monkeypatch):
    full, full_dir = run_training(tmp_path, RESUMABLE, name="full")
    stopped, part_dir = run_training(tmp_path, [*RESUMABLE, "train.stop_after_steps=4"], name="part")
    assert stopped["status"] == "stopped"
    state = load_file(str(part_dir / "checkpoints" / "step-4" / "method_state.safetensors"))
    assert {
        "delta_total",
        "delta_count",
        "udm.weight",
        "udm.bias",
        "udm_weights",
        "ref_logps.train",
        "ref_logps.eval",
    } <= set(state)

    def refit(*_args, **_kwargs):
        raise AssertionError("the UDM classifier must be reloaded on resume, not refitted")

    monkeypatch.setattr("rewardctl.methods.bco.fit_balanced_logistic_regression", refit)
    monkeypatch.setattr(BcoMethod, "_table", refit)  # nor are the reference log-probs recomputed
    resumed, _ = run_training(tmp_path, [*RESUMABLE, "train.stop_after_steps=4"], name="part")
    assert resumed["status"] == "completed"
    keep = lambda records: [{k: v for k, v in r.items() if not k.endswith(("seconds", "_per_sec"))} for r in records]  # noqa: E731
    assert keep(read_jsonl(part_dir / "metrics.jsonl")) == keep(read_jsonl(full_dir / "metrics.jsonl"))
    full_meta = json.loads((full_dir / "model" / "config.json").read_text())["rewardctl"]
    part_meta = json.loads((part_dir / "model" / "config.json").read_text())["rewardctl"]
    assert (
        part_meta["delta"] == full_meta["delta"] and part_meta["delta_count"] == full_meta["delta_count"] == 8 * 4 * 1
    )


def test_lora_trains_only_the_adapter_and_its_reference_is_the_adapter_disabled(tmp_path: Path):
    from accelerate.utils import set_seed
    from peft import AutoPeftModelForCausalLM

    from rewardctl.evaluate import evaluate_run

    overrides = ["method=bco", "peft=lora", "peft.r=4", "experiment=smoke", "train.max_steps=6"]
    summary, run_dir = run_training(tmp_path, overrides)
    model_dir = run_dir / "model"
    assert (model_dir / "adapter_config.json").is_file() and (model_dir / "base" / "config.json").is_file()
    assert json.loads((model_dir / "rewardctl.json").read_text())["delta"] == pytest.approx(
        summary["final_eval"]["delta"]
    )

    method = make_method(*overrides[1:])
    set_seed(method.run.train.seed)  # the session seeds exactly here: this rebuilds the starting weights
    initial = {k: v.clone() for k, v in method.build_model().state_dict().items()}
    trained = AutoPeftModelForCausalLM.from_pretrained(model_dir)  # stock peft, base found through the adapter config
    final = trained.state_dict()
    lora = [k for k in initial if "lora_" in k]
    base = [k for k in initial if "lora_" not in k]
    assert lora and base
    assert all(torch.equal(initial[k], final[k]) for k in base)  # base weights untouched
    assert all(not torch.equal(initial[k], final[k]) for k in lora if "lora_B" in k)  # every adapter matrix B moved

    cfg = compose_eval([f"run_dir={run_dir}", f"output_dir={tmp_path / 'eval'}", "max_rows=4"])
    evaluate_run(cfg)
    first = read_jsonl(tmp_path / "eval" / "predictions.jsonl")[0]
    row = read_jsonl(Path(method.run.data.eval))[first["row"] - 1]
    tok = method.tokenizer
    reference = completion_logp(AutoModelForCausalLM.from_pretrained(model_dir / "base").eval(), tok, row)
    policy = completion_logp(trained.eval(), tok, row)
    assert first["ref_logp"] == pytest.approx(reference, abs=1e-4)  # the reference is the base, adapter off
    assert first["logp"] == pytest.approx(policy, abs=1e-4) and first["logp"] != pytest.approx(first["ref_logp"])
    from rewardctl.export import export_run

    export_run(compose_export([f"run_dir={run_dir}", f"output_dir={tmp_path / 'exported'}"]))
    for merged_dir in (run_dir / "model-merged", tmp_path / "exported"):  # written by the run, and by export
        merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()  # stock transformers alone
        assert completion_logp(merged, tok, row) == pytest.approx(policy, abs=1e-4)
        saved = json.loads((merged_dir / "config.json").read_text())["rewardctl"]
        assert saved["delta"] == pytest.approx(summary["final_eval"]["delta"])  # the threshold travels with it
