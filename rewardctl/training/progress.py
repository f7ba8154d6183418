"""How a run shows its progress: a tqdm bar on a terminal, a plain log line per logged step elsewhere.

Piped into a file, a bar writes hundreds of carriage-return updates that read as one garbled line,
and with the bar off nothing at all appears between evals. So where stderr is not a terminal (CI, a
cluster job's log, ``| tee``) each logged step (``train.log_every``) becomes one line: step, loss,
learning rate, items per second and the time left.
"""

from __future__ import annotations

import logging
import sys
import time
from datetime import timedelta
from typing import Any

from tqdm.auto import tqdm

log = logging.getLogger("rewardctl.training.loop")


def format_eta(seconds: float) -> str:
    return str(timedelta(seconds=max(0, round(seconds))))


def progress_line(record: dict[str, Any], max_steps: int, item_name: str, seconds_left: float | None) -> str:
    """``step 40/500 (8%) loss 0.6712 lr 1.00e-03 812.3 pairs/s ETA 0:00:31``."""
    step = record["step"]
    parts = [f"step {step}/{max_steps} ({100 * step // max(max_steps, 1)}%)"]
    if isinstance(record.get("loss"), float):
        parts.append(f"loss {record['loss']:.4f}")
    parts.append(f"lr {record['lr']:.2e}")
    rate = record.get(f"{item_name}_per_sec")
    if isinstance(rate, float):
        parts.append(f"{rate:.1f} {item_name}/s")
    if seconds_left is not None:
        parts.append(f"ETA {format_eta(seconds_left)}")
    return " ".join(parts)


class Progress:
    """One per run; only the main process shows anything. ``bar``: a tqdm bar when asked for
    (``train.progress_bar``) and stderr is a terminal; otherwise plain lines (``lines``)."""

    def __init__(
        self,
        *,
        main: bool,
        wanted: bool,
        max_steps: int,
        start: int,
        item_name: str,
        desc: str,
        terminal: bool | None = None,
    ) -> None:
        terminal = sys.stderr.isatty() if terminal is None else terminal
        self.max_steps = max_steps
        self.item_name = item_name
        self.bar = tqdm(
            total=max_steps, initial=start, desc=desc, dynamic_ncols=True, disable=not (main and wanted and terminal)
        )
        self.lines = main and not (wanted and terminal)
        self._start_step = start
        self._started = time.perf_counter()

    def step(self) -> None:
        self.bar.update(1)

    def logged(self, record: dict[str, Any]) -> None:
        """A train record was logged (every ``train.log_every`` steps and at the last one)."""
        if "loss" in record:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
        if self.lines:
            done = record["step"] - self._start_step
            elapsed = time.perf_counter() - self._started
            left = elapsed / done * (self.max_steps - record["step"]) if done > 0 else None
            log.info(progress_line(record, self.max_steps, self.item_name, left))

    def close(self) -> None:
        self.bar.close()
