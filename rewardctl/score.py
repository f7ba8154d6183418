"""`rewardctl score`: a trained reward model's scores for any rows, every input column kept.

The rows come from a file, a folder, a hub dataset or stdin (one JSON object per line); the scores
go to a JSON-lines or Parquet file (or stdout). The model is opened once (``training.scorer``), with
the run's own tokenisation and truncation, so a labelled row scores exactly as ``rewardctl eval``
scored it. Under several processes each scores its share and the main process writes.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

from datasets import Dataset
from omegaconf import DictConfig

from rewardctl.config.schema import Layout, RunConfig, ScoreConfig
from rewardctl.config.validate import to_score_config
from rewardctl.data.loading import dataset_from_records, rename_columns
from rewardctl.data.splits import load_split
from rewardctl.errors import ConfigError, DataError
from rewardctl.training.scorer import ScoredRows, has_reward_stats, no_reward_stats, open_model_source, prepare_rows
from rewardctl.utils.fs import write_text_atomic

log = logging.getLogger(__name__)
STDIN = "-"


def read_stdin(stream: IO[bytes]) -> Dataset:
    """One JSON object per line; a bad line is one error naming its line number."""
    rows = []
    for number, raw in enumerate(stream, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError("<stdin>", "is not UTF-8 text", row=number) from None
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError("<stdin>", f"is not valid JSON ({exc.msg})", row=number) from None
        if not isinstance(value, dict):
            raise DataError("<stdin>", f"must be a JSON object, got {type(value).__name__}", row=number)
        rows.append(value)
    if not rows:
        raise DataError("<stdin>", "holds no rows (one JSON object per line)")
    return dataset_from_records(rows)  # a field whose type varies stays exact JSON, as from a file


def read_rows(sc: ScoreConfig, run: RunConfig) -> tuple[Dataset, str]:
    if sc.dataset == STDIN:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("data", "stdin (data=-) is read by one process; under torchrun name a file")
        rows, name = read_stdin(sys.stdin.buffer), "<stdin>"
    else:
        # New data: its format by its own suffix (not the run's layout), no hub config or revision of the
        # training set; the run's column mapping is applied to the columns the rows have.
        same = sc.dataset in (run.data.train, run.data.eval)
        data = replace(
            run.data,
            layout=sc.layout or Layout.auto,
            subset=run.data.subset if same else None,
            revision=run.data.revision if same else None,
            columns={},
        )
        rows, name = load_split(data, sc.dataset, sc.split, mapping_required=False)
    mapping = {
        k: v for k, v in (run.data.columns or {}).items() if v in rows.column_names and k not in rows.column_names
    }
    if mapping:
        rows = rename_columns(rows, mapping, name)
    if sc.max_rows:
        rows = rows.select(range(min(sc.max_rows, len(rows))))
    return rows, name


def output_path(sc: ScoreConfig, model: Path) -> Path | None:
    """Where the scores go (None: stdout): ``output``, else ``scores/<data name>.jsonl`` beside the run."""
    if sc.output == STDIN:
        return None
    if sc.output:
        return Path(sc.output).expanduser().resolve()
    if sc.run_dir:
        base = Path(sc.run_dir).resolve()
    elif (model.parent / "config.yaml").is_file():  # a run's model/ or model-merged/
        base = model.parent
    else:
        base = Path.cwd()
    name = "stdin" if sc.dataset == STDIN else Path(sc.dataset.rstrip("/")).name
    stem = Path(name).stem if Path(sc.dataset).expanduser().is_file() else f"{name}-{sc.split}"
    return base / "scores" / f"{stem}.jsonl"


def merged_records(rows: Dataset, scored: ScoredRows) -> list[dict[str, Any]]:
    """Every input row with its score columns; a row that was not scored (skipped as bad, or too
    long under data.overlength=drop) gets the same columns as null."""
    names = sorted({key for columns in scored.columns if columns for key in columns})
    empty = dict.fromkeys(names)
    records = []
    for row, columns in zip(rows, scored.columns, strict=True):
        kept = {k: v for k, v in row.items() if not k.startswith("_")}
        records.append({**kept, **(columns or empty)})
    return records


def parquet_ready(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Parquet wants one type per column: a column whose values differ in kind (a string here, a
    number or a message list there, e.g. a bad row kept with bad_rows=skip) is written as JSON text."""
    kinds: dict[str, set[type]] = {}
    for record in records:
        for key, value in record.items():
            if value is not None:
                kinds.setdefault(key, set()).add(type(value))
    mixed = {key for key, seen in kinds.items() if len(seen) > 1 and not seen <= {int, float}}
    if not mixed:
        return records
    return [
        {k: json.dumps(v, ensure_ascii=False) if k in mixed and v is not None else v for k, v in r.items()}
        for r in records
    ]


def as_json_lines(records: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def write_records(records: list[dict[str, Any]], path: Path | None) -> None:
    if path is None:
        sys.stdout.write(as_json_lines(records))
        sys.stdout.flush()
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
        Dataset.from_list(parquet_ready(records)).to_parquet(str(tmp))
        os.replace(tmp, path)
    else:
        write_text_atomic(path, as_json_lines(records))


def reward_summary(scored: ScoredRows, reward_columns: tuple[str, ...]) -> str:
    """``reward mean m, std s`` over every reward of every scored row (empty when there is none)."""
    values: list[float] = []
    for columns in scored.columns:
        for key in reward_columns:
            value = (columns or {}).get(key)
            values.extend(v for v in (value if isinstance(value, list) else [value]) if isinstance(v, float))
    if not values:
        return ""
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
    return f"; reward mean {mean:.4g}, std {std:.4g}"


def score_rows(cfg: DictConfig) -> dict[str, Any]:
    sc = to_score_config(cfg)
    opened = open_model_source(sc, batch_size=sc.batch_size)
    if sc.bad_rows is not None:
        opened.run.data.bad_rows = sc.bad_rows
    if sc.normalize and not has_reward_stats(opened.path):
        raise no_reward_stats(opened.path)
    rows, name = read_rows(sc, opened.run)
    path = output_path(sc, opened.path)
    prepared = prepare_rows(opened.method, opened.accelerator, rows, name)  # bad rows named before the weights load
    scorer = opened.load()
    start = time.perf_counter()
    scored = scorer.score_prepared(prepared, len(rows), normalize=sc.normalize, progress=True)
    seconds = time.perf_counter() - start
    result = {"rows": len(rows), "scored": sum(c is not None for c in scored.columns), "seconds": round(seconds, 3)}
    if scorer.accelerator.is_main_process:
        write_records(merged_records(rows, scored), path)
        log.info(
            "scored %d of %d rows of %s in %.1f s (%.1f rows/s)%s -> %s",
            result["scored"],
            result["rows"],
            name,
            seconds,
            result["scored"] / max(seconds, 1e-9),
            reward_summary(scored, scorer.method.reward_columns),
            path or "stdout",
        )
    result["output"] = str(path) if path else "-"
    return result
