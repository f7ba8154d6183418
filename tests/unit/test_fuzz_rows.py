"""Fuzzing the data path with malformed rows, for every method and file layout.

The oracle judges each row alone: a row behaves in any file as it does in a file by itself (with the
same columns). So with ``data.bad_rows=error`` a file is prepared exactly when every row is, with the
very features each row gets alone, and otherwise stops with a one-line DataError that names the file,
the first bad row and the error that row gets alone; with ``data.bad_rows=skip`` it keeps every row
that is usable alone, with the same features, counts the others and lists their errors. Nothing else:
no other exception type, no clean row lost because another row widened a column's type, no value
silently changed on the way (``"1"`` read as 1, a float one ulp off, NaN read as null).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import datasets
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rewardctl.config.schema import BadRows, Layout
from rewardctl.data.prepare import ROW_COLUMN
from rewardctl.data.splits import load_split
from rewardctl.errors import DataError
from rewardctl.methods.registry import method_class, to_run_config

from ..conftest import compose_train

# A few examples per case keep the file near 30 s; REWARDCTL_FUZZ_EXAMPLES=200 digs deeper.
FUZZ = settings(
    derandomize=True,
    max_examples=int(os.environ.get("REWARDCTL_FUZZ_EXAMPLES", "8")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

USER = [{"role": "user", "content": "Is the sky blue?"}]


def said(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


# ---- what rows look like --------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    """A method and a row form: its fields (name -> kind) and a pool of clean rows."""

    name: str
    method: str
    fields: tuple[tuple[str, str], ...]
    clean: tuple[dict[str, Any], ...]
    typed: tuple[int, ...]  # clean rows of one Arrow type per field (what a parquet file can hold)


VARIANTS = {
    "pairwise": Variant(
        "pairwise",
        "pairwise",
        (("prompt", "prompt"), ("chosen", "message"), ("rejected", "message"), ("margin", "number")),
        (
            {"prompt": "Q: sky? A:", "chosen": " blue", "rejected": " green", "margin": 0.5},
            {"prompt": "Q: 2+2? A:", "chosen": " 4", "rejected": " 5", "margin": 0.30000000000000004},
            {"prompt": "Q: hi", "chosen": " hello there", "rejected": " go away", "margin": 1e-7},
            {"prompt": USER, "chosen": said("Yes."), "rejected": said("No."), "margin": 2},
        ),
        typed=(0, 1, 2),
    ),
    "pairwise_ids": Variant(
        "pairwise_ids",
        "pairwise",
        (("chosen_ids", "ids"), ("rejected_ids", "ids")),
        (
            {"chosen_ids": [5, 6, 7], "rejected_ids": [5, 8]},
            {"chosen_ids": [9], "rejected_ids": [10, 11, 12]},
        ),
        typed=(0, 1),
    ),
    "bco": Variant(
        "bco",
        "bco",
        (("prompt", "prompt"), ("completion", "message"), ("label", "bool")),
        (
            {"prompt": "Q1:", "completion": " good", "label": True},
            {"prompt": "Q2:", "completion": " bad", "label": False},
            {"prompt": USER, "completion": said("Yes."), "label": True},
        ),
        typed=(0, 1),
    ),
    "bco_paired": Variant(
        "bco_paired",
        "bco",
        (("prompt", "prompt"), ("chosen", "message"), ("rejected", "message")),
        (
            {"prompt": "Q1:", "chosen": " yes", "rejected": " no"},
            {"prompt": "Q2:", "chosen": " fine, thanks", "rejected": " leave"},
            {"prompt": USER, "chosen": said("Yes."), "rejected": said("No.")},
        ),
        typed=(0, 1),
    ),
    "ranklist": Variant(
        "ranklist",
        "ranklist",
        (("prompt", "prompt"), ("responses", "responses"), ("scores", "numbers")),
        (
            {"prompt": "Q:", "responses": [" a", " b", " c"], "scores": [1.0, 3.0, 2.5]},
            {"prompt": "Q2:", "responses": [" x", " y"], "scores": [0.1, 0.30000000000000004]},
            {"prompt": USER, "responses": [said("a"), said("b")], "scores": [2, 1]},
        ),
        typed=(0, 1),
    ),
    "prm": Variant(
        "prm",
        "prm",
        (("prompt", "prompt"), ("completions", "steps"), ("labels", "step_labels")),
        (
            {"prompt": "Q:", "completions": ["step one", "step two"], "labels": [1.0, 0.0]},
            {"prompt": "Q2:", "completions": ["a"], "labels": [0.75]},
            {"prompt": USER, "completions": ["b", "c"], "labels": [True, False]},
        ),
        typed=(0, 1),
    ),
}

NAN, INF = float("nan"), float("inf")
CHAT_GARBAGE = [
    [{"role": "robot", "content": "x"}],
    USER,
    said(""),
    said("   "),
    [{"role": "assistant"}],
    [{"content": "x"}],
    [{"role": "assistant", "content": 5}],
    USER + said("ok") + USER,
    [[]],
    [{"role": None, "content": "x"}],
]
# Any JSON value, for the layouts that hold any (jsonl, json).
ANY = [
    None,
    "",
    "   ",
    "1",
    "x",
    "NaN",
    "true",
    "null",
    "[1]",
    0,
    1,
    -1,
    1.5,
    0.30000000000000004,
    NAN,
    INF,
    -INF,
    1e308,
    True,
    False,
    [],
    [""],
    ["a"],
    [1, 2.5],
    [None],
    {},
    {"a": {"b": [1]}},
    2**70,
    -(2**63) - 1,
    "é\x00🙂",
    "\ud800",
    *CHAT_GARBAGE,
]
# Values of each field's own Arrow type (or null), for parquet.
TYPED = {
    "prompt": [None, "", "   ", "x", "1", "NaN", "é\x00🙂"],
    "message": [None, "", "   ", "x", "1", "NaN", "é\x00🙂", " blue"],
    "number": [None, NAN, INF, -INF, 0.0, -1e300, 0.1],
    "bool": [None, True, False],
    "ids": [None, [], [-1], [10**6], [5, 5], [0]],
    "responses": [None, [], [""], [" a"], [" a", " a"], [" b", "  "], [" a", " b", " c", " d"]],
    "numbers": [None, [], [NAN, 1.0], [1.0], [1.0, 1.0], [INF, 0.0], [0.0, 1.0, 2.0]],
    "steps": [None, [], [""], ["a", "b", "c"], ["x"]],
    "step_labels": [None, [], [2.0], [NAN], [-0.5], [1.0, 0.0, 1.0], [0.0]],
}
# Wrong values JSON can carry beyond ANY, per kind: strings for numbers, a float among ids, mixed lists.
JSON_ONLY = {
    "number": ["1", "0.5", "big", [1]],
    "bool": ["true", 1, 0, 1.0, NAN],
    "ids": [[5, 6.5], [5, "6"], [5.0, 6.0], [True], [5, None], [5, 2**70]],
    "responses": [[" a", 5], [" a", None], [" a", USER], [" a", said("b"), " c"], [said("a"), said("a")]],
    "numbers": [["1", 2.0], [1, "x"], [True, 2.0], [NAN, 1.0], [1e309 if False else 1e308, 1.0]],
    "steps": [["a", 5], [None], [USER], ["a", ""]],
    "step_labels": [["1"], [True, 0.5], [0.5, "x"], [None], [NAN], [INF]],
}
BAD_LINES = [
    '{"prompt": "x",,}',
    "[1, 2]",
    '"just text"',
    '{"margin": 1e309}',
    "{",
    "null",
    '{"prompt": "\\ud800"}',
    '{"chosen": NaN, "label": Infinity}',
    "12",
    '{"a": 1}{"b": 2}',
]
BAD_ITEMS = [5, "x", None, [1], True]


@dataclass(frozen=True)
class Line:
    """A JSON-lines line (or a JSON array item) that is not a row object."""

    text: str | None = None
    item: Any = None


@st.composite
def rows_for(draw: Any, variant: Variant, layout: str) -> tuple[list[Any], list[int]]:
    """1-4 rows, each clean, with one or two fields replaced or dropped, or (JSON) not an object at all;
    and how many changes each row got."""
    pool = [variant.clean[i] for i in variant.typed] if layout == "parquet" else list(variant.clean)
    rows, changes = [], []
    for _ in range(draw(st.integers(1, 4))):
        row = dict(draw(st.sampled_from(pool)))
        how = draw(st.sampled_from(["clean", "field", "field", "field", "two", "line"]))
        if how == "line" and layout in ("jsonl", "json"):
            rows.append(
                Line(text=draw(st.sampled_from(BAD_LINES)))
                if layout == "jsonl"
                else Line(item=draw(st.sampled_from(BAD_ITEMS)))
            )
            changes.append(1)
            continue
        changes.append({"clean": 0, "field": 1, "two": 2, "line": 1}[how])
        for _ in range(changes[-1]):
            name, kind = draw(st.sampled_from(variant.fields))
            choices = TYPED[kind] + (["<drop>"] if layout != "parquet" else [])
            if layout in ("jsonl", "json"):
                choices = choices + ANY + JSON_ONLY.get(kind, [])
            value = draw(st.sampled_from(choices))
            if value == "<drop>":
                row.pop(name, None)
            else:
                row[name] = value
        rows.append(row)
    return rows, changes


@st.composite
def ranked_lines(draw: Any) -> list[list[str]]:
    """Ranked-list lines: responses with empty, blank, duplicated, quoted, tabbed or \\r-holding text."""
    words = st.sampled_from([" a", "b", "c d", "", "  ", '"q"', '"x\ty"', 'say "hi"', "a\rb", "é🙂", '"open', "a"])
    return draw(st.lists(st.lists(words, min_size=0, max_size=4), min_size=1, max_size=4))


# ---- writing files ---------------------------------------------------------------------------------
def columns_of(rows: list[Any]) -> list[str]:
    """The file's columns: every key a row names, bad rows' too (``{"margin": 1e309}`` names margin)."""
    return list(dict.fromkeys(key for row in rows for key in (row if isinstance(row, dict) else line_keys(row))))


def line_keys(line: Any) -> list[str]:
    """The keys of an object line that Python's parser reads (NaN, 1e309 and all); none otherwise."""
    if not isinstance(line, Line) or line.text is None:
        return []
    try:
        value = json.loads(line.text, parse_float=str, parse_int=str, parse_constant=str)
    except ValueError:
        return []
    return list(value) if isinstance(value, dict) else []


def cell(value: Any) -> str:
    """A CSV cell as a spreadsheet export writes it: text as is, lists as JSON, null as empty."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return repr(value) if isinstance(value, float) else str(value)


def render(rows: list[Any], layout: str, columns: list[str]) -> bytes:
    if layout == "jsonl":
        return "".join((row.text if isinstance(row, Line) else json.dumps(row)) + "\n" for row in rows).encode()
    if layout == "json":
        return json.dumps([row.item if isinstance(row, Line) else row for row in rows], indent=1).encode()
    if layout in ("csv", "tsv"):
        out = io.StringIO()
        writer = csv.writer(out, delimiter="," if layout == "csv" else "\t", lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([cell(row.get(c)) for c in columns] for row in rows)
        return out.getvalue().encode()
    if layout == "ranked_tsv":
        return "".join("\t".join(row) + "\n" for row in rows).encode()
    raise ValueError(layout)


def write(path: Path, rows: list[Any], layout: str, columns: list[str]) -> Path:
    if layout == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist([{c: row.get(c) for c in columns} for row in rows]), path)
    else:
        path.write_bytes(render(rows, layout, columns))
    return path


def representable(rows: list[Any], layout: str) -> bool:
    """Whether the layout can hold these values at all (UTF-8 text; parquet's one type per column)."""
    if layout == "parquet":
        import pyarrow as pa

        try:
            pa.Table.from_pylist([r for r in rows if isinstance(r, dict)])
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            return False
        return True
    try:
        render(rows, layout, columns_of(rows)).decode("utf-8")
    except (UnicodeEncodeError, ValueError):
        return False
    return True


# ---- preparing them ----------------------------------------------------------------------------------
@dataclass
class Outcome:
    features: dict[int, list[dict[str, Any]]] | None = None  # file row (0-based) -> its prepared rows
    report: dict[str, Any] | None = None
    error: DataError | None = None


_METHODS: dict[tuple[str, BadRows], Any] = {}


def method_for(variant: Variant, bad_rows: BadRows) -> Any:
    key = (variant.method, bad_rows)
    if key not in _METHODS:
        run = to_run_config(
            compose_train([f"method={variant.method}", "data.eval=null", f"data.bad_rows={bad_rows.value}"])
        )
        _METHODS[key] = method_class(run.method._target_)(run.method, run)
    return _METHODS[key]


def prepare(variant: Variant, layout: str, path: Path, bad_rows: BadRows) -> Outcome:
    """Load and prepare ``path`` as training does (``load_split`` then ``method.prepare``)."""
    method = method_for(variant, bad_rows)
    data = replace(method.run.data, layout=Layout.ranked_tsv if layout == "ranked_tsv" else Layout.auto)
    try:
        rows, name = load_split(data, str(path), "train")
        split = method.prepare(rows, name, training=False)
    except DataError as error:
        return Outcome(error=error)
    features: dict[int, list[dict[str, Any]]] = {}
    for record in split.dataset:
        features.setdefault(record[ROW_COLUMN], []).append({k: v for k, v in record.items() if not k.startswith("_")})
    return Outcome(features=features, report=split.report)


_ALONE: dict[tuple[Any, ...], tuple[Outcome, Outcome]] = {}


def alone(variant: Variant, layout: str, row: Any, columns: list[str], folder: Path) -> tuple[Outcome, Outcome]:
    """How ``row`` fares in a file of its own (same layout, same columns), with error and with skip."""
    key = (variant.name, layout, repr(row), tuple(columns))
    if key not in _ALONE:
        filled = (
            {c: row.get(c) for c in columns}
            if isinstance(row, dict)
            else fill_line(row, columns)
            if isinstance(row, Line)
            else row
        )
        path = write(folder / f"alone-{len(_ALONE)}.{suffix(layout)}", [filled], layout, columns)
        _ALONE[key] = (prepare(variant, layout, path, BadRows.error), prepare(variant, layout, path, BadRows.skip))
    return _ALONE[key]


def fill_line(line: Line, columns: list[str]) -> Line:
    """An object line given the file's other columns as nulls (a missing key reads as null), spliced
    into its text: parsing and re-writing it would change what is being tested (1e309, NaN)."""
    keys = line_keys(line)
    if not keys or not line.text.startswith("{"):
        return line  # not a JSON object: a bad row in any company
    nulls = [f"{json.dumps(c)}: null" for c in columns if c not in keys]
    rest = line.text[1:].lstrip()
    return Line(text="{" + ", ".join(nulls) + (", " if nulls and rest != "}" else "") + rest) if nulls else line


def suffix(layout: str) -> str:
    return "tsv" if layout == "ranked_tsv" else layout


def skipped_alone(outcome: Outcome) -> int:
    """Rows a skip run leaves out of a one-row file (two for a paired BCO row whose sides both fail)."""
    if outcome.error is None:
        return outcome.report["skipped_bad"]
    found = re.search(r"all (\d+) rows are malformed", str(outcome.error))
    assert found, f"a one-row file failed for another reason than its row: {outcome.error}"
    return int(found.group(1))


def same_reason(reason: str) -> str:
    return re.sub(r"line \d+", "line N", reason)


def check(variant: Variant, layout: str, rows: list[Any], folder: Path, changes: list[int] | None = None) -> None:
    """``changes``: per row, how many problems were put in (a row with several may be blamed for any)."""
    if layout == "ranked_tsv":
        rows = [row for row in rows if "\t".join(row).strip()]  # blank lines hold no list
        if not rows:
            return
    changes = changes or [1] * len(rows)
    columns = columns_of(rows)
    path = write(folder / f"rows.{suffix(layout)}", rows, layout, columns)
    singles = [alone(variant, layout, row, columns, folder) for row in rows]
    for bad_rows in (BadRows.error, BadRows.skip):
        got = prepare(variant, layout, path, bad_rows)
        if got.error is not None:
            message = str(got.error)
            assert str(path) in message and "\n" not in message, message
        if any(single[0].error is not None and single[0].error.row is None for single in singles):
            assert got.error is not None, "a file-level problem of a row passed in a file of several"
            continue
        if bad_rows == BadRows.error:
            check_error_mode(got, [single[0] for single in singles], changes)
        else:
            check_skip_mode(got, [single[1] for single in singles], path)


def check_error_mode(got: Outcome, singles: list[Outcome], changes: list[int]) -> None:
    if all(single.error is None for single in singles):
        assert got.error is None, f"every row is fine alone, yet: {got.error}"
        assert got.features == {i: single.features[0] for i, single in enumerate(singles)}, "values changed"
        return
    assert got.error is not None, "a row that fails alone passed in company"
    assert got.error.row is not None, f"no row named: {got.error}"
    blamed = singles[got.error.row - 1].error
    assert blamed is not None, f"row {got.error.row} is fine alone, yet blamed: {got.error}"
    if changes[got.error.row - 1] == 1:  # one problem: the very error it gets alone
        assert (got.error.field, same_reason(got.error.reason)) == (blamed.field, same_reason(blamed.reason))
    assert "data.bad_rows=skip" in got.error.reason, "a skippable error must say so"


def check_skip_mode(got: Outcome, singles: list[Outcome], path: Path) -> None:
    if all(single.error is not None for single in singles):
        assert got.error is not None and "no usable rows" in str(got.error) and "row " in str(got.error), got.error
        return
    assert got.error is None, f"usable rows alone, yet: {got.error}"
    expected = {i: single.features[0] for i, single in enumerate(singles) if single.error is None and single.features}
    assert got.features == expected, "a row kept or dropped differently than alone, or its values changed"
    assert got.report["skipped_bad"] == sum(skipped_alone(single) for single in singles)
    assert all(str(path) in error and "row " in error for error in got.report["errors"])
    assert bool(got.report["errors"]) == bool(got.report["skipped_bad"])


# ---- the tests -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def _quiet_progress():
    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


CASES = [(v, layout) for v in VARIANTS for layout in ("jsonl", "json", "csv", "tsv", "parquet")]


@pytest.mark.parametrize(("variant", "layout"), CASES, ids=[f"{v}-{layout}" for v, layout in CASES])
def test_malformed_rows_fail_by_name_or_are_skipped_and_counted(variant: str, layout: str, tmp_path_factory):
    spec = VARIANTS[variant]
    folder = tmp_path_factory.mktemp(f"fuzz-{variant}-{layout}")

    @FUZZ
    @given(st.data())
    def run(data: Any) -> None:
        rows, changes = data.draw(rows_for(spec, layout))
        if not representable(rows, layout):
            return
        check(spec, layout, rows, folder, changes)

    run()


def test_ranked_tsv_lines_fail_by_name_or_are_skipped_and_counted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz-ranked")

    @FUZZ
    @given(ranked_lines())
    def run(rows: list[list[str]]) -> None:
        check(VARIANTS["ranklist"], "ranked_tsv", rows, folder)

    run()


def test_csv_cannot_hold_lists_and_says_so_by_row(tmp_path: Path):
    """List fields in a CSV cell are text: every row fails, by name, before anything loads."""
    rows = [dict(VARIANTS["prm"].clean[0])]
    path = write(tmp_path / "prm.csv", rows, "csv", columns_of(rows))
    got = prepare(VARIANTS["prm"], "csv", path, BadRows.error)
    assert got.error is not None and got.error.row == 1 and got.error.field == "completions"
