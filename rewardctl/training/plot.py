"""curves.png: the loss and the method's primary metric, train and eval, against optimizer steps,
redrawn at evals at most once a minute (``CurveRedraws``); and ``pyplot()``, the one way
rewardctl imports matplotlib."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any


@functools.cache
def pyplot() -> ModuleType:
    """matplotlib.pyplot on the Agg backend (no display on training machines), imported on first use.

    Imported at the first picture, not when the run starts: a run shorter than
    ``train.curves_every_s`` draws only once it has finished, so matplotlib's 25 MiB (and 0.35 s of
    import) never sit in its training peak. Cached: the backend is chosen once, not at every picture.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(records: list[dict[str, Any]], metrics: tuple[str, ...], path: Path, title: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for split, style in (("train", dict(alpha=0.8)), ("eval", dict(marker="o", linewidth=2))):
            points = [(r["step"], r[metric]) for r in records if r.get("split") == split and r.get(metric) is not None]
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, label=split, **style)
        ax.set_title(metric)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


class CurveRedraws:
    """Calls ``draw`` after an eval only when ``interval_s`` seconds have passed since the last
    drawing (or since training started); 0 draws after every eval.

    Why: a picture costs 0.15-0.4 s on the main process while every other process waits at its next
    collective, and the first one also imports matplotlib. After every eval, the embedded default's
    six evals spent about 1.5 s of its 16-20 s drawing pictures nobody looks at mid-run. A long run's
    picture is still redrawn at its evals, at most once a minute, and the session draws the final one
    when the run ends or fails with an error (what a SIGKILL or an out-of-memory kill leaves is the
    last drawing, if any: metrics.jsonl holds every point).
    """

    def __init__(self, draw: Callable[[], None], interval_s: float, clock: Callable[[], float] = time.monotonic):
        self._draw = draw
        self._interval_s = interval_s
        self._clock = clock
        self._last = clock()

    def __call__(self) -> None:
        if self._clock() - self._last >= self._interval_s:
            self._draw()
            self._last = self._clock()
