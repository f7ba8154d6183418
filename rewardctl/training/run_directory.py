"""One run's directory: the files rewardctl keeps there and the decisions they settle.

Layout (the README's "Run directory"): ``config.yaml`` (the resolved config), ``data_report.json``
(rows read, used, truncated, skipped per split), ``metrics.jsonl`` (one record per log and eval),
``curves.png``, ``checkpoints/step-N/`` (see ``checkpoint.py`` for their contents), ``model/`` (the
final stock transformers model) and ``summary.json`` (what the run ended as). Whether a run starts
fresh, resumes, has nothing left to do or is refused is decided here, from those files, before the
model loads; nothing already in the directory is overwritten by a run that is refused.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from rewardctl.config.schema import RunConfig
from rewardctl.errors import ConfigError
from rewardctl.training.checkpoint import (
    STEP_DIR,
    latest_checkpoint,
    newest_intact_checkpoint,
    read_trainer_state,
    validate_checkpoint,
)
from rewardctl.utils.fs import write_json_atomic, write_text_atomic

#: The run's config.yaml, written beside a run's final weights and by ``rewardctl export``: a model
#: directory scores as its run wherever it is copied.
RUN_CONFIG_FILE = "rewardctl_run.yaml"

log = logging.getLogger(__name__)


def stamp_run_config(model_dir: Path, run_dir: Path) -> None:
    """The run's config.yaml as ``model_dir/rewardctl_run.yaml`` (a run's final models, an export)."""
    write_text_atomic(model_dir / RUN_CONFIG_FILE, (run_dir / "config.yaml").read_text(encoding="utf-8"))


def resolved_config_yaml(cfg: DictConfig, run_dir: Path) -> str:
    """The composed config with every interpolation resolved and ``output_dir`` fixed to this run."""
    container = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    container["output_dir"] = str(run_dir)
    return OmegaConf.to_yaml(OmegaConf.create(container))


class RunDirectory:
    """The run directory of one job. ``main``: this process writes its files (the others only read)."""

    def __init__(self, path: Path, *, main: bool = True) -> None:
        self.path = path
        self.main = main

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def curves_path(self) -> Path:
        return self.path / "curves.png"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    # Decisions, before the model loads.

    def resume_point(self, run: RunConfig) -> Path | None:
        """The checkpoint to continue from (``train.resume``: auto, off or a path), or None; refuses
        to clobber an existing run and another method's checkpoint."""
        found = self._resume_point(run.train.resume)
        if found is not None:
            check_same_method(found, run.method.name)
        return found

    def _resume_point(self, resume: str) -> Path | None:
        if resume == "off":
            if latest_checkpoint(self.checkpoints) or self.model_dir.exists():
                raise ConfigError(
                    "train.resume",
                    f"{self.path} already holds a run (checkpoints/ or model/); "
                    "continue it with train.resume=auto or choose another output_dir",
                )
            return None
        if resume == "auto":
            return newest_intact_resume(self.checkpoints)
        return checked_resume(Path(resume))

    def finished(self) -> dict[str, Any] | None:
        """The summary of a completed run here, if there is one."""
        if not self.summary_path.exists() or not self.model_dir.exists():
            return None
        summary = json.loads(self.summary_path.read_text(encoding="utf-8"))
        return summary if summary.get("status") == "completed" else None

    def already_done(self, max_steps: int, resume_from: Path | None) -> dict[str, Any] | None:
        """A finished run that already reached ``max_steps`` (returned: nothing to do); a finished
        run with no checkpoint to continue from is refused (it ran with ``train.save_every=0``)."""
        finished = self.finished()
        if finished is not None and finished["step"] >= max_steps:
            hint = "raise train.max_steps to continue" if resume_from else "no checkpoint was kept (train.save_every=0)"
            log.info("%s already completed %d steps; nothing to do (%s)", self.path, finished["step"], hint)
            return finished
        if finished is not None and resume_from is None:
            raise ConfigError(
                "train.resume",
                f"{self.path} holds a finished {finished['step']}-step run and no "
                "checkpoint to continue from (it ran with train.save_every=0); use a new output_dir",
            )
        return None

    # Files, written by the main process only.

    def record_start(self, cfg: DictConfig, reports: dict[str, Any], *, resuming: bool) -> None:
        """config.yaml and data_report.json, once every check has passed (a refused or finished run
        leaves the directory as it was). A fresh start sets an earlier attempt's metrics aside."""
        if not self.main:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path / "config.yaml", resolved_config_yaml(cfg, self.path))
        write_json_atomic(self.path / "data_report.json", reports)
        if not resuming and self.metrics_path.exists():
            backup = self.metrics_path.with_name(f"metrics.{int(time.time())}.jsonl.bak")
            self.metrics_path.rename(backup)
            log.warning(
                "no checkpoint to resume in %s; the previous metrics.jsonl was kept as %s", self.path, backup.name
            )

    def stamp_saved_models(self) -> None:
        """The run's config.yaml beside the final weights (``model/``, ``model-merged/``), as
        ``rewardctl export`` writes it: a model directory copied out of its run (a LoRA adapter
        included) still scores with the run's tokenisation, truncation and method."""
        for saved in (self.model_dir, self.model_dir.with_name(f"{self.model_dir.name}-merged")):
            if saved.is_dir():
                stamp_run_config(saved, self.path)

    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.main:
            write_json_atomic(self.summary_path, summary)

    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.checkpoints)

    def early_stop_summary(self, since: float) -> dict[str, Any] | None:
        """The workers' summary when they wrote one after ``since`` with a ``diverged`` or
        ``interrupted`` status: the launcher's own exit status then says so, not "failed"."""
        if not self.summary_path.exists() or self.summary_path.stat().st_mtime < since:
            return None
        summary = json.loads(self.summary_path.read_text(encoding="utf-8"))
        return summary if summary.get("status") in ("diverged", "interrupted") else None


def newest_intact_resume(root: Path) -> Path | None:
    """train.resume=auto: the newest checkpoint that validates, warning about each damaged one passed over."""
    damaged: list[str] = []

    def passed_over(path: Path, reason: str) -> None:
        log.warning("checkpoint %s is damaged (%s); trying the one before it", path, reason)
        damaged.append(f"{path.name}: {reason}")

    found = newest_intact_checkpoint(root, on_damaged=passed_over)
    if found is None and damaged:  # starting over would silently discard the run: a person should look
        raise ConfigError(
            "train.resume",
            f"no checkpoint in {root} is intact ({'; '.join(damaged)}); move checkpoints/ aside to start the run over",
        )
    return found


def checked_resume(path: Path) -> Path:
    """train.resume=<dir>: refused, naming the fallback, when the checkpoint is damaged."""
    reason = validate_checkpoint(path)
    if reason is None:
        return path
    match = STEP_DIR.match(path.name)
    previous = newest_intact_checkpoint(path.parent, below=int(match.group(1))) if match else None
    fallback = f"the previous intact checkpoint is {previous}" if previous else "no earlier checkpoint is intact"
    raise ConfigError("train.resume", f"{path} is damaged: {reason}; {fallback}")


def check_same_method(path: Path, method: str) -> None:
    """Another method's checkpoint is refused by name before any data loads (its heads and state differ)."""
    written_by = read_trainer_state(path).get("method")
    if written_by is not None and written_by != method:
        raise ConfigError(
            "train.resume",
            f"{path} was written by method={written_by}, this run is method={method}; "
            f"resume it with method={written_by} or choose another output_dir",
        )


def check_resume(path: Path, guard: dict[str, Any], max_steps: int) -> None:
    """Refuse, before the model loads, a checkpoint whose data order differs from this run's."""
    state = read_trainer_state(path)
    for key, now in guard.items():
        if key in state and state[key] != now:
            raise ConfigError(
                "train.resume",
                f"{path} was written with {key}={state[key]}, this run has {now}; "
                "resuming would replay a different data order (start a new output_dir instead)",
            )
    if state["step"] > max_steps:
        raise ConfigError("train.resume", f"{path} is at step {state['step']}, beyond this run's {max_steps} steps")
