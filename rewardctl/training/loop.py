"""The one training loop, shared by every method.

It knows optimisation (accumulation, clipping, precision, schedule), cadence (log, eval, save,
stop) and bookkeeping (position in the data, metric totals, checkpoints). It knows nothing about what
a batch contains or what the loss means: those come from the ``Method``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from rewardctl import __version__
from rewardctl.config.schema import TrainConfig
from rewardctl.data.batching import EpochBatchSampler
from rewardctl.methods.base import Method
from rewardctl.training.checkpoint import load_checkpoint, save_checkpoint
from rewardctl.training.evaluation import run_evaluation
from rewardctl.training.metrics import MetricsLog, MetricTracker

log = logging.getLogger(__name__)


@dataclass
class LoopResult:
    status: str  # "completed" or "stopped" (train.stop_after_steps)
    step: int
    train: dict[str, Any] = field(default_factory=dict)
    evals: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0
    totals: dict[str, float] = field(default_factory=dict)


class TrainingLoop:
    def __init__(
        self,
        *,
        accelerator: Accelerator,
        method: Method,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        train_loader: DataLoader,
        batch_sampler: EpochBatchSampler,
        eval_loader: DataLoader | None,
        cfg: TrainConfig,
        max_steps: int,
        run_dir: Path,
        metrics_log: MetricsLog,
        on_eval: Callable[[], None] | None = None,
        resume_guard: dict[str, Any] | None = None,
    ) -> None:
        self.accelerator = accelerator
        self.method = method
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.train_loader = train_loader
        self.batch_sampler = batch_sampler
        self.eval_loader = eval_loader
        self.cfg = cfg
        self.max_steps = max_steps
        self.checkpoint_root = run_dir / "checkpoints"
        self.metrics_log = metrics_log
        self.on_eval = on_eval
        # Settings that fix the data order; stored in checkpoints and compared before a resume.
        self.resume_guard = dict(resume_guard or {})
        self.tracker = MetricTracker()
        self.step = 0
        self.micro_batches = 0
        self.train_seconds = 0.0
        self.evals: list[dict[str, Any]] = []
        self.last_train: dict[str, Any] = {}
        self._mark = time.perf_counter()
        self._window_seconds = 0.0
        self._grad_norms: list[torch.Tensor] = []

    def _clock(self) -> None:
        """Count the time since the last mark as training time (call after a synchronising op)."""
        now = time.perf_counter()
        self.train_seconds += now - self._mark
        self._window_seconds += now - self._mark
        self._mark = now

    def _restart_clock(self) -> None:
        """Exclude what just happened (eval, checkpoint) from training time."""
        self._mark = time.perf_counter()

    # ---- position in the data ---------------------------------------------------------------------
    @property
    def micro_batches_per_epoch(self) -> int:
        return len(self.batch_sampler)

    @property
    def epoch(self) -> float:
        return self.micro_batches / self.micro_batches_per_epoch

    def _micro_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """An endless stream over epochs, starting at ``self.micro_batches`` (resume-exact)."""
        epoch, offset = divmod(self.micro_batches, self.micro_batches_per_epoch)
        while True:
            self.batch_sampler.set_epoch(epoch, offset)
            for batch in self.train_loader:
                yield send_to_device(batch, self.accelerator.device)
            epoch, offset = epoch + 1, 0

    # ---- checkpoints ----------------------------------------------------------------------------
    def _trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "micro_batches": self.micro_batches,
            "epoch": self.epoch,
            "max_steps": self.max_steps,
            "totals": self.tracker.totals,
            "train_seconds": self.train_seconds,
            "rewardctl_version": __version__,
            **self.resume_guard,
        }

    def _process_state(self) -> dict[str, Any]:
        """What this process has seen since the last log: a resumed run must log the same numbers."""
        return {"window": self.tracker.window_state(), "grad_norms": [g.item() for g in self._grad_norms],
                "window_seconds": self._window_seconds}

    def save(self) -> Path:
        path = save_checkpoint(
            self.accelerator, self.checkpoint_root, self.step, self._trainer_state(),
            self.method.state_dict(), self.cfg.keep_checkpoints, process_state=self._process_state(),
        )
        log.info("checkpoint saved: %s", path)
        return path

    def restore(self, path: Path) -> None:
        """Continue from ``path``; the session has already checked it matches this run (``resume_guard``)."""
        state, method_state, process_state = load_checkpoint(self.accelerator, path)
        self.step = state["step"]
        self.micro_batches = state["micro_batches"]
        self.train_seconds = state.get("train_seconds", 0.0)
        self.tracker.totals = dict(state.get("totals", {}))
        self.tracker.load_window_state(process_state.get("window", {}))
        self._grad_norms = [torch.tensor(g) for g in process_state.get("grad_norms", [])]
        self._window_seconds = process_state.get("window_seconds", 0.0)
        self.method.load_state_dict(method_state)
        self.metrics_log.keep_until(self.step)
        self.evals = [r for r in self.metrics_log.records() if r.get("split") == "eval"]
        log.info("resumed from %s at step %d (epoch %.2f)", path, self.step, self.epoch)

    # ---- logging and evaluation -----------------------------------------------------------------
    def _emit(self, record: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            self.metrics_log.write(record)
        if self.accelerator.trackers:
            prefix = record["split"]
            self.accelerator.log({f"{prefix}/{k}": v for k, v in record.items()
                                  if k not in ("step", "split") and isinstance(v, (int, float))}, step=record["step"])

    def _log_train(self) -> None:
        values, window_sums = self.tracker.reduce(self.accelerator)  # synchronises: the clock is now honest
        self._clock()
        seconds, self._window_seconds = self._window_seconds, 0.0
        record: dict[str, Any] = {"step": self.step, "split": "train", "epoch": round(self.epoch, 4),
                                  "lr": self.scheduler.get_last_lr()[0]}
        if self._grad_norms:
            record["grad_norm"] = torch.stack([g.float().cpu() for g in self._grad_norms]).mean().item()
            self._grad_norms = []
        record.update(values)
        for name, total in window_sums.items():
            record[f"{name}_per_sec"] = total / seconds if seconds > 0 else None
        record["train_seconds"] = round(self.train_seconds, 3)
        self.last_train = record
        self._emit(record)

    def evaluate(self) -> dict[str, Any]:
        start = time.perf_counter()
        metrics, _ = run_evaluation(self.accelerator, self.method, self.model, self.eval_loader)
        record = {"step": self.step, "split": "eval", "epoch": round(self.epoch, 4), **metrics,
                  "eval_seconds": round(time.perf_counter() - start, 3)}
        self.evals.append(record)
        self._emit(record)
        if self.on_eval is not None and self.accelerator.is_main_process:
            self.on_eval()
        shown = {k: record[k] for k in ("loss", self.method.primary_metric) if k in record}
        log.info("eval @ step %d: %s", self.step, ", ".join(f"{k}={v:.4f}" for k, v in shown.items()))
        return record

    # ---- the loop -------------------------------------------------------------------------------
    def _optimizer_step(self, stream: Iterator[dict[str, torch.Tensor]]) -> torch.Tensor:
        """One update from ``grad_accum`` micro-batches; returns the gradient norm before clipping."""
        acc = self.accelerator
        window = [next(stream) for _ in range(self.cfg.grad_accum)]
        total = torch.stack([self.method.batch_weight(b).float() for b in window]).sum().to(acc.device)
        if acc.num_processes > 1:
            total = acc.reduce(total, reduction="sum")
        # DDP averages gradients over processes: undo that, then normalise by the window's items. Every
        # prepared row holds at least one loss item, so the clamp only avoids a division by zero.
        scale = acc.num_processes / total.clamp(min=1.0)
        # accelerate.backward divides by gradient_accumulation_steps (1 here, except under DeepSpeed,
        # whose engine divides by its own accumulation count): undone, so the window's normalisation
        # above is the only one.
        scale = scale * acc.gradient_accumulation_steps
        try:
            for i, batch in enumerate(window):
                last = i == len(window) - 1
                # DeepSpeed's engine reduces gradients and steps only on a micro-batch accelerate marks
                # as a boundary; DDP / FSDP skip the gradient all-reduce inside no_sync.
                acc.sync_gradients = last
                with nullcontext() if last else acc.no_sync(self.model):
                    out = self.method.train_step(self.model, batch)
                    acc.backward(out.loss_sum * scale)
                self.tracker.add(out.metrics)
        finally:
            acc.sync_gradients = True  # process-wide state: never left mid-window
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else math.inf
        grad_norm = acc.clip_grad_norm_(self.model.parameters(), max_norm)
        self.optimizer.step()
        if not acc.optimizer_step_was_skipped:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.micro_batches += len(window)
        if torch.is_tensor(grad_norm):
            return grad_norm.detach()
        # DeepSpeed reports the engine's norm as a float (None before its first step)
        return torch.tensor(float("nan") if grad_norm is None else float(grad_norm))

    def run(self) -> LoopResult:
        cfg = self.cfg
        if self.step == 0 and cfg.eval_at_start and self.eval_loader is not None:
            self.evaluate()
        stream = self._micro_batches()
        self.model.train()
        bar = tqdm(total=self.max_steps, initial=self.step, desc=f"{self.method.cfg.name}",
                   disable=not (self.accelerator.is_main_process and cfg.progress_bar), dynamic_ncols=True)
        start_step = self.step
        self._restart_clock()
        last_eval = self.step if (self.step == 0 and cfg.eval_at_start) else -1
        last_save = self.step
        status = "completed"
        while self.step < self.max_steps:
            self._grad_norms.append(self._optimizer_step(stream))
            bar.update(1)
            final = self.step == self.max_steps
            if self.step % cfg.log_every == 0 or final:
                self._log_train()
                if "loss" in self.last_train:
                    bar.set_postfix(loss=f"{self.last_train['loss']:.4f}", lr=f"{self.last_train['lr']:.2e}")
            if self.eval_loader is not None and ((cfg.eval_every and self.step % cfg.eval_every == 0) or final):
                self._clock()
                self.evaluate()
                self._restart_clock()
                last_eval = self.step
            if cfg.save_every and (self.step % cfg.save_every == 0 or final):
                self._clock()
                self.save()
                self._restart_clock()
                last_save = self.step
            if cfg.stop_after_steps is not None and self.step - start_step >= cfg.stop_after_steps and not final:
                self._clock()
                if last_save != self.step:
                    self.save()
                log.info("stopping at step %d after %d steps as asked (train.stop_after_steps); rerun the same "
                         "command (same output_dir, train.resume=auto) to continue", self.step, self.step - start_step)
                status = "stopped"
                break
        bar.close()
        if status == "completed" and self.eval_loader is not None and last_eval != self.step:
            self.evaluate()
        return LoopResult(status, self.step, self.last_train, self.evals, self.train_seconds, dict(self.tracker.totals))
