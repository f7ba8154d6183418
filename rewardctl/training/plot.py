"""curves.png: the loss and the method's primary metric, train and eval, against optimizer steps;
and ``pyplot()``, the one way rewardctl imports matplotlib."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from types import ModuleType
from typing import Any


@functools.cache
def pyplot() -> ModuleType:
    """matplotlib.pyplot on the Agg backend (no display on training machines), imported on first use.

    Pictures are drawn once a run has finished: importing matplotlib when the run starts would hold
    its 25 MiB (and 0.3 s of start-up) through the whole of training, peak memory included. Cached:
    the backend is chosen once, not again at every picture.
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
