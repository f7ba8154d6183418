"""The sweep report: after ``rewardctl train -m ...``, one row per job in the sweep directory.

``sweep_summary.csv`` (every final eval metric), ``sweep_summary.md`` (the table printed at the end of
the sweep) and ``sweep_curves.png`` (every job's eval curve of the primary metric and of the loss),
ranked by the method's primary metric, best first, in the metric's own direction
(``Method.primary_metric_higher_is_better``).

Collected by a Hydra callback (``SweepReport``, registered in conf/train.yaml under
``hydra.callbacks``): ``on_job_end`` appends what Hydra knows of the job (its override strings, its run
directory, how it ended) to ``sweep_jobs.jsonl`` in the sweep directory and rewrites the report from
those records and each job's ``summary.json`` and ``metrics.jsonl`` (so it is there even if a sweeper
fails afterwards); ``on_multirun_end`` writes it once more and prints the table. Nothing assumes the basic
sweeper's numbering or subdirectories (a sweeper plugin such as Optuna numbers its trials itself, and
``hydra.sweep.subdir`` may be anything): a job is wherever Hydra ran it. A record is one line appended
per job, so launchers that run jobs in other processes add theirs without a lock.

A job that fails ends as a row holding its one-line error: the job itself catches its error (see
``rewardctl.cli.train_app``) and notes it here (``note_job_failure``) for ``on_job_end``, which
runs in the job's process right after it. An exception that still reaches Hydra (``--debug``) is
Hydra's failed ``JobReturn`` and becomes the same row.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from rewardctl.utils.fs import write_text_atomic

RECORDS = "sweep_jobs.jsonl"
SUMMARY_CSV = "sweep_summary.csv"
SUMMARY_MD = "sweep_summary.md"
CURVES_PNG = "sweep_curves.png"

# Keys of an eval record that are not metrics.
NOT_METRICS = frozenset({"step", "split", "epoch"})
# A metric whose name says smaller is better, for a job whose method class cannot be imported.
LOWER_IS_BETTER_HINTS = ("loss", "error", "ece", "mse", "mae", "perplexity")

# How the running job ended when that is not in its summary.json (a job refused before training has
# none, and an earlier run's may still lie in its directory): set by the job, read by on_job_end.
_job_note: dict[str, Any] = {}


def note_job_failure(error: str) -> None:
    """The running job failed with ``error`` (one line): its row will say so."""
    _job_note.update(status="failed", error=error)


@dataclass
class JobRow:
    """One job of a sweep as the report shows it."""

    job: str
    overrides: list[str]
    status: str
    run_dir: str = ""  # empty when the job left no directory (refused before training)
    error: str = ""
    method: str = ""
    primary_metric: str = ""
    higher_is_better: bool = True
    final: dict[str, float] = field(default_factory=dict)  # the final eval's metrics
    final_step: int | None = None
    best: float | None = None  # best eval value of the primary metric over the run
    best_step: int | None = None
    items_per_sec: float | None = None
    item_name: str = ""
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # eval metric -> (step, value)

    @property
    def primary(self) -> float | None:
        value = self.final.get(self.primary_metric)
        return value if value is not None and value == value else None  # NaN ranks with the missing


# ---- the records -------------------------------------------------------------------------------


def enabled(hydra: DictConfig) -> bool:
    """Whether ``SweepReport`` is among the callbacks of the ``hydra`` node (a user may remove it)."""
    callbacks = OmegaConf.select(hydra, "callbacks", default=None) or {}
    return any(c.get("_target_") == f"{__name__}.{SweepReport.__name__}" for c in callbacks.values())


def _in_multirun(config: DictConfig) -> bool:
    from hydra.types import RunMode

    return OmegaConf.select(config, "hydra.mode") == RunMode.MULTIRUN


def job_record(
    hydra: DictConfig, method_target: str | None = None, *, status: str | None = None, error: str = ""
) -> dict[str, Any]:
    """What Hydra knows of a job (from its ``hydra`` node), plus how it ended when its summary.json
    cannot tell: ``status`` None means read the job's summary.json."""
    return {
        "job": str(OmegaConf.select(hydra, "job.num", default="")),
        "overrides": list(OmegaConf.to_container(hydra.overrides.task, resolve=False) or []),
        "run_dir": str(hydra.runtime.output_dir),
        "status": status,
        "error": error,
        "method_target": method_target,
    }


def append_record(sweep_dir: Path, record: dict[str, Any]) -> None:
    """One line per job, written in one call (lines from several processes do not interleave)."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with (sweep_dir / RECORDS).open("a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=str) + "\n")


def read_records(sweep_dir: Path) -> list[dict[str, Any]]:
    """The jobs' records in the order they ended; a job recorded twice (by its run directory) keeps
    its last record."""
    path = sweep_dir / RECORDS
    if not path.is_file():
        return []
    records: dict[str, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            records.pop(record["run_dir"], None)
            records[record["run_dir"]] = record
    return list(records.values())


# ---- rows --------------------------------------------------------------------------------------


def higher_is_better(method_target: str | None, metric: str) -> bool:
    """The direction of ``metric`` for the method ``method_target`` names (its class's
    ``primary_metric_higher_is_better``); by the metric's name when the class cannot be imported."""
    if method_target:
        from rewardctl.errors import RewardctlError
        from rewardctl.methods.registry import method_class

        try:
            cls = method_class(method_target)
        except RewardctlError:
            cls = None
        if cls is not None and cls.primary_metric == metric:
            return bool(cls.primary_metric_higher_is_better)
    return not any(hint in metric.lower() for hint in LOWER_IS_BETTER_HINTS)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def eval_curves(metrics_path: Path) -> dict[str, list[tuple[int, float]]]:
    """Every numeric metric of the eval records of a metrics.jsonl, by step (a step evaluated twice,
    e.g. around a resume, keeps its last value)."""
    curves: dict[str, dict[int, float]] = {}
    try:
        lines = metrics_path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return {}
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash
        if record.get("split") != "eval" or not isinstance(record.get("step"), int):
            continue
        for key, value in record.items():
            if key not in NOT_METRICS and isinstance(value, (int, float)) and not isinstance(value, bool):
                curves.setdefault(key, {})[record["step"]] = float(value)
    return {key: sorted(points.items()) for key, points in curves.items()}


def _best(points: list[tuple[int, float]], higher: bool) -> tuple[float | None, int | None]:
    finite = [(step, value) for step, value in points if value == value]
    if not finite:
        return None, None
    step, value = max(finite, key=lambda p: (p[1] if higher else -p[1], -p[0]))  # the earliest of equals
    return value, step


def build_row(record: dict[str, Any]) -> JobRow:
    """A job's row from its record and what its run directory holds."""
    run_dir = Path(record["run_dir"])
    row = JobRow(
        job=str(record.get("job", "")),
        overrides=list(record.get("overrides") or []),
        status=record.get("status") or "failed",
        run_dir=str(run_dir) if run_dir.is_dir() else "",
        error=record.get("error") or "",
    )
    if record.get("status") == "failed":
        return row  # a summary.json there is an earlier run's
    summary = _read_json(run_dir / "summary.json")
    if summary is None:
        row.error = row.error or f"no summary.json in {run_dir}"
        return row
    row.status = summary.get("status") or "failed"
    row.method = summary.get("method") or ""
    row.primary_metric = summary.get("primary_metric") or ""
    row.higher_is_better = higher_is_better(record.get("method_target") or _method_target(run_dir), row.primary_metric)
    if row.status == "diverged":
        row.error = summary.get("message") or row.error
    final = summary.get("final_eval") or {}
    row.final = {k: float(v) for k, v in final.items() if k not in NOT_METRICS and _is_number(v)}
    row.final_step = final.get("step")
    rates = [(k, v) for k, v in summary.items() if k.endswith("_per_sec") and k != "tokens_per_sec"]
    if rates:
        name, row.items_per_sec = rates[0]
        row.item_name = name[: -len("_per_sec")]
    row.curves = eval_curves(run_dir / "metrics.jsonl")
    points = row.curves.get(row.primary_metric) or (
        [(int(final["step"]), row.final[row.primary_metric])] if row.primary_metric in row.final else []
    )
    row.best, row.best_step = _best(points, row.higher_is_better)
    return row


def _method_target(run_dir: Path) -> str | None:
    """``method._target_`` of the config.yaml a run wrote (for a job recorded without its config)."""
    try:
        return OmegaConf.select(OmegaConf.load(run_dir / "config.yaml"), "method._target_", default=None)
    except Exception:  # noqa: BLE001 - missing or unreadable: the metric's name decides the direction
        return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def rank(rows: list[JobRow]) -> list[JobRow]:
    """Best first by the primary metric, in its direction: completed jobs, then those that ended early
    (diverged, interrupted, stopped: their last eval may be the baseline), then those without a final
    value (failed) in the order they ended. A sweep over methods with different primary metrics ranks
    each metric's jobs together, in the order the metrics first appear."""
    metrics = list(dict.fromkeys(r.primary_metric for r in rows if r.primary is not None))

    def key(indexed: tuple[int, JobRow]) -> tuple[int, int, float, int]:
        index, row = indexed
        value = row.primary
        if value is None:
            return (2, 0, 0.0, index)
        signed = -value if row.higher_is_better else value
        return (0 if row.status == "completed" else 1, metrics.index(row.primary_metric), signed, index)

    return [row for _, row in sorted(enumerate(rows), key=key)]


def collect(sweep_dir: Path) -> list[JobRow]:
    """Every recorded job of ``sweep_dir``, ranked."""
    return rank([build_row(record) for record in read_records(sweep_dir)])


# ---- the files ---------------------------------------------------------------------------------

CSV_COLUMNS = (
    "rank",
    "job",
    "status",
    "overrides",
    "method",
    "primary_metric",
    "higher_is_better",
    "final",
    "best",
    "best_step",
    "final_step",
    "items_per_sec",
    "item_name",
    "run_dir",
    "error",
)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def to_csv(rows: list[JobRow]) -> str:
    """One line per job: the columns of ``CSV_COLUMNS``, then ``final_<metric>`` for every metric of
    any job's final eval (sorted by name). The overrides are the job's override strings, joined
    by spaces."""
    metric_names = sorted({name for row in rows for name in row.final})
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*CSV_COLUMNS, *(f"final_{name}" for name in metric_names)])
    for position, row in enumerate(rows, start=1):
        fixed = {
            "rank": position,
            "job": row.job,
            "status": row.status,
            "overrides": " ".join(row.overrides),
            "method": row.method,
            "primary_metric": row.primary_metric,
            "higher_is_better": row.higher_is_better if row.primary_metric else None,
            "final": row.primary,
            "best": row.best,
            "best_step": row.best_step,
            "final_step": row.final_step,
            "items_per_sec": row.items_per_sec,
            "item_name": row.item_name,
            "run_dir": row.run_dir,
            "error": row.error,
        }
        writer.writerow([_cell(fixed[c]) for c in CSV_COLUMNS] + [_cell(row.final.get(n)) for n in metric_names])
    return out.getvalue()


def shared_overrides(rows: list[JobRow]) -> list[str]:
    """The overrides every job has (``output_dir=...``, the fixed settings); none for a single job."""
    if len(rows) < 2:
        return []
    common = set.intersection(*(set(row.overrides) for row in rows))
    return [o for o in rows[0].overrides if o in common]


def varying_overrides(rows: list[JobRow]) -> list[list[str]]:
    """Each job's overrides less the shared ones: what tells the jobs apart."""
    shared = set(shared_overrides(rows))
    return [[o for o in row.overrides if o not in shared] for row in rows]


def _number(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _uniform(values: list[str], fallback: str) -> str:
    distinct = {v for v in values if v}
    return distinct.pop() if len(distinct) == 1 else fallback


def table(rows: list[JobRow], sweep_dir: Path) -> str:
    """The markdown table of sweep_summary.md, also printed on the console (padded, so it reads as
    plain text too)."""
    metric = _uniform([r.primary_metric for r in rows], "")
    item = _uniform([r.item_name for r in rows], "items")
    header = ["#", "job", "overrides", "status", metric or "primary", "loss", "best (step)", f"{item}/s", "run dir"]
    has_errors = any(r.error for r in rows)
    body = []
    for position, (row, overrides) in enumerate(zip(rows, varying_overrides(rows), strict=True), start=1):
        primary = _number(row.primary)
        if primary and not metric:
            primary = f"{row.primary_metric} {primary}"
        best = f"{_number(row.best)} ({row.best_step})" if row.best is not None else ""
        cells = [
            str(position),
            row.job,
            " ".join(overrides),
            row.status,
            primary,
            _number(row.final.get("loss")),
            best,
            _number(row.items_per_sec, 1),
            _relative(row.run_dir, sweep_dir),
        ]
        body.append([*cells, _shortened(row.error)] if has_errors else cells)
    header = [*header, "error"] if has_errors else header
    cells = [[c.replace("|", "\\|") for c in line] for line in [header, *body]]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |" for line in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _shortened(text: str, limit: int = 100) -> str:
    """An error as the table shows it (the csv keeps it whole)."""
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def _relative(run_dir: str, sweep_dir: Path) -> str:
    if not run_dir:
        return ""
    try:
        return str(Path(run_dir).resolve().relative_to(sweep_dir.resolve()))
    except ValueError:
        return run_dir


def headline(rows: list[JobRow]) -> str:
    """One line: how the jobs ended and what they are ranked by."""
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.status] = counts.get(row.status, 0) + 1
    ended = ", ".join(f"{n} {status}" for status, n in counts.items())
    ranked = [r for r in rows if r.primary is not None]
    if not ranked:
        return f"{len(rows)} job(s): {ended}; none has a final eval to rank by"
    directions = {(r.primary_metric, r.higher_is_better) for r in ranked}
    by = ", ".join(f"eval {m} ({'higher' if h else 'lower'} is better)" for m, h in sorted(directions))
    return f"{len(rows)} job(s): {ended}; ranked by {by}, best first"


def markdown(rows: list[JobRow], sweep_dir: Path) -> str:
    parts = [f"# Sweep {sweep_dir}", "", headline(rows), ""]
    if shared_overrides(rows):
        parts += [f"Every job: `{' '.join(shared_overrides(rows))}`", ""]
    parts += [table(rows, sweep_dir), ""]
    if any(r.curves for r in rows):
        parts += [f"![eval curves]({CURVES_PNG})", ""]
    return "\n".join(parts)


def plot(rows: list[JobRow], path: Path) -> bool:
    """Every job's eval curve of its primary metric (one panel per primary metric) and of the eval
    loss, overlaid; False (and no file) when no job has an eval curve."""
    metrics = list(dict.fromkeys(r.primary_metric for r in rows if r.curves.get(r.primary_metric)))
    if any(r.curves.get("loss") for r in rows) and "loss" not in metrics:
        metrics.append("loss")
    if not metrics:
        return False
    from matplotlib.ticker import MaxNLocator

    from rewardctl.training.plot import pyplot

    plt = pyplot()

    labels = {id(r): " ".join(o) or f"job {r.job}" for r, o in zip(rows, varying_overrides(rows), strict=True)}
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4.5), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for row in rows:
            points = row.curves.get(metric) if metric in (row.primary_metric, "loss") else None
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, marker="o", markersize=3, label=f"job {row.job}: {labels[id(row)]}"[:60])
        ax.set_title(f"eval {metric}")
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(3, max(1, len(names))), fontsize="small")
    fig.suptitle(f"{path.parent}: eval curves of {len(names)} of {len(rows)} job(s), best first")
    fig.tight_layout(rect=(0, min(0.4, 0.06 * (1 + (len(names) - 1) // 3)), 1, 1))
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def write_report(sweep_dir: Path) -> list[JobRow]:
    """sweep_summary.csv, sweep_summary.md and sweep_curves.png of the jobs recorded so far."""
    rows = collect(sweep_dir)
    write_text_atomic(sweep_dir / SUMMARY_CSV, to_csv(rows))
    write_text_atomic(sweep_dir / SUMMARY_MD, markdown(rows, sweep_dir))
    plot(rows, sweep_dir / CURVES_PNG)
    return rows


def report(sweep_dir: Path) -> list[JobRow]:
    """Write the report and print its table: the end of a sweep (or of a sweep stopped by a signal)."""
    rows = write_report(sweep_dir)
    if rows:
        print(f"\nsweep report ({sweep_dir / SUMMARY_MD}): {headline(rows)}\n{table(rows, sweep_dir)}", flush=True)
    return rows


# ---- the Hydra callback ------------------------------------------------------------------------


class SweepReport(Callback):
    """conf/train.yaml's ``hydra.callbacks.sweep_report``; does nothing outside ``-m`` runs."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:  # noqa: ARG002 - Hydra's callback signature
        """A rerun of the same sweep (e.g. to resume it) starts a fresh list of jobs."""
        (Path(config.hydra.sweep.dir) / RECORDS).unlink(missing_ok=True)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:  # noqa: ARG002 - Hydra's callback signature
        _job_note.clear()

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:  # noqa: ARG002 - Hydra's callback signature
        """The job's record: failed when the job noted it, or when Hydra holds its exception."""
        if not _in_multirun(config):
            return
        status, error = _job_note.get("status"), _job_note.get("error", "")
        from hydra.core.utils import JobStatus

        if job_return.status == JobStatus.FAILED:  # read without the property, which re-raises
            exc = getattr(job_return, "_return_value", None)
            status, error = "failed", error or first_line(exc)
        _job_note.clear()
        target = OmegaConf.select(config, "method._target_", default=None)
        sweep_dir = Path(config.hydra.sweep.dir)
        append_record(sweep_dir, job_record(config.hydra, target, status=status, error=error))
        write_report(sweep_dir)  # up to date after every job, also if the sweeper fails later

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:  # noqa: ARG002 - Hydra's callback signature
        rows = report(Path(config.hydra.sweep.dir))
        sweep_outcome["status"] = exit_status(rows)


#: The exit status the finished sweep asks for (read by the command in the launching process: jobs run
#: by an out-of-process launcher, joblib or submitit, tell it only through their records on disk).
sweep_outcome: dict[str, int] = {"status": 0}

#: A job's status -> the exit status it gives the sweep (the worst one wins), as for one run.
JOB_EXIT_STATUS = {"failed": 2, "diverged": 3}


def exit_status(rows: list[JobRow]) -> int:
    """2 when a job failed, 3 when one diverged (the higher when both), 0 otherwise."""
    return max((JOB_EXIT_STATUS.get(row.status, 0) for row in rows), default=0)


def first_line(exc: BaseException | None) -> str:
    """An exception as one line: its type and the first line of its message."""
    if exc is None:
        return "failed"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
