"""Bad input ends in one line naming file, row and field (or, with data.bad_rows=skip, in a counted
skip), never in a traceback, and no value is changed on the way in (the line read in a child process,
which pyarrow could crash, is in tests/e2e/test_data_errors_subprocess.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from rewardctl.data.loading import load_rows
from rewardctl.data.prepare import ROW_COLUMN
from rewardctl.data.splits import prepare_data
from rewardctl.errors import DataError, RowError
from rewardctl.methods.base import PreparedSplit
from rewardctl.methods.registry import method_class, to_run_config

from ..conftest import compose_train, write_jsonl

HINT = "data.bad_rows=skip leaves such rows out"
PAIR = {"prompt": "Q: sky? A:", "chosen": " blue", "rejected": " green"}
USER = [{"role": "user", "content": "Is the sky blue?"}]


def said(text: str, role: str = "assistant") -> list[dict[str, str]]:
    return [{"role": role, "content": text}]


def prepare(method: str, path: Path, *overrides: str) -> PreparedSplit:
    """The train split of ``path``, loaded and prepared as ``rewardctl train`` does before any model."""
    run = to_run_config(compose_train([f"method={method}", f"data.train={path}", "data.eval=null", *overrides]))
    train, _ = prepare_data(method_class(run.method._target_)(run.method, run), run)
    return train


def refused(method: str, path: Path, *overrides: str) -> DataError:
    with pytest.raises(DataError) as info:
        prepare(method, path, *overrides)
    assert "\n" not in str(info.value)
    return info.value


def lines(path: Path, *texts: str) -> Path:
    path.write_text("".join(text + "\n" for text in texts), encoding="utf-8")
    return path


# ---- bytes and JSON syntax -------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".tsv"])
def test_non_utf8_bytes_are_named_by_line_and_byte(tmp_path: Path, suffix: str):
    """Before: a pyarrow UnicodeDecodeError traceback mid-tokenisation, for every method."""
    header = {".jsonl": b"", ".json": b"", ".csv": b"prompt,chosen,rejected\n", ".tsv": b"prompt\tchosen\trejected\n"}[
        suffix
    ]
    good = {
        ".jsonl": json.dumps(PAIR).encode(),
        ".json": b"[" + json.dumps(PAIR).encode() + b",",
        ".csv": b"Q,blue,green",
        ".tsv": b"Q\tblue\tgreen",
    }[suffix]
    bad = {
        ".jsonl": b'{"prompt": "Q", "chosen": "caf\xe9", "rejected": "x"}',
        ".json": b'{"chosen": "caf\xe9"}]',
        ".csv": b"Q,caf\xe9,x",
        ".tsv": b"Q\tcaf\xe9\tx",
    }[suffix]
    path = tmp_path / f"latin1{suffix}"
    path.write_bytes(header + good + b"\n" + bad + b"\n")
    error = refused("pairwise", path)
    line, offset = (3 if header else 2), len(header + good) + 1 + bad.index(0xE9)
    assert str(error).startswith(f"{path}{', row 2' if suffix == '.jsonl' else ''}: is not UTF-8 text: line {line}, ")
    assert f"byte {offset} is 0xe9" in str(error)


def test_a_malformed_json_line_is_named_and_skippable(tmp_path: Path):
    path = lines(tmp_path / "rows.jsonl", json.dumps(PAIR), '{"prompt": "x", "chosen": "y",,}', json.dumps(PAIR))
    error = refused("pairwise", path)
    assert (
        str(error) == f"{path}, row 2: line 2 is not valid JSON (Expecting property name enclosed in double quotes "
        f"at column 31); {HINT}"
    )
    split = prepare("pairwise", path, "data.bad_rows=skip")  # before: the same error, skip or not
    assert split.report["skipped_bad"] == 1 and split.report["used"] == 2 and split.dataset[ROW_COLUMN] == [0, 2]
    assert split.report["errors"] == [
        f"{path}, row 2: line 2 is not valid JSON (Expecting property name enclosed in double quotes at column 31)"
    ]


@pytest.mark.parametrize(
    ("text", "field", "reason"),
    [
        (
            '{"prompt": "Q", "chosen": "a\\ud800b", "rejected": "c"}',
            "chosen",
            "holds a lone surrogate \\ud800, which is not valid Unicode",
        ),
        (
            '{"prompt": "Q", "chosen": "a", "rejected": "c", "margin": 1e309}',
            "margin",
            "holds 1e309, beyond the range of a 64-bit float",
        ),
        (
            '{"prompt": "Q", "chosen": "a", "rejected": "c", "margin": 123456789012345678901234}',
            "margin",
            "holds 123456789012345678901234, beyond the 64-bit integer range",
        ),
        (
            '{"prompt": "Q", "chosen": [{"role": "assistant", "content": "\\udc00"}], "rejected": "c"}',
            "chosen[0].content",
            "holds a lone surrogate \\udc00, which is not valid Unicode",
        ),
    ],
)
def test_json_values_arrow_cannot_hold_name_row_and_field(tmp_path: Path, text: str, field: str, reason: str):
    """Before: 'could not be read: An error occurred while generating the dataset', no row, no skip."""
    path = lines(tmp_path / "rows.jsonl", json.dumps({**PAIR, "margin": 1.0}), text)
    assert str(refused("pairwise", path)) == f"{path}, row 2, field '{field}': {reason}; {HINT}"
    split = prepare("pairwise", path, "data.bad_rows=skip")
    assert split.report["skipped_bad"] == 1 and split.report["used"] == 1


# ---- values changed on the way in -----------------------------------------------------------------
def test_a_float_in_token_ids_blames_its_own_row_and_skip_keeps_the_others(tmp_path: Path):
    """Before: Arrow made the whole column float, so row 1 was blamed and skip rejected every row."""
    rows = [
        {"chosen_ids": [5, 6], "rejected_ids": [5, 7]},
        {"chosen_ids": [5, 6.5], "rejected_ids": [5, 7]},
        {"chosen_ids": [9], "rejected_ids": [10, 11]},
    ]
    path = write_jsonl(tmp_path / "ids.jsonl", rows)
    assert (
        str(refused("pairwise", path))
        == f"{path}, row 2, field 'chosen_ids': must hold integers only; position 1 holds 6.5; {HINT}"
    )
    split = prepare("pairwise", path, "data.bad_rows=skip")
    assert split.dataset["chosen_ids"] == [[5, 6], [9]] and split.dataset[ROW_COLUMN] == [0, 2]


@pytest.mark.parametrize(
    ("method", "rows", "field", "got"),
    [
        (
            "bco",
            [{"prompt": "Q", "completion": " a", "label": True}, {"prompt": "Q", "completion": " b", "label": "NaN!"}],
            "label",
            "got NaN",
        ),
        ("pairwise", [{**PAIR, "margin": 1.0}, {**PAIR, "margin": "NaN!"}], "margin", "got NaN"),
        (
            "prm",
            [
                {"prompt": "Q", "completions": ["a"], "labels": [True]},
                {"prompt": "Q", "completions": ["a"], "labels": ["NaN!"]},
            ],
            "labels[0]",
            "got NaN",
        ),
    ],
)
def test_nan_is_reported_as_nan_not_as_null(
    tmp_path: Path, method: str, rows: list[dict[str, Any]], field: str, got: str
):
    """Before: datasets read NaN in a field of mixed JSON types as null ("got None")."""
    path = lines(tmp_path / "rows.jsonl", *(json.dumps(r).replace('"NaN!"', "NaN") for r in rows))
    error = refused(method, path)
    assert error.row == 2 and error.field == field and got in str(error)


@pytest.mark.parametrize(
    ("method", "rows", "field"),
    [
        ("pairwise", [{**PAIR, "margin": 1.0}, {**PAIR, "margin": "1"}], "margin"),
        (
            "ranklist",
            [
                {"prompt": "Q", "responses": [" a", " b"], "scores": [1.0, 2.0]},
                {"prompt": "Q", "responses": [" a", " b"], "scores": ["1", 2.0]},
            ],
            "scores[0]",
        ),
        (
            "prm",
            [
                {"prompt": "Q", "completions": ["a"], "labels": [0.5]},
                {"prompt": "Q", "completions": ["a"], "labels": ["1"]},
            ],
            "labels[0]",
        ),
        (
            "bco",
            [{"prompt": "Q", "completion": " a", "label": True}, {"prompt": "Q", "completion": " b", "label": "true"}],
            "label",
        ),
    ],
)
def test_a_string_where_a_number_belongs_is_an_error_not_a_coercion(tmp_path: Path, method, rows, field):
    """Before: datasets stored the string "1" of a mixed-type field as the number 1 ("true" as true)."""
    error = refused(method, write_jsonl(tmp_path / "rows.jsonl", rows))
    assert error.row == 2 and error.field == field and "got the string '" in str(error) and HINT in str(error)


def test_fields_of_mixed_json_types_keep_every_value_exactly(tmp_path: Path):
    """ujson (datasets' Json decoder) reads 0.007884021981768897 one ulp off; text stays text."""
    rows = [
        {"prompt": "Q:", "chosen": " 1", "rejected": " true", "margin": 0.007884021981768897},
        {"prompt": USER, "chosen": said("null"), "rejected": said("[1]"), "margin": "x"},
        {"prompt": USER, "chosen": said("true"), "rejected": said("1"), "margin": 2},
    ]
    method_rows = prepare("pairwise", write_jsonl(tmp_path / "rows.jsonl", rows), "data.bad_rows=skip")
    assert method_rows.dataset["margin"] == [0.007884021981768897, 2.0] and method_rows.dataset[ROW_COLUMN] == [0, 2]
    assert method_rows.report["errors"][0].endswith("field 'margin': must be a finite number, got the string 'x'")
    alone = prepare("pairwise", write_jsonl(tmp_path / "alone.jsonl", [rows[0]]))
    assert method_rows.dataset["chosen_ids"][0] == alone.dataset["chosen_ids"][0]  # " 1" is text, as alone


def test_csv_cells_are_text_numbers_are_read_where_numbers_belong(tmp_path: Path):
    """Before: pandas guessed types per column, so one 'x' made every margin a string (row 1 blamed,
    skip rejected all), 'NA' in a text became null, and an empty margin read as 'got None'."""
    path = tmp_path / "rows.csv"
    path.write_text("prompt,chosen,rejected,margin\nQ,NA,007,1.50\nQ,a,b,x\nQ,a,c,NaN\nQ,a,d,\n", encoding="utf-8")
    error = refused("pairwise", path)
    assert str(error) == f"{path}, row 2, field 'margin': must be a finite number, got the string 'x'; {HINT}"
    split = prepare("pairwise", path, "data.bad_rows=skip")
    assert split.dataset["margin"] == [1.5] and split.dataset[ROW_COLUMN] == [0]
    assert [e.split(": ", 1)[1] for e in split.report["errors"]] == [
        "must be a finite number, got the string 'x'",
        "must be a finite number, got NaN",
        "must be a finite number, got null (missing)",
    ]
    assert load_rows(str(path), split="train")[0] == {
        "prompt": "Q",
        "chosen": "NA",
        "rejected": "007",
        "margin": "1.50",
    }


def test_csv_labels_read_true_and_false_and_nothing_else(tmp_path: Path):
    path = tmp_path / "rows.csv"
    path.write_text("prompt,completion,label\nQ, a,True\nQ, b,false\nQ, c,1\n", encoding="utf-8")
    split = prepare("bco", path, "data.bad_rows=skip")
    assert split.dataset["label"] == [True, False] and split.report["errors"][0].endswith("got the string '1'")


# ---- chat rows ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("row", "field", "reason"),
    [
        (
            {"prompt": USER, "chosen": said("Yes.", role="robot"), "rejected": said("No.")},
            "chosen",
            "message 0 has role 'robot'; roles are system, developer, user, assistant, tool, ipython",
        ),
        (
            {"prompt": USER, "chosen": said("Yes.") + USER, "rejected": said("No.")},
            "chosen",
            "ends with a 'user' message; a response must end with the assistant's answer",
        ),
        (
            {"prompt": USER, "chosen": said("Yes."), "rejected": said("  ")},
            "rejected",
            "message 0 (the assistant's answer) is empty",
        ),
        (
            {"prompt": USER, "chosen": said("Same."), "rejected": said("Same.")},
            "rejected",
            "is identical to the chosen response after tokenisation, so the pair teaches nothing; "
            "data.bad_rows=skip leaves such pairs out",
        ),
    ],
)
def test_pairwise_chat_rows_are_checked(tmp_path: Path, row, field, reason):
    good = {"prompt": USER, "chosen": said("Yes."), "rejected": said("No.")}
    path = write_jsonl(tmp_path / "chat.jsonl", [good, row])
    assert str(refused("pairwise", path)) == f"{path}, row 2, field '{field}': {reason}" + (
        "" if "data.bad_rows" in reason else f"; {HINT}"
    )
    split = prepare("pairwise", path, "data.bad_rows=skip")
    assert split.report["skipped_bad"] == 1 and split.report["errors"] == [f"{path}, row 2, field '{field}': {reason}"]


def test_identical_texts_are_refused_alike_by_pairwise_bco_and_ranklist(tmp_path: Path):
    same = {"prompt": "Q:", "chosen": " same", "rejected": " same"}
    path = write_jsonl(tmp_path / "same.jsonl", [PAIR, same])
    assert refused("pairwise", path).field == "rejected"
    error = refused("bco", path)
    assert (error.row, error.field) == (2, "rejected") and "both desirable and undesirable" in str(error)
    ranked = write_jsonl(
        tmp_path / "ranked.jsonl",
        [{"prompt": "Q:", "responses": [" a", " b"]}, {"prompt": "Q:", "responses": [" same", " same"]}],
    )
    assert refused("ranklist", ranked).row == 2
    for method, file in (("pairwise", path), ("bco", path), ("ranklist", ranked)):
        assert prepare(method, file, "data.bad_rows=skip").report["skipped_bad"] == 1, method


def test_bco_paired_skips_are_listed_by_file_row_and_field(tmp_path: Path):
    """Before: the report counted the skipped halves of paired rows but listed none of their errors."""
    rows = [
        {"prompt": USER, "chosen": said("Yes."), "rejected": said("No.")},
        {"prompt": USER, "chosen": said(""), "rejected": said("No.")},
        {"prompt": USER, "chosen": said("Yes."), "rejected": said("Yes.", role="robot")},
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    assert (
        str(refused("bco", path))
        == f"{path}, row 2, field 'chosen': message 0 (the assistant's answer) is empty; {HINT}"
    )
    split = prepare("bco", path, "data.bad_rows=skip")
    assert split.report["skipped_bad"] == 2 and split.report["errors"] == [
        f"{path}, row 2, field 'chosen': message 0 (the assistant's answer) is empty",
        f"{path}, row 3, field 'rejected': message 0 has role 'robot'; roles are system, developer, user, assistant, "
        "tool, ipython",
    ]
    assert split.dataset[ROW_COLUMN] == [0, 0, 1, 2]  # the good half of a pair stays


def test_a_chat_template_that_refuses_a_conversation_is_a_row_error(tiny_tokenizer):
    from rewardctl.config.schema import Overlength
    from rewardctl.data.text import SequenceEncoder

    tiny_tokenizer.chat_template = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    encoder = SequenceEncoder(tiny_tokenizer, 64, Overlength.truncate)
    with pytest.raises(RowError) as info:
        encoder.encode(USER, said("Yes."), response_field="chosen")
    assert info.value.field == "chosen"
    assert info.value.reason == "the chat template refused it (Conversation roles must alternate user/assistant)"


def test_a_ranked_tsv_review_longer_than_the_csv_field_limit_is_read(tmp_path: Path):
    from rewardctl.config.schema import Layout

    long = "x" * 200_000
    (tmp_path / "train.tsv").write_text(f"{long}\tshort\n", encoding="utf-8")
    assert load_rows(str(tmp_path / "train.tsv"), split="train", layout=Layout.ranked_tsv)["responses"] == [
        [long, "short"]
    ]
