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


def source_name(source: str, split: str) -> str:
    """How errors and reports name a split: the file path, or the folder / hub id with the split."""
    return source if Path(source).expanduser().is_file() else f"{source} [{split}]"


def load_split(data: DataConfig, source: str, split: str, *, mapping_required: bool = True) -> tuple[Dataset, str]:
    """Rows of one split with ``data.columns`` applied, and the split's name. Eval of other data than
    the run's (``mapping_required=False``) applies the mapping only where its columns exist."""
    rows = load_rows(
        source, split=split, subset=data.subset, revision=data.revision, layout=data.layout, bad_rows=data.bad_rows
    )
    if data.columns and (mapping_required or all(c in rows.column_names for c in data.columns.values())):
        rows = rename_columns(rows, data.columns, source)
    return rows, source_name(source, split)


def load_raw_splits(data: DataConfig, seed: int) -> tuple[tuple[Dataset, str], tuple[Dataset, str] | None]:
    train_rows, train_name = load_split(data, data.train, data.train_split)
    eval_pair = None
    if data.eval:
        eval_pair = load_split(data, data.eval, data.eval_split)
    elif data.holdout_fraction > 0:
        train_rows = train_rows.add_column(
            SOURCE_ROW_COLUMN, list(range(len(train_rows)))
        )  # file rows survive the shuffle
        parts = train_rows.train_test_split(test_size=data.holdout_fraction, seed=seed)
        train_rows = parts["train"]
        eval_pair = (parts["test"], f"{train_name} (held-out {data.holdout_fraction:.0%})")
    if data.max_train_rows:
        train_rows = train_rows.select(range(min(len(train_rows), data.max_train_rows)))
    if eval_pair and data.max_eval_rows:
        eval_pair = (eval_pair[0].select(range(min(len(eval_pair[0]), data.max_eval_rows))), eval_pair[1])
    return (train_rows, train_name), eval_pair


def describe(split: str, report: dict[str, Any], method: Method, run: RunConfig) -> str:
    text = f"{split}: {report['rows']} rows from {report['source']} -> {report['used']} {report.get('row_name', method.item_name)} used"
    budget = report.get("budget", f"model.max_length={run.model.max_length}")
    if report.get("truncated"):
        text += f"; {report['truncated']} truncated to {budget} ({report.get('truncation_note', 'sequence ends kept')})"
    if report.get("dropped_overlength"):
        text += f"; {report['dropped_overlength']} dropped as longer than {budget}"
    if report.get("details"):
        text += f" ({report['details']})"
    if report.get("skipped_bad"):
        text += f"; {report['skipped_bad']} malformed rows skipped (first: {report['errors'][0] if report['errors'] else '?'})"
    return text


def prepare_data(method: Method, run: RunConfig) -> tuple[PreparedSplit, PreparedSplit | None]:
    (train_rows, train_name), eval_pair = load_raw_splits(run.data, run.train.seed)
    train = method.prepare(train_rows, train_name, training=True)
    evaluation = method.prepare(eval_pair[0], eval_pair[1], training=False) if eval_pair else None
    return train, evaluation
