"""`rewardctl eval benchmark=reward_bench` on a small RewardBench-format file, in-process on a
briefly trained tiny pairwise model: groups, section scores, and the overall metrics of a plain eval."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from rewardctl.evaluate import evaluate_run

from ..conftest import SAMPLES, compose_eval, read_jsonl, run_training, write_jsonl

SUBSETS = ["alpacaeval-easy", "mt-bench-hard", "donotanswer", "hep-python", "math-prm", "my-own"]


def test_reward_bench_eval_reports_groups_and_sections(tmp_path: Path):
    _, run_dir = run_training(
        tmp_path, ["experiment=smoke", "train.max_steps=2", "train.eval_every=0", "train.save_every=0"]
    )
    rows = read_jsonl(SAMPLES / "pairwise" / "eval.jsonl")[:12]
    bench = [{**row, "subset": SUBSETS[i % len(SUBSETS)], "id": i} for i, row in enumerate(rows)]
    bench_file = write_jsonl(tmp_path / "reward_bench.jsonl", bench)
    plain_file = write_jsonl(tmp_path / "plain.jsonl", rows)

    plain = evaluate_run(compose_eval([f"run_dir={run_dir}", f"dataset={plain_file}", f"output_dir={tmp_path / 'p'}"]))
    assert "groups" not in plain  # no subset column, no group_by: a plain eval
    out = tmp_path / "rb"
    bench_args = [f"run_dir={run_dir}", f"dataset={bench_file}", "benchmark=reward_bench"]
    evaluate_run(compose_eval([*bench_args, "chat_template=false", f"output_dir={out}"]))
    result = json.loads((out / "metrics.json").read_text())

    assert result["metrics"] == pytest.approx(plain["metrics"])  # the overall numbers are the plain eval's
    assert result["chat_template"] is False
    assert result["group_by"] == "subset" and sorted(result["groups"]) == sorted(SUBSETS)
    assert all(result["group_rows"][s] == 2 and result["groups"][s]["pairs"] == 2 for s in SUBSETS)
    predictions = {p["row"] - 1: p["correct"] for p in read_jsonl(out / "predictions.jsonl")}
    for subset in SUBSETS:  # each group's accuracy is that of its own rows
        own = [predictions[i] for i, row in enumerate(bench) if row["subset"] == subset]
        assert result["groups"][subset]["accuracy"] == pytest.approx(sum(own) / len(own))

    scores = result["reward_bench"]
    accuracy = {s: result["groups"][s]["accuracy"] for s in SUBSETS}
    assert scores["sections"]["Chat"] == pytest.approx(accuracy["alpacaeval-easy"])
    assert scores["sections"]["Chat Hard"] == pytest.approx(accuracy["mt-bench-hard"])
    assert scores["sections"]["Safety"] == pytest.approx(accuracy["donotanswer"])
    reasoning = (accuracy["math-prm"] * 984 + accuracy["hep-python"] * 164) / (984 + 164)
    assert scores["sections"]["Reasoning"] == pytest.approx(reasoning)
    assert scores["score"] == pytest.approx(sum(scores["sections"].values()) / 4)
    assert set(scores["incomplete"]) == {"Chat", "Chat Hard", "Safety", "Reasoning"}
    assert scores["unknown_subsets"] == ["my-own"]

    table = list(csv.DictReader((out / "groups.csv").open(encoding="utf-8")))
    assert [line["subset"] for line in table] == [*sorted(SUBSETS), "(overall)"]
    assert float(table[-1]["accuracy"]) == pytest.approx(plain["metrics"]["accuracy"])


def test_reward_bench_renders_rows_through_the_chat_template_as_its_script_does(tmp_path: Path):
    """The bundled tokenizer has a chat template, so by default each RewardBench row is scored as the
    conversation [user: prompt, assistant: answer]: the same numbers as a plain eval of those rows
    written as chat messages, and not those of the plain-text rows."""
    _, run_dir = run_training(
        tmp_path, ["experiment=smoke", "train.max_steps=2", "train.eval_every=0", "train.save_every=0"]
    )
    rows = read_jsonl(SAMPLES / "pairwise" / "eval.jsonl")[:8]
    bench_file = write_jsonl(tmp_path / "rb.jsonl", [{**row, "subset": "hep-go"} for row in rows])
    chat_rows = [
        {
            "prompt": [{"role": "user", "content": row["prompt"]}],
            "chosen": [{"role": "assistant", "content": row["chosen"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]}],
        }
        for row in rows
    ]
    chat_file = write_jsonl(tmp_path / "chat.jsonl", chat_rows)
    as_chat = evaluate_run(compose_eval([f"run_dir={run_dir}", f"dataset={chat_file}", f"output_dir={tmp_path / 'c'}"]))
    bench = evaluate_run(
        compose_eval(
            [f"run_dir={run_dir}", f"dataset={bench_file}", "benchmark=reward_bench", f"output_dir={tmp_path / 'b'}"]
        )
    )
    assert bench["chat_template"] is True
    assert bench["metrics"] == pytest.approx(as_chat["metrics"])
    plain = evaluate_run(compose_eval([f"run_dir={run_dir}", f"dataset={bench_file}", f"output_dir={tmp_path / 'p'}"]))
    assert plain["metrics"]["margin"] != pytest.approx(bench["metrics"]["margin"])
