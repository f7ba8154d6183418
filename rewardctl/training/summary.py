"""What a run ended as: ``summary.json`` (read by the CLI, sweeps and benchmarks) and its console lines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rewardctl.config.schema import RunConfig
from rewardctl.methods.base import Method
from rewardctl.training.checkpoint import latest_checkpoint
from rewardctl.training.loop import LoopResult


def summarize(
    result: LoopResult,
    run: RunConfig,
    method: Method,
    run_dir: Path,
    max_steps: int,
    processes: int,
    peak_memory: float | None = None,
    parameters: dict[str, int] | None = None,
) -> dict[str, Any]:
    items = result.totals.get(method.item_name)
    return {
        "status": result.status,
        "method": run.method.name,
        "step": result.step,
        "max_steps": max_steps,
        "processes": processes,
        # What actually ran (hardware.mixed_precision=auto is resolved by now): benchmarks read these.
        "mixed_precision": run.hardware.mixed_precision.value,
        "compile": run.train.compile,
        "train_seconds": round(result.train_seconds, 3),
        f"{method.item_name}_per_sec": (items / result.train_seconds) if items and result.train_seconds else None,
        "peak_gpu_memory_gib": peak_memory,
        "parameters": parameters,
        "totals": result.totals,
        "last_train": result.train,
        "first_eval": result.evals[0] if result.evals else None,
        "final_eval": result.evals[-1] if result.evals else None,
        "primary_metric": method.primary_metric,
        "run_dir": str(run_dir),
        "model_dir": str(run_dir / "model") if result.status == "completed" else None,
        # Updates skipped as non-finite (and fp16 loss-scaler overflows); why a diverged run stopped;
        # which signal interrupted it; the checkpoint a rerun of the same command continues from.
        "skipped_steps": result.skipped_steps,
        "message": result.message,
        "signal": result.signal,
        "checkpoint": str(latest) if (latest := latest_checkpoint(run_dir / "checkpoints")) else None,
    }


def peak_gpu_memory_gib(accelerator: Any) -> float | None:
    """The largest per-process peak of allocated GPU memory (None on CPU): what a user sizes GPUs by."""
    if accelerator.device.type != "cuda":
        return None
    peak = torch.tensor(float(torch.cuda.max_memory_allocated(accelerator.device)), device=accelerator.device)
    if accelerator.num_processes > 1:
        peak = accelerator.gather(peak[None]).max()
    return round(peak.item() / 2**30, 3)


def summary_lines(summary: dict[str, Any], method: Method) -> list[str]:
    """The end-of-run report on the console: status and speed, the eval metrics before -> after."""
    rate = summary.get(f"{method.item_name}_per_sec")
    lines = [
        f"{summary['status']}: {summary['method']} run, {summary['step']}/{summary['max_steps']} steps in "
        f"{summary['train_seconds']:.1f} s of training" + (f" ({rate:.1f} {method.item_name}/s)" if rate else "")
    ]
    first, final = summary.get("first_eval"), summary.get("final_eval")
    if final:
        for key in (method.primary_metric, "loss", *method.report_metrics):
            if isinstance(final.get(key), (int, float)):
                before = (
                    f"{first[key]:.4f} (step {first['step']}) -> "
                    if first and first is not final and key in first
                    else ""
                )
                lines.append(f"  eval {key}: {before}{final[key]:.4f} (step {final['step']})")
        verdict = method.verdict(final)
        if verdict:
            lines.append(f"  WARNING: {verdict}")
    if summary.get("peak_gpu_memory_gib") is not None:
        lines.append(f"  peak GPU memory: {summary['peak_gpu_memory_gib']:.2f} GiB per process")
    train = summary.get("last_train") or {}
    if "loss" in train:
        lines.append(f"  last train loss: {train['loss']:.4f}")
    if summary.get("skipped_steps"):
        lines.append(f"  skipped updates (non-finite): {summary['skipped_steps']}")
    if summary.get("model_dir"):
        lines.append(f"  model: {summary['model_dir']}")
    elif summary["status"] in ("diverged", "interrupted", "stopped"):
        kept = summary.get("checkpoint")
        lines.append(f"  no model saved; newest checkpoint: {kept}" if kept else "  no model and no checkpoint saved")
    lines.append(f"  metrics: {summary['run_dir']}/metrics.jsonl, curves: {summary['run_dir']}/curves.png")
    if summary.get("figures"):
        lines.append(f"  pictures of the last eval: {', '.join(summary['figures'])}")
    return lines
