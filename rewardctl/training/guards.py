"""When the training loop must stop early: a diverging run, or a signal from the user or the cluster.

Both only *decide*; the loop acts (skips an update, writes or withholds a checkpoint, sets the status).
Kept apart from the loop so the rules can be tested without training anything.
"""

from __future__ import annotations

import math
import signal
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from types import FrameType
from typing import Any

# The median rule starts once this many train losses were logged (the first losses of a randomly
# initialised head move fast), and looks at most this many recent logged losses back.
MEDIAN_WARMUP = 10
MEDIAN_WINDOW = 20

ADVICE = (
    "try a lower train.lr, a longer warmup (train.warmup_steps / train.warmup_ratio), gradient clipping "
    "(train.max_grad_norm=1.0), or hardware.mixed_precision=bf16 instead of fp16"
)


@dataclass
class DivergenceGuard:
    """Counts skipped (non-finite) updates and watches the logged loss.

    Its state goes into every checkpoint (``state_dict``), so a resumed run decides exactly as an
    uninterrupted one would.
    """

    max_bad_steps: int
    factor: float
    skipped_steps: int = 0
    bad_streak: int = 0
    recent: list[float] = field(default_factory=list)
    last_finite_loss: float | None = None
    last_finite_step: int | None = None

    def after_update(self, step: int, loss: float, skipped: bool, bad: bool) -> str | None:
        """Record optimizer step ``step`` (its loss over every process); the reason to stop after
        ``max_bad_steps`` bad ones in a row.

        ``skipped`` counts every update not applied (an fp16 loss scaler's overflow included);
        only ``bad`` ones (non-finite loss, or non-finite gradients without a loss scaler) count
        towards the streak."""
        if math.isfinite(loss):
            self.last_finite_loss, self.last_finite_step = loss, step
        self.skipped_steps += int(skipped)
        if not bad:
            self.bad_streak = 0
            return None
        self.bad_streak += 1
        if self.max_bad_steps and self.bad_streak >= self.max_bad_steps:
            return f"{self.bad_streak} updates in a row had a non-finite loss or gradient norm"
        return None

    def after_log(self, loss: float | None) -> str | None:
        """Record a logged train loss; the reason to stop when it exploded against the recent median.

        Logged losses (window means), not single steps: one hard batch late in a run, against a
        small median, is noise; a whole window over ``factor`` times the median is not."""
        if loss is None or not math.isfinite(loss):
            return None
        if self.factor > 0 and len(self.recent) >= MEDIAN_WARMUP:
            median = statistics.median(self.recent)
            if median > 0 and loss > self.factor * median:
                return (
                    f"train loss {loss:.4g} is over {self.factor:g}x the median {median:.4g} of the last "
                    f"{len(self.recent)} logged losses"
                )
        self.recent = [*self.recent, loss][-MEDIAN_WINDOW:]
        return None

    def message(self, step: int, reason: str) -> str:
        """The one line a user reads: where, why, the last good loss, and what to change."""
        if self.last_finite_loss is None:
            last = "no step had a finite loss"
        else:
            last = f"last finite loss {self.last_finite_loss:.4g} at step {self.last_finite_step}"
        return f"diverged at step {step}: {reason} ({last}); {ADVICE}"

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("max_bad_steps", "factor")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, list(value) if key == "recent" else value)


class ImmediateStop(KeyboardInterrupt):
    """A second SIGINT/SIGTERM: stop now, without a checkpoint. A KeyboardInterrupt, so no
    ``except Exception`` swallows it; ``signum`` gives the CLI its exit status (128 + signum)."""

    how = "stopped at once, without a checkpoint"

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StoppedBeforeTraining(ImmediateStop):
    """A signal that stopped a multi-process run while its workers were still loading (before the
    first step): there is nothing to checkpoint and no summary; the command ends with 128 + signal."""

    how = "stopped before training started (nothing to checkpoint yet)"


# torchrun's and accelerate's launchers forward the signal they receive to every worker, which the
# cluster (or the terminal's Ctrl-C) often signalled already: a copy arriving this soon after the
# first is the same request, not a second one.
DUPLICATE_WINDOW_S = 0.5
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class SignalStop:
    """Within ``with``: the first SIGINT/SIGTERM only records a stop request (the loop finishes its
    step and checkpoints); a second one, at least ``DUPLICATE_WINDOW_S`` later, raises ``ImmediateStop``;
    after that the signals get their OS default (a third kills, even inside a blocking collective).
    The previous handlers come back on exit. Outside the main thread nothing is installed (Python
    allows handlers only there). The handlers only set fields: logging from a handler can re-enter
    a stream the interrupted code was writing."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._at = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> SignalStop:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str | None:
        return None if self.signum is None else signal.Signals(self.signum).name

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._at = signum, now
            return
        if now - self._at < DUPLICATE_WINDOW_S:
            return
        for other in STOP_SIGNALS:
            signal.signal(other, signal.SIG_DFL)
        raise ImmediateStop(signum)
