"""Acceptance on the real datasets of ../shared/data, end to end, one test per method (slow; skipped
when ../shared is absent). The figures of each run are printed (pytest -s) and kept in the run's
summary.json; docs/benchmarks.md records them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from safetensors.torch import load_file

from .conftest import compose_eval, read_jsonl, run_training

pytestmark = [pytest.mark.slow, pytest.mark.acceptance]


def test_pairwise_hh_rlhf_with_minilm(tmp_path: Path, shared_data: Path, minilm_path: Path):
    """HH-RLHF pairs, MiniLM-L6: 1 epoch over the first 1,000 train pairs (the full 2,000 run is in
    `make bench`), 8 pairs per batch, lr 5e-5, at most 256 tokens, 250 held-out pairs. HH-RLHF is hard
    for a 22M-parameter encoder at this budget (TRL's RewardTrainer is at chance too)."""
    data = shared_data / "hh_rlhf_pairwise"
    summary, run_dir = run_training(tmp_path, [
        "model=minilm", f"model.name_or_path={minilm_path}", f"data.train={data / 'train.jsonl'}",
        f"data.eval={data / 'test.jsonl'}", "data.max_train_rows=1000", "data.max_eval_rows=250", "train.epochs=1",
        "train.per_device_batch_size=8", "train.lr=5e-5", "model.max_length=256", "train.log_every=25",
    ])
    report = json.loads((run_dir / "data_report.json").read_text())
    first, final = summary["first_eval"], summary["final_eval"]
    print(f"\nHH-RLHF pairwise, MiniLM-L6: held-out accuracy {first['accuracy']:.3f} -> {final['accuracy']:.3f} "
          f"on {final['pairs']:.0f} pairs, loss {first['loss']:.4f} -> {final['loss']:.4f}, "
          f"{summary['pairs_per_sec']:.2f} pairs/s ({summary['train_seconds']:.0f} s), "
          f"{report['train']['truncated']} of {report['train']['rows']} train pairs truncated (none dropped)")
    assert summary["status"] == "completed" and summary["step"] == 125
    assert report["train"]["used"] == 1000 and report["eval"]["used"] == 250  # truncation keeps every pair
    assert final["pairs"] == 250 and 0.0 <= final["accuracy"] <= 1.0
    assert first["loss"] == pytest.approx(0.693, abs=0.01)  # an untrained head starts at ln 2
    train = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["split"] == "train"]
    assert len(train) == 5 and all(r["grad_norm"] > 0 for r in train)
    assert (run_dir / "model" / "model.safetensors").is_file()


def test_ranklist_rlhf_glm_sentiment_with_minilm(tmp_path: Path, shared_data: Path, minilm_path: Path):
    """Chinese review lists of 4 ranked by sentiment (the RLHF_GLM article's data), MiniLM-L6.

    Budget: 800 train lists (3,200 responses), 1 epoch, 8 lists per batch, lr 5e-5, 128 tokens (the
    article's max_seq_len); held-out pairwise accuracy on 300 lists (1,800 ordered pairs)."""
    data = shared_data / "rlhf_glm_sentiment_ranklist"
    summary, run_dir = run_training(tmp_path, [
        "method=ranklist", "model=minilm", f"model.name_or_path={minilm_path}", f"data.train={data / 'train.jsonl'}",
        f"data.eval={data / 'test.jsonl'}", "data.max_train_rows=800", "data.max_eval_rows=300", "train.epochs=1",
        "train.per_device_batch_size=8", "train.lr=5e-5", "model.max_length=128", "train.log_every=25",
    ])
    first, final = summary["first_eval"], summary["final_eval"]
    print(f"\nRLHF_GLM sentiment ranklist, MiniLM-L6: held-out pairwise accuracy {first['accuracy']:.3f} -> "
          f"{final['accuracy']:.3f} on {final['pairs']:.0f} pairs, Kendall tau {first['kendall_tau']:.3f} -> "
          f"{final['kendall_tau']:.3f}, top-1 {final['top1_accuracy']:.3f}, exact order "
          f"{final['exact_order_accuracy']:.3f}, {summary['lists_per_sec']:.2f} lists/s ({summary['train_seconds']:.0f} s)")
    assert summary["status"] == "completed" and summary["step"] == 100
    assert final["lists"] == 300 and final["pairs"] == 1800
    assert first["loss"] == pytest.approx(0.693, abs=0.01)
    assert final["accuracy"] > 0.6 and final["kendall_tau"] > first["kendall_tau"] + 0.2


def test_bco_hh_rlhf_unpaired_end_to_end(tmp_path: Path, shared_data: Path):
    """Real unpaired HH-RLHF rows (half desirable), the bundled tiny policy from scratch, precomputed
    reference log-probs and UDM weights: trains, evaluates, and `rewardctl eval` reproduces the eval."""

    from rewardctl.evaluate import evaluate_run

    data = shared_data / "hh_rlhf_unpaired"
    summary, run_dir = run_training(tmp_path, [
        "method=bco", f"data.train={data / 'train.jsonl'}", f"data.eval={data / 'test.jsonl'}",
        "data.max_train_rows=800", "data.max_eval_rows=200", "model.max_length=256", "train.epochs=1",
        "train.per_device_batch_size=8", "method.precompute_ref_log_probs=true", "method.udm.enabled=true",
        "method.prompt_sample_size=200", "train.log_every=25", "train.save_every=100",
    ])
    report = json.loads((run_dir / "data_report.json").read_text())
    first, final = summary["first_eval"], summary["final_eval"]
    print(f"\nHH-RLHF unpaired, BCO, tiny policy: eval accuracy {first['accuracy']:.3f} -> {final['accuracy']:.3f}, "
          f"AUC {first['auc']:.3f} -> {final['auc']:.3f}, delta {final['delta']:.4f}, margin {final['rewards/margin']:.4f}, "
          f"{summary['rows_per_sec']:.1f} rows/s; {report['train']['truncated']} of 800 train rows truncated")
    assert summary["status"] == "completed" and summary["step"] == 100
    assert report["train"]["desirable"] + report["train"]["undesirable"] == report["train"]["used"] == 800
    assert final["rows"] == 200 and math.isfinite(final["loss"]) and final["delta"] != 0
    state = load_file(str(run_dir / "checkpoints" / "step-100" / "method_state.safetensors"))
    assert state["ref_logps.train"].shape == (800,) and state["udm_weights"].shape == (800,)
    cfg = compose_eval([f"run_dir={run_dir}", f"output_dir={tmp_path / 'eval'}"])
    result = evaluate_run(cfg)
    assert result["metrics"]["accuracy"] == pytest.approx(final["accuracy"])
    assert result["metrics"]["loss"] == pytest.approx(final["loss"], rel=1e-4)


def test_prm_prm800k_with_minilm(tmp_path: Path, shared_data: Path, minilm_path: Path):
    """Real PRM800K steps (lists up to 92 steps) with the MiniLM-L6 encoder as a token classifier.

    Budget: 800 train rows, 1 epoch, 8 rows per batch, lr 5e-5, 256 tokens (so truncation matters:
    rows whose first step no longer fits are skipped and counted), [SEP] between steps (BERT's
    tokenizer drops a newline). Step accuracy is judged against the majority-class baseline."""
    data = shared_data / "prm800k_stepwise"
    summary, run_dir = run_training(tmp_path, [
        "method=prm", "model=minilm", f"model.name_or_path={minilm_path}", f"data.train={data / 'train.jsonl'}",
        f"data.eval={data / 'test.jsonl'}", "data.max_train_rows=800", "data.max_eval_rows=200", "data.bad_rows=skip",
        "train.epochs=1", "train.per_device_batch_size=8", "train.lr=5e-5", "model.max_length=256",
        "method.step_separator='[SEP]'", "train.log_every=25",
    ])
    report = json.loads((run_dir / "data_report.json").read_text())
    first, final = summary["first_eval"], summary["final_eval"]
    print(f"\nPRM800K, MiniLM-L6: step accuracy {first['step_accuracy']:.3f} -> {final['step_accuracy']:.3f} "
          f"(majority baseline {final['majority_baseline']:.3f}) on {final['steps']:.0f} steps, wrong-step F1 "
          f"{first['error_f1']:.3f} -> {final['error_f1']:.3f}, first-error accuracy {first['first_error_accuracy']:.3f} -> "
          f"{final['first_error_accuracy']:.3f}; {report['train']['truncated']} train rows truncated, "
          f"{report['train']['skipped_bad']} skipped (no label left); {summary['steps_per_sec']:.1f} labelled steps/s")
    assert summary["status"] == "completed" and report["train"]["truncated"] > 0
    assert report["train"]["used"] + report["train"]["skipped_bad"] == 800
    assert final["rows"] == 200 and final["step_accuracy"] > final["majority_baseline"]
    assert final["error_f1"] > first["error_f1"] and final["loss"] < first["loss"]
