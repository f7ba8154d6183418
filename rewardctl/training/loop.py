"""The one training loop, shared by every method.

It knows optimisation (accumulation, clipping, precision, schedule), cadence (log, eval, save,
stop) and bookkeeping (position in the data, metric totals, checkpoints). It knows nothing about what
a batch contains or what the loss means: those come from the ``Method``.

Stopping early (``guards``): an update whose loss or gradient norm is non-finite is skipped, and
``train.max_bad_steps`` of them in a row, or an exploding logged loss, end the run as ``diverged``;
SIGINT/SIGTERM end it as ``interrupted`` after the current step and a checkpoint. One host read per
optimizer step (the finiteness flags and the stop request, agreed by every process in one collective)
decides both; nothing is read back per micro-batch.

Checkpoints never hold non-finite weights, so rotation (``train.keep_checkpoints``, done by the
checkpoint writer) can never delete the newest finite checkpoint in favour of a broken one: a save is
withheld when the step's update was skipped, and refused, ending the run as ``diverged``, when the
weights themselves are no longer finite (a finite but huge update can overflow them; the check is one
pass over the weights, only at a save). The final model is saved by the session only for ``completed``.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, send_to_device
from torch import nn
from torch.utils.data import DataLoader

from rewardctl import __version__
from rewardctl.config.schema import TrainConfig
from rewardctl.data.batching import EpochBatchSampler
from rewardctl.methods.base import Method
from rewardctl.training.checkpoint import load_checkpoint, save_checkpoint
from rewardctl.training.clipping import GradientClipper
from rewardctl.training.evaluation import run_evaluation
from rewardctl.training.guards import DivergenceGuard, SignalStop
from rewardctl.training.metrics import MetricsLog, MetricTracker
from rewardctl.training.progress import Progress

log = logging.getLogger(__name__)


@dataclass
class LoopResult:
    # "completed", "stopped" (train.stop_after_steps), "interrupted" (SIGINT/SIGTERM) or "diverged"
    status: str
    step: int
    train: dict[str, Any] = field(default_factory=dict)
    evals: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0
    totals: dict[str, float] = field(default_factory=dict)
    skipped_steps: int = 0
    message: str | None = None  # why a diverged run stopped: one line with what to try
    signal: str | None = None  # the signal that interrupted the run, e.g. "SIGTERM"
    eval_outputs: dict[str, Any] | None = None  # per-item outputs of the last eval (pictures)


@dataclass
class StepHealth:
    """What the one per-step host read tells every process (already agreed across processes)."""

    grad_bad: bool  # the gradient norm is non-finite
    loss: float  # the step's loss over every process (the objective: summed losses / items)
    signum: int  # a stop signal some process received (0: none)

    @property
    def loss_bad(self) -> bool:
        return not math.isfinite(self.loss)


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
        self.clip = GradientClipper(accelerator, optimizer)
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
        #: The per-item outputs of the latest eval (the end-of-run pictures are drawn from them).
        self.last_eval_outputs: dict[str, torch.Tensor] | None = None
        self.last_train: dict[str, Any] = {}
        self._mark = time.perf_counter()
        self._window_seconds = 0.0
        self._grad_norms: list[torch.Tensor] = []
        self.guard = DivergenceGuard(cfg.max_bad_steps, cfg.divergence_factor)
        self._diverged: str | None = None  # the reason, once a rule fired
        self._signals = SignalStop()  # installed only while ``run`` runs
        self._stop_signum = 0  # the stop signal every process agreed on
        self._start_step = self._last_save = 0
        self._last_eval = -1
        self._restored_last_eval = -1  # the step of the last eval before the checkpoint resumed from

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
            "divergence": self.guard.state_dict(),  # skipped updates, recent losses: a resume decides alike
            "last_eval": self._last_eval,  # a checkpoint written right after an eval: not evaluated again
            "rewardctl_version": __version__,
            **self.resume_guard,
        }

    def _process_state(self) -> dict[str, Any]:
        """What this process has seen since the last log: a resumed run must log the same numbers."""
        return {
            "window": self.tracker.window_state(),
            "grad_norms": [g.item() for g in self._grad_norms],
            "window_seconds": self._window_seconds,
        }

    def save(self) -> Path:
        path = save_checkpoint(
            self.accelerator,
            self.checkpoint_root,
            self.step,
            self._trainer_state(),
            self.method.checkpoint_state(with_reward_stats=self._last_eval == self.step),
            self.cfg.keep_checkpoints,
            process_state=self._process_state(),
        )
        log.info("checkpoint saved: %s", path)
        return path

    def restore(self, path: Path) -> None:
        """Continue from ``path``; the session has already checked it matches this run (``resume_guard``)."""
        state, method_state, process_state = load_checkpoint(self.accelerator, path)
        self.step = state["step"]
        self._restored_last_eval = state.get("last_eval", -1)
        self.micro_batches = state["micro_batches"]
        self.train_seconds = state.get("train_seconds", 0.0)
        self.tracker.totals = dict(state.get("totals", {}))
        self.guard.load_state_dict(state.get("divergence", {}))
        self.tracker.load_window_state(process_state.get("window", {}))
        self._grad_norms = [torch.tensor(g) for g in process_state.get("grad_norms", [])]
        self._window_seconds = process_state.get("window_seconds", 0.0)
        self.method.restore_checkpoint_state(method_state)
        self.metrics_log.keep_until(self.step)
        self.evals = [r for r in self.metrics_log.records() if r.get("split") == "eval"]
        log.info("resumed from %s at step %d (epoch %.2f)", path, self.step, self.epoch)

    # ---- logging and evaluation -----------------------------------------------------------------
    def _emit(self, record: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            self.metrics_log.write(record)
        if self.accelerator.trackers:
            prefix = record["split"]
            self.accelerator.log(
                {
                    f"{prefix}/{k}": v
                    for k, v in record.items()
                    if k not in ("step", "split") and isinstance(v, (int, float))
                },
                step=record["step"],
            )

    def _log_train(self) -> None:
        values, window_sums = self.tracker.reduce(self.accelerator)  # synchronises: the clock is now honest
        self._clock()
        seconds, self._window_seconds = self._window_seconds, 0.0
        record: dict[str, Any] = {
            "step": self.step,
            "split": "train",
            "epoch": round(self.epoch, 4),
            "lr": self.scheduler.get_last_lr()[0],
        }
        if self._grad_norms:
            record["grad_norm"] = torch.stack([g.float().cpu() for g in self._grad_norms]).mean().item()
            self._grad_norms = []
        record.update(values)
        for name, total in window_sums.items():
            record[f"{name}_per_sec"] = total / seconds if seconds > 0 else None
        record["train_seconds"] = round(self.train_seconds, 3)
        record["skipped_steps"] = self.guard.skipped_steps
        self.last_train = record
        self._emit(record)
        self._diverged = self._diverged or self.guard.after_log(record.get("loss"))

    def evaluate(self) -> dict[str, Any]:
        start = time.perf_counter()
        metrics, outputs = run_evaluation(self.accelerator, self.method, self.model, self.eval_loader)
        self.method.record_reward_stats(outputs)  # saved with the model: scores can be normalised
        self.last_eval_outputs = outputs
        record = {
            "step": self.step,
            "split": "eval",
            "epoch": round(self.epoch, 4),
            **metrics,
            "eval_seconds": round(time.perf_counter() - start, 3),
        }
        self.evals.append(record)
        self._emit(record)
        if self.on_eval is not None and self.accelerator.is_main_process:
            self.on_eval()
        shown = {k: record[k] for k in ("loss", self.method.primary_metric) if k in record}
        log.info("eval @ step %d: %s", self.step, ", ".join(f"{k}={v:.4f}" for k, v in shown.items()))
        return record

    # ---- the loop -------------------------------------------------------------------------------
    def _optimizer_step(self, stream: Iterator[dict[str, torch.Tensor]]) -> bool:
        """One update from ``grad_accum`` micro-batches; True when it was bad (non-finite) and skipped.

        The window's metrics and gradient norm are kept only for an applied update, so a skipped
        one never writes null into metrics.jsonl; the data position advances either way (resume-exact)."""
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
        metrics, losses = [], []
        try:
            for i, batch in enumerate(window):
                last = i == len(window) - 1
                # DeepSpeed's engine reduces gradients and steps only on a micro-batch accelerate marks
                # as a boundary; DDP / FSDP skip the gradient all-reduce inside no_sync.
                acc.sync_gradients = last
                with nullcontext() if last else acc.no_sync(self.model):
                    out = self.method.train_step(self.model, batch)
                    acc.backward(out.loss_sum * scale)
                metrics.append(out.metrics)
                losses.append(out.loss_sum.detach().float().sum())
        finally:
            acc.sync_gradients = True  # process-wide state: never left mid-window
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else math.inf
        grad_norm = self._norm_tensor(self.clip(self.model.parameters(), max_norm))
        health = self._health(grad_norm, torch.stack(losses).sum() / total.clamp(min=1.0))
        bad, skipped = self._update(health)
        if not skipped:
            for step_metrics in metrics:
                self.tracker.add(step_metrics)
            if grad_norm is not None:
                self._grad_norms.append(grad_norm)
        self.step += 1
        self.micro_batches += len(window)
        self._stop_signum = self._stop_signum or health.signum
        if skipped:
            self._note_skipped(health, bad)
        return bad

    def _norm_tensor(self, grad_norm: Any) -> torch.Tensor | None:
        """The gradient norm as a plain tensor on this process's device; None when unknown (DeepSpeed
        reports the engine's norm as a float, and None before its first step)."""
        if grad_norm is None:
            return None
        if torch.is_tensor(grad_norm):
            if hasattr(grad_norm, "full_tensor"):  # a DTensor (FSDP2)
                grad_norm = grad_norm.full_tensor()
            return grad_norm.detach().float().to(self.accelerator.device)
        return torch.full((), float(grad_norm), device=self.accelerator.device)

    def _health(self, grad_norm: torch.Tensor | None, loss: torch.Tensor) -> StepHealth:
        """The step's one host read, from every process in one gather (so all of them skip, stop or
        continue at the same step, and never wait on each other): whether the gradient norm is
        finite, this process's share of the step's loss, and the stop signal it received, if any."""
        signum = torch.full((), float(self._signals.signum or 0), device=loss.device)
        grad_bad = torch.zeros((), device=loss.device) if grad_norm is None else (~torch.isfinite(grad_norm)).float()
        row = torch.stack([grad_bad.to(loss.device), loss.float(), signum])
        rows = self.accelerator.gather(row[None]) if self.accelerator.num_processes > 1 else row[None]
        grad_bad, shares, signums = zip(*rows.tolist(), strict=True)
        return StepHealth(max(grad_bad) > 0, sum(shares), int(max(signums)))  # inf + -inf: nan, still bad

    def _update(self, health: StepHealth) -> tuple[bool, bool]:
        """Apply the update unless it is bad; returns (bad, skipped).

        Under fp16 the loss scaler must see every step (it skips an overflowing update itself and
        lowers its scale): there a non-finite gradient with a finite loss is the scaler's routine
        overflow, skipped but not counted towards ``train.max_bad_steps``. DeepSpeed's engine has
        already stepped inside ``backward`` (its ``optimizer.step`` is a no-op): a bad step there is
        counted, not undone."""
        acc = self.accelerator
        if self._loss_scaled:
            bad = health.loss_bad
            self.optimizer.step()
            skipped = acc.optimizer_step_was_skipped or bad
        else:
            bad = skipped = health.grad_bad or health.loss_bad
            if not bad:
                self.optimizer.step()
        if not skipped:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        reason = self.guard.after_update(self.step + 1, health.loss, skipped, bad)
        self._diverged = self._diverged or reason
        return bad, skipped

    @property
    def _loss_scaled(self) -> bool:
        """fp16 with a dynamic loss scale: accelerate's GradScaler, or DeepSpeed's own."""
        acc = self.accelerator
        deepspeed_fp16 = acc.distributed_type == DistributedType.DEEPSPEED and acc.mixed_precision == "fp16"
        return acc.scaler is not None or deepspeed_fp16

    def _note_skipped(self, health: StepHealth, bad: bool) -> None:
        if not bad:
            log.debug("step %d: the fp16 loss scaler skipped an overflowing update", self.step)
            return
        what = "loss" if health.loss_bad else "gradient norm"
        log.warning(
            "step %d: non-finite %s, update skipped (%d in a row, %d skipped in all)",
            self.step,
            what,
            self.guard.bad_streak,
            self.guard.skipped_steps,
        )

    def _weights_finite(self) -> bool:
        """Collective: whether every process's weights (its shard, under FSDP / ZeRO-3) are finite."""
        device = self.accelerator.device
        flags = [torch.isfinite(_local(p)).all() for p in self.model.parameters()]
        bad = (~torch.stack(flags).all()).float().reshape(1).to(device) if flags else torch.zeros(1, device=device)
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, reduction="max")
        return bad.item() == 0

    def _checkpoint(self, last_bad: bool) -> bool:
        """Save unless the checkpoint could hold non-finite weights; False when withheld."""
        if last_bad:
            log.warning("step %d: checkpoint not written: this step's update was skipped as non-finite", self.step)
            return False
        if not self._weights_finite():
            self._diverged = self._diverged or "the weights are no longer finite"
            return False
        self._clock()
        self.save()
        self._restart_clock()
        self._last_save = self.step
        return True

    def run(self) -> LoopResult:
        """Train to ``max_steps``, or until stopped; SIGINT/SIGTERM handlers live only this long."""
        with SignalStop() as self._signals:
            return self._run()

    def _stop_requested(self) -> bool:
        """The agreed request; one process also sees its own signal that arrived after the step's read."""
        if not self._stop_signum and self.accelerator.num_processes == 1 and self._signals.requested:
            self._stop_signum = self._signals.signum or 0
        return bool(self._stop_signum)

    def _run(self) -> LoopResult:
        if self.step == 0 and self.cfg.eval_at_start and self.eval_loader is not None:
            self.evaluate()
        stream = self._micro_batches()
        self.model.train()
        progress = Progress(
            main=self.accelerator.is_main_process,
            wanted=self.cfg.progress_bar,
            max_steps=self.max_steps,
            start=self.step,
            item_name=self.method.item_name,
            desc=f"{self.method.cfg.name}",
        )
        self._start_step = self.step
        self._restart_clock()
        self._last_eval = self.step if (self.step == 0 and self.cfg.eval_at_start) else self._restored_last_eval
        self._last_save = self.step
        status = None
        while status is None and self.step < self.max_steps:
            bad = self._optimizer_step(stream)
            progress.step()
            status = self._after_step(bad, progress)
        progress.close()
        return self._finish(status or "completed")

    def _after_step(self, bad: bool, progress: Progress) -> str | None:
        """Cadence (log, eval, save) and the early stops; the status to end with, or None to go on.
        A diverged run writes nothing more: no eval, no checkpoint."""
        cfg = self.cfg
        final = self.step == self.max_steps
        if self.step % cfg.log_every == 0 or final:
            self._log_train()
            progress.logged(self.last_train)
        if self._diverged:
            return "diverged"
        if self.eval_loader is not None and ((cfg.eval_every and self.step % cfg.eval_every == 0) or final):
            self._clock()
            self.evaluate()
            self._restart_clock()
            self._last_eval = self.step
        if cfg.save_every and (self.step % cfg.save_every == 0 or final):
            self._checkpoint(bad)
        if self._diverged:
            return "diverged"
        if final:
            return None
        if self._stop_requested():
            return self._stop("interrupted", bad)
        if cfg.stop_after_steps is not None and self.step - self._start_step >= cfg.stop_after_steps:
            return self._stop("stopped", bad)
        return None

    def _stop(self, status: str, bad: bool) -> str:
        """End before max_steps, with a checkpoint of this step unless it could be unsafe."""
        if self._last_save != self.step:
            self._checkpoint(bad)
        if self._diverged:
            return "diverged"
        if status == "interrupted":
            withheld = "" if self._last_save == self.step else " (no checkpoint written at this step)"
            log.warning(
                "%s received: stopped at step %d after finishing the step%s", self._signal_name(), self.step, withheld
            )
        else:
            log.info(
                "stopping at step %d after %d steps as asked (train.stop_after_steps); rerun the same command "
                "(same output_dir, train.resume=auto) to continue",
                self.step,
                self.step - self._start_step,
            )
        return status

    def _finish(self, status: str) -> LoopResult:
        """A run that reached max_steps is completed only with finite weights (then evaluated last)."""
        if status == "completed" and not self._weights_finite():
            self._diverged = "the weights are no longer finite"
        if self._diverged:
            return self._result("diverged", self.guard.message(self.step, self._diverged))
        if status == "completed" and self._stop_requested():
            log.warning("%s received at the last step: finishing the run", self._signal_name())
        if status == "completed" and self.eval_loader is not None and self._last_eval != self.step:
            self.evaluate()
        return self._result(status)

    def _signal_name(self) -> str:
        return signal.Signals(self._stop_signum).name if self._stop_signum else "stop request"

    def _result(self, status: str, message: str | None = None) -> LoopResult:
        if message:
            log.error(message)
        return LoopResult(
            status,
            self.step,
            self.last_train,
            self.evals,
            self.train_seconds,
            dict(self.tracker.totals),
            skipped_steps=self.guard.skipped_steps,
            message=message,
            signal=self._signal_name() if status == "interrupted" else None,
            eval_outputs=self.last_eval_outputs,
        )


def _local(param: torch.Tensor) -> torch.Tensor:
    """This process's part of a parameter: a DTensor's local shard (FSDP2), a ZeRO-3 partition."""
    if hasattr(param, "ds_tensor"):
        return param.ds_tensor
    if hasattr(param, "to_local"):
        return param.to_local()
    return param.detach()
