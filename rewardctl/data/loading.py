"""Reading raw rows: a local file, a folder of files, or a hub dataset id, all through `datasets`.

`datasets.load_dataset` does the real work (formats, caching, hub access). What this module adds is
diagnosis: when a local file does not parse, it finds the first offending line and names it, instead
of surfacing a pyarrow error about "column changed from string to array".
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset

from rewardctl.config.schema import Layout
from rewardctl.errors import DataError

FILE_BUILDERS = {
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".parquet": ("parquet", {}),
}


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return "null"


def diagnose_jsonl(path: Path) -> DataError | None:
    """The first malformed line of a JSON-lines file, or a field whose type changes between rows."""
    kinds: dict[str, tuple[str, int]] = {}
    row = 0
    with path.open("r", encoding="utf-8", errors="strict") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            row += 1
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                return DataError(str(path), f"line {line_no} is not valid JSON ({exc.msg} at column {exc.colno})", row=row)
            if not isinstance(record, dict):
                return DataError(str(path), f"line {line_no} is a JSON {_json_kind(record)}, expected an object", row=row)
            for key, value in record.items():
                kind = _json_kind(value)
                if kind == "null":
                    continue
                seen = kinds.setdefault(key, (kind, row))
                if seen[0] != kind and {seen[0], kind} != {"number"}:
                    return DataError(
                        str(path),
                        f"is a {kind} but row {seen[1]} has a {seen[0]}; one file must use one format per field",
                        row=row,
                        field=key,
                    )
    return None


def _diagnose(path: Path, exc: Exception) -> DataError:
    if path.suffix == ".jsonl" or path.suffix == ".json":
        try:
            found = diagnose_jsonl(path)
        except UnicodeDecodeError as decode:
            return DataError(str(path), f"is not UTF-8 text ({decode.reason} at byte {decode.start})")
        if found is not None:
            return found
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return DataError(str(path), f"could not be read: {first_line}")


def _load_file(path: Path) -> Dataset:
    suffix = path.suffix.lower()
    if suffix not in FILE_BUILDERS:
        raise DataError(str(path), f"unsupported file type {suffix!r} (use one of {', '.join(FILE_BUILDERS)})")
    if path.stat().st_size == 0:
        raise DataError(str(path), "is empty")
    builder, kwargs = FILE_BUILDERS[suffix]
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except Exception as exc:  # datasets/pyarrow raise many types; all mean "this file is unusable"
        raise _diagnose(path, exc) from exc


def _load_folder(path: Path, split: str) -> Dataset:
    try:
        return datasets.load_dataset(str(path), split=split)
    except ValueError as exc:
        if "Unknown split" in str(exc) or "split" in str(exc).lower():
            raise DataError(str(path), f"has no split {split!r}: {str(exc).splitlines()[0]}") from exc
        raise
    except Exception as exc:
        files = sorted(p for p in path.iterdir() if p.suffix in FILE_BUILDERS)
        for file in files:
            problem = _diagnose(file, exc) if file.suffix in (".jsonl", ".json") else None
            if problem is not None and "could not be read" not in str(problem):
                raise problem from exc
        raise DataError(str(path), f"could not be read as a dataset folder: {str(exc).splitlines()[0]}") from exc


def _load_hub(name: str, split: str, subset: str | None, revision: str | None) -> Dataset:
    try:
        return datasets.load_dataset(name, subset, split=split, revision=revision)
    except Exception as exc:
        looks_local = name.startswith((".", "/", "~")) or Path(name).suffix in FILE_BUILDERS
        if looks_local:
            raise DataError(name, "no such file or directory") from exc
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(name, f"could not be loaded from the Hugging Face Hub ({detail}); "
                              "offline machines need a local file or folder") from exc


def parse_ranked_line(line: str) -> list[str]:
    """One tab-separated list: CSV quoting rules (a quoted field may hold tabs and doubled quotes),
    surrounding whitespace stripped."""
    protected = line.replace("\r", "\x00")  # the csv module refuses a bare \r in an unquoted field
    fields = next(csv.reader([protected], delimiter="\t", quotechar='"'))
    return [field.replace("\x00", "\r").strip() for field in fields]


def _load_ranked_tsv(source: str, path: Path, split: str) -> Dataset:
    """The RLHF_GLM text form: one list per non-blank line, responses separated by tabs, best first.

    A folder holds one file per split (``<split>.tsv`` or ``<split>.txt``), as the article's
    ``data/reward_datasets/<task>/{train,dev}.tsv`` does. Lines end at ``\n`` only (a stray ``\r``
    inside a review does not split a list). Row N of errors is the N-th list.
    """
    if path.is_dir():
        candidates = [path / f"{split}{suffix}" for suffix in (".tsv", ".txt")]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise DataError(source, f"data.layout=ranked_tsv: the folder has no {split}.tsv or {split}.txt for split {split!r}")
        path = found[0]
    elif not path.is_file():
        raise DataError(source, "data.layout=ranked_tsv reads local files or folders only; no such file or directory")
    if path.stat().st_size == 0:
        raise DataError(str(path), "is empty")
    try:
        text = path.read_bytes().decode("utf-8")  # no universal newlines: a lone \r stays inside its field
    except UnicodeDecodeError as exc:
        raise DataError(str(path), f"is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    lines = [line.removesuffix("\r") for line in text.split("\n") if line.strip()]
    return Dataset.from_dict({"responses": [parse_ranked_line(line) for line in lines]})


def load_rows(
    source: str, *, split: str, subset: str | None = None, revision: str | None = None, layout: Layout = Layout.auto
) -> Dataset:
    """Raw rows of one split. Local files hold a single split; folders and hub ids are split by name."""
    path = Path(source).expanduser()
    if layout == Layout.ranked_tsv:
        dataset = _load_ranked_tsv(source, path, split)
    elif path.is_file():
        dataset = _load_file(path)
    elif path.is_dir():
        dataset = _load_folder(path, split)
    else:
        dataset = _load_hub(source, split, subset, revision)
    if len(dataset) == 0:
        raise DataError(source, f"split {split!r} holds no rows")
    return dataset


def rename_columns(dataset: Dataset, mapping: dict[str, str], source: str) -> Dataset:
    """Apply ``data.columns`` (canonical name -> name in the data)."""
    renames = {}
    for canonical, actual in mapping.items():
        if actual not in dataset.column_names:
            raise DataError(source, f"data.columns.{canonical} names column {actual!r}, which does not exist "
                                    f"(columns: {', '.join(dataset.column_names)})")
        if actual != canonical:
            renames[actual] = canonical
    return dataset.rename_columns(renames) if renames else dataset
