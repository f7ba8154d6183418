"""End-to-end behaviour of the shared loop with the pairwise method, in-process on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

from rewardctl.errors import ConfigError, DataError
from rewardctl.evaluate import evaluate_run
from rewardctl.methods.pairwise import PairwiseMethod
from rewardctl.methods.registry import to_run_config

from ..conftest import (
    SAMPLES,
    assert_eval_reproduces,
    compose_eval,
    compose_train,
    optional_module,
    read_jsonl,
    reset_accelerate,
    run_training,
    write_jsonl,
)

TIMING_KEYS = {"train_seconds", "eval_seconds", "pairs_per_sec", "tokens_per_sec"}
SHORT = [
    "train.max_steps=100",
    "train.eval_every=50",
    "train.log_every=10",
    "train.weight_decay=0.0",
    "data.max_eval_rows=200",
]


def comparable(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 100-step run on the bundled sample, shared by the tests that inspect its outputs."""
    tmp_path = tmp_path_factory.mktemp("trained")
    summary, run_dir = run_training(tmp_path, SHORT)
    return summary, run_dir


def test_run_directory_layout(trained):
    summary, run_dir = trained
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "curves.png",
        "summary.json",
        "data_report.json",
        "model/config.json",
        "model/model.safetensors",
        "model/tokenizer.json",
        "model/chat_template.jinja",
    ):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert all({"step", "split"} <= set(r) for r in records)
    assert [r["step"] for r in records if r["split"] == "eval"] == [0, 50, 100]
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(10, 101, 10))
    assert summary["status"] == "completed" and summary["step"] == 100 and summary["totals"]["pairs"] == 1600
    assert json.loads((run_dir / "model" / "config.json").read_text())["rewardctl"]["method"] == "pairwise"
    weights = load_file(str(run_dir / "model" / "model.safetensors"))
    total = sum(v.numel() for v in weights.values())
    assert summary["parameters"] == {"total": total, "trainable": total}  # full fine-tune: everything trains
    assert summary["peak_gpu_memory_gib"] is None  # CPU run


def test_loss_falls_and_heldout_accuracy_rises(trained):
    summary, run_dir = trained
    train = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["split"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"] - 0.15
    first, final = summary["first_eval"], summary["final_eval"]
    assert first["loss"] == pytest.approx(0.693, abs=0.02)  # an untrained head starts at ln 2
    assert final["accuracy"] > first["accuracy"] + 0.15 and final["loss"] < first["loss"] - 0.1


def test_every_trainable_parameter_changed(trained):
    _, run_dir = trained
    run = to_run_config(compose_train([f"output_dir={run_dir}", *SHORT]))
    method = PairwiseMethod(run.method, run)
    set_seed(run.train.seed)  # the session seeds exactly here, so this rebuilds the initial weights
    initial = {k.removeprefix("classifier."): v for k, v in method.build_model().state_dict().items()}
    final = load_file(str(run_dir / "model" / "model.safetensors"))
    assert set(initial) == set(final)
    unchanged = [k for k in initial if torch.equal(initial[k], final[k])]
    assert unchanged == []


def test_stock_transformers_reload_and_pipeline_give_the_training_scores(trained, tmp_path: Path):
    summary, run_dir = trained
    cfg = compose_eval([f"run_dir={run_dir}", f"output_dir={tmp_path}", "max_rows=16"])
    evaluate_run(cfg)
    predictions = read_jsonl(tmp_path / "predictions.jsonl")
    rows = read_jsonl(SAMPLES / "pairwise" / "eval.jsonl")[:16]
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "model").eval()
    texts = [r["prompt"] + r["chosen"] + tokenizer.eos_token for r in rows]
    with torch.no_grad():
        stock = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits.squeeze(-1)
    ours = torch.tensor([p["chosen_reward"] for p in predictions])
    torch.testing.assert_close(stock, ours, atol=1e-5, rtol=1e-5)
    scorer = pipeline("text-classification", model=str(run_dir / "model"), device="cpu")
    piped = torch.tensor([out["score"] for out in scorer(texts[:4])])
    torch.testing.assert_close(piped, ours[:4], atol=1e-5, rtol=1e-5)
    assert scorer(texts[0])[0]["label"] == "reward"


def test_eval_command_reproduces_the_end_of_training_eval(trained):
    summary, run_dir = trained
    result = assert_eval_reproduces(
        run_dir,
        None,
        summary["final_eval"],
        ("loss", "accuracy", "margin", "reward_mean", "reward_std", "reward_min", "reward_max", "pairs"),
        rel=1e-6,
    )
    saved = json.loads((run_dir / "eval" / "eval" / "metrics.json").read_text())
    assert saved["metrics"] == result["metrics"]
    assert len(read_jsonl(run_dir / "eval" / "eval" / "predictions.jsonl")) == 200


def test_eval_from_a_checkpoint(tmp_path: Path):
    summary, run_dir = run_training(tmp_path, ["experiment=smoke"])
    result = evaluate_run(compose_eval([f"run_dir={run_dir}", "checkpoint=step-6"]))
    assert result["metrics"]["accuracy"] == pytest.approx(summary["final_eval"]["accuracy"])
    assert result["metrics"]["loss"] == pytest.approx(summary["final_eval"]["loss"], rel=1e-6)


RESUMABLE = [
    "experiment=smoke",
    "train.max_steps=12",
    "train.save_every=4",
    "train.eval_every=4",
    "train.log_every=4",
    "model.disable_dropout=false",
    "+model.config_overrides.attention_dropout=0.2",
]


def test_resume_from_a_mid_run_checkpoint_matches_an_uninterrupted_run(tmp_path: Path):
    """Stopping at step 6 (between two log steps) and rerunning the same command must give exactly the
    uninterrupted run: same metrics.jsonl (the half-filled log window is carried in the checkpoint),
    same weights, same metric totals."""
    full, full_dir = run_training(tmp_path, RESUMABLE, name="full")
    chunked = [*RESUMABLE, "train.stop_after_steps=6"]
    stopped, part_dir = run_training(tmp_path, chunked, name="part")
    assert stopped["status"] == "stopped" and stopped["step"] == 6 and not (part_dir / "model").exists()
    assert sorted(p.name for p in (part_dir / "checkpoints").iterdir()) == ["step-4", "step-6"]
    resumed, _ = run_training(tmp_path, chunked, name="part")  # the same command continues (6 more steps)
    assert resumed["status"] == "completed" and resumed["step"] == 12
    assert comparable(read_jsonl(part_dir / "metrics.jsonl")) == comparable(read_jsonl(full_dir / "metrics.jsonl"))
    assert resumed["totals"] == full["totals"] and resumed["final_eval"]["loss"] == full["final_eval"]["loss"]
    full_weights = load_file(str(full_dir / "model" / "model.safetensors"))
    part_weights = load_file(str(part_dir / "model" / "model.safetensors"))
    assert all(torch.equal(full_weights[k], part_weights[k]) for k in full_weights)
    assert sorted(p.name for p in (part_dir / "checkpoints").iterdir()) == ["step-12", "step-8"]  # keep_checkpoints=2


def test_resume_refuses_a_checkpoint_with_a_different_data_order(tmp_path: Path):
    _, run_dir = run_training(tmp_path, [*RESUMABLE, "train.stop_after_steps=4"])
    for override, key in (
        ("data.max_train_rows=40", "train_rows"),
        ("train.per_device_batch_size=2", "per_device_batch_size"),
        ("data.group_by_length=false", "group_by_length"),
    ):
        with pytest.raises(ConfigError) as info:
            run_training(tmp_path, [*RESUMABLE, override])
        reset_accelerate()
        assert info.value.key == "train.resume" and key in str(info.value)
    with pytest.raises(ConfigError, match="is not a rewardctl checkpoint"):
        to_run_config(compose_train([f"train.resume={run_dir}"]))


def test_a_finished_run_without_checkpoints_is_not_retrained_over(tmp_path: Path):
    summary, run_dir = run_training(tmp_path, ["experiment=smoke", "train.save_every=0", "train.max_steps=2"])
    before = (run_dir / "model" / "model.safetensors").read_bytes()
    with pytest.raises(ConfigError) as info:
        run_training(tmp_path, ["experiment=smoke", "train.save_every=0", "train.max_steps=4"])
    reset_accelerate()
    assert "no checkpoint to continue from" in str(info.value)
    assert (run_dir / "model" / "model.safetensors").read_bytes() == before


def test_gradient_accumulation_is_normalised_like_one_big_batch(tmp_path: Path):
    common = [
        "experiment=smoke",
        "train.max_steps=5",
        "train.log_every=1",
        "train.save_every=0",
        "train.eval_every=0",
        "data.group_by_length=false",
    ]  # same rows per optimizer step in both runs
    big, big_dir = run_training(tmp_path, [*common, "train.per_device_batch_size=16"], name="big")
    small, small_dir = run_training(
        tmp_path, [*common, "train.per_device_batch_size=8", "train.grad_accum=2"], name="small"
    )
    big_train = [r for r in read_jsonl(big_dir / "metrics.jsonl") if r["split"] == "train"]
    small_train = [r for r in read_jsonl(small_dir / "metrics.jsonl") if r["split"] == "train"]
    assert [r["pairs"] for r in small_train] == [16, 32, 48, 64, 80]
    for a, b in zip(big_train, small_train, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a["grad_norm"] == pytest.approx(
            b["grad_norm"], rel=1e-4
        )
    a, b = load_file(str(big_dir / "model/model.safetensors")), load_file(str(small_dir / "model/model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_existing_runs_are_never_clobbered(tmp_path: Path):
    summary, run_dir = run_training(tmp_path, ["experiment=smoke"])
    files = ("metrics.jsonl", "config.yaml", "data_report.json", "summary.json", "model/model.safetensors")
    before = {name: (run_dir / name).read_bytes() for name in files}
    again, _ = run_training(tmp_path, ["experiment=smoke", "train.lr=0.5"])  # resume=auto on a finished run
    assert again == summary
    with pytest.raises(ConfigError) as info:
        run_training(tmp_path, ["experiment=smoke", "train.resume=off", "train.lr=0.5"])
    reset_accelerate()
    assert info.value.key == "train.resume" and "already holds a run" in str(info.value)
    assert {name: (run_dir / name).read_bytes() for name in files} == before


def test_bad_rows_and_overlength_rows_are_counted_before_training(tmp_path: Path):
    rows = read_jsonl(SAMPLES / "pairwise" / "train.jsonl")[:40]
    rows[3]["chosen"] = ""
    rows[7] = {"prompt": rows[7]["prompt"], "chosen": rows[7]["chosen"]}
    rows[9]["rejected"] = rows[9]["rejected"] + " and so on" * 100
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError) as info:
        run_training(tmp_path, ["experiment=smoke", f"data.train={path}"], name="strict")
    reset_accelerate()
    assert f"{path}, row 4, field 'chosen': is empty" in str(info.value)
    assert not (tmp_path / "strict" / "model").exists()
    summary, run_dir = run_training(
        tmp_path,
        [
            "experiment=smoke",
            f"data.train={path}",
            "data.bad_rows=skip",
            "data.overlength=drop",
            "model.max_length=150",
        ],
        name="lenient",
    )
    report = json.loads((run_dir / "data_report.json").read_text())["train"]
    assert report["skipped_bad"] == 2 and report["dropped_overlength"] == 1 and report["used"] == 37
    assert report["errors"][0] == f"{path}, row 4, field 'chosen': is empty"
    assert report["errors"][1] == f"{path}, row 8, field 'rejected': is missing (null)"
    assert summary["status"] == "completed"


def test_conversational_data_and_margins_with_centering_train(tmp_path: Path):
    chat, _ = run_training(tmp_path, ["experiment=smoke", "data=pairwise_sample_chat"], name="chat")
    assert chat["status"] == "completed"
    rows = read_jsonl(SAMPLES / "pairwise" / "train.jsonl")[:32]
    for i, row in enumerate(rows):
        row["margin"] = float(i % 3)
    path = write_jsonl(tmp_path / "margin.jsonl", rows)
    margin, run_dir = run_training(
        tmp_path, ["experiment=smoke", f"data.train={path}", "method.center_rewards_coefficient=0.01"], name="margin"
    )
    assert margin["status"] == "completed"
    assert json.loads((run_dir / "data_report.json").read_text())["train"]["margin"] is True


def test_tensorboard_tracker_receives_the_metrics(tmp_path: Path):
    optional_module("tensorboard", "tensorboard")
    summary, run_dir = run_training(tmp_path, ["experiment=smoke", "train.report_to=[tensorboard]"])
    assert summary["status"] == "completed"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir / "trackers" / "rewardctl"))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"train/loss", "train/accuracy", "eval/loss", "eval/accuracy"} <= tags
    assert [e.step for e in accumulator.Scalars("eval/accuracy")] == [0, 3, 6]


def test_heldout_split_errors_and_predictions_use_file_row_numbers(tmp_path: Path):
    rows = read_jsonl(SAMPLES / "pairwise" / "train.jsonl")[:60]
    rows[2]["chosen"] = ""
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    overrides = [
        "experiment=smoke",
        f"data.train={path}",
        "data.eval=null",
        "data.holdout_fraction=0.25",
        "train.max_steps=2",
        "data.max_eval_rows=null",
    ]
    with pytest.raises(DataError) as info:
        run_training(tmp_path, overrides, name="strict")
    reset_accelerate()
    assert f"{path}, row 3, field 'chosen': is empty" in str(info.value)
    summary, run_dir = run_training(tmp_path, [*overrides, "data.bad_rows=skip"], name="lenient")
    result = evaluate_run(compose_eval([f"run_dir={run_dir}"]))
    assert result["metrics"]["accuracy"] == pytest.approx(summary["final_eval"]["accuracy"])
    predicted = [r["row"] for r in read_jsonl(run_dir / "eval" / "train-holdout" / "predictions.jsonl")]
    report = json.loads((run_dir / "data_report.json").read_text())
    assert len(predicted) == report["eval"]["used"] == 15 and predicted == sorted(predicted)
    assert set(predicted) <= set(range(1, 61)) and max(predicted) > 15  # file rows, not positions in the split
