"""One validating, tokenising pass over a split, shared by every method.

A method supplies ``featurize(row) -> (features, Fit)`` and raises ``RowError`` for a bad row. This
module runs it through ``datasets.map`` (cached on disk under a fingerprint of everything that shapes
the output), applies the bad-row and over-length policies, and counts what happened so the counts can
be reported before training starts.
"""

from __future__ import annotations

import hashlib
import inspect
import sys
from collections.abc import Callable
from typing import Any

from datasets import Dataset, Features

from rewardctl.config.schema import BadRows
from rewardctl.data.text import Fit
from rewardctl.errors import DataError, RowError

Featurizer = Callable[[dict[str, Any]], tuple[dict[str, Any], Fit]]
ROW_COLUMN = "_row"
FIT_COLUMN = "_fit"
# Set by splits.py before a shuffle (held-out split) so errors and predictions keep file row numbers.
SOURCE_ROW_COLUMN = "_source_row"
MAX_REPORTED_ERRORS = 3


def _row_at(batch: dict[str, list[Any]], i: int) -> dict[str, Any]:
    return {key: values[i] for key, values in batch.items()}


def require_columns(dataset: Dataset, source: str, *alternatives: tuple[str, ...]) -> tuple[str, ...]:
    """The first alternative whose columns are all present, or a DataError naming what is missing."""
    columns = set(dataset.column_names)
    for needed in alternatives:
        if set(needed) <= columns:
            return needed
    first = alternatives[0]
    missing = [c for c in first if c not in columns]
    hint = " or ".join("/".join(a) for a in alternatives)
    raise DataError(source, f"missing column {', '.join(repr(m) for m in missing)} (needs {hint}; "
                            f"found: {', '.join(dataset.column_names)}). Map names with data.columns.<name>=<column>")


def list_lengths(dataset: Dataset, *columns: str) -> list[int]:
    """Row-wise maximum length of list columns, computed in Arrow (fast on millions of rows)."""
    import pyarrow.compute as pc

    table = dataset.with_format("arrow")[:]
    lengths = [pc.list_value_length(table[column]) for column in columns]
    longest = lengths[0]
    for other in lengths[1:]:
        longest = pc.max_element_wise(longest, other)
    return longest.to_pylist()


def by_length(dataset: Dataset, lengths: list[int] | None) -> Dataset:
    """Longest rows first: eval batches then pad little (outputs keep each row's ``_row``)."""
    if lengths is None:
        return dataset
    return dataset.select(sorted(range(len(dataset)), key=lambda i: -lengths[i]))


def fingerprint(dataset: Dataset, featurizer: Featurizer, extra: tuple[Any, ...]) -> str:
    """Cache key: the input data, the code that featurises it (whole modules, so a helper's change
    counts too), the rewardctl version, and every setting the output depends on."""
    from rewardctl import __version__

    sources = []
    for name in sorted({featurizer.__module__, __name__, "rewardctl.data.text"}):
        try:
            sources.append(inspect.getsource(sys.modules[name]))
        except (OSError, TypeError, KeyError):
            sources.append(name)
    digest = hashlib.sha256()
    for part in (dataset._fingerprint, __version__, *sources, *map(repr, extra)):
        digest.update(str(part).encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()[:32]


def _output_features(dataset: Dataset, featurizer: Featurizer, source: str, bad_rows: BadRows) -> Features:
    """Arrow types of the output, from the first usable row, so every batch is written alike."""
    for index in range(len(dataset)):
        try:
            example, fit = featurizer(dataset[index])
        except RowError as exc:
            if bad_rows == BadRows.error:
                row = dataset[index][SOURCE_ROW_COLUMN] if SOURCE_ROW_COLUMN in dataset.column_names else index
                raise DataError(source, exc.reason, row=row + 1, field=exc.field) from None
            continue
        return Dataset.from_list([{**example, ROW_COLUMN: index, FIT_COLUMN: int(fit)}]).features
    raise DataError(source, f"no usable rows: all {len(dataset)} rows are malformed")


def featurize_split(
    dataset: Dataset,
    featurizer: Featurizer,
    *,
    source: str,
    bad_rows: BadRows,
    num_proc: int | None = None,
    cache_key: tuple[Any, ...] = (),
) -> tuple[Dataset, dict[str, Any]]:
    """Features for every usable row plus ``_row`` (the 0-based source row) and the report."""
    total = len(dataset)
    columns = dataset.column_names
    has_source_rows = SOURCE_ROW_COLUMN in columns
    output_features = _output_features(dataset, featurizer, source, bad_rows)

    def run(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {}
        for i, index in enumerate(indices):
            row = batch[SOURCE_ROW_COLUMN][i] if has_source_rows else index
            try:
                example, fit = featurizer(_row_at(batch, i))
            except RowError as exc:
                if bad_rows == BadRows.error:
                    raise DataError(source, exc.reason, row=row + 1, field=exc.field) from None
                continue
            for key, value in example.items():
                out.setdefault(key, []).append(value)
            out.setdefault(ROW_COLUMN, []).append(row)
            out.setdefault(FIT_COLUMN, []).append(int(fit))
        return out or {name: [] for name in output_features}

    featurized = dataset.map(
        run,
        batched=True,
        with_indices=True,
        remove_columns=columns,
        num_proc=num_proc,
        features=output_features,
        new_fingerprint=fingerprint(dataset, featurizer, (bad_rows, *cache_key)),
        desc=f"tokenising {source}",
    )
    report: dict[str, Any] = {"source": source, "rows": total, "skipped_bad": total - len(featurized), "errors": []}
    if report["skipped_bad"]:
        kept = set(featurized[ROW_COLUMN])
        rows = dataset[SOURCE_ROW_COLUMN] if has_source_rows else range(total)
        for index, row in enumerate(rows):
            if row in kept:
                continue
            try:
                featurizer(dataset[index])
            except RowError as exc:
                report["errors"].append(str(DataError(source, exc.reason, row=row + 1, field=exc.field)))
            if len(report["errors"]) >= MAX_REPORTED_ERRORS:
                break
    if len(featurized) == 0:
        first = report["errors"][0] if report["errors"] else "no rows"
        raise DataError(source, f"no usable rows: all {total} rows are malformed (first: {first})")
    fits = featurized[FIT_COLUMN]
    report["truncated"] = sum(1 for f in fits if f == Fit.truncated)
    report["dropped_overlength"] = sum(1 for f in fits if f == Fit.too_long)
    if report["dropped_overlength"]:
        featurized = featurized.filter(lambda fit: fit != Fit.too_long, input_columns=[FIT_COLUMN])
        if len(featurized) == 0:
            raise DataError(source, f"every row is longer than model.max_length and data.overlength=drop "
                                    f"removed all {total}; raise model.max_length or use data.overlength=truncate")
    report["used"] = len(featurized)
    return featurized.remove_columns([FIT_COLUMN]), report
