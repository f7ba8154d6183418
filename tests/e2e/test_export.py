"""`rewardctl export`: the run's model (any checkpoint, adapter merged, optionally cast) as a stock
transformers directory that scores exactly as `rewardctl eval` does; refusals before anything loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rewardctl.errors import ConfigError
from rewardctl.evaluate import evaluate_run
from rewardctl.export import export_run

from ..conftest import SAMPLES, completion_logp, compose_eval, compose_export, read_jsonl, run_training, stock_scores


def chosen_rewards(model_dir: Path, rows: list[dict]) -> list[float]:
    """Rewards of the chosen responses through stock transformers alone."""
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    return [s[0] for s in stock_scores("pairwise", model, AutoTokenizer.from_pretrained(model_dir), rows)]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A full fine-tune (no adapter) with checkpoints at steps 3 and 6."""
    _, run_dir = run_training(tmp_path_factory.mktemp("export"), ["experiment=smoke"])
    assert (run_dir / "checkpoints" / "step-3").is_dir()
    return run_dir


def test_a_checkpoint_exports_to_a_stock_model_scoring_as_eval_of_that_checkpoint(full_run: Path, tmp_path: Path):
    evaluate_run(
        compose_eval([f"run_dir={full_run}", "checkpoint=step-3", f"output_dir={tmp_path / 'eval'}", "max_rows=6"])
    )
    predictions = read_jsonl(tmp_path / "eval" / "predictions.jsonl")
    rows = read_jsonl(SAMPLES / "pairwise" / "eval.jsonl")
    rows = [rows[p["row"] - 1] for p in predictions]

    result = export_run(compose_export([f"run_dir={full_run}", "checkpoint=step-3"]))
    exported = full_run / "model-merged-step-3"
    assert result["output_dir"] == str(exported) and not result["merged_adapter"]
    got = chosen_rewards(exported, rows)
    assert got == pytest.approx([p["chosen_reward"] for p in predictions], abs=1e-5)
    # step 3 is not the final model: the export really came from the checkpoint
    assert got != pytest.approx(chosen_rewards(full_run / "model", rows), abs=1e-5)


def test_dtype_casts_the_weights_and_the_config(full_run: Path, tmp_path: Path):
    out = tmp_path / "bf16"
    export_run(compose_export([f"run_dir={full_run}", f"output_dir={out}", "dtype=bfloat16"]))
    weights = load_file(str(out / "model.safetensors"))
    assert {v.dtype for v in weights.values()} == {torch.bfloat16}
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.dtype == torch.bfloat16 and model.config.rewardctl["method"] == "pairwise"
    rows = read_jsonl(SAMPLES / "pairwise" / "eval.jsonl")[:4]
    full = chosen_rewards(full_run / "model", rows)
    assert chosen_rewards(out, rows) == pytest.approx(full, abs=0.05)


def test_refusals_leave_what_exists_untouched(full_run: Path, tmp_path: Path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="overwrite=true"):
        export_run(compose_export([f"run_dir={full_run}", f"output_dir={out}"]))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    for clash in (full_run / "model", full_run / "model" / "sub"):  # what the export reads
        with pytest.raises(ConfigError, match="overlaps the model being exported"):
            export_run(compose_export([f"run_dir={full_run}", f"output_dir={clash}", "overwrite=true"]))
    for clash in (full_run, full_run.parent, full_run / "checkpoints" / "mine"):  # the run itself
        with pytest.raises(ConfigError, match="overlaps|would replace the run"):
            export_run(compose_export([f"run_dir={full_run}", f"output_dir={clash}", "overwrite=true"]))
    assert (full_run / "model" / "model.safetensors").is_file() and (full_run / "checkpoints" / "step-3").is_dir()
    with pytest.raises(ConfigError, match="dtype"):
        export_run(compose_export([f"run_dir={full_run}", "dtype=auto"]))
    with pytest.raises(ConfigError, match="not a rewardctl run"):
        export_run(compose_export([f"run_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match="checkpoint"):
        export_run(compose_export([f"run_dir={full_run}", "checkpoint=step-99"]))
    with pytest.raises(ConfigError, match="run_dir"):
        export_run(compose_export([]))

    export_run(compose_export([f"run_dir={full_run}", f"output_dir={out}", "overwrite=true"]))
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()


def test_a_lora_checkpoint_of_bco_exports_merged_with_that_checkpoints_delta(tmp_path: Path):
    """A checkpoint is rebuilt (adapter included), merged, and saved with the delta of its own
    method state, not the final one; stock transformers then gives eval's log-probabilities."""
    from transformers import AutoModelForCausalLM

    _, run_dir = run_training(
        tmp_path, ["method=bco", "peft=lora", "peft.r=4", "experiment=smoke", "peft.save_merged=false"]
    )
    state = load_file(str(run_dir / "checkpoints" / "step-3" / "method_state.safetensors"))
    delta_at_3 = (state["delta_total"] / state["delta_count"]).item()
    export_run(compose_export([f"run_dir={run_dir}", "checkpoint=step-3"]))
    exported = run_dir / "model-merged-step-3"
    assert not (exported / "adapter_config.json").exists()
    saved = AutoModelForCausalLM.from_pretrained(exported).eval()
    assert saved.config.rewardctl["delta"] == pytest.approx(delta_at_3)
    final_delta = json.loads((run_dir / "model" / "rewardctl.json").read_text())["delta"]
    assert delta_at_3 != pytest.approx(final_delta)  # really the checkpoint's, not the end's

    evaluate_run(
        compose_eval([f"run_dir={run_dir}", "checkpoint=step-3", f"output_dir={tmp_path / 'eval'}", "max_rows=3"])
    )
    tokenizer = AutoTokenizer.from_pretrained(exported)
    rows = read_jsonl(SAMPLES / "bco" / "eval.jsonl")
    for prediction in read_jsonl(tmp_path / "eval" / "predictions.jsonl"):
        row = rows[prediction["row"] - 1]
        assert completion_logp(saved, tokenizer, row) == pytest.approx(prediction["logp"], abs=1e-4)
