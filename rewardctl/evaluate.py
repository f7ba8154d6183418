"""`rewardctl eval`: re-score a run's saved model (or a checkpoint) on any dataset.

The run's own config.yaml decides the method, the tokenisation, the truncation and the metrics, so
`rewardctl eval` on the run's eval set reproduces the end-of-training eval exactly.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from datasets import Dataset
from omegaconf import DictConfig

from rewardctl.config.schema import EvalConfig, RunConfig
from rewardctl.config.validate import to_eval_config
from rewardctl.data.splits import load_raw_splits, load_split
from rewardctl.errors import ConfigError
from rewardctl.eval_groups import (
    apply_benchmark,
    as_chat_rows,
    benchmark_uses_chat_template,
    grouped_results,
    plan_groups,
    write_group_report,
)
from rewardctl.methods.registry import load_run_config
from rewardctl.training.evaluation import eval_loader, run_evaluation
from rewardctl.training.figures import draw_figures, figure_series
from rewardctl.training.scorer import open_run
from rewardctl.training.trained_run import resolve_checkpoint
from rewardctl.utils.fs import write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)


def eval_rows(ev: EvalConfig, run: RunConfig) -> tuple[Dataset, str, str, str]:
    """The rows to score: ``dataset=`` (``data=`` on the command line) if given, else exactly the run's own eval set (same split, same
    row limit, same held-out fraction), through the code path training used."""
    if ev.dataset is None:
        _, pair = load_raw_splits(run.data, run.train.seed)
        rows, name = pair
        source, split = run.data.eval or run.data.train, run.data.eval_split if run.data.eval else "holdout"
    else:
        source, split = ev.dataset, ev.split or run.data.eval_split
        data = replace(run.data, layout=ev.layout) if ev.layout is not None else run.data
        rows, name = load_split(data, source, split, mapping_required=False)
    if ev.max_rows:
        rows = rows.select(range(min(ev.max_rows, len(rows))))
    return rows, name, source, split


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[-80:] or "data"


def evaluate_run(cfg: DictConfig) -> dict[str, Any]:
    ev: EvalConfig = to_eval_config(cfg)
    run_dir = Path(ev.run_dir).resolve()
    run = load_run_config(run_dir / "config.yaml")
    ev, run = apply_benchmark(ev, run)  # benchmark=reward_bench: its data, read in its format
    if ev.batch_size:
        run.train.per_device_eval_batch_size = ev.batch_size
    if not (ev.dataset or run.data.eval or run.data.holdout_fraction > 0):
        raise ConfigError("data", "the run had no eval set; pass data=<file, folder or hub id>")
    model_path = resolve_checkpoint(run_dir, ev.checkpoint)

    opened = open_run(run, model_path, ev.device, ev.mixed_precision)
    accelerator, method = opened.accelerator, opened.method

    rows, name, source, split = eval_rows(ev, run)  # data problems surface before the weights load
    chat = benchmark_uses_chat_template(ev, method.tokenizer)
    if chat:  # RewardBench rows through the chat template, as RewardBench's script renders them
        rows = as_chat_rows(rows)
    grouping = plan_groups(ev, rows)  # (group_by / subset) read from the raw rows, which keep every column
    with accelerator.main_process_first():
        prepared = method.prepare(rows, name, training=False)
    model = opened.load().model
    loader = eval_loader(method, run, accelerator, prepared.dataset)
    metrics, outputs = run_evaluation(accelerator, method, model, loader)

    is_file = Path(source).expanduser().is_file()
    label = Path(source).stem if is_file else f"{Path(source).name}-{split}"
    label = f"{label}-holdout" if split == "holdout" and is_file else label
    out_dir = Path(ev.output_dir) if ev.output_dir else run_dir / "eval" / _slug(label)
    result = {"metrics": metrics, "data": source, "split": split, "model": str(model_path), "report": prepared.report}
    if grouping is not None:
        result.update(grouped_results(method, outputs, grouping))
    if ev.benchmark is not None:
        result["chat_template"] = chat  # whether rows went through the chat template (RewardBench's way)
    series = figure_series(method, outputs)  # the pictures' data, computed once
    calibration = series.get("calibration")
    if calibration:  # the reliability table behind the ECE: predicted against observed win rate per bin
        result["calibration"] = calibration["bins"]
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        result["figures"] = [p.name for p in draw_figures(out_dir, series)]
        write_json_atomic(out_dir / "metrics.json", result)
        if ev.write_predictions:
            records = method.predictions(outputs)
            write_text_atomic(out_dir / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        log.info("eval of %s on %s: %d %s", model_path, name, prepared.report["used"], method.item_name)
        for key, value in metrics.items():
            log.info("  %-14s %.6g", key, value)
        if grouping is not None:
            write_group_report(out_dir, result, method)
        log.info("written to %s", out_dir)
    return result
