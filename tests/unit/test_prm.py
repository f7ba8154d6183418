"""PRM: exact ids and labels, soft-label loss by hand, accumulation-window normalisation, metrics by
hand, parity with TRL's tokenisation, and the sequence score_steps builds (the training run is in
tests/e2e/test_prm_runs.py)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rewardctl.config.schema import Overlength
from rewardctl.data.loading import load_rows
from rewardctl.errors import ConfigError, DataError, RowError
from rewardctl.methods.prm import IGNORE, PrmMethod, StepEncoder, score_steps, step_metrics
from rewardctl.methods.registry import to_run_config

from ..conftest import compose_train, optional_module, write_jsonl


def make_method(*overrides: str) -> PrmMethod:
    run = to_run_config(compose_train(["method=prm", *overrides]))
    return PrmMethod(run.method, run)


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# ---- tokenisation ---------------------------------------------------------------------------------
def test_each_label_sits_on_its_separator_and_nowhere_else():
    method = make_method()
    tok = method.tokenizer
    got, labels, targets, fit = method.encoder().encode("Q:", ["a", "bb"], [True, False], training=True)
    nl = ids(tok, "\n")
    assert len(nl) == 1
    expected = ids(tok, "Q:") + ids(tok, "a") + nl + ids(tok, "bb") + nl
    assert got == expected and fit == 0
    first_end = len(ids(tok, "Q:") + ids(tok, "a"))
    assert labels == [IGNORE] * first_end + [1] + [IGNORE] * len(ids(tok, "bb")) + [0]
    assert targets[first_end] == 1.0 and targets[-1] == 0.0


def test_a_multi_token_separator_carries_the_label_on_its_last_token():
    method = make_method("method.step_separator=' ## '")
    tok = method.tokenizer
    sep = ids(tok, " ## ")
    assert len(sep) > 1
    got, labels, _, _ = method.encoder().encode("Q:", ["x", "y"], [False, True], training=False)
    assert got == ids(tok, "Q:") + ids(tok, "x") + sep + ids(tok, "y") + sep
    labelled = [i for i, v in enumerate(labels) if v != IGNORE]
    assert labelled == [len(ids(tok, "Q:") + ids(tok, "x") + sep) - 1, len(got) - 1]
    assert [labels[i] for i in labelled] == [0, 1]


def test_last_step_only_applies_to_training_and_eval_labels_every_step():
    method = make_method("method.train_on_last_step_only=true")
    encoder = method.encoder()
    _, train_labels, _, _ = encoder.encode("Q:", ["a", "b", "c"], [True, True, False], training=True)
    _, eval_labels, _, _ = encoder.encode("Q:", ["a", "b", "c"], [True, True, False], training=False)
    assert [v for v in train_labels if v != IGNORE] == [0]
    assert [v for v in eval_labels if v != IGNORE] == [1, 1, 0]


def test_bos_or_cls_comes_first():
    method = make_method()
    method.tokenizer.bos_token = "<|im_start|>"
    got, labels, _, _ = method.encoder().encode("Q:", ["a"], [True], training=True)
    assert got[0] == method.tokenizer.bos_token_id and got[1:] == ids(method.tokenizer, "Q:") + ids(
        method.tokenizer, "a\n"
    )


def test_truncation_keeps_the_prompt_end_and_the_first_steps_with_their_labels():
    method = make_method("method.max_length=12", "method.max_prompt_length=3")
    tok = method.tokenizer
    prompt = "one two three four"
    steps = ["s1", "s2", "s3", "s4", "s5"]
    got, labels, _, fit = method.encoder().encode(prompt, steps, [True, False, True, True, False], training=False)
    assert fit == 1 and len(got) == 12
    assert got[:3] == ids(tok, prompt)[-3:]  # the prompt's end
    completion = []
    for step in steps:
        completion += ids(tok, step) + ids(tok, "\n")
    assert got[3:] == completion[:9]  # the steps' start
    kept = [v for v in labels if v != IGNORE]
    per_step = len(ids(tok, "s1") + ids(tok, "\n"))
    assert kept == [1, 0, 1, 1, 0][: 9 // per_step]  # labels go with their steps


def test_a_row_that_loses_every_label_is_reported_and_counted(tmp_path: Path):
    method = make_method("method.max_length=8", "method.max_prompt_length=4")
    with pytest.raises(RowError, match="no step label survives truncation"):
        method.encoder().encode("Q:", ["a very long first step indeed"], [True], training=True)
    rows = [
        {"prompt": "Q:", "completions": ["ok"], "labels": [True]},
        {"prompt": "Q:", "completions": ["a very long first step indeed"], "labels": [False]},
    ]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    with pytest.raises(DataError, match="row 2, field 'completions': no step label survives"):
        method.prepare(load_rows(str(path), split="train"), str(path), training=True)
    skipping = make_method("method.max_length=8", "method.max_prompt_length=4", "data.bad_rows=skip")
    split = skipping.prepare(load_rows(str(path), split="train"), str(path), training=True)
    assert split.report["skipped_bad"] == 1 and split.report["used"] == 1


def test_labels_stay_int64_through_datasets_and_soft_labels_keep_their_value(tmp_path: Path):
    rows = [
        {"prompt": "Q:", "completions": ["a", "b"], "labels": [True, False]},
        {"prompt": "Q:", "completions": ["c", "d"], "labels": [0.75, 0.25]},
    ]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    method = make_method()
    split = method.prepare(load_rows(str(path), split="train"), str(path), training=True)
    assert split.dataset.features["labels"].feature.dtype == "int64"  # TRL's -100 -> True cast cannot happen
    batch = method.collate(list(split.dataset))
    assert batch["labels"].dtype == torch.int64 and (batch["labels"] == IGNORE).sum() > 0
    labelled = batch["labels"] != IGNORE
    assert batch["labels"][labelled].tolist() == [1, 0, 1, 0]
    assert batch["targets"][labelled].tolist() == [1.0, 0.0, 0.75, 0.25]
    assert split.report["labelled_steps"] == 4


def test_collate_pads_ids_labels_and_targets_exactly():
    method = make_method()
    pad = method.tokenizer.pad_token_id
    features = [
        {"input_ids": [5, 6, 7], "labels": [IGNORE, 1, 0], "targets": [0.0, 1.0, 0.0]},
        {"input_ids": [8], "labels": [1], "targets": [0.75]},
    ]
    batch = method.collate(features)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, pad, pad]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 1, 0], [1, IGNORE, IGNORE]]
    assert batch["targets"].tolist() == [[0.0, 1.0, 0.0], [0.75, 0.0, 0.0]]
    assert batch["labels"].dtype == torch.int64 and batch["targets"].dtype == torch.float32


@pytest.mark.parametrize(
    ("row", "field", "text"),
    [
        ({"prompt": "Q", "completions": ["a", "b"], "labels": [True]}, "labels", "one label per step: 2 steps, got 1"),
        ({"prompt": "Q", "completions": [], "labels": []}, "completions", "non-empty list of steps"),
        ({"prompt": "Q", "completions": ["a", ""], "labels": [True, True]}, "completions[1]", "is empty"),
        ({"prompt": "Q", "completions": ["a"], "labels": [1.5]}, "labels[0]", "probability in [0, 1]"),
    ],
)
def test_bad_rows_name_row_and_field(tmp_path: Path, row, field, text):
    numeric = any(not isinstance(v, bool) for v in row["labels"])
    good = {"prompt": "Q", "completions": ["a"], "labels": [0.5 if numeric else True]}  # one JSON type per column
    path = write_jsonl(tmp_path / "bad.jsonl", [good, row])
    method = make_method()
    with pytest.raises(DataError) as info:
        method.prepare(load_rows(str(path), split="train"), str(path), training=True)
    assert "row 2" in str(info.value) and f"'{field}'" in str(info.value) and text in str(info.value)


def test_an_empty_separator_is_refused_by_name():
    with pytest.raises(ConfigError, match="method.step_separator"):
        make_method("method.step_separator=''")


# ---- loss and metrics -----------------------------------------------------------------------------
class FixedLogits(torch.nn.Module):
    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(logits)

    def forward(self, input_ids, attention_mask, **kwargs):
        return SimpleNamespace(logits=self.logits[: input_ids.shape[0], : input_ids.shape[1]])


def test_soft_cross_entropy_over_labelled_positions_by_hand():
    method = make_method()
    batch = {
        "input_ids": torch.zeros(2, 3, dtype=torch.long),
        "attention_mask": torch.ones(2, 3, dtype=torch.long),
        "labels": torch.tensor([[IGNORE, 1, 0], [IGNORE, IGNORE, 1]]),
        "targets": torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.75]]),
    }
    logits = torch.tensor([[[5.0, -5.0], [0.0, 2.0], [1.0, 0.0]], [[0.0, 0.0], [3.0, 3.0], [0.0, 1.0]]])
    out = method.train_step(FixedLogits(logits), batch)

    def log_p1(a: float, b: float) -> float:
        return b - math.log(math.exp(a) + math.exp(b))

    expected = (
        -log_p1(0.0, 2.0)
        - math.log(1 - math.exp(log_p1(1.0, 0.0)))
        - (0.75 * log_p1(0.0, 1.0) + 0.25 * math.log(1 - math.exp(log_p1(0.0, 1.0))))
    )
    assert out.loss_sum.item() == pytest.approx(expected, abs=1e-5)
    assert method.batch_weight(batch).item() == 3
    assert out.metrics["step_accuracy"].value.item() == 3  # argmax: correct, incorrect, correct


def test_accumulation_window_normalisation_matches_one_batch(tmp_path: Path):
    """Two micro-batches with 2 and 7 labelled steps, each loss summed and divided by the window's 9,
    give the gradient of the one batch holding all rows (what the loop does with batch_weight)."""
    from accelerate.utils import set_seed

    method = make_method()
    rows = [
        {"prompt": "Start:", "completions": ["1+1=2."], "labels": [True]},
        {"prompt": "Start:", "completions": ["2+2=5."], "labels": [False]},
        {"prompt": "Go:", "completions": ["a", "b", "c", "d"], "labels": [True, True, False, True]},
        {"prompt": "Go:", "completions": ["x", "y", "z"], "labels": [0.2, 0.9, 1.0]},
    ]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    features = list(method.prepare(load_rows(str(path), split="train"), str(path), training=True).dataset)
    set_seed(0)
    model = method.build_model()

    def gradient(batches: list[list[dict]]) -> torch.Tensor:
        model.zero_grad()
        collated = [method.collate(b) for b in batches]
        total = sum(method.batch_weight(b) for b in collated)
        for b in collated:
            (method.train_step(model, b).loss_sum / total).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    split = gradient([features[:2], features[2:]])
    whole = gradient([features])
    assert [method.batch_weight(method.collate(b)).item() for b in (features[:2], features[2:])] == [2, 7]
    torch.testing.assert_close(split, whole, atol=1e-6, rtol=1e-5)


def test_step_metrics_by_hand():
    outputs = {
        "step_prob": torch.tensor([[0.9, 0.2, 0.0], [0.8, 0.7, 0.6], [0.3, 0.9, 0.0]]),
        "step_label": torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 0]]),
        "step_target": torch.zeros(3, 3),
        "present": torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 0]]),
        "loss_sum": torch.tensor([0.7, 0.7, 0.7]),
    }
    m = step_metrics(outputs)
    # steps: (0.9,1) ok, (0.2,0) ok, (0.8,1) ok, (0.7,1) ok, (0.6,0) wrong, (0.3,1) wrong, (0.9,1) ok
    assert m["step_accuracy"] == pytest.approx(5 / 7)
    # wrong-step detection: tp = 1 (row 1 step 2), fp = 1 (row 3 step 1), fn = 1 (row 2 step 3)
    assert m["error_precision"] == pytest.approx(0.5) and m["error_recall"] == pytest.approx(0.5)
    assert m["error_f1"] == pytest.approx(0.5)
    # first error gold / predicted: row 1: 1 / 1; row 2: 2 / none; row 3: none / 0 -> one of three right
    assert m["first_error_accuracy"] == pytest.approx(1 / 3)
    assert m["majority_baseline"] == pytest.approx(5 / 7) and m["loss"] == pytest.approx(2.1 / 7)
    assert m["processbench_f1"] == 0.0  # 1 of 2 erroneous rows right, 0 of 1 correct row right
    both_right = step_metrics(
        {
            "step_prob": torch.tensor([[0.9, 0.9], [0.9, 0.1]]),
            "step_label": torch.tensor([[1, 1], [1, 0]]),
            "step_target": torch.zeros(2, 2),
            "present": torch.ones(2, 2, dtype=torch.long),
            "loss_sum": torch.zeros(2),
        }
    )
    assert both_right["processbench_f1"] == 1.0 and both_right["first_error_accuracy"] == 1.0


def test_tokenisation_matches_trl_0_29_prm_on_the_same_rows():
    trl_prm = optional_module("trl.experimental.prm.prm_trainer", "parity")
    rows = [
        {
            "prompt": "Which is larger, 9.8 or 9.11?",
            "completions": ["11 > 8.", "So 9.11 > 9.8."],
            "labels": [True, False],
        },
        {"prompt": "2+2?", "completions": ["2+2=4.", "answer=4."], "labels": [True, True]},
    ]
    for separator in ("\n", " ## "):
        method = make_method(f"method.step_separator='{separator}'")
        for row in rows:
            theirs = trl_prm.PRMTrainer.tokenize_row(
                row,
                method.tokenizer,
                separator,
                max_length=None,
                max_completion_length=None,
                train_on_last_step_only=False,
                is_eval=False,
            )
            got, labels, _, _ = method.encoder().encode(row["prompt"], row["completions"], row["labels"], training=True)
            assert got == theirs["input_ids"] and labels == theirs["labels"]


# ---- scoring --------------------------------------------------------------------------------------


def test_score_steps_builds_the_training_sequence():
    method = make_method()
    calls = []

    class Recorder(torch.nn.Module):
        config = SimpleNamespace(rewardctl={"step_separator": "\n"}, max_position_embeddings=512)

        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, input_ids):
            calls.append(input_ids[0].tolist())
            return SimpleNamespace(logits=torch.zeros(1, input_ids.shape[1], 2))

    probs = score_steps(Recorder(), method.tokenizer, "Q:", ["a", "b"])
    expected, _, _, _ = StepEncoder(method.tokenizer, method.cfg, 512, Overlength.truncate).encode(
        "Q:", ["a", "b"], [True, True], training=False
    )
    assert calls == [expected] and probs == [0.5, 0.5]
