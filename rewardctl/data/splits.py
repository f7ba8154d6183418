"""From ``data.*`` to the raw train and eval rows, and to prepared (tokenised, validated) splits.

Training and ``rewardctl eval`` both call ``load_raw_splits``, so an eval of a finished run sees
exactly the rows (split, held-out fraction, row limit) that the run evaluated on.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from datasets import Dataset

from rewardctl.config.schema import DataConfig, RunConfig
from rewardctl.data.loading import load_rows, rename_columns
from rewardctl.data.prepare import SOURCE_ROW_COLUMN

if TYPE_CHECKING:
    from rewardctl.methods.base import Method, PreparedSplit


def _source_name(source: str, split: str) -> str:
    return source if Path(source).expanduser().is_file() else f"{source} [{split}]"


def load_raw_splits(data: DataConfig, seed: int) -> tuple[tuple[Dataset, str], tuple[Dataset, str] | None]:
    train_rows = rename_columns(load_rows(data.train, split=data.train_split, subset=data.subset, revision=data.revision),
                                data.columns, data.train)
    train_name = _source_name(data.train, data.train_split)
    eval_pair = None
    if data.eval:
        eval_rows = rename_columns(load_rows(data.eval, split=data.eval_split, subset=data.subset, revision=data.revision),
                                   data.columns, data.eval)
        eval_pair = (eval_rows, _source_name(data.eval, data.eval_split))
    elif data.holdout_fraction > 0:
        train_rows = train_rows.add_column(SOURCE_ROW_COLUMN, list(range(len(train_rows))))  # file rows survive the shuffle
        parts = train_rows.train_test_split(test_size=data.holdout_fraction, seed=seed)
        train_rows = parts["train"]
        eval_pair = (parts["test"], f"{train_name} (held-out {data.holdout_fraction:.0%})")
    if data.max_train_rows:
        train_rows = train_rows.select(range(min(len(train_rows), data.max_train_rows)))
    if eval_pair and data.max_eval_rows:
        eval_pair = (eval_pair[0].select(range(min(len(eval_pair[0]), data.max_eval_rows))), eval_pair[1])
    return (train_rows, train_name), eval_pair


def describe(split: str, report: dict[str, Any], method: Method, run: RunConfig) -> str:
    text = f"{split}: {report['rows']} rows from {report['source']} -> {report['used']} {method.item_name} used"
    if report.get("truncated"):
        text += f"; {report['truncated']} truncated to model.max_length={run.model.max_length} (sequence ends kept)"
    if report.get("dropped_overlength"):
        text += f"; {report['dropped_overlength']} dropped as longer than model.max_length={run.model.max_length}"
    if report.get("skipped_bad"):
        text += f"; {report['skipped_bad']} malformed rows skipped (first: {report['errors'][0] if report['errors'] else '?'})"
    return text


def prepare_data(method: Method, run: RunConfig) -> tuple[PreparedSplit, PreparedSplit | None]:
    (train_rows, train_name), eval_pair = load_raw_splits(run.data, run.train.seed)
    train = method.prepare(train_rows, train_name, training=True)
    evaluation = method.prepare(eval_pair[0], eval_pair[1], training=False) if eval_pair else None
    return train, evaluation
