"""The pictures of an eval: reward histograms, the calibration curve, per-step accuracy, predicted
against target; written at the end of a run and of ``rewardctl eval``.

The method decides what is drawn (``Method.figure_data`` returns plain named series); this module
only knows how to draw the four kinds of picture, so methods stay free of matplotlib and a user's
own method gets pictures by returning the same series. Each PNG is written atomically (a reader,
e.g. a browser refreshing the run directory, never sees half a file) and a picture that cannot be
drawn is logged and skipped: it must never fail a finished run.
"""

from __future__ import annotations

import logging
import math
import os
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import Tensor

from rewardctl.methods.base import Method
from rewardctl.training.plot import pyplot

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

MAX_BINS = 40
PANELS_PER_ROW = 3


def save_figure(fig: Figure, path: Path) -> None:
    """Write ``fig`` to ``path`` through a temporary file and a rename, then free it."""
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}.png"
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        pyplot().close(fig)
        tmp.unlink(missing_ok=True)


def _suptitle(fig: Figure, text: str) -> None:
    """The figure's title, wrapped to its width (a long title is cut off at the edges otherwise)."""
    fig.suptitle(textwrap.fill(text, width=max(30, int(fig.get_figwidth() * 10))))


def _finite(values: list[float]) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    return array[np.isfinite(array)]


def _grid(count: int, width: float = 5.5, height: float = 4.2) -> tuple[Figure, list[Any]]:
    columns = min(count, PANELS_PER_ROW)
    rows = math.ceil(count / columns)
    fig, axes = pyplot().subplots(rows, columns, figsize=(width * columns, height * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[count:]:
        ax.set_visible(False)
    return fig, flat[:count]


def _histogram_panel(ax: Any, panel: dict[str, Any]) -> None:
    """Overlaid distributions on shared bins (comparable bar heights), each labelled with its count
    and mean, and a dashed vertical line per marker (e.g. BCO's delta)."""
    series = {label: _finite(values) for label, values in panel["series"].items()}
    series = {label: values for label, values in series.items() if values.size}
    if series:
        pooled = np.concatenate(list(series.values()))
        bins = np.histogram_bin_edges(pooled, bins=int(min(MAX_BINS, max(10, math.sqrt(pooled.size)))))
        for index, (label, values) in enumerate(series.items()):
            color = f"C{index}"
            legend = f"{label} (n={values.size}, mean {values.mean():.3g})"
            ax.hist(values, bins=bins, color=color, alpha=0.35, label=legend)
            ax.hist(values, bins=bins, color=color, histtype="step", linewidth=1.5)
    for label, x in (panel.get("markers") or {}).items():
        ax.axvline(x, color="black", linestyle="--", linewidth=1.5, label=label)
    if panel.get("title"):
        ax.set_title(panel["title"])
    ax.set_xlabel(panel.get("xlabel", "value"))
    ax.set_ylabel("count")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def draw_reward_histogram(spec: dict[str, Any]) -> Figure:
    panels = spec["panels"]
    fig, axes = _grid(len(panels), width=7 if len(panels) == 1 else 5.5, height=4.5)
    for ax, panel in zip(axes, panels, strict=True):
        _histogram_panel(ax, panel)
    _suptitle(fig, spec.get("title", "Eval rewards"))
    fig.tight_layout()
    return fig


def draw_calibration(spec: dict[str, Any]) -> Figure:
    """Reliability diagram: observed win rate against mean predicted probability per bin, the
    diagonal being perfect calibration; below it, how many predictions each bin holds."""
    bins = spec["bins"]
    filled = [b for b in bins if b["count"]]
    fig, (top, bottom) = pyplot().subplots(
        2, 1, figsize=(6.5, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]}, squeeze=True
    )
    top.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfectly calibrated")
    top.plot(
        [b["predicted"] for b in filled],
        [b["observed"] for b in filled],
        marker="o",
        color="C0",
        label="this model (one point per non-empty bin)",
    )
    top.set_xlim(0, 1)
    top.set_ylim(-0.02, 1.02)
    top.set_ylabel("observed share of pairs a won")
    top.grid(alpha=0.3)
    top.legend(loc="upper left", fontsize="small")
    centers = [(b["low"] + b["high"]) / 2 for b in bins]
    widths = [(b["high"] - b["low"]) * 0.9 for b in bins]
    bottom.bar(centers, [b["count"] for b in bins], width=widths, color="C0", alpha=0.5)
    bottom.set_ylabel("predictions")
    bottom.set_xlabel("predicted P(a beats b) = σ(r_a − r_b)")
    bottom.grid(alpha=0.3)
    title = spec.get("title") or (f"Calibration, {spec['pairs']} pairs (each read both ways): ECE {spec['ece']:.3f}")
    _suptitle(fig, title)
    fig.tight_layout()
    return fig


def draw_step_accuracy(spec: dict[str, Any]) -> Figure:
    """Accuracy by step index (left axis) over a bar per index of how many rows have that step."""
    fig, ax = pyplot().subplots(figsize=(max(7.0, 0.35 * len(spec["steps"]) + 3), 4.8))
    x = np.arange(len(spec["steps"]))
    counts = ax.twinx()
    last = spec["steps"][-1]
    label = "rows with this step" + (f" ({last}: with {last[:-1]} or more)" if last.endswith("+") else "")
    counts.bar(x, spec["count"], color="grey", alpha=0.25, label=label)
    counts.set_ylabel("rows with this step")
    ax.set_zorder(counts.get_zorder() + 1)  # the lines above the bars
    ax.patch.set_visible(False)
    ax.plot(x, spec["accuracy"], marker="o", color="C0", linewidth=2, label="step accuracy")
    ax.plot(x, spec["majority"], marker=".", color="C1", linestyle="--", label="majority baseline at this step")
    ax.set_xticks(x, spec["steps"])
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("step index (1 = first step)")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()
    bars = counts.get_legend_handles_labels()
    ax.legend(handles[0] + bars[0], handles[1] + bars[1], loc="lower left", fontsize="small")
    _suptitle(fig, spec.get("title", "Per-step accuracy"))
    fig.tight_layout()
    return fig


def draw_prediction_scatter(spec: dict[str, Any]) -> Figure:
    """Each response as a point, prediction against target, with the line where they are equal."""
    panels = spec["panels"]
    fig, axes = _grid(len(panels), width=5.2, height=5)
    for ax, panel in zip(axes, panels, strict=True):
        target, prediction = np.asarray(panel["target"], float), np.asarray(panel["prediction"], float)
        keep = np.isfinite(target) & np.isfinite(prediction)
        target, prediction = target[keep], prediction[keep]
        size = 12 if target.size < 500 else 4
        ax.scatter(target, prediction, s=size, alpha=0.5, color="C0", label=f"responses (n={target.size})")
        if target.size:
            low = min(target.min(), prediction.min())
            high = max(target.max(), prediction.max())
            ax.plot([low, high], [low, high], color="grey", linestyle="--", label="prediction = target")
        ax.set_title(panel.get("title", ""))
        ax.set_xlabel("target")
        ax.set_ylabel("prediction")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    _suptitle(fig, spec.get("title", "Predicted against target"))
    fig.tight_layout()
    return fig


#: Picture name (its PNG's stem) -> how to draw the series ``Method.figure_data`` returns for it.
DRAWERS: dict[str, Callable[[dict[str, Any]], Figure]] = {
    "reward_histogram": draw_reward_histogram,
    "calibration": draw_calibration,
    "step_accuracy": draw_step_accuracy,
    "prediction_scatter": draw_prediction_scatter,
}


def figure_series(method: Method, outputs: dict[str, Tensor]) -> dict[str, Any]:
    """The method's named picture series for these eval outputs ({} when it has none or fails)."""
    if not outputs:
        return {}
    try:
        return method.figure_data(outputs)
    except Exception:  # noqa: BLE001 - pictures are extras: a method's bug here must not fail the run
        log.warning("no eval pictures: %s.figure_data failed", type(method).__name__, exc_info=True)
        return {}


def write_figures(out_dir: Path, method: Method, outputs: dict[str, Tensor]) -> list[Path]:
    """Draw every picture the method names for these gathered eval outputs into ``out_dir`` as
    ``<name>.png``; returns the paths written (none for a method without ``figure_data``)."""
    return draw_figures(out_dir, figure_series(method, outputs))


def draw_figures(out_dir: Path, data: dict[str, Any]) -> list[Path]:
    """Draw the series of ``figure_series`` (computed once by a caller that also reads them)."""
    written = []
    for name, spec in data.items():
        drawer = DRAWERS.get(name)
        if drawer is None or not spec:
            log.debug("no drawer for picture %r", name)
            continue
        path = Path(out_dir) / f"{name}.png"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_figure(drawer(spec), path)
        except Exception:  # noqa: BLE001 - the same: one picture failing leaves the others and the run
            log.warning("could not draw %s", path, exc_info=True)
            pyplot().close("all")
            continue
        written.append(path)
    return written
