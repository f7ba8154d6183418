"""Eval by category: per-group metrics on hand-made outputs, and RewardBench's section weighting
against hand-computed numbers (rewardctl/eval_groups.py)."""

from __future__ import annotations

import csv
import io
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset

from rewardctl.config.schema import EvalConfig, Layout
from rewardctl.data.prepare import SOURCE_ROW_COLUMN
from rewardctl.errors import ConfigError
from rewardctl.eval_groups import (
    REWARD_BENCH_COUNTS,
    REWARD_BENCH_SECTIONS,
    Grouping,
    apply_benchmark,
    benchmark_uses_chat_template,
    group_metrics,
    grouped_results,
    groups_csv,
    pair_wins,
    plan_groups,
    reward_bench_scores,
    split_outputs,
)
from rewardctl.methods.pairwise import PairwiseMethod
from rewardctl.methods.ranklist import RanklistMethod
from rewardctl.methods.registry import to_run_config

from ..conftest import compose_train


def method_of(cls, *overrides: str):
    run = to_run_config(compose_train(list(overrides)))
    return cls(run.method, run)


# ---- grouping --------------------------------------------------------------------------------------
def pairwise_outputs() -> dict[str, torch.Tensor]:
    """Four pairs in eval order (rows 2, 0, 3, 1): rows 0, 1, 3 in group a, row 2 in group b."""
    return {
        "chosen_reward": torch.tensor([3.0, 1.0, 2.0, 0.0]),
        "rejected_reward": torch.tensor([1.0, 0.0, 2.5, 2.0]),
        "loss": torch.tensor([0.1, 0.2, 0.3, 0.4]),
        "row": torch.tensor([2, 0, 3, 1]),
    }


def test_pairwise_metrics_per_group_are_exact():
    method = method_of(PairwiseMethod)
    groups = {0: "a", 1: "a", 2: "b", 3: "a"}
    got = group_metrics(method, pairwise_outputs(), groups)
    assert list(got) == ["a", "b"]
    a, b = got["a"], got["b"]
    # a: pairs (1, 0), (2, 2.5), (0, 2): one of three right, margins 1, -0.5, -2
    assert a["accuracy"] == pytest.approx(1 / 3) and a["margin"] == pytest.approx(-1.5 / 3)
    assert a["loss"] == pytest.approx(0.3) and a["pairs"] == 3
    assert a["reward_mean"] == pytest.approx((1 + 2 + 0 + 0 + 2.5 + 2) / 6)
    assert a["reward_min"] == 0 and a["reward_max"] == 2.5
    # b: the pair (3, 1) alone
    assert b["accuracy"] == 1 and b["margin"] == 2 and b["loss"] == pytest.approx(0.1) and b["pairs"] == 1
    assert b["reward_std"] == pytest.approx(1.0)
    # every metric is the method's own on the group's outputs alone
    alone = method.eval_metrics({k: v[[1, 2, 3]] for k, v in pairwise_outputs().items()})
    assert a == pytest.approx(alone)


def test_ragged_list_outputs_are_selected_along_the_first_dimension():
    """Three ranked lists padded to width 3: the padding of a group stays masked."""
    method = method_of(RanklistMethod, "method=ranklist")
    outputs = {
        "rewards": torch.tensor([[3.0, 2.0, 1.0], [0.0, 1.0, 0.0], [2.0, 1.0, 0.0]]),
        "present": torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 0]]),
        "ranks": torch.tensor([[0, 1, 2], [0, 1, 0], [0, 1, 0]]),
        "order": torch.tensor([[0, 1, 2], [0, 1, 0], [0, 1, 0]]),
        "loss_sum": torch.tensor([0.3, 0.9, 0.1]),
        "loss_weight": torch.tensor([3.0, 1.0, 1.0]),
        "row": torch.tensor([0, 1, 2]),
    }
    got = group_metrics(method, outputs, {0: "x", 1: "y", 2: "x"})
    x, y = got["x"], got["y"]
    assert x["accuracy"] == 1 and x["top1_accuracy"] == 1 and x["kendall_tau"] == pytest.approx(1)
    assert x["lists"] == 2 and x["pairs"] == 4 and x["loss"] == pytest.approx(0.4 / 4)
    assert x["reward_mean"] == pytest.approx((3 + 2 + 1 + 2 + 1) / 5)  # the padded zero is not a reward
    assert y["accuracy"] == 0 and y["top1_accuracy"] == 0 and y["kendall_tau"] == pytest.approx(-1)
    assert y["lists"] == 1 and y["loss"] == pytest.approx(0.9) and y["reward_mean"] == pytest.approx(0.5)
    parts = split_outputs(outputs, {0: "x", 1: "y", 2: "x"})
    assert parts["x"]["rewards"].shape == (2, 3) and parts["x"]["row"].tolist() == [0, 2]


def test_the_group_column_is_the_subset_column_by_default_and_any_column_on_request():
    rows = Dataset.from_list(
        [
            {"chosen": "a", "rejected": "b", "subset": "s1", "lang": "en"},
            {"chosen": "c", "rejected": "d", "subset": None, "lang": "de"},
        ]
    )
    auto = plan_groups(EvalConfig(run_dir="x"), rows)
    assert auto is not None and auto.column == "subset" and auto.groups == {0: "s1", 1: "(none)"}
    chosen = plan_groups(EvalConfig(run_dir="x", group_by="lang"), rows)
    assert chosen is not None and chosen.groups == {0: "en", 1: "de"}
    assert plan_groups(EvalConfig(run_dir="x"), rows.remove_columns("subset")) is None
    with pytest.raises(ConfigError) as info:
        plan_groups(EvalConfig(run_dir="x", group_by="topic"), rows)
    assert str(info.value) == "group_by: column 'topic' is not in the data (columns: chosen, rejected, subset, lang)"


def test_held_out_rows_are_keyed_by_their_file_row():
    rows = Dataset.from_list([{"subset": "b", SOURCE_ROW_COLUMN: 7}, {"subset": "a", SOURCE_ROW_COLUMN: 2}])
    grouping = plan_groups(EvalConfig(run_dir="x"), rows)
    assert grouping is not None and grouping.groups == {7: "b", 2: "a"}


def test_results_and_csv_hold_every_group_and_the_overall_line():
    method = method_of(PairwiseMethod)
    outputs = pairwise_outputs()
    groups = {0: "a", 1: "a", 2: "b", 3: "a", 4: "c"}  # row 4 (group c) left no pair
    result = {"metrics": method.eval_metrics(outputs), **grouped_results(method, outputs, Grouping("subset", groups))}
    assert result["group_rows"] == {"a": 3, "b": 1, "c": 1} and set(result["groups"]) == {"a", "b"}
    lines = list(csv.DictReader(io.StringIO(groups_csv(result))))
    assert [line["subset"] for line in lines] == ["a", "b", "c", "(overall)"]
    assert float(lines[1]["accuracy"]) == 1 and lines[2]["accuracy"] == "" and lines[3]["data_rows"] == "5"
    assert float(lines[3]["accuracy"]) == pytest.approx(result["metrics"]["accuracy"])


def test_numeric_groups_come_in_numeric_order():
    parts = split_outputs(pairwise_outputs(), {0: "10", 1: "2", 2: "b", 3: "a"})
    assert list(parts) == ["2", "10", "a", "b"]


def test_outputs_without_rows_cannot_be_grouped():
    with pytest.raises(ConfigError, match="no 'row'"):
        split_outputs({"reward": torch.zeros(2)}, {0: "a"})


# ---- RewardBench -----------------------------------------------------------------------------------
def test_section_scores_weight_subsets_by_rewardbench_example_counts():
    got = reward_bench_scores(
        {
            "alpacaeval-easy": (1.0, 4),
            "mt-bench-easy": (0.5, 2),
            "math-prm": (0.5, 2),
            "hep-python": (1.0, 3),
            "donotanswer": (0.25, 4),
            "my-own": (1.0, 1),
        }
    )
    chat = (1.0 * 100 + 0.5 * 28) / (100 + 28)  # 0.890625
    reasoning = (0.5 * 984 + 1.0 * 164) / (984 + 164)
    assert got["sections"] == pytest.approx({"Chat": chat, "Reasoning": reasoning, "Safety": 0.25})
    assert "Chat Hard" not in got["sections"]  # no subset of it in the data
    assert got["score"] == pytest.approx((chat + reasoning + 0.25) / 3)
    assert set(got["incomplete"]) == {"Chat", "Chat Hard", "Safety", "Reasoning"}
    assert got["incomplete"]["Chat"] == ["alpacaeval-length", "alpacaeval-hard", "mt-bench-med"]
    assert got["unknown_subsets"] == ["my-own"]
    assert got["subsets"]["hep-python"] == {"accuracy": 1.0, "pairs": 3}


def test_math_prm_weighs_as_much_as_the_six_code_subsets_together():
    accuracies = {name: (0.8, 10) for members in REWARD_BENCH_SECTIONS.values() for name in members}
    accuracies["math-prm"] = (0.2, 10)
    got = reward_bench_scores(accuracies)
    assert got["sections"]["Reasoning"] == pytest.approx((0.2 + 0.8) / 2)
    assert got["incomplete"] == {} and got["unknown_subsets"] == []
    assert got["score"] == pytest.approx((0.8 + 0.8 + 0.8 + 0.5) / 4)
    assert sum(REWARD_BENCH_COUNTS[s] for s in REWARD_BENCH_SECTIONS["Chat"]) == 358  # the filtered split's Chat size


def test_pair_wins_of_pairwise_and_of_unpaired_bco_outputs():
    rows, wins = pair_wins(pairwise_outputs())
    assert rows == [2, 0, 3, 1] and wins == [True, True, False, False]
    bco = {
        "reward": torch.tensor([1.0, 0.5, -1.0, 2.0, 3.0]),
        "label": torch.tensor([1, 0, 1, 0, 1]),
        "row": torch.tensor([0, 0, 1, 1, 2]),  # row 2 lost its rejected side
    }
    assert pair_wins(bco) == ([0, 1], [True, False])
    with pytest.raises(ConfigError, match="pairwise, bco or udm"):
        pair_wins({"rewards": torch.zeros(1, 2), "row": torch.zeros(1)})


def test_the_benchmark_reads_the_hub_dataset_in_the_plain_format(monkeypatch):
    """benchmark=reward_bench goes through the real hub loader with allenai/reward-bench [filtered],
    whatever hub config, layout or column mapping the run itself used."""
    from rewardctl.data import loading
    from rewardctl.evaluate import eval_rows

    run = to_run_config(compose_train(["data.subset=some_config", "+data.columns.chosen=good"]))
    ev, run = apply_benchmark(EvalConfig(run_dir="x", benchmark="reward_bench"), run)
    assert (ev.dataset, ev.split, ev.group_by) == ("allenai/reward-bench", "filtered", "subset")
    assert run.data.layout is Layout.auto and run.data.columns == {} and run.data.subset is None
    calls = []

    def fake_hub(name, subset, *, split, revision):
        calls.append((name, subset, split, revision))
        return Dataset.from_list([{"prompt": "p", "chosen": "c", "rejected": "r", "subset": "hep-go"}])

    monkeypatch.setattr(loading.datasets, "load_dataset", fake_hub)
    rows, _, source, split = eval_rows(ev, run)
    assert calls == [("allenai/reward-bench", None, "filtered", None)] and (source, split) == (ev.dataset, "filtered")
    assert plan_groups(ev, rows).groups == {0: "hep-go"}


def test_benchmark_mistakes_are_one_line_config_errors():
    run = to_run_config(compose_train([]))
    with pytest.raises(ConfigError, match="^benchmark: unknown benchmark 'rewardbench'; known: reward_bench$"):
        apply_benchmark(EvalConfig(run_dir="x", benchmark="rewardbench"), run)
    with pytest.raises(ConfigError, match="^group_by: "):
        apply_benchmark(EvalConfig(run_dir="x", benchmark="reward_bench", group_by="lang"), run)
    ev, _ = apply_benchmark(EvalConfig(run_dir="x", benchmark="reward_bench", dataset="local.jsonl"), run)
    no_template = SimpleNamespace(chat_template=None)
    with pytest.raises(ConfigError, match="^chat_template: is true but the run's tokenizer has no chat template"):
        benchmark_uses_chat_template(replace(ev, chat_template=True), no_template)
    assert benchmark_uses_chat_template(ev, no_template) is False  # null: plain text when there is none
    assert benchmark_uses_chat_template(ev, SimpleNamespace(chat_template="{{x}}")) is True
    assert benchmark_uses_chat_template(replace(ev, benchmark=None), SimpleNamespace(chat_template="{{x}}")) is False
    rows = Dataset.from_list([{"prompt": "p", "chosen": "c", "rejected": "r"}])
    with pytest.raises(
        ConfigError, match=r"^benchmark: column 'subset' is not in the data \(columns: prompt, chosen, rejected\)$"
    ):
        plan_groups(ev, rows)
