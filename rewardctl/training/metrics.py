"""Aggregating training metrics exactly, and the metrics.jsonl event log.

Methods report sums with counts (``Metric``); the tracker adds them over every micro-batch of a log
window and reduces across processes in one collective, so "accuracy" is the accuracy over all pairs
the window saw on all processes, not a mean of per-batch means.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor

from rewardctl.methods.base import Metric, Reduce
from rewardctl.utils.fs import write_text_atomic


class MetricTracker:
    """Window accumulator plus run-long totals for ``Reduce.sum`` metrics (restored on resume).

    A window slot is ``[reduce, value, count]`` with value and count float64 tensors on the device
    the metric came from: ``add`` only queues device arithmetic (the host never waits for a step),
    ``reduce`` at the log step is the one synchronisation. Sums run micro-batch by micro-batch in
    float64, so a window carried through a checkpoint (``window_state``) resumes bit for bit.
    """

    def __init__(self) -> None:
        self.window: dict[str, list[Any]] = {}
        self.totals: dict[str, float] = {}

    def add(self, metrics: dict[str, Metric]) -> None:
        for name, metric in metrics.items():
            value = _as_float64(metric.value)
            slot = self.window.get(name)
            if slot is None:
                self.window[name] = [metric.reduce, value, _count_like(metric.count, value)]
            elif metric.reduce == Reduce.min:
                slot[1] = torch.minimum(slot[1], value)
            elif metric.reduce == Reduce.max:
                slot[1] = torch.maximum(slot[1], value)
            else:
                slot[1] = slot[1] + value
                # A Python count is a kernel argument; a tensor count is added on the device.
                slot[2] = slot[2] + (
                    metric.count.detach().double() if torch.is_tensor(metric.count) else float(metric.count)
                )

    def window_state(self) -> dict[str, list[Any]]:
        """This process's not-yet-logged window, JSON-able, for checkpoints (restored per process)."""
        return {name: [kind.value, value.item(), count.item()] for name, (kind, value, count) in self.window.items()}

    def load_window_state(self, state: dict[str, list[Any]]) -> None:
        self.window = {
            name: [Reduce(kind), torch.tensor(value, dtype=torch.float64), torch.tensor(count, dtype=torch.float64)]
            for name, (kind, value, count) in state.items()
        }

    def reduce(self, accelerator: Accelerator) -> tuple[dict[str, float], dict[str, float]]:
        """Collective: call on every process. Returns (values to log, window sums of sum-metrics).

        The window is packed into two tensors, reduced across processes, and read back with one
        copy each: the synchronisation of the log step, and the only one the metrics cause."""
        names = sorted(self.window)
        device = accelerator.device
        summed = torch.zeros(2 * len(names), dtype=torch.float64, device=device)
        extremes = torch.zeros(len(names), dtype=torch.float64, device=device)
        for i, name in enumerate(names):
            kind, value, count = self.window[name]
            if kind in (Reduce.mean, Reduce.sum):
                summed[2 * i] = value.to(device)
                summed[2 * i + 1] = count.to(device)
            else:
                extremes[i] = value.to(device)
        if accelerator.num_processes > 1:
            summed = accelerator.reduce(summed, reduction="sum")
            gathered = accelerator.gather(extremes.unsqueeze(0))
        else:
            gathered = extremes.unsqueeze(0)
        sums = summed.tolist()
        lowest, highest = gathered.min(0).values.tolist(), gathered.max(0).values.tolist()
        values: dict[str, float] = {}
        window_sums: dict[str, float] = {}
        for i, name in enumerate(names):
            kind = self.window[name][0]
            total, count = sums[2 * i], sums[2 * i + 1]
            if kind == Reduce.mean:
                if count > 0:
                    values[name] = total / count
            elif kind == Reduce.sum:
                window_sums[name] = total
                self.totals[name] = self.totals.get(name, 0.0) + total
                values[name] = self.totals[name]
            elif kind == Reduce.min:
                values[name] = lowest[i]
            else:
                values[name] = highest[i]
        self.window.clear()
        return values, window_sums


def _as_float64(value: Tensor | float) -> Tensor:
    """A metric's value, detached, as a float64 tensor where it already lives (no host round trip)."""
    if torch.is_tensor(value):
        return value.detach().double()
    return torch.tensor(float(value), dtype=torch.float64)


def _count_like(count: Tensor | float, value: Tensor) -> Tensor:
    """The first count of a slot as a float64 tensor on ``value``'s device; a Python count is a fill
    there, not a host-to-device copy."""
    if torch.is_tensor(count):
        return count.detach().double()
    return torch.full((), float(count), dtype=torch.float64, device=value.device)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """One JSON object per line: every train log and every eval, each with ``step`` and ``split``."""

    def __init__(self, path: Path, *, enabled: bool) -> None:
        self.path = Path(path)
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")

    def records(self) -> list[dict[str, Any]]:
        """All events; a torn last line (the process died mid-write) is ignored, any other bad line raises."""
        if not self.path.exists():
            return []
        lines = [line for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]
        records = []
        for number, line in enumerate(lines, start=1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if number != len(lines):
                    raise
        return records

    def keep_until(self, step: int) -> None:
        """On resume: drop events the interrupted run wrote after its last checkpoint (they will be replayed)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [r for r in self.records() if r.get("step", 0) <= step]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
