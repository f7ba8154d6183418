"""LoRA for the reward-model methods: only the adapter and the head train, the saved adapter reloads
with stock peft, and the merged copy with stock transformers, all scoring as rewardctl eval does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate.utils import set_seed
from peft import AutoPeftModelForSequenceClassification, AutoPeftModelForTokenClassification
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

from rewardctl.evaluate import evaluate_run
from rewardctl.export import export_run
from rewardctl.methods.registry import method_class, to_run_config

from ..conftest import SAMPLES, compose_eval, compose_export, compose_train, read_jsonl, run_training, stock_scores

HEADS = {"pairwise": "score", "ranklist": "score", "prm": "score"}


def rewardctl_scores(method: str, predictions: list[dict]) -> list[list[float]]:
    if method == "prm":
        return [p["step_probs"] for p in predictions]
    return [[p["chosen_reward"] if method == "pairwise" else p["rewards"][0]] for p in predictions]


@pytest.mark.parametrize("method", ["pairwise", "ranklist", "prm"])
def test_lora_trains_adapter_and_head_only_and_reloads_with_stock_peft_and_merged(tmp_path: Path, method: str):
    overrides = [f"method={method}", "peft=lora", "peft.r=4", "experiment=smoke", "train.max_steps=6"]
    summary, run_dir = run_training(tmp_path, overrides)
    assert summary["status"] == "completed"
    model_dir, merged_dir = run_dir / "model", run_dir / "model-merged"
    assert (model_dir / "adapter_config.json").is_file() and (merged_dir / "config.json").is_file()

    run = to_run_config(compose_train([*overrides, f"output_dir={run_dir}"]))
    rebuilt = method_class(run.method._target_)(run.method, run)
    set_seed(run.train.seed)  # the session seeds exactly here: the starting weights again
    initial = {k.removeprefix("classifier."): v.clone() for k, v in rebuilt.build_model().state_dict().items()}
    auto = AutoPeftModelForTokenClassification if method == "prm" else AutoPeftModelForSequenceClassification
    labels = 2 if method == "prm" else 1
    adapted = auto.from_pretrained(model_dir, num_labels=labels).eval()
    final = adapted.state_dict()
    lora_b = [k for k in initial if "lora_B" in k]
    head = [k for k in initial if f"{HEADS[method]}.modules_to_save" in k]
    frozen = [k for k in initial if "lora_" not in k and "modules_to_save" not in k]
    assert lora_b and head and frozen
    assert all(torch.equal(initial[k], final[k]) for k in frozen), "base weights must not move"
    assert all(not torch.equal(initial[k], final[k]) for k in lora_b + head), "adapter and head must train"
    trainable = sum(v.numel() for k, v in initial.items() if "lora_" in k or f"{HEADS[method]}.modules_to_save" in k)
    assert summary["parameters"]["trainable"] == trainable < summary["parameters"]["total"]

    cfg = compose_eval([f"run_dir={run_dir}", f"output_dir={tmp_path / 'eval'}", "max_rows=4"])
    evaluate_run(cfg)
    predictions = read_jsonl(tmp_path / "eval" / "predictions.jsonl")
    rows = read_jsonl(SAMPLES / f"{method}" / "eval.jsonl")
    rows = [rows[p["row"] - 1] for p in predictions]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    merged_class = AutoModelForTokenClassification if method == "prm" else AutoModelForSequenceClassification
    merged = merged_class.from_pretrained(merged_dir).eval()
    # `rewardctl export` merges after the run (e.g. a sharded one, which writes no model-merged/).
    exported_dir = tmp_path / "exported"
    result = export_run(compose_export([f"run_dir={run_dir}", f"output_dir={exported_dir}"]))
    assert result["merged_adapter"] and not (exported_dir / "adapter_config.json").exists()
    exported = merged_class.from_pretrained(exported_dir).eval()
    ours = rewardctl_scores(method, predictions)
    for model in (adapted, merged, exported):
        for a, b in zip(stock_scores(method, model, tokenizer, rows), ours, strict=True):
            assert a == pytest.approx(b, abs=1e-4)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_with_lora_trains_the_adapter(tmp_path: Path, reentrant: bool):
    from safetensors.torch import load_file

    summary, run_dir = run_training(
        tmp_path,
        [
            "peft=lora",
            "peft.r=4",
            "experiment=smoke",
            "train.max_steps=4",
            "train.gradient_checkpointing=true",
            f"train.gradient_checkpointing_reentrant={str(reentrant).lower()}",
            "peft.save_merged=false",
        ],
    )
    assert summary["status"] == "completed" and not (run_dir / "model-merged").exists()
    adapter = load_file(str(run_dir / "model" / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: every one moved
