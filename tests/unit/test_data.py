"""Loading, validation and bad-row policy: every error names the file, the row and the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import Dataset

from rewardctl.config.schema import BadRows
from rewardctl.data.batching import EpochBatchSampler
from rewardctl.data.loading import load_rows, rename_columns
from rewardctl.data.prepare import featurize_split, require_columns
from rewardctl.data.text import Fit
from rewardctl.errors import DataError, RowError

from ..conftest import write_jsonl

ROWS = [
    {"prompt": "Q1 ", "chosen": "good one", "rejected": "bad one"},
    {"prompt": "Q2 ", "chosen": "good two", "rejected": "bad two"},
    {"prompt": "Q3 ", "chosen": "good three", "rejected": "bad three"},
]


def test_jsonl_csv_tsv_parquet_and_folder_read_the_same_rows(tmp_path: Path):
    write_jsonl(tmp_path / "rows.jsonl", ROWS)
    Dataset.from_list(ROWS).to_csv(str(tmp_path / "rows.csv"), index=False)
    Dataset.from_list(ROWS).to_csv(str(tmp_path / "rows.tsv"), sep="\t", index=False)
    Dataset.from_list(ROWS).to_parquet(str(tmp_path / "rows.parquet"))
    (tmp_path / "folder").mkdir()
    write_jsonl(tmp_path / "folder" / "train.jsonl", ROWS)
    write_jsonl(tmp_path / "folder" / "test.jsonl", ROWS[:1])
    for name in ("rows.jsonl", "rows.csv", "rows.tsv", "rows.parquet"):
        assert load_rows(str(tmp_path / name), split="train").to_list() == ROWS, name
    assert load_rows(str(tmp_path / "folder"), split="train").to_list() == ROWS
    assert load_rows(str(tmp_path / "folder"), split="test").to_list() == ROWS[:1]


def test_malformed_jsonl_line_is_named(tmp_path: Path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n" + '{"prompt": "x", "chosen": "y",,}\n')
    with pytest.raises(DataError) as info:
        load_rows(str(path), split="train")
    assert str(path) in str(info.value) and "line 3" in str(info.value) and "not valid JSON" in str(info.value)


def test_rows_mixing_formats_load_and_are_checked_row_by_row(tmp_path: Path):
    """datasets 5 reads a field whose JSON type varies (a Json feature); each row is then validated
    on its own by the method (see test_pairwise for the per-row errors)."""
    chat = [{"role": "assistant", "content": "x"}]
    rows = [ROWS[0], {"prompt": [{"role": "user", "content": "Q"}], "chosen": chat, "rejected": chat}]
    dataset = load_rows(str(write_jsonl(tmp_path / "mixed.jsonl", rows)), split="train")
    assert dataset.to_list() == rows


def test_diagnosis_names_a_field_whose_type_changes(tmp_path: Path):
    from rewardctl.data.loading import diagnose_jsonl

    rows = [ROWS[0], ROWS[1], {"prompt": "Q", "chosen": 3, "rejected": "z"}]
    error = diagnose_jsonl(write_jsonl(tmp_path / "mixed.jsonl", rows))
    assert error.row == 3 and error.field == "chosen" and "row 1 has a string" in str(error)
    assert diagnose_jsonl(write_jsonl(tmp_path / "fine.jsonl", ROWS)) is None


def test_missing_file_empty_file_and_unknown_type(tmp_path: Path):
    with pytest.raises(DataError, match="no such file"):
        load_rows(str(tmp_path / "absent.jsonl"), split="train")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="is empty"):
        load_rows(str(tmp_path / "empty.jsonl"), split="train")
    (tmp_path / "rows.xml").write_text("<a/>")
    with pytest.raises(DataError, match="unsupported file type"):
        load_rows(str(tmp_path / "rows.xml"), split="train")


def test_folder_without_the_split_is_named(tmp_path: Path):
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    with pytest.raises(DataError, match="validation"):
        load_rows(str(tmp_path), split="validation")


def test_missing_column_lists_what_exists(tmp_path: Path):
    dataset = Dataset.from_list([{"prompt": "p", "chosen": "c", "answer": "a"}])
    with pytest.raises(DataError) as info:
        require_columns(dataset, "f.jsonl", ("chosen", "rejected"), ("chosen_ids", "rejected_ids"))
    text = str(info.value)
    assert (
        "f.jsonl" in text
        and "'rejected'" in text
        and "found: prompt, chosen, answer" in text
        and "data.columns" in text
    )


def test_column_mapping(tmp_path: Path):
    dataset = Dataset.from_list([{"question": "p", "good": "c", "bad": "r"}])
    renamed = rename_columns(dataset, {"prompt": "question", "chosen": "good", "rejected": "bad"}, "f")
    assert renamed.column_names == ["prompt", "chosen", "rejected"]
    with pytest.raises(DataError, match="data.columns.chosen names column 'nope'"):
        rename_columns(dataset, {"chosen": "nope"}, "f")


def _featurizer(row):
    if not row["chosen"]:
        raise RowError("chosen", "is empty")
    fit = Fit.too_long if len(row["chosen"]) > 8 else Fit.truncated if len(row["chosen"]) > 4 else Fit.fits
    return {"n": len(row["chosen"])}, fit


def test_bad_row_stops_with_row_and_field_by_default():
    dataset = Dataset.from_list([{"chosen": "ok"}, {"chosen": "ok"}, {"chosen": ""}])
    with pytest.raises(DataError) as info:
        featurize_split(dataset, _featurizer, source="f.jsonl", bad_rows=BadRows.error)
    assert str(info.value) == "f.jsonl, row 3, field 'chosen': is empty; data.bad_rows=skip leaves such rows out"


def test_skip_policy_counts_and_reports_bad_rows():
    rows = [{"chosen": "ok"}, {"chosen": ""}, {"chosen": "abcdef"}, {"chosen": "abcdefghijk"}, {"chosen": ""}]
    features, report = featurize_split(Dataset.from_list(rows), _featurizer, source="f.jsonl", bad_rows=BadRows.skip)
    assert features["n"] == [2, 6] and features["_row"] == [0, 2]
    assert report == {
        "source": "f.jsonl",
        "rows": 5,
        "skipped_bad": 2,
        "truncated": 1,
        "dropped_overlength": 1,
        "used": 2,
        "errors": ["f.jsonl, row 2, field 'chosen': is empty", "f.jsonl, row 5, field 'chosen': is empty"],
    }


def test_all_rows_bad_or_too_long_is_an_error():
    with pytest.raises(DataError, match="no usable rows"):
        featurize_split(Dataset.from_list([{"chosen": ""}] * 3), _featurizer, source="f", bad_rows=BadRows.skip)
    with pytest.raises(DataError, match="overlength=truncate"):
        featurize_split(Dataset.from_list([{"chosen": "x" * 20}] * 3), _featurizer, source="f", bad_rows=BadRows.error)


def test_batches_are_a_pure_function_of_seed_epoch_and_position():
    sampler = EpochBatchSampler(10, 3, seed=7)
    epoch0 = list(sampler)
    assert sorted(i for b in epoch0 for i in b) == list(range(10)) and [len(b) for b in epoch0] == [3, 3, 3, 1]
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch1 != epoch0
    sampler.set_epoch(1, start=2)
    assert list(sampler) == epoch1[2:]
    sampler.set_epoch(0)
    assert list(sampler) == epoch0


def test_batches_shard_evenly_across_processes():
    shards = [EpochBatchSampler(10, 3, seed=7, num_replicas=3, rank=r) for r in range(3)]
    batches = [list(s) for s in shards]
    assert all(len(b) == len(s) == 2 for b, s in zip(batches, shards, strict=True))
    global_batches = shards[0].global_batches()
    assert [batches[r][k] for k in range(2) for r in range(3)] == global_batches
    assert global_batches[4:] == global_batches[:2]  # padded by repeating the first batches


def test_length_grouping_cuts_padding_and_stays_a_permutation():
    import random

    lengths = [random.Random(i).randint(5, 300) for i in range(400)]
    grouped = EpochBatchSampler(400, 8, seed=3, lengths=lengths, group_batches=10)
    plain = EpochBatchSampler(400, 8, seed=3)

    def padded_tokens(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    batches = list(grouped)
    assert sorted(i for b in batches for i in b) == list(range(400)) and len(batches) == len(grouped) == 50
    assert max(lengths[i] for i in batches[0]) == max(lengths)  # the longest batch comes first
    assert padded_tokens(batches) < 0.75 * padded_tokens(list(plain))
    assert batches == list(grouped)  # a pure function of (seed, epoch)
    grouped.set_epoch(1)
    assert list(grouped) != batches


def test_tokenisation_cache_key_covers_data_settings_and_code():
    from rewardctl.data.prepare import fingerprint

    first, second = Dataset.from_list([{"chosen": "a"}]), Dataset.from_list([{"chosen": "b"}])
    key = fingerprint(first, _featurizer, ("max_length=8",))
    assert key == fingerprint(first, _featurizer, ("max_length=8",))  # stable across calls
    assert key != fingerprint(first, _featurizer, ("max_length=9",))
    assert key != fingerprint(second, _featurizer, ("max_length=8",))
    assert key != fingerprint(first, json.loads, ("max_length=8",))  # another module's code


def test_skip_survives_a_whole_batch_of_bad_rows():
    rows = [{"chosen": ""}] * 1000 + [{"chosen": "ok"}] * 5  # datasets.map batches are 1000 rows
    features, report = featurize_split(Dataset.from_list(rows), _featurizer, source="f", bad_rows=BadRows.skip)
    assert features["_row"] == [1000, 1001, 1002, 1003, 1004] and report["skipped_bad"] == 1000


def test_metrics_log_ignores_only_a_torn_last_line(tmp_path: Path):
    from rewardctl.training.metrics import MetricsLog

    log = MetricsLog(tmp_path / "metrics.jsonl", enabled=True)
    log.write({"step": 1, "split": "train", "loss": 0.5})
    log.write({"step": 2, "split": "train", "loss": 0.4})
    with log.path.open("a") as handle:
        handle.write('{"step": 3, "split": "tr')  # the process died here
    assert [r["step"] for r in log.records()] == [1, 2]
    log.keep_until(2)
    assert log.path.read_text().count("\n") == 2
    log.path.write_text('{"step": 1}\n{"ste\n{"step": 3}\n')
    with pytest.raises(json.JSONDecodeError):
        log.records()
