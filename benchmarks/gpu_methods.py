"""Throughput, MFU and peak GPU memory of every method on a real-sized (Qwen2.5-0.5B-shaped) model,
with the batch layouts on and off: a shared prompt (pairwise, ranklist), plain padded batches, and
padding-free rows.

Runs `rewardctl train` once per method and layout, as a user would (a subprocess each, so every
peak-memory reading starts clean), on a Llama-architecture config with Qwen2.5-0.5B's shape (24
layers, hidden 896, 14 query / 2 key-value heads, MLP 4864, vocab 151,936: 494M parameters) built
from scratch with the bundled tokenizer, so no hub access is needed. Data: ../shared/data when
present (real lengths; ``--data-root``), else the bundled samples.

Layouts (``--layouts``; each runs for the methods it applies to):
- ``shared``: ``data.share_prefix=true`` (pairwise, ranklist): one packed row per pair or list,
  the prompt computed once behind a 4-D mask (sdpa).
- ``padded``: ``data.share_prefix=false data.padding_free=false``: one padded sequence per response
  (every method).
- ``padding_free``: ``data.padding_free=true`` with ``--padding-free-attention`` (flex_attention by
  default, flash_attention_2 where the flash-attn package is installed): the real tokens only,
  concatenated, position ids restarting per sequence (every method).

Per run: items/s over the whole run and in steady state (the median of the log windows after the
first, which holds compilation and allocator warm-up), real tokens/s, MFU and the busiest process's
peak GPU memory. MFU counts the weights' matmul FLOPs on the real tokens only (forward 2N, input
gradients 2N, weight gradients 2N for the trained matmul weights: 6N per token in full fine-tuning,
about 4N with LoRA), not attention's and not a checkpointed forward's recomputation, against the
GPU's dense bf16 peak (``--peak-tflops``, else a table of known GPUs): a lower bound that padding
and recomputation cannot inflate.

    python benchmarks/gpu_methods.py                               # hardware=gpu (bf16), every method
    python benchmarks/gpu_methods.py --peft lora --gradient-checkpointing
    python benchmarks/gpu_methods.py --shape tiny --hardware cpu --steps 8 --padding-free-attention sdpa
                                                                   # plumbing check on a CPU

Writes <--out, default bench-results>/gpu_methods-<shape>-<hardware>-peft_<peft>[-gc]-b<batch>[-compiled].json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

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
TINY_CONFIG = REPO / "rewardctl" / "assets" / "tiny-llama" / "config.json"  # model=tiny, before the overrides
#: Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, by a name torch.cuda.get_device_name() contains.
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "H800": 989.4, "A100": 312.0, "A800": 312.0, "L40S": 362.1}
#: Layout name -> (overrides, the methods it applies to).
LAYOUTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "shared": (("data.share_prefix=true", "data.padding_free=false"), ("pairwise", "ranklist")),
    "padded": (("data.share_prefix=false", "data.padding_free=false"), ("pairwise", "ranklist", "bco", "prm")),
    "padding_free": (("data.share_prefix=false", "data.padding_free=true"), ("pairwise", "ranklist", "bco", "prm")),
}
SHARED_DATA = {
    "pairwise": "hh_rlhf_pairwise",
    "ranklist": "rlhf_glm_sentiment_ranklist",
    "bco": "hh_rlhf_unpaired",
    "prm": "prm800k_stepwise",
}


def data_overrides(method: str, root: Path = SHARED) -> tuple[list[str], str]:
    folder = root / SHARED_DATA[method]
    if not (folder / "train.jsonl").is_file():
        return [], "bundled sample"
    extra = ["data.bad_rows=skip"] if method == "prm" else []
    return [
        f"data.train={folder / 'train.jsonl'}",
        f"data.eval={folder / 'test.jsonl'}",
        *extra,
    ], folder.name


def layout_overrides(layout: str, method: str, attention: str) -> list[str] | None:
    """The overrides of ``layout`` for ``method``, or None where the layout does not apply to it."""
    overrides, methods = LAYOUTS[layout]
    if method not in methods:
        return None
    extra = [f"model.attn_implementation={attention}"] if layout == "padding_free" else []
    return [*overrides, *extra]


def train_flops_per_token(total_params: int, trainable_params: int, embedding_params: int) -> int:
    """Matmul FLOPs one real token costs in a training step: forward 2N and input gradients 2N over the
    N weights that multiply activations (every parameter but the input embedding's lookup table),
    plus weight gradients 2N over those that train (all N in full fine-tuning; with LoRA only the
    adapters and the head, which also add their own small forward)."""
    matmul = total_params - embedding_params
    trained = matmul if trainable_params >= total_params else trainable_params
    return 4 * matmul + 2 * trained


def gpu_peak_tflops(name: str | None) -> float | None:
    """The dense bf16 peak of a GPU named ``name`` (as torch reports it), or None when unknown."""
    if not name:
        return None
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name.upper()), None)


def steady_rate(records: list[dict[str, Any]], key: str) -> float | None:
    """The median of ``key`` over the train log windows after the first (which holds compilation,
    kernel selection and allocator warm-up); the only window's value when there is one."""
    rates = [r[key] for r in records if r.get("split") == "train" and r.get(key) is not None]
    if not rates:
        return None
    return statistics.median(rates[1:] if len(rates) > 1 else rates)


def train_overrides(method: str, layout: str, args: argparse.Namespace, run_dir: Path) -> list[str] | None:
    """The ``rewardctl train`` overrides of one benchmark run (None where ``layout`` does not apply to
    ``method``); benchmarks/gpu_profile.py profiles the same runs."""
    layout_args = layout_overrides(layout, method, args.padding_free_attention)
    if layout_args is None:
        return None
    shape = QWEN25_05B_SHAPE if args.shape == "qwen2.5-0.5b" else {}
    data, _ = data_overrides(method, args.data_root)
    return [
        f"method={method}",
        "model=tiny",
        *[f"+model.config_overrides.{k}={v}" for k, v in shape.items()],
        f"model.max_length={args.max_length}",
        f"hardware={args.hardware}",
        f"peft={args.peft}",
        *data,
        *layout_args,
        f"data.max_train_rows={args.steps * args.batch}",
        "data.max_eval_rows=16",
        f"train.max_steps={args.steps}",
        f"train.per_device_batch_size={args.batch}",
        f"train.lr={args.lr}",
        "train.eval_every=0",
        "train.eval_at_start=false",
        "train.save_every=0",
        f"train.log_every={max(1, args.steps // args.windows)}",
        "train.progress_bar=false",
        f"train.gradient_checkpointing={str(args.gradient_checkpointing).lower()}",
        f"train.compile={str(args.compile).lower()}",
        f"output_dir={run_dir}",
    ]


def run_method(method: str, layout: str, args: argparse.Namespace, out: Path) -> dict | None:
    run_dir = out / f"{method}-{layout}"
    overrides = train_overrides(method, layout, args, run_dir)
    if overrides is None:
        return None
    layout_args = layout_overrides(layout, method, args.padding_free_attention)
    shape = QWEN25_05B_SHAPE if args.shape == "qwen2.5-0.5b" else {}
    _, data_name = data_overrides(method, args.data_root)
    result = subprocess.run(
        [sys.executable, "-m", "rewardctl", "train", *overrides],
        capture_output=True,
        text=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        cwd=out,  # not the checkout: `-m rewardctl` must import the installed package (its conf/ is mapped in)
    )
    if result.returncode != 0:
        lines = [
            line for line in (result.stderr or result.stdout).strip().splitlines() if "HYDRA_FULL_ERROR" not in line
        ]
        print("\n".join(lines[-20:]), flush=True)  # the log keeps the cause; the table keeps its last line
        return {"method": method, "layout": layout, "error": (lines[-1:] or ["(no output)"])[0][:300]}
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    item = next(k for k in summary if k.endswith("_per_sec") and k != "tokens_per_sec")
    parameters = summary.get("parameters") or {}
    config = {**json.loads(TINY_CONFIG.read_text()), **shape}
    embedding = int(config["vocab_size"]) * int(config["hidden_size"])
    flops = train_flops_per_token(parameters.get("total", 0), parameters.get("trainable", 0), embedding)
    tokens_steady = steady_rate(records, "tokens_per_sec")
    mfu = None
    if args.peak_tflops and tokens_steady:
        mfu = round(flops * tokens_steady / (args.peak_tflops * 1e12), 4)
    return {
        "method": method,
        "layout": layout,
        "overrides": layout_args,
        "data": data_name,
        "steps": summary["step"],
        "train_seconds": summary["train_seconds"],
        "item": item.removesuffix("_per_sec"),
        "items_per_sec": round(summary[item] or 0.0, 2),
        "items_per_sec_steady": _round(steady_rate(records, item), 2),
        "tokens_per_sec_steady": None if tokens_steady is None else int(tokens_steady),
        "train_flops_per_token": flops,
        "mfu": mfu,
        "peak_gpu_memory_gib": summary.get("peak_gpu_memory_gib"),
        "parameters": parameters,
        "last_train_loss": (summary.get("last_train") or {}).get("loss"),
    }


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def table(results: list[dict]) -> str:
    """The markdown table docs/benchmarks.md records."""
    lines = [
        "| method | layout | items/s (steady) | real tokens/s | MFU | peak GiB | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['layout']} | failed: {r['error']} | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        memory = f"{r['peak_gpu_memory_gib']:.2f}" if r["peak_gpu_memory_gib"] is not None else "n/a"
        lines.append(
            f"| {r['method']} | {r['layout']} | {r['items_per_sec']} {r['item']}/s ({r['items_per_sec_steady']}) "
            f"| {r['tokens_per_sec_steady']} | {mfu} | {memory} | {r['train_seconds']:.1f} |"
        )
    return "\n".join(lines)


def default_attention() -> str:
    """flash_attention_2 where its package is installed, else flex_attention (in torch itself)."""
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return "flex_attention"
    return "flash_attention_2"


def device_name() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def argument_parser(description: str) -> argparse.ArgumentParser:
    """The runs' settings, shared with benchmarks/gpu_profile.py."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--methods", default="pairwise,ranklist,bco,prm")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help=f"any of {', '.join(LAYOUTS)}")
    parser.add_argument("--shape", choices=["qwen2.5-0.5b", "tiny"], default="qwen2.5-0.5b")
    parser.add_argument("--hardware", default="gpu")
    parser.add_argument("--peft", default="none")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--compile", action="store_true", help="train.compile=true: fewer, fused kernels for a host-bound step"
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--windows", type=int, default=6, help="log windows per run (steady = all but the first)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--padding-free-attention", default=None, help="default: flash_attention_2 if installed")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak; default: known GPUs")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results")
    parser.add_argument("--data-root", type=Path, default=SHARED, help="holds ../shared/data's folders")
    return parser


def resolve_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Layouts checked, paths made absolute (the runs start elsewhere), attention and peak filled in."""
    unknown = set(args.layouts.split(",")) - set(LAYOUTS)
    if unknown:
        parser.error(f"unknown layout(s) {', '.join(sorted(unknown))}; choose from {', '.join(LAYOUTS)}")
    args.data_root, args.out = args.data_root.resolve(), args.out.resolve()
    args.padding_free_attention = args.padding_free_attention or default_attention()
    args.device = device_name()
    args.peak_tflops = args.peak_tflops or gpu_peak_tflops(args.device)
    return args


def main() -> None:
    parser = argument_parser(__doc__.splitlines()[0])
    args = resolve_arguments(parser, parser.parse_args())
    gpu = args.device
    print(f"device: {gpu or 'no GPU'}; bf16 peak {args.peak_tflops or 'unknown'} TFLOP/s", flush=True)

    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    args.out.mkdir(parents=True, exist_ok=True)
    name = (
        f"gpu_methods-{args.shape}-{args.hardware}-peft_{args.peft}{'-gc' if args.gradient_checkpointing else ''}"
        f"-b{args.batch}{'-compiled' if args.compile else ''}.json"
    )
    results: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            for layout in args.layouts.split(","):
                r = run_method(method, layout, args, Path(tmp))
                if r is None:
                    continue
                results.append(r)
                print(table([r]).splitlines()[-1], flush=True)
                # after every run: a lease that ends mid-matrix still brings back what was measured
                (args.out / name).write_text(
                    json.dumps({"config": config, "device": gpu, "results": results}, indent=2) + "\n"
                )
    print(table(results))
    print(f"written to {args.out / name}")
    if any("error" in r for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
