"""Reading raw rows: a local file, a folder of files, or a hub dataset id, all through `datasets`.

`datasets.load_dataset` does the real work (formats, caching, hub access). What this module adds is
diagnosis and fidelity:

- text files are checked to be UTF-8 first (a stray Latin-1 byte would otherwise surface as a pyarrow
  UnicodeDecodeError traceback mid-tokenisation), naming line and byte;
- a JSON file that `datasets` cannot read (a malformed line, ``1e309``, a lone surrogate) is read
  line by line in Python instead, naming the first bad row, or, with ``data.bad_rows=skip``, keeping
  it as a placeholder row that the data report counts;
- a JSON field whose type varies between rows is re-read in Python too: `datasets` would store the
  string ``"1"`` as the number 1 (and ``"true"`` as true), and decode floats with ujson, one ulp off;
- CSV/TSV cells stay the text they are (no guessing ``NA`` is missing or ``007`` is 7); an empty
  cell is null. Methods read numbers from text cells where they expect numbers.
"""

from __future__ import annotations

import codecs
import csv
import json
import logging
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
from datasets import Dataset, Features, Value
from datasets.table import InMemoryTable

from rewardctl.config.schema import BadRows, Layout
from rewardctl.data.prepare import ROW_ERROR_COLUMN, json_paths, row_error_marker, with_hint
from rewardctl.data.text import json_kind
from rewardctl.errors import DataError

CSV_OPTIONS = {"keep_default_na": False, "na_values": [""]}  # only an empty cell is missing
FILE_BUILDERS = {
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    ".csv": ("csv", CSV_OPTIONS),
    ".tsv": ("csv", {"delimiter": "\t", **CSV_OPTIONS}),
    ".parquet": ("parquet", {}),
}
JSON_SUFFIXES = (".jsonl", ".json")
TEXT_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")
# The files data.layout=ranked_tsv reads (tab-separated responses, best first); others go by suffix.
RANKED_TSV_SUFFIXES = (".tsv", ".txt")
_CHUNK = 16 << 20


# ---- UTF-8 -------------------------------------------------------------------------------------
# What pyarrow's JSON reader gets wrong, found in C at nearly the speed of a copy (one pattern each:
# with a literal first byte the regex engine skips ahead; an alternation would crawl). A false alarm
# (the word NaN inside a string) costs only speed: such files are read by Python's exact parser.
_NOT_AN_OBJECT = re.compile(rb"\n[ \t\r\f\v]*[^{\s]")  # `null` reads as a row of nulls, or crashes
_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")  # a lone surrogate escape is read as other text
_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")  # 19 digits in a row: an integer past int64?
_NON_FINITE = (b"NaN", b"Infinity")  # NaN: a float in a numeric column, null in a column of strings


def _pyarrow_traps(text: bytes) -> bool:
    """Whether these JSON lines hold something pyarrow would misread (or crash on)."""
    if text.lstrip()[:1] not in (b"{", b"") or _NOT_AN_OBJECT.search(text) or _SURROGATE.search(text):
        return True
    return _long_integer(text) or any(_bare_word(text, word) for word in _NON_FINITE)


def _long_integer(text: bytes) -> bool:
    """A JSON integer of 19+ digits (pyarrow rounds one past int64 to a float)."""
    zeros = text.translate(_DIGITS_AS_ZERO)  # a C pass, then a C search: no regex crawling every digit
    start = zeros.find(b"0" * 19)
    while start != -1:
        end = start + 19
        while end < len(zeros) and zeros[end] == 0x30:
            end += 1
        if _after_json_separator(text, start) and text[end : end + 1] not in (b".", b"e", b"E"):
            return True
        start = zeros.find(b"0" * 19, end)
    return False


def _after_json_separator(text: bytes, start: int) -> bool:
    """Whether the digits at ``start`` open a JSON value (after ``:``, ``[`` or ``,``, maybe ``-``),
    not digits inside a string (a URL, an id) or after a float's point."""
    head = text[max(0, start - 64) : start].rstrip(b" \t").removesuffix(b"-").rstrip(b" \t")
    return head[-1:] in (b":", b"[", b",")


def _bare_word(text: bytes, word: bytes) -> bool:
    """``word`` somewhere as a JSON value (not inside an identifier or a quoted word)."""
    start = text.find(word)
    while start != -1:
        before, after = text[start - 1 : start] if start else b"", text[start + len(word) : start + len(word) + 1]
        if not any(c.isalnum() or c in (b'"', b"_") for c in (before, after) if c):
            return True
        start = text.find(word, start + 1)
    return False


_BLANK_LINE = re.compile(rb"\n[ \t\r\f\v]*(?=\n)")  # a literal first byte: the engine skips ahead


@dataclass
class TextScan:
    """What one pass over a text file's bytes found (beyond its being UTF-8, or it would have raised)."""

    pyarrow_traps: bool = False  # JSON that pyarrow would misread (see _pyarrow_traps)
    rows: int = 0  # non-blank lines: the rows of a JSON-lines file


def scan_text(path: Path, *, json_lines: bool) -> TextScan:
    """Raise a DataError at the first byte that is not UTF-8, naming line, byte offset and (for JSON
    lines) the row. Reads 16 MiB pieces cut at newlines (never inside a character): fast, in C.

    For JSON, also tells whether pyarrow would misread it (``_pyarrow_traps``): a ``null`` line it
    reads as a row of nulls or crashes on (SIGSEGV, at the start of a file), a big integer it rounds,
    NaN it reads as null in some columns, a lone surrogate; a top-level array, which datasets reads
    with ujson (floats one ulp off, NaN as null). And it counts the rows, so a line pyarrow splits in
    two (``{...}{...}``), which would shift every later row number, is noticed.
    """
    offset = lines = 0
    carry = b""
    scan = TextScan()
    with path.open("rb") as handle:
        while True:
            chunk = handle.read(_CHUNK)
            piece = carry + chunk
            cut = len(piece) if not chunk else piece.rfind(b"\n") + 1
            body, carry = piece[:cut], piece[cut:]
            _check_piece(path, body, offset, lines, json_lines)
            if json_lines:
                text = body.removeprefix(codecs.BOM_UTF8) if offset == 0 else body
                scan.pyarrow_traps = scan.pyarrow_traps or _pyarrow_traps(text)
                scan.rows += _rows_in(text)
            offset, lines = offset + len(body), lines + body.count(b"\n")
            if not chunk:
                return scan


def _rows_in(body: bytes) -> int:
    """Non-blank lines in ``body``, a piece cut after a newline (or a file's last, unterminated line)."""
    text = b"\n" + body + (b"" if body.endswith(b"\n") else b"\n")  # every line between two newlines
    return text.count(b"\n") - 1 - sum(1 for _ in _BLANK_LINE.finditer(text))


def _check_piece(path: Path, body: bytes, offset: int, lines: int, rows_are_lines: bool) -> None:
    """Raise the DataError for the first byte of ``body`` that is not UTF-8."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = lines + body.count(b"\n", 0, exc.start) + 1
        column = exc.start - body.rfind(b"\n", 0, exc.start)
        row = _row_of_line(path, line) if rows_are_lines and path.suffix.lower() == ".jsonl" else None
        raise DataError(
            str(path),
            f"is not UTF-8 text: line {line}, column {column}, byte {offset + exc.start} "
            f"is 0x{body[exc.start]:02x} ({exc.reason}); save the file as UTF-8 "
            "(e.g. iconv -f latin1 -t utf-8)",
            row=row,
        ) from None


def _row_of_line(path: Path, line: int) -> int:
    """The row a JSON-lines line holds: blank lines hold none."""
    with path.open("rb") as handle:
        return sum(1 for number, text in enumerate(handle, start=1) if number <= line and text.strip()) or 1


# ---- JSON read in Python -------------------------------------------------------------------------
class _Bad:
    """A JSON value that must not reach a method (Arrow refuses it, or would change it)."""

    def __init__(self, problem: str) -> None:
        self.problem = problem


def _parse_float(text: str) -> float | _Bad:
    value = float(text)
    return value if math.isfinite(value) else _Bad(f"holds {text}, beyond the range of a 64-bit float")


def _parse_int(text: str) -> int | _Bad:
    if len(text.lstrip("-")) > 19 or not -(2**63) <= int(text) < 2**63:
        return _Bad(f"holds {text if len(text) <= 24 else text[:21] + '...'}, beyond the 64-bit integer range")
    return int(text)


# NaN and Infinity (not JSON, but what Python and pandas write) pass as the floats they name: Arrow
# reads them so in a numeric column, and a method's check then says "got NaN" wherever they are.
_DECODER = json.JSONDecoder(parse_float=_parse_float, parse_int=_parse_int)


def _value_problem(value: Any, path: str) -> tuple[str, str] | None:
    """(field path, what is wrong) for the first value Arrow or a method must not see."""
    if isinstance(value, _Bad):
        return path, value.problem
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return path, f"holds a lone surrogate \\u{ord(value[exc.start]):04x}, which is not valid Unicode"
        return None
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = _value_problem(item, f"{path}[{index}]")
            if found:
                return found
    elif isinstance(value, dict):
        for key, item in value.items():
            found = _value_problem(key, f"{path}.{key!r}") or _value_problem(item, f"{path}.{key}" if path else key)
            if found:
                return found
    return None


def _parse_record(text: str, line: int | None) -> tuple[Any, tuple[str | None, str] | None]:
    """(record, None) or (None, (field, problem)) for one JSON document."""
    where = f"line {line}" if line is not None else "the file"
    try:
        record = _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        return None, (None, f"{where} is not valid JSON ({exc.msg} at column {exc.colno})")
    except RecursionError:
        return None, (None, f"{where} nests JSON too deeply")
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        return None, (None, f"{where} is not usable JSON ({exc})")
    return _check_record(record, line)


def _check_record(record: Any, line: int | None) -> tuple[Any, tuple[str | None, str] | None]:
    """(record, None), or (its fields as nulls, or None, (field, problem)): a bad row still names
    its columns, so the file has the columns its rows name, bad ones too."""
    if not isinstance(record, dict):
        where = f"line {line} is" if line is not None else "it is"
        return None, (None, f"{where} {json_kind(record)}, expected a JSON object")
    found = _value_problem(record, "")
    return (dict.fromkeys(map(str, record)), found) if found else (record, None)


def _json_records(path: Path) -> Iterator[tuple[Any, tuple[str | None, str] | None]]:
    """(record, problem) per row: one per non-blank line, or (.json) per item of a top-level array."""
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        document, problem = _parse_document(text)
        if problem is not None:
            raise DataError(str(path), problem)
        for record in document:
            yield _check_record(record, None)
        return
    for line, content in enumerate(text.split("\n"), start=1):
        if content.strip():
            yield _parse_record(content, line)


def _parse_document(text: str) -> tuple[list[Any], str | None]:
    try:
        return _DECODER.decode(text), None
    except json.JSONDecodeError as exc:
        return [], f"is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
    except (RecursionError, ValueError) as exc:
        return [], f"is not usable JSON ({type(exc).__name__}: {exc})"


def diagnose_jsonl(path: Path) -> DataError | None:
    """The first unusable row of a JSON(-lines) file, or a field whose type changes between rows."""
    kinds: dict[str, tuple[str, int]] = {}
    for row, (record, problem) in enumerate(_json_records(path), start=1):
        if problem is not None:
            return DataError(str(path), problem[1], row=row, field=problem[0])
        for key, value in record.items():
            kind = json_kind(value)
            if kind == "null":
                continue
            seen = kinds.setdefault(key, (kind, row))
            if seen[0] != kind:
                return DataError(
                    str(path),
                    f"is {kind} but row {seen[1]} has {seen[0]}; one file must use one format per field",
                    row=row,
                    field=key,
                )
    return None


def load_json_in_python(files: list[Path], source: str, bad_rows: BadRows) -> Dataset:
    """Rows of JSON files parsed by Python's exact parser, for what `datasets` cannot read faithfully.

    A bad row raises (``bad_rows=error``) or becomes a placeholder carrying its error, so row numbers
    stay those of the file and the skip is counted. A field whose type varies is stored as JSON text
    (a Json feature) that methods read back with the same exact parser.
    """
    rows: list[dict[str, Any]] = []
    for path in files:
        for record, problem in _json_records(path):
            if problem is None:
                rows.append(record)
                continue
            field, reason = problem
            reason = reason if source == str(path) else f"{path.name}: {reason}"  # a folder: which file
            if bad_rows == BadRows.error:
                raise DataError(source, with_hint(reason), row=len(rows) + 1, field=field)
            rows.append({**(record or {}), ROW_ERROR_COLUMN: row_error_marker(reason, field)})
    if rows and all(ROW_ERROR_COLUMN in row for row in rows):
        first = json.loads(rows[0][ROW_ERROR_COLUMN])
        named = DataError(source, first["reason"], row=1, field=first["field"])
        raise DataError(source, f"no usable rows: all {len(rows)} rows are malformed (first: {named})")
    return dataset_from_records(rows)


def dataset_from_records(rows: list[dict[str, Any]]) -> Dataset:
    """Columns typed by Arrow where every value has one JSON shape; a column whose shape varies (a
    string here, a chat list there; true next to 1.5) is kept as exact JSON text (a Json column):
    Arrow would cast true to 1.0, and datasets would read the string "1" as the number 1."""
    names = dict.fromkeys(key for row in rows for key in row)
    names = [n for n in names if n != ROW_ERROR_COLUMN] + ([ROW_ERROR_COLUMN] if ROW_ERROR_COLUMN in names else [])
    arrays = {}
    for name in names:
        values = [row.get(name) for row in rows]
        arrays[name] = _json_array(values) if _shape_varies(values) else _typed_array(values)
    return Dataset(InMemoryTable(pa.table(arrays)))


def _typed_array(values: list[Any]) -> pa.Array:
    try:
        return pa.array(values)
    except (pa.ArrowException, OverflowError, TypeError, ValueError):  # what Arrow cannot type stays exact text
        return _json_array(values)


def _json_array(values: list[Any]) -> pa.Array:
    text = [None if value is None else json.dumps(value, ensure_ascii=False) for value in values]
    return pa.array(text, pa.string()).cast(pa.json_())


class _Varies(Exception):
    """Two values of one field have different JSON shapes."""


def _shape_varies(values: list[Any]) -> bool:
    shape: Any = None
    try:
        for value in values:
            shape = _unify(shape, _shape(value))
    except _Varies:
        return True
    return False


def _shape(value: Any) -> Any:
    """The JSON type skeleton of a value: what Arrow must hold for it without a cast."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"  # ints and floats share a column, as they do when pyarrow reads JSON lines
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        item: Any = None
        for element in value:
            item = _unify(item, _shape(element))
        return ("list", item)
    return ("object", tuple(sorted((str(k), _shape(v)) for k, v in value.items())))


def _unify(a: Any, b: Any) -> Any:
    if a is None or a == b:
        return b
    if b is None:
        return a
    if isinstance(a, tuple) and isinstance(b, tuple) and a[0] == b[0] == "list":
        return ("list", _unify(a[1], b[1]))
    if isinstance(a, tuple) and isinstance(b, tuple) and a[0] == b[0] == "object":
        fields = dict(a[1])
        for key, shape in b[1]:
            fields[key] = _unify(fields.get(key), shape)
        return ("object", tuple(sorted(fields.items())))
    raise _Varies


# ---- files, folders, hub ---------------------------------------------------------------------------
def _root_cause(exc: BaseException) -> str:
    """The innermost message of a chained exception: datasets wraps every builder failure in "An
    error occurred while generating the dataset", which says nothing about the file."""
    causes = [exc]
    while (
        (nxt := causes[-1].__cause__ or causes[-1].__context__) is not None and nxt not in causes and len(causes) < 10
    ):
        causes.append(nxt)
    for cause in reversed(causes):
        text = str(cause).strip()
        if text:
            return text.splitlines()[0]
    return type(exc).__name__


def _diagnose(path: Path, exc: Exception) -> DataError:
    return DataError(str(path), f"could not be read: {_root_cause(exc)}")


@contextmanager
def _quiet_builders() -> Iterator[None]:
    """The JSON and CSV builders log "Failed to read file ..." before raising; the DataError that
    follows says it better, in one line."""
    logger = logging.getLogger("datasets.packaged_modules")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _csv_features(path: Path, delimiter: str) -> Features | None:
    """Every column as text (from the header), so pandas guesses no types and drops no zeros."""
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            names = next(csv.reader(handle, delimiter=delimiter))
    except (StopIteration, csv.Error, OSError):
        return None
    if not names or len(set(names)) != len(names) or any(not name for name in names):
        return None
    return Features({name: Value("string") for name in names})


def _load_file(path: Path, bad_rows: BadRows) -> Dataset:
    suffix = path.suffix.lower()
    if suffix not in FILE_BUILDERS:
        raise DataError(str(path), f"unsupported file type {suffix!r} (use one of {', '.join(FILE_BUILDERS)})")
    if path.stat().st_size == 0:
        raise DataError(str(path), "is empty")
    builder, kwargs = FILE_BUILDERS[suffix]
    scan = scan_text(path, json_lines=suffix in JSON_SUFFIXES) if suffix in TEXT_SUFFIXES else TextScan()
    if scan.pyarrow_traps:  # Python's parser reads what pyarrow or ujson would not read faithfully
        return load_json_in_python([path], str(path), bad_rows)
    if builder == "csv":
        features = _csv_features(path, kwargs.get("delimiter", ","))
        kwargs = {**kwargs, **({"features": features} if features is not None else {})}
    try:
        with _quiet_builders():
            dataset = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except Exception as exc:  # datasets/pyarrow raise many types; all mean "this file is unusable"
        if suffix in JSON_SUFFIXES:
            return load_json_in_python([path], str(path), bad_rows)
        raise _diagnose(path, exc) from exc
    if suffix in JSON_SUFFIXES and (json_paths(dataset.features) or len(dataset) != scan.rows):
        return load_json_in_python([path], str(path), bad_rows)
    return dataset


def _folder_csv_options(files: list[Path]) -> dict[str, Any]:
    """A folder of CSV/TSV files is read as single files are: every cell text, only empty ones null."""
    if not files or any(f.suffix.lower() not in (".csv", ".tsv") for f in files):
        return {}
    features = _csv_features(files[0], "\t" if files[0].suffix.lower() == ".tsv" else ",")
    return {**CSV_OPTIONS, **({"features": features} if features is not None else {})}


def _split_files(path: Path, split: str) -> list[Path]:
    """The files `datasets` would read for ``split`` of a folder (none when it cannot tell)."""
    try:
        builder = datasets.load_dataset_builder(str(path))
        files = (builder.config.data_files or {}).get(split, [])
    except Exception:  # noqa: BLE001 - any failure to tell means "no file list": the caller falls back
        return []
    return [Path(str(f)) for f in files]


def _load_folder(path: Path, split: str, bad_rows: BadRows) -> Dataset:
    files = [f for f in _split_files(path, split) if f.is_file()]
    scans = [
        scan_text(f, json_lines=f.suffix.lower() in JSON_SUFFIXES) for f in files if f.suffix.lower() in TEXT_SUFFIXES
    ]
    all_json = bool(files) and all(f.suffix.lower() in JSON_SUFFIXES for f in files)
    if all_json and any(scan.pyarrow_traps for scan in scans):
        return load_json_in_python(files, f"{path} [{split}]", bad_rows)
    try:
        with _quiet_builders():
            dataset = datasets.load_dataset(str(path), split=split, **_folder_csv_options(files))
    except ValueError as exc:
        if "Unknown split" in str(exc) or "split" in str(exc).lower():
            raise DataError(str(path), f"has no split {split!r}: {str(exc).splitlines()[0]}") from exc
        if all_json:
            return load_json_in_python(files, f"{path} [{split}]", bad_rows)
        raise DataError(str(path), f"could not be read as a dataset folder: {_root_cause(exc)}") from exc
    except Exception as exc:
        if all_json:
            return load_json_in_python(files, f"{path} [{split}]", bad_rows)
        raise DataError(str(path), f"could not be read as a dataset folder: {_root_cause(exc)}") from exc
    if all_json and (json_paths(dataset.features) or len(dataset) != sum(scan.rows for scan in scans)):
        return load_json_in_python(files, f"{path} [{split}]", bad_rows)
    return dataset


def _load_hub(name: str, split: str, subset: str | None, revision: str | None) -> Dataset:
    try:
        return datasets.load_dataset(name, subset, split=split, revision=revision)
    except Exception as exc:
        looks_local = name.startswith((".", "/", "~")) or Path(name).suffix in FILE_BUILDERS
        if looks_local:
            raise DataError(name, "no such file or directory") from exc
        raise DataError(
            name,
            f"could not be loaded from the Hugging Face Hub ({_root_cause(exc)}); "
            "offline machines need a local file or folder",
        ) from exc


def parse_ranked_line(line: str) -> list[str]:
    """One tab-separated list: CSV quoting rules (a quoted field may hold tabs and doubled quotes),
    surrounding whitespace stripped."""
    protected = line.replace("\r", "\x00")  # the csv module refuses a bare \r in an unquoted field
    if len(line) >= csv.field_size_limit():  # a long review is data, not an error (the default is 128 KiB)
        csv.field_size_limit(len(line) + 1)
    fields = next(csv.reader([protected], delimiter="\t", quotechar='"'))
    return [field.replace("\x00", "\r").strip() for field in fields]


def _ranked_tsv_file(source: str, path: Path, split: str) -> Path:
    if path.is_dir():
        candidates = [path / f"{split}{suffix}" for suffix in RANKED_TSV_SUFFIXES]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise DataError(
                source, f"data.layout=ranked_tsv: the folder has no {split}.tsv or {split}.txt for split {split!r}"
            )
        return found[0]
    if not path.is_file():
        raise DataError(source, "data.layout=ranked_tsv reads local files or folders only; no such file or directory")
    return path


def _ranked_tsv_applies(path: Path, split: str) -> bool:
    """``data.layout=ranked_tsv`` describes text files, so it applies per file: a ``.tsv``/``.txt`` file,
    a folder with ``<split>.tsv``/``.txt`` (or no table of that split at all, which fails by name), or a
    path that does not exist (failing by name). A ``.jsonl``/``.json``/``.csv``/``.parquet`` file, or a
    folder holding only such files for the split, is read by its suffix, so a run may train on the
    article's TSV lists and hold out a JSON-lines set (or score one)."""
    if path.is_file():
        return path.suffix.lower() in RANKED_TSV_SUFFIXES
    if path.is_dir():
        if any((path / f"{split}{suffix}").is_file() for suffix in RANKED_TSV_SUFFIXES):
            return True
        tables = [f for f in _split_files(path, split) if f.suffix.lower() not in RANKED_TSV_SUFFIXES]
        return not any(f.is_file() and f.suffix.lower() in FILE_BUILDERS for f in tables)
    return True


def _load_ranked_tsv(source: str, path: Path, split: str, bad_rows: BadRows) -> Dataset:
    """The RLHF_GLM text form: one list per non-blank line, responses separated by tabs, best first.

    A folder holds one file per split (``<split>.tsv`` or ``<split>.txt``), as the article's
    ``data/reward_datasets/<task>/{train,dev}.tsv`` does. Lines end at ``\n`` only (a stray ``\r``
    inside a review does not split a list). Row N of errors is the N-th list.
    """
    path = _ranked_tsv_file(source, path, split)
    if path.stat().st_size == 0:
        raise DataError(str(path), "is empty")
    scan_text(path, json_lines=False)
    text = path.read_bytes().decode("utf-8")  # no universal newlines: a lone \r stays inside its field
    responses: list[list[str] | None] = []
    errors: list[str | None] = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            responses.append(parse_ranked_line(line.removesuffix("\r")))
            errors.append(None)
        except csv.Error as exc:  # e.g. a field over the csv module's 128 KiB limit
            reason = f"line {number} is not a tab-separated list ({exc})"
            if bad_rows == BadRows.error:
                raise DataError(str(path), with_hint(reason), row=len(responses) + 1) from None
            responses.append(None)
            errors.append(row_error_marker(reason))
    columns: dict[str, list[Any]] = {"responses": responses}
    if any(errors):
        columns[ROW_ERROR_COLUMN] = errors
    return Dataset.from_dict(
        columns,
        features=Features(
            {
                "responses": datasets.List(Value("string")),
                **({ROW_ERROR_COLUMN: Value("string")} if any(errors) else {}),
            }
        ),
    )


def load_rows(
    source: str,
    *,
    split: str,
    subset: str | None = None,
    revision: str | None = None,
    layout: Layout = Layout.auto,
    bad_rows: BadRows = BadRows.error,
) -> Dataset:
    """Raw rows of one split. Local files hold a single split; folders and hub ids are split by name.

    ``bad_rows`` decides what a row the loader itself cannot read does: stop the run, or stay as a
    placeholder the method's data report counts as skipped.
    """
    path = Path(source).expanduser()
    if layout == Layout.ranked_tsv and _ranked_tsv_applies(path, split):
        dataset = _load_ranked_tsv(source, path, split, bad_rows)
    elif path.is_file():
        dataset = _load_file(path, bad_rows)
    elif path.is_dir():
        dataset = _load_folder(path, split, bad_rows)
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
            raise DataError(
                source,
                f"data.columns.{canonical} names column {actual!r}, which does not exist "
                f"(columns: {', '.join(dataset.column_names)})",
            )
        if actual != canonical:
            renames[actual] = canonical
    return dataset.rename_columns(renames) if renames else dataset
