"""Throughput and peak GPU memory of every method on a real-sized (Qwen2.5-0.5B-shaped) model.

Runs `rewardctl train` once per method, as a user would (a subprocess each, so every peak-memory
reading starts clean), on a Llama-architecture config with Qwen2.5-0.5B's shape (24 layers, hidden
896, 14 query / 2 key-value heads, MLP 4864, vocab 151,936: 494M parameters) built from scratch with
the bundled tokenizer, so no hub access is needed. Data: ../shared/data when present (real lengths),
else the bundled samples. Each run's summary.json gives items/s (pairs, lists, rows or labelled
steps) and the peak GPU memory of the busiest process.

    python benchmarks/gpu_methods.py                               # hardware=gpu (bf16), every method
    python benchmarks/gpu_methods.py --peft lora --gradient-checkpointing
    python benchmarks/gpu_methods.py --shape tiny --hardware cpu --steps 4   # plumbing check on a CPU

Writes bench-results/gpu_methods-<shape>-<hardware>-peft_<peft>[-gc].json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
QWEN25_05B_SHAPE = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "head_dim": 64,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": "true",
}
SHARED_DATA = {
    "pairwise": "hh_rlhf_pairwise",
    "ranklist": "rlhf_glm_sentiment_ranklist",
    "bco": "hh_rlhf_unpaired",
    "prm": "prm800k_stepwise",
}


def data_overrides(method: str) -> tuple[list[str], str]:
    folder = SHARED / SHARED_DATA[method]
    if not (folder / "train.jsonl").is_file():
        return [], "bundled sample"
    extra = ["data.bad_rows=skip"] if method == "prm" else []
    return [
        f"data.train={folder / 'train.jsonl'}",
        f"data.eval={folder / 'test.jsonl'}",
        *extra,
    ], f"../shared/data/{folder.name}"


def run_method(method: str, args: argparse.Namespace, out: Path) -> dict:
    shape = QWEN25_05B_SHAPE if args.shape == "qwen2.5-0.5b" else {}
    data, data_name = data_overrides(method)
    overrides = [
        f"method={method}",
        "model=tiny",
        *[f"+model.config_overrides.{k}={v}" for k, v in shape.items()],
        f"model.max_length={args.max_length}",
        f"hardware={args.hardware}",
        f"peft={args.peft}",
        *data,
        f"data.max_train_rows={args.steps * args.batch}",
        "data.max_eval_rows=16",
        f"train.max_steps={args.steps}",
        f"train.per_device_batch_size={args.batch}",
        f"train.lr={args.lr}",
        "train.eval_every=0",
        "train.eval_at_start=false",
        "train.save_every=0",
        f"train.log_every={args.steps}",
        "train.progress_bar=false",
        f"train.gradient_checkpointing={str(args.gradient_checkpointing).lower()}",
        f"output_dir={out / method}",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "rewardctl", "train", *overrides],
        capture_output=True,
        text=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    if result.returncode != 0:
        raise SystemExit(f"{method} failed:\n{result.stderr[-4000:]}")
    summary = json.loads((out / method / "summary.json").read_text())
    item = next(k for k in summary if k.endswith("_per_sec"))
    return {
        "method": method,
        "data": data_name,
        "steps": summary["step"],
        "train_seconds": summary["train_seconds"],
        "items_per_sec": round(summary[item] or 0.0, 2),
        "item": item.removesuffix("_per_sec"),
        "peak_gpu_memory_gib": summary.get("peak_gpu_memory_gib"),
        "parameters": summary.get("parameters"),
        "last_train_loss": (summary.get("last_train") or {}).get("loss"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="pairwise,ranklist,bco,prm")
    parser.add_argument("--shape", choices=["qwen2.5-0.5b", "tiny"], default="qwen2.5-0.5b")
    parser.add_argument("--hardware", default="gpu")
    parser.add_argument("--peft", default="none")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-5)
    args = parser.parse_args()

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            results.append(run_method(method, args, Path(tmp)))
            r = results[-1]
            memory = f"{r['peak_gpu_memory_gib']:.2f} GiB" if r["peak_gpu_memory_gib"] is not None else "n/a (CPU)"
            millions = r["parameters"]["total"] / 1e6
            print(
                f"{method:9s} {millions:7.1f}M params {r['items_per_sec']:9.2f} {r['item']}/s  peak {memory:>10s}  "
                f"{r['train_seconds']:.1f} s for {r['steps']} steps  ({r['data']})",
                flush=True,
            )
    config = {k: v for k, v in vars(args).items()}
    out = REPO / "bench-results"
    out.mkdir(exist_ok=True)
    name = (
        f"gpu_methods-{args.shape}-{args.hardware}-peft_{args.peft}{'-gc' if args.gradient_checkpointing else ''}.json"
    )
    (out / name).write_text(json.dumps({"config": config, "results": results}, indent=2) + "\n")
    print(f"written to {out / name}")


if __name__ == "__main__":
    main()
