"""BCO training with the policy's vocabulary projection at the completion-predicting positions only,
against every position's logits (the behaviour before, and what TRL's BCOTrainer computes).

A policy method needs log pi(y_t | x, y_<t) for the completion tokens only, but a causal LM's stock
forward projects every position, prompt and padding included, onto its vocabulary, and the log-softmax
then works on a float32 copy of all of it: on the Qwen2.5-0.5B shape (vocab 151,936) that is
rows x L x 151,936 values per pass, for the policy and again for the reference. rewardctl passes the
positions it needs as ``logits_to_keep`` (``rewardctl.modeling.causal.completion_logps``); "every
position" here is the same code with that check switched off in the child process.

    python benchmarks/policy_logits.py --pairs 2              # Qwen2.5-0.5B shape, 3 steps of 4 rows
    python benchmarks/policy_logits.py --shape tiny --steps 20 --batch 8 --max-length 512
    python benchmarks/policy_logits.py --hardware gpu --steps 20 --batch 16 --max-length 512   # a GPU

Each setting trains in its own subprocess (its peak resident memory is its own), ``--pairs`` pairs of
runs in alternating order, on ../shared/data/hh_rlhf_unpaired (real prompt and completion lengths;
``--data-root``), bf16 autocast where the CPU computes bf16 natively (``hardware=cpu``'s auto rule) or
on a GPU (``--hardware gpu``). Reports train seconds, peak RSS (and peak GPU memory on a GPU) and the
last step's loss of each run (both settings compute the same maths, so the
losses agree to rounding), and the median ratios. Writes <--out>/policy_logits-<shape>.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = REPO.parent / "shared" / "data"
#: The child process of the "every position" setting: rewardctl with the positions check switched off.
EVERY_POSITION = (
    "import sys, rewardctl.modeling.causal as causal; causal.takes_logit_positions = lambda model: False; "
    "from rewardctl import cli; sys.exit(cli.main(sys.argv[1:]))"
)
SETTINGS = {"completion positions": ["-m", "rewardctl"], "every position": ["-c", EVERY_POSITION]}


def _load(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def overrides(args: argparse.Namespace, run_dir: Path) -> list[str]:
    shape = _load("gpu_methods").QWEN25_05B_SHAPE if args.shape == "qwen2.5-0.5b" else {}
    return [
        "method=bco",
        "model=tiny",
        *[f"+model.config_overrides.{k}={v}" for k, v in shape.items()],
        f"model.max_length={args.max_length}",
        f"hardware={args.hardware}",
        f"data.train={args.data_root / 'hh_rlhf_unpaired' / 'train.jsonl'}",
        f"data.eval={args.data_root / 'hh_rlhf_unpaired' / 'test.jsonl'}",
        f"data.max_train_rows={args.steps * args.batch}",
        "data.max_eval_rows=8",
        f"train.max_steps={args.steps}",
        f"train.per_device_batch_size={args.batch}",
        "train.eval_every=0",
        "train.eval_at_start=false",
        "train.save_every=0",
        "train.log_every=1",
        "train.progress_bar=false",
        f"output_dir={run_dir}",
    ]


def run(setting: str, args: argparse.Namespace, work: Path, index: int) -> dict[str, Any]:
    bench = _load("speed_vs_trl")
    name = f"{'positions' if setting == 'completion positions' else 'every'}-{index}"
    run_dir = work / name
    cmd = [sys.executable, *SETTINGS[setting], "train", *overrides(args, run_dir)]
    summary, records, wall, rss = bench.train_child(cmd, work, name, run_dir)
    train = [r for r in records if r.get("split") == "train"]
    return {
        "setting": setting,
        "train_seconds": summary["train_seconds"],
        "peak_rss_mib": rss,
        "peak_gpu_memory_gib": summary.get("peak_gpu_memory_gib"),
        "wall_seconds": wall,
        "tokens": summary["totals"].get("tokens"),
        "losses": [r.get("loss") for r in train],
        "mixed_precision": summary.get("mixed_precision"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=["qwen2.5-0.5b", "tiny"], default="qwen2.5-0.5b")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=1, help="pairs of runs, alternating which goes first")
    parser.add_argument("--hardware", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--data-root", type=Path, default=SHARED, help="holds hh_rlhf_unpaired/")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results")
    args = parser.parse_args()
    if not (args.data_root / "hh_rlhf_unpaired" / "train.jsonl").is_file():
        sys.exit(f"{args.data_root / 'hh_rlhf_unpaired'} is missing: this benchmark reads its train.jsonl")
    from rewardctl.machine import cpu_description

    bench = _load("speed_vs_trl")
    runs = bench.alternating_pairs(
        list(SETTINGS),
        args.pairs,
        lambda setting, work, pair: run(setting, args, work, pair),
        lambda r: (
            f"{r['train_seconds']:.1f} train s, {r['peak_rss_mib']:.0f} MiB peak, last loss {r['losses'][-1]:.6f}"
        ),
    )
    print(
        f"\n{cpu_description()}, {args.shape}, {args.steps} steps x {args.batch} rows, <= {args.max_length} tokens, "
        f"{runs[0]['mixed_precision']}\n"
    )
    print("| setting | train s | peak RSS MiB | peak GPU GiB | last loss |\n|---|---|---|---|---|")
    for r in runs:
        gpu = "n/a" if r["peak_gpu_memory_gib"] is None else f"{r['peak_gpu_memory_gib']:.2f}"
        print(
            f"| {r['setting']} | {r['train_seconds']:.1f} | {r['peak_rss_mib']:.0f} | {gpu} | {r['losses'][-1]:.6f} |"
        )
    bench.print_paired_ratios(runs, "completion positions", "every position")
    path = args.out / f"policy_logits-{args.shape}-{args.hardware}.json"
    bench.write_runs(path, args, cpu_description(), runs)


if __name__ == "__main__":
    main()
