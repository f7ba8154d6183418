"""A trained reward model loaded once and scoring rows as training built them (score and serve).

``open_scorer`` takes a run directory (its ``model/`` or a checkpoint), a model directory inside a
run (``model/``, ``model-merged/``), an exported directory (its ``rewardctl_run.yaml``), or any
stock single-output sequence classifier (scored as a pairwise reward model). The run's config decides
tokenisation, truncation and batching, so a row scores exactly as ``rewardctl eval`` scores it.
``Scorer.score`` is collective under several processes: every process scores its share and the
main process holds every row's scores.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, replace
from importlib.resources import files
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from omegaconf import OmegaConf
from safetensors import safe_open
from torch import nn
from torch.utils.data import DataLoader

from rewardctl.config.schema import Device, MixedPrecision, RunConfig, TrainedModelSource
from rewardctl.config.validate import run_config_node
from rewardctl.data.prepare import by_length
from rewardctl.errors import ConfigError
from rewardctl.machine import check_precision, model_hidden_size
from rewardctl.methods.base import REWARD_STATS_KEY, Method, PreparedSplit
from rewardctl.methods.registry import build_method, load_run_config, to_run_config
from rewardctl.modeling.adapters import read_saved_meta
from rewardctl.training.checkpoint import METHOD_STATE
from rewardctl.training.evaluation import gather_outputs
from rewardctl.training.run_directory import RUN_CONFIG_FILE
from rewardctl.training.runtime import AccelerateRuntime, build_accelerator, quiet_other_processes
from rewardctl.training.trained_run import is_saved_model, load_model, resolve_checkpoint, use_saved_tokenizer

log = logging.getLogger(__name__)

#: Budget of a stock model whose tokenizer states no usable ``model_max_length``.
FALLBACK_MAX_LENGTH = 512


@dataclass
class ScoredRows:
    """Per input row (in order) its score columns, or None where the row could not be scored."""

    columns: list[dict[str, Any] | None]
    report: dict[str, Any]


class Scorer:
    """A method and its trained model, placed on the accelerator's device, ready to score rows."""

    def __init__(self, run: RunConfig, method: Method, model: nn.Module, accelerator: Accelerator, path: Path) -> None:
        self.run, self.method, self.model, self.accelerator, self.path = run, method, model, accelerator, path

    @property
    def normalization(self) -> dict[str, float] | None:
        return self.method.reward_normalization

    def describe(self) -> dict[str, Any]:
        """What the model is and how it scores (``rewardctl serve``'s /info)."""
        return {
            "method": self.run.method.name,
            "model": str(self.path),
            "base_model": self.run.model.name_or_path,
            "max_length": self.run.model.max_length,
            "truncation": self.run.data.truncation.value,
            "normalization": self.normalization,
            "reward_columns": list(self.method.reward_columns),
        }

    def score(self, rows: Any, source: str, *, normalize: bool = False, progress: bool = False) -> ScoredRows:
        """Score every row of the datasets.Dataset ``rows``; bad rows follow ``data.bad_rows``."""
        return self.score_prepared(
            prepare_rows(self.method, self.accelerator, rows, source), len(rows), normalize=normalize, progress=progress
        )

    def score_prepared(
        self, prepared: PreparedSplit, rows: int, *, normalize: bool = False, progress: bool = False
    ) -> ScoredRows:
        """Score features from ``prepare_rows`` (of ``rows`` input rows)."""
        batch_size = self.run.train.per_device_eval_batch_size or self.run.train.per_device_batch_size
        ordered = by_length(prepared.dataset, self.method.score_lengths(prepared.dataset))
        loader = DataLoader(ordered, batch_size=batch_size, shuffle=False, collate_fn=self.method.score_collate)
        if self.accelerator.num_processes > 1:
            loader = self.accelerator.prepare(loader)  # sharded; accelerate keeps a reference (one-shot score)
        else:  # never registered with the accelerator: a server scoring for days keeps no loader alive
            loader = on_device(loader, self.accelerator.device)
        outputs = gather_outputs(self.accelerator, self.method.score_step, self.model, loader, progress=progress)
        records = self.method.score_records(outputs) if outputs else {}
        if normalize:
            records = {row: self.normalized(columns) for row, columns in records.items()}
        return ScoredRows([records.get(i) for i in range(rows)], prepared.report)

    def normalized(self, columns: dict[str, Any]) -> dict[str, Any]:
        """``(r - mean) / std`` for every reward column, by the statistics saved with the model."""
        stats = self.normalization
        if stats is None:
            raise no_reward_stats(self.path)
        mean, std = stats["reward_mean"], stats["reward_std"] or 1.0

        def scale(value: Any) -> Any:
            if isinstance(value, list):
                return [scale(v) for v in value]
            return (value - mean) / std if isinstance(value, float) else value

        return {k: scale(v) if k in self.method.reward_columns else v for k, v in columns.items()}


@dataclass
class OpenedRun:
    """A run's method, tokenizer and accelerator, before its weights load: a command reads and checks
    its data first, so a bad row fails before the (possibly large) model is read."""

    run: RunConfig
    method: Method
    accelerator: Accelerator
    path: Path

    def load(self) -> Scorer:
        """The weights, placed for inference, and the method's eval hooks (e.g. BCO's reference)."""
        model = load_model(self.method, self.run, self.path)
        model = self.accelerator.prepare_model(model, evaluation_mode=True)
        self.method.on_eval_start(model, AccelerateRuntime(self.accelerator))
        return Scorer(self.run, self.method, model, self.accelerator, self.path)


def open_run(
    run: RunConfig, path: Path, device: Device | None = None, mixed_precision: MixedPrecision | None = None
) -> OpenedRun:
    """The method of ``run`` with the tokenizer saved beside ``path``, on an accelerator built as
    training built it. A run's config.yaml holds the precision it resolved; ``auto`` (given here, or
    in an older or hand-written config) is resolved for this machine. ``train.compile`` is ignored:
    one no-grad pass rarely repays the compile time, and eager scores match compiled ones to rounding."""
    device = device or run.hardware.device
    wanted = mixed_precision or run.hardware.mixed_precision
    width = model_hidden_size(run.model) if wanted == MixedPrecision.auto else None
    precision = check_precision(device, wanted, "mixed_precision", width)
    accelerator = build_accelerator(replace(run.hardware, device=device, mixed_precision=precision), report_to=[])
    quiet_other_processes(accelerator)
    method = build_method(run)
    use_saved_tokenizer(method, run, path)
    return OpenedRun(run, method, accelerator, path)


def on_device(loader: Any, device: Any) -> Any:
    """The batches of ``loader`` moved to ``device`` (what a prepared loader does on one process)."""
    for batch in loader:
        yield {key: value.to(device) for key, value in batch.items()}


def no_reward_stats(path: Path) -> ConfigError:
    return ConfigError(
        "normalize",
        f"{path} holds no reward statistics (reward_mean / reward_std in its config.json: saved by runs of "
        "this version at every eval); score without normalize=true",
    )


def has_reward_stats(path: Path) -> bool:
    """Whether a saved model's metadata or a checkpoint's method state holds the reward statistics
    (read without loading any weights)."""
    if is_saved_model(path):
        return read_saved_meta(path).get("reward_mean") is not None
    state = path / METHOD_STATE
    if not state.is_file():
        return False
    with safe_open(str(state), framework="pt") as tensors:
        return REWARD_STATS_KEY in tensors.keys()


def prepare_rows(method: Method, accelerator: Accelerator, rows: Any, source: str) -> PreparedSplit:
    """The method's scoring features of ``rows`` (tokenised once, on the main process first)."""
    with accelerator.main_process_first():
        return method.score_prepare(rows, source)


def open_model_source(source: TrainedModelSource, batch_size: int | None = None) -> OpenedRun:
    """The run behind ``source``, before its weights load (see ``OpenedRun``)."""
    run, path = locate(source.run_dir, source.model_dir, source.checkpoint, source.max_length)
    if batch_size:
        run.train.per_device_eval_batch_size = batch_size
    return open_run(run, path, source.device, source.mixed_precision)


def locate(
    run_dir: str | None, model_dir: str | None, checkpoint: str | None, max_length: int | None
) -> tuple[RunConfig, Path]:
    """(the run config that scores the model, the model's directory)."""
    if (run_dir is None) == (model_dir is None):
        raise ConfigError("run_dir", "name one of run_dir=<run directory> or model_dir=<saved model directory>")
    if run_dir is not None:
        root = Path(run_dir).expanduser().resolve()
        if not (root / "config.yaml").is_file():
            raise ConfigError(
                "run_dir", f"{run_dir!r} has no config.yaml (not a rewardctl run); for a saved model use model_dir="
            )
        return load_run_config(root / "config.yaml"), resolve_checkpoint(root, checkpoint)
    path = Path(model_dir).expanduser().resolve()
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        raise ConfigError("model_dir", f"{model_dir!r} holds no saved model (no config.json or adapter_config.json)")
    for config in (path / RUN_CONFIG_FILE, path.parent / "config.yaml"):
        if config.is_file():
            run = load_run_config(config)
            if max_length:
                run.model.max_length = max_length
            return run, path
    return stock_run_config(path, max_length), path


def stock_run_config(path: Path, max_length: int | None) -> RunConfig:
    """A run config for a model directory without one: the method its metadata names (pairwise for a
    stock classifier) with the settings it recorded, the budget from ``max_length`` or its tokenizer."""
    meta = read_saved_meta(path)
    name = meta.get("method", "pairwise")
    option = files("rewardctl.conf") / "method" / f"{name}.yaml"
    if not option.is_file():
        raise ConfigError("model_dir", f"{path} was saved by method {name!r}, which this version does not know")
    method = OmegaConf.load(str(option))
    for key in [k for k in meta if k in method]:
        method[key] = meta[key]
    budget = max_length or saved_budget(path)
    raw = OmegaConf.create(
        {
            "method": method,
            "model": {"name_or_path": str(path), "max_length": budget},
            "data": {"train": str(path)},
            "peft": {"name": "none"},
            "hardware": {"name": "auto", "device": "auto"},
            "output_dir": str(path),
        }
    )
    return to_run_config(run_config_node(raw, str(path)), for_training=False)


def saved_budget(path: Path) -> int:
    """The tokenizer's ``model_max_length`` (rewardctl saves the run's budget there), if it is a real
    number; transformers writes a huge sentinel when a tokenizer has none."""
    config = path / "tokenizer_config.json"
    value = json.loads(config.read_text(encoding="utf-8")).get("model_max_length") if config.is_file() else None
    if isinstance(value, (int, float)) and math.isfinite(value) and 0 < value <= 1_000_000:
        return int(value)
    log.warning("%s states no max length: scoring with %d tokens (set max_length=)", path, FALLBACK_MAX_LENGTH)
    return FALLBACK_MAX_LENGTH
