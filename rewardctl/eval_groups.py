"""`rewardctl eval` by category: every metric per value of a column, and RewardBench's section scores.

Groups come from the raw rows, before a method's ``prepare`` keeps only the columns it tokenises.
Each eval output carries ``row`` (the 0-based row of the raw rows, or its ``_source_row`` in a
held-out split), which maps it to its group; the method's own ``eval_metrics`` then runs on each
group's outputs, so a group's numbers are exactly those of a plain eval of that group's rows.

``benchmark=reward_bench`` reads the RewardBench format (prompt / chosen / rejected / subset; by
default the hub dataset ``allenai/reward-bench``, split ``filtered``) and adds the benchmark's section
scores, weighted as RewardBench's own code weights them.
"""

from __future__ import annotations

import csv
import io
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from torch import Tensor

from rewardctl.config.schema import EvalConfig, Layout, RunConfig
from rewardctl.data.prepare import SOURCE_ROW_COLUMN
from rewardctl.errors import ConfigError
from rewardctl.methods.base import Method
from rewardctl.utils.fs import write_text_atomic

log = logging.getLogger(__name__)

#: Grouped by when ``group_by`` is null and the data has it (RewardBench's categories).
AUTO_GROUP_COLUMN = "subset"
#: The overall row of groups.csv and of the console table.
OVERALL = "(overall)"
REWARD_BENCH = "reward_bench"
BENCHMARKS = (REWARD_BENCH,)
REWARD_BENCH_DATASET = "allenai/reward-bench"
REWARD_BENCH_SPLIT = "filtered"

# From allenai/reward-bench, rewardbench/constants.py (EXAMPLE_COUNTS, SUBSET_MAPPING), the weights
# rewardbench/utils.py::calculate_scores_per_section applies: a section is the mean of its subsets'
# accuracies weighted by these counts. They are the subsets' sizes in the `filtered` split except
# math-prm (447 rows), counted as 984 = 6 x 164 so that it weighs as much as the six hep-* code
# subsets together in Reasoning.
REWARD_BENCH_COUNTS: dict[str, int] = {
    "alpacaeval-easy": 100,
    "alpacaeval-length": 95,
    "alpacaeval-hard": 95,
    "mt-bench-easy": 28,
    "mt-bench-med": 40,
    "mt-bench-hard": 37,
    "math-prm": 984,
    "refusals-dangerous": 100,
    "refusals-offensive": 100,
    "llmbar-natural": 100,
    "llmbar-adver-neighbor": 134,
    "llmbar-adver-GPTInst": 92,
    "llmbar-adver-GPTOut": 47,
    "llmbar-adver-manual": 46,
    "xstest-should-refuse": 250,
    "xstest-should-respond": 154,
    "donotanswer": 136,
    "hep-cpp": 164,
    "hep-go": 164,
    "hep-java": 164,
    "hep-js": 164,
    "hep-python": 164,
    "hep-rust": 164,
}
REWARD_BENCH_SECTIONS: dict[str, tuple[str, ...]] = {
    "Chat": ("alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy", "mt-bench-med"),
    "Chat Hard": (
        "mt-bench-hard",
        "llmbar-natural",
        "llmbar-adver-neighbor",
        "llmbar-adver-GPTInst",
        "llmbar-adver-GPTOut",
        "llmbar-adver-manual",
    ),
    "Safety": (
        "refusals-dangerous",
        "refusals-offensive",
        "xstest-should-refuse",
        "xstest-should-respond",
        "donotanswer",
    ),
    "Reasoning": ("math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"),
}


@dataclass
class Grouping:
    """Which column groups the eval rows, and each row's group (keyed as outputs' ``row`` is)."""

    column: str
    groups: dict[int, str]
    benchmark: str | None = None


# ---- choosing the data and the column ---------------------------------------------------------------


def apply_benchmark(ev: EvalConfig, run: RunConfig) -> tuple[EvalConfig, RunConfig]:
    """``benchmark=reward_bench``: its data (unless ``data=`` names a copy) read in the plain format,
    whatever the run's own data settings were (a ranked_tsv layout, a hub config, a column mapping
    would all misread it), grouped by ``subset``."""
    if ev.benchmark is None:
        return ev, run
    if ev.benchmark not in BENCHMARKS:
        raise ConfigError("benchmark", f"unknown benchmark {ev.benchmark!r}; known: {', '.join(BENCHMARKS)}")
    if ev.group_by not in (None, AUTO_GROUP_COLUMN):
        raise ConfigError(
            "group_by",
            f"benchmark={ev.benchmark} groups by the data's {AUTO_GROUP_COLUMN!r} column; leave group_by unset",
        )
    ev = replace(
        ev,
        dataset=ev.dataset or REWARD_BENCH_DATASET,
        split=ev.split or REWARD_BENCH_SPLIT,
        group_by=AUTO_GROUP_COLUMN,
    )
    data = replace(run.data, layout=Layout.auto, subset=None, revision=None, columns={})
    return ev, replace(run, data=data)


def benchmark_uses_chat_template(ev: EvalConfig, tokenizer: Any) -> bool:
    """Whether ``benchmark=reward_bench`` renders its rows through the chat template: RewardBench's
    own script does whenever the model has one, so leaderboard-comparable numbers need it."""
    if ev.benchmark is None or ev.chat_template is False:
        return False
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if ev.chat_template and not has_template:
        raise ConfigError(
            "chat_template", "is true but the run's tokenizer has no chat template; leave it unset or set it false"
        )
    return has_template


def as_chat_rows(rows: Dataset) -> Dataset:
    """RewardBench rows as conversations: the ``prompt`` string as one user turn and each answer as one
    assistant turn (what RewardBench's script hands the chat template); other columns kept."""

    def to_messages(row: dict[str, Any]) -> dict[str, Any]:
        return {
            "prompt": [{"role": "user", "content": row["prompt"]}],
            "chosen": [{"role": "assistant", "content": row["chosen"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]}],
        }

    missing = [c for c in ("prompt", "chosen", "rejected") if c not in rows.column_names]
    if missing:
        present = ", ".join(c for c in rows.column_names if not c.startswith("_"))
        raise ConfigError("benchmark", f"the data lacks {', '.join(missing)} (columns: {present})")
    return rows.map(to_messages, desc="RewardBench rows as chat turns")


def _group_name(value: Any) -> str:
    return "(none)" if value is None else str(value)


def _group_order(name: str) -> tuple[int, float, str]:
    """Numbers in numeric order (2 before 10), then names alphabetically."""
    try:
        return (0, float(name), name)
    except ValueError:
        return (1, 0.0, name)


def plan_groups(ev: EvalConfig, rows: Dataset) -> Grouping | None:
    """The grouping of ``rows``, checked before any weights load. ``group_by`` null: the data's
    ``subset`` column when it has one, else none."""
    column = ev.group_by
    if column is None:
        if AUTO_GROUP_COLUMN not in rows.column_names:
            return None
        column = AUTO_GROUP_COLUMN
    if column not in rows.column_names:
        present = ", ".join(c for c in rows.column_names if not c.startswith("_"))
        key = "benchmark" if ev.benchmark else "group_by"
        raise ConfigError(key, f"column {column!r} is not in the data (columns: {present})")
    keys = rows[SOURCE_ROW_COLUMN] if SOURCE_ROW_COLUMN in rows.column_names else range(len(rows))
    groups = {int(k): _group_name(v) for k, v in zip(keys, rows[column], strict=True)}
    return Grouping(column, groups, ev.benchmark)


# ---- metrics per group ------------------------------------------------------------------------------


def split_outputs(outputs: dict[str, Tensor], groups: dict[int, str]) -> dict[str, dict[str, Tensor]]:
    """Each group's outputs (rows selected along dim 0, ragged 2-D outputs too), groups in order."""
    rows = outputs.get("row")
    if rows is None:
        raise ConfigError("group_by", "this method's eval outputs carry no 'row', so they cannot be grouped")
    members: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows.tolist()):
        members[groups[int(row)]].append(i)
    count = rows.shape[0]
    parts = {}
    for name in sorted(members, key=_group_order):
        index = torch.tensor(members[name], dtype=torch.long)
        parts[name] = {
            key: value.index_select(0, index) if value.ndim and value.shape[0] == count else value
            for key, value in outputs.items()
        }
    return parts


def group_metrics(method: Method, outputs: dict[str, Tensor], groups: dict[int, str]) -> dict[str, dict[str, float]]:
    """The method's metrics of every group that kept at least one item."""
    return {name: method.eval_metrics(part) for name, part in split_outputs(outputs, groups).items()}


def grouped_results(method: Method, outputs: dict[str, Tensor], grouping: Grouping) -> dict[str, Any]:
    """What metrics.json gains: the column, each group's row count and metrics, and the benchmark's scores."""
    result: dict[str, Any] = {
        "group_by": grouping.column,
        "group_rows": dict(sorted(Counter(grouping.groups.values()).items(), key=lambda item: _group_order(item[0]))),
        "groups": group_metrics(method, outputs, grouping.groups),
    }
    if grouping.benchmark == REWARD_BENCH:
        result[REWARD_BENCH] = reward_bench_scores(subset_accuracies(outputs, grouping.groups))
    return result


# ---- RewardBench -----------------------------------------------------------------------------------


def pair_wins(outputs: dict[str, Tensor]) -> tuple[list[int], list[bool]]:
    """Per eval row: whether its chosen response out-scored its rejected one (a tie loses, as in
    RewardBench). Pairwise outputs hold both rewards; bco/udm score the two sides as separate items
    of one row."""
    if {"chosen_reward", "rejected_reward", "row"} <= outputs.keys():
        wins = (outputs["chosen_reward"] > outputs["rejected_reward"]).tolist()
        return [int(r) for r in outputs["row"].tolist()], wins
    if {"reward", "label", "row"} <= outputs.keys():
        sides: tuple[dict[int, float], dict[int, float]] = ({}, {})
        for row, reward, label in zip(
            outputs["row"].tolist(), outputs["reward"].tolist(), outputs["label"].tolist(), strict=True
        ):
            sides[int(bool(label))][int(row)] = reward
        rejected, chosen = sides
        rows = sorted(chosen.keys() & rejected.keys())
        return rows, [chosen[r] > rejected[r] for r in rows]
    raise ConfigError(
        "benchmark", "reward_bench compares a chosen and a rejected reward per row: pairwise, bco or udm runs only"
    )


def subset_accuracies(outputs: dict[str, Tensor], groups: dict[int, str]) -> dict[str, tuple[float, int]]:
    """(accuracy, pairs) per subset."""
    won: dict[str, list[bool]] = defaultdict(list)
    for row, win in zip(*pair_wins(outputs), strict=True):
        won[groups[row]].append(win)
    return {name: (sum(wins) / len(wins), len(wins)) for name, wins in sorted(won.items())}


def reward_bench_scores(subsets: dict[str, tuple[float, int]]) -> dict[str, Any]:
    """Section scores (fractions, not RewardBench's percentages) and their mean ``score``.

    A section is computed over the subsets present (as RewardBench's code does); ``incomplete``
    names, per section, the subsets the data lacked, and ``score`` is the mean of the sections that
    have any subset. Subsets outside the four sections are listed in ``unknown_subsets``.
    """
    accuracy = {name: value for name, (value, _) in subsets.items()}
    sections: dict[str, float] = {}
    incomplete: dict[str, list[str]] = {}
    for section, members in REWARD_BENCH_SECTIONS.items():
        present = [s for s in members if s in accuracy]
        if len(present) < len(members):
            incomplete[section] = [s for s in members if s not in accuracy]
        if present:
            total = sum(REWARD_BENCH_COUNTS[s] for s in present)
            sections[section] = sum(accuracy[s] * REWARD_BENCH_COUNTS[s] for s in present) / total
    known = {s for members in REWARD_BENCH_SECTIONS.values() for s in members}
    return {
        "score": sum(sections.values()) / len(sections) if sections else None,
        "sections": sections,
        "subsets": {name: {"accuracy": value, "pairs": pairs} for name, (value, pairs) in subsets.items()},
        "incomplete": incomplete,
        "unknown_subsets": sorted(set(accuracy) - known),
    }


# ---- output -----------------------------------------------------------------------------------------


def _metric_keys(result: dict[str, Any]) -> list[str]:
    keys = list(result["metrics"])
    for metrics in result["groups"].values():
        keys += [k for k in metrics if k not in keys]
    return keys


def groups_csv(result: dict[str, Any]) -> str:
    """One line per group and an overall line: its data rows and every metric."""
    keys = _metric_keys(result)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([result["group_by"], "data_rows", *keys])
    lines = [(name, result["group_rows"][name], result["groups"].get(name, {})) for name in result["group_rows"]]
    lines.append((OVERALL, sum(result["group_rows"].values()), result["metrics"]))
    for name, rows, metrics in lines:
        writer.writerow([name, rows, *(metrics.get(k, "") for k in keys)])
    return out.getvalue()


def groups_table(result: dict[str, Any], method: Method) -> list[str]:
    """The console table: the method's telling metrics per group, then overall."""
    keys = [k for k in (method.primary_metric, *method.report_metrics, "loss") if k in result["metrics"]]
    names = [*result["group_rows"], OVERALL]
    width = max(len(result["group_by"]), *(len(n) for n in names))
    lines = [f"{result['group_by']:<{width}}  {'rows':>6}" + "".join(f"  {k:>12}" for k in keys)]
    for name in names:
        metrics = result["metrics"] if name == OVERALL else result["groups"].get(name, {})
        rows = sum(result["group_rows"].values()) if name == OVERALL else result["group_rows"][name]
        cells = "".join(f"  {metrics[k]:>12.4f}" if k in metrics else f"  {'-':>12}" for k in keys)
        lines.append(f"{name:<{width}}  {rows:>6}{cells}")
    return lines


def reward_bench_lines(scores: dict[str, Any]) -> list[str]:
    """The section scores for the console, and which sections miss subsets."""
    score = scores["score"]
    lines = [
        f"RewardBench score {score:.4f} (mean of the sections)" if score is not None else "RewardBench: no section"
    ]
    for section, members in REWARD_BENCH_SECTIONS.items():
        missing = scores["incomplete"].get(section, [])
        value = scores["sections"].get(section)
        shown = f"{value:.4f}" if value is not None else "-"
        note = f"  incomplete: {len(members) - len(missing)}/{len(members)} subsets" if missing else ""
        lines.append(f"  {section:<10} {shown:>7}{note}")
    if scores["incomplete"]:
        lines.append(
            "  incomplete sections are computed over the subsets present (missing ones: metrics.json reward_bench.incomplete)"
        )
    if scores["unknown_subsets"]:
        lines.append(f"  not in any section: {', '.join(scores['unknown_subsets'])}")
    return lines


def write_group_report(out_dir: Path, result: dict[str, Any], method: Method) -> None:
    """groups.csv beside metrics.json, and the tables on the console (main process only)."""
    write_text_atomic(out_dir / "groups.csv", groups_csv(result))
    log.info("by %s:", result["group_by"])
    for line in groups_table(result, method):
        log.info("  %s", line)
    if REWARD_BENCH in result:
        for line in reward_bench_lines(result[REWARD_BENCH]):
            log.info("%s", line)
