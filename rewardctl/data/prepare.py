"""One validating, tokenising pass over a split, shared by every method.

A method supplies ``featurize(row) -> (features, Fit)`` and raises ``RowError`` for a bad row. This
module runs it through ``datasets.map`` (cached on disk under a fingerprint of everything that shapes
the output), applies the bad-row and over-length policies, and counts what happened so the counts can
be reported before training starts.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import sys
from collections.abc import Callable
from typing import Any

from datasets import Dataset, Features, Json

from rewardctl.config.schema import BadRows
from rewardctl.data.text import Fit
from rewardctl.errors import DataError, RowError

Featurizer = Callable[[dict[str, Any]], tuple[dict[str, Any], Fit]]
ROW_COLUMN = "_row"
FIT_COLUMN = "_fit"
# Set by splits.py before a shuffle (held-out split) so errors and predictions keep file row numbers.
SOURCE_ROW_COLUMN = "_source_row"
MAX_REPORTED_ERRORS = 3
#: A row the loader could not read (a malformed JSON line...) kept as a placeholder under
#: ``data.bad_rows=skip``, so it is counted and reported with its file row like any other bad row.
ROW_ERROR_COLUMN = "_row_error"
POSITION_COLUMN = "_position"
SKIP_HINT = "data.bad_rows=skip leaves such rows out"
JsonPath = list[str | int]


def row_error_marker(reason: str, field: str | None = None) -> str:
    """The ``ROW_ERROR_COLUMN`` value of a placeholder row."""
    return json.dumps({"reason": reason, "field": field})


def cells_are_text(dataset: Dataset) -> bool:
    """Whether every value arrived as text (CSV/TSV), so a number may be written ``1.5`` only as text."""
    return getattr(dataset.info, "builder_name", None) == "csv"


def with_hint(reason: str) -> str:
    """An error that ``data.bad_rows=skip`` would turn into a counted skip says so."""
    return reason if "data.bad_rows" in reason else f"{reason}; {SKIP_HINT}"


def json_paths(features: Features) -> list[JsonPath]:
    """Where ``features`` hold Json values (fields whose JSON type varies between rows)."""
    from datasets.utils.json import get_json_field_paths_from_feature

    return get_json_field_paths_from_feature(features)


def raw_json(dataset: Dataset) -> tuple[Dataset, list[JsonPath]]:
    """The dataset with Json fields read as their JSON text, and where they are.

    datasets decodes Json with ujson, which rounds floats (0.007884021981768897 comes back one ulp
    off) and reads NaN as null; ``decode_json`` decodes the text with Python's exact parser instead.
    """
    paths = json_paths(dataset.features)
    if not paths:
        return dataset, []
    from datasets.features.features import _visit

    decoding: list[bool] = []

    def undecoded(feature: Any) -> Any:
        if isinstance(feature, Json):
            decoding.append(feature.decode)
            return Json(decode=False)
        return feature  # (None would drop the changes made below this node)

    features = _visit(dataset.features, undecoded)
    return (dataset.cast(features) if any(decoding) else dataset), paths


def decode_json(row: dict[str, Any], paths: list[JsonPath]) -> dict[str, Any]:
    """``row`` with the JSON text at each of ``paths`` parsed."""
    if not paths:
        return row
    row = dict(row)
    for head, *rest in paths:
        if head in row:
            row[head] = _decode_at(row[head], rest)
    return row


def _decode_at(value: Any, path: list[str | int]) -> Any:
    if value is None:
        return None
    if not path:
        return json.loads(value) if isinstance(value, str) else value
    head, *rest = path
    if head == 0:
        return [_decode_at(item, rest) for item in value] if isinstance(value, list) else value
    return {**value, head: _decode_at(value.get(head), rest)} if isinstance(value, dict) else value


def _row_at(batch: dict[str, list[Any]], i: int) -> dict[str, Any]:
    return {key: values[i] for key, values in batch.items()}


def _featurize_row(featurizer: Featurizer, row: dict[str, Any], paths: list[JsonPath]) -> tuple[dict[str, Any], Fit]:
    """Run ``featurizer``, or raise the loader's error for a placeholder row."""
    marker = row.get(ROW_ERROR_COLUMN)
    if marker is not None:
        found = json.loads(marker)
        raise RowError(found["field"], found["reason"])
    return featurizer(decode_json(row, paths))


def _source_row(dataset: Dataset, index: int) -> int:
    return dataset[index][SOURCE_ROW_COLUMN] if SOURCE_ROW_COLUMN in dataset.column_names else index


def require_columns(dataset: Dataset, source: str, *alternatives: tuple[str, ...]) -> tuple[str, ...]:
    """The first alternative whose columns are all present, or a DataError naming what is missing."""
    columns = set(dataset.column_names)
    for needed in alternatives:
        if set(needed) <= columns:
            return needed
    first = alternatives[0]
    missing = [c for c in first if c not in columns]
    hint = " or ".join("/".join(a) for a in alternatives)
    found = [c for c in dataset.column_names if not c.startswith("_")] or ["no columns"]
    raise DataError(
        source,
        f"missing column {', '.join(repr(m) for m in missing)} (needs {hint}; "
        f"found: {', '.join(found)}). Map names with data.columns.<name>=<column>",
    )


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


def _output_features(
    dataset: Dataset, featurizer: Featurizer, source: str, bad_rows: BadRows, paths: list[JsonPath]
) -> Features:
    """Arrow types of the output, from the first usable row, so every batch is written alike."""
    for index in range(len(dataset)):
        try:
            example, fit = _featurize_row(featurizer, dataset[index], paths)
        except RowError as exc:
            if bad_rows == BadRows.error:
                raise DataError(
                    source, with_hint(exc.reason), row=_source_row(dataset, index) + 1, field=exc.field
                ) from None
            continue
        return Dataset.from_list(
            [{**example, ROW_COLUMN: index, FIT_COLUMN: int(fit), POSITION_COLUMN: index}]
        ).features
    first = _first_errors(dataset, featurizer, source, range(len(dataset)), paths)
    raise DataError(source, f"no usable rows: all {len(dataset)} rows are malformed (first: {first[0]})")


def _first_errors(
    dataset: Dataset, featurizer: Featurizer, source: str, positions: Any, paths: list[JsonPath]
) -> list[str]:
    """The first few errors among rows at ``positions`` (the map drops bad rows without a word)."""
    errors: list[str] = []
    for index in positions:
        try:
            _featurize_row(featurizer, dataset[index], paths)
        except RowError as exc:
            errors.append(str(DataError(source, exc.reason, row=_source_row(dataset, index) + 1, field=exc.field)))
            if len(errors) >= MAX_REPORTED_ERRORS:
                break
    return errors


def featurize_split(
    dataset: Dataset,
    featurizer: Featurizer,
    *,
    source: str,
    bad_rows: BadRows,
    num_proc: int | None = None,
    cache_key: tuple[Any, ...] = (),
) -> tuple[Dataset, dict[str, Any]]:
    """Features for every usable row plus ``_row`` (the 0-based source row) and the report.

    Bad rows are named by file row; skipped ones are counted per row of ``dataset`` (with paired BCO
    rows one file row gives two, so errors are found by position, not by file row).
    """
    total = len(dataset)
    dataset, paths = raw_json(dataset)
    columns = dataset.column_names
    has_source_rows = SOURCE_ROW_COLUMN in columns
    output_features = _output_features(dataset, featurizer, source, bad_rows, paths)

    def run(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {}
        for i, index in enumerate(indices):
            row = batch[SOURCE_ROW_COLUMN][i] if has_source_rows else index
            try:
                example, fit = _featurize_row(featurizer, _row_at(batch, i), paths)
            except RowError as exc:
                if bad_rows == BadRows.error:
                    raise DataError(source, with_hint(exc.reason), row=row + 1, field=exc.field) from None
                continue
            for key, value in example.items():
                out.setdefault(key, []).append(value)
            out.setdefault(ROW_COLUMN, []).append(row)
            out.setdefault(FIT_COLUMN, []).append(int(fit))
            out.setdefault(POSITION_COLUMN, []).append(index)
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
        kept = set(featurized[POSITION_COLUMN])
        dropped = (index for index in range(total) if index not in kept)
        report["errors"] = _first_errors(dataset, featurizer, source, dropped, paths)
    featurized = featurized.remove_columns([POSITION_COLUMN])
    if len(featurized) == 0:
        first = report["errors"][0] if report["errors"] else "no rows"
        raise DataError(source, f"no usable rows: all {total} rows are malformed (first: {first})")
    fits = featurized[FIT_COLUMN]
    report["truncated"] = sum(1 for f in fits if f == Fit.truncated)
    report["dropped_overlength"] = sum(1 for f in fits if f == Fit.too_long)
    if report["dropped_overlength"]:
        featurized = featurized.filter(lambda fit: fit != Fit.too_long, input_columns=[FIT_COLUMN])
        if len(featurized) == 0:
            raise DataError(
                source,
                f"every row is longer than model.max_length and data.overlength=drop "
                f"removed all {total}; raise model.max_length or use data.overlength=truncate",
            )
    report["used"] = len(featurized)
    return featurized.remove_columns([FIT_COLUMN]), report
