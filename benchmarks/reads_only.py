"""PRM and BCO training with the model computing what its loss reads only, against every position
(the stock forward, what TRL's PRMTrainer and BCOTrainer run).

A process reward model is read at its labelled tokens only (each step's separator), and a BCO policy at
the positions that predict its completion tokens only, yet the stock forward runs every layer over every
position of the padded batch, the last layer's queries, output projection and MLP included. With
``model.skip_padding`` and ``model.final_layer_at_reads`` (both default on) rewardctl runs the layers on a
CPU batch's real tokens and the last layer and head at the read tokens only
(``rewardctl/modeling/read_slots.py``: ``token_reads.py`` for the PRM's classifier, ``causal_reads.py``
for the policy, and its reference); "every position" is the same run with both switched off (a BCO
policy then still projects onto its vocabulary at the completion-predicting positions only, as before).

    python benchmarks/reads_only.py --pairs 3                         # PRM, bench decoder shape, 40 steps of 8 rows
    python benchmarks/reads_only.py --last-step-only --pairs 3        # method.train_on_last_step_only=true
    python benchmarks/reads_only.py --method bco --pairs 3            # BCO on HH-RLHF unpaired rows
    python benchmarks/reads_only.py --shape qwen2.5-0.5b --steps 3 --batch 4
    python benchmarks/reads_only.py --set train.gradient_checkpointing=true   # any override, both settings
    python benchmarks/reads_only.py --shape qwen2.5-0.5b --hardware gpu --steps 20 --batch 16 --max-length 512

Data: ../shared/data/prm800k_stepwise (real PRM800K step lengths) or hh_rlhf_unpaired (``--method bco``;
``--data-root``), the bundled tiny tokenizer, the model from scratch at the benchmark decoder's compute
shape (hidden 384, 6 layers of 6 heads, MLP 1536: ``make bench``'s decoder) or the Qwen2.5-0.5B shape.
``hardware=cpu``'s auto precision (bf16 where the CPU computes it natively and the model is at least 256
wide), or ``--hardware gpu`` (there only the last layer and head at the reads apply: the real-tokens
layout is CPU-only). Each setting trains in its own subprocess, ``--pairs`` pairs in alternating order;
reports train seconds, peak RSS, the last train loss and the held-out metric of each run (PRM: step
accuracy; BCO: accuracy of the implicit reward's sign; the same maths both ways: they agree to
rounding), and the median ratios. Writes <--out>/reads_only-<method>-<shape>-<hardware>.json.
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
SETTINGS = {
    "read tokens only": ["model.skip_padding=true", "model.final_layer_at_reads=true"],
    "every position": ["model.skip_padding=false", "model.final_layer_at_reads=false"],
}
#: Per method: its data folder under --data-root, its own overrides, and the held-out metric reported.
METHODS = {
    "prm": ("prm800k_stepwise", ["data.bad_rows=skip"], "step_accuracy"),  # rows whose first step does not fit
    "bco": ("hh_rlhf_unpaired", [], "accuracy"),
}


def _load(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def overrides(args: argparse.Namespace, run_dir: Path, setting: str) -> list[str]:
    # make bench's decoder compute shape (speed_vs_trl.DECODER_SHAPE), with the tiny model's vocabulary
    shape = (
        _load("gpu_methods").QWEN25_05B_SHAPE if args.shape == "qwen2.5-0.5b" else _load("speed_vs_trl").DECODER_SHAPE
    )
    folder, extra, _ = METHODS[args.method]
    data = args.data_root / folder
    method = [f"method.train_on_last_step_only={str(args.last_step_only).lower()}"] if args.method == "prm" else []
    return [
        f"method={args.method}",
        "model=tiny",
        *[f"+model.config_overrides.{k}={v}" for k, v in shape.items()],
        f"model.max_length={args.max_length}",
        f"hardware={args.hardware}",
        *method,
        f"data.train={data / 'train.jsonl'}",
        f"data.eval={data / 'test.jsonl'}",
        f"data.max_train_rows={args.steps * args.batch}",
        f"data.max_eval_rows={args.eval_rows}",
        *extra,
        "train.epochs=1",
        f"train.max_steps={args.steps}",
        f"train.per_device_batch_size={args.batch}",
        "train.lr=1e-4",
        "train.eval_every=0",
        "train.eval_at_start=false",
        "train.save_every=0",
        "train.log_every=10",
        "train.progress_bar=false",
        *args.set,
        *SETTINGS[setting],
        f"output_dir={run_dir}",
    ]


def run(setting: str, args: argparse.Namespace, work: Path, index: int) -> dict[str, Any]:
    bench = _load("speed_vs_trl")
    name = f"{'reads' if setting == 'read tokens only' else 'every'}-{index}"
    run_dir = work / name
    cmd = [sys.executable, "-m", "rewardctl", "train", *overrides(args, run_dir, setting)]
    summary, records, wall, rss = bench.train_child(cmd, work, name, run_dir)
    train = [r for r in records if r.get("split") == "train"]
    evals = [r for r in records if r.get("split") == "eval"]
    return {
        "setting": setting,
        "train_seconds": summary["train_seconds"],
        "peak_rss_mib": rss,
        "peak_gpu_memory_gib": summary.get("peak_gpu_memory_gib"),
        "wall_seconds": wall,
        "tokens": summary["totals"].get("tokens"),
        "last_loss": train[-1]["loss"],
        "eval_metric": evals[-1][METHODS[args.method][2]] if evals else None,
        "eval_loss": evals[-1]["loss"] if evals else None,
        "mixed_precision": summary.get("mixed_precision"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=list(METHODS), default="prm")
    parser.add_argument("--shape", choices=["bench", "qwen2.5-0.5b"], default="bench")
    parser.add_argument("--hardware", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--eval-rows", type=int, default=100)
    parser.add_argument("--last-step-only", action="store_true", help="PRM: method.train_on_last_step_only=true")
    parser.add_argument("--pairs", type=int, default=1, help="pairs of runs, alternating which goes first")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a train override for both settings"
    )
    parser.add_argument("--data-root", type=Path, default=SHARED, help="holds prm800k_stepwise/, hh_rlhf_unpaired/")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results")
    args = parser.parse_args()
    folder = args.data_root / METHODS[args.method][0]
    if not (folder / "train.jsonl").is_file():
        sys.exit(f"{folder} is missing: this benchmark reads its train.jsonl")
    from rewardctl.machine import cpu_description

    bench = _load("speed_vs_trl")
    metric = METHODS[args.method][2].replace("_", " ")
    runs = bench.alternating_pairs(
        list(SETTINGS),
        args.pairs,
        lambda setting, work, pair: run(setting, args, work, pair),
        lambda r: (
            f"{r['train_seconds']:.1f} train s, {r['peak_rss_mib']:.0f} MiB peak, last loss {r['last_loss']:.6f}, "
            f"held-out {metric} {r['eval_metric']}"
        ),
    )
    labels = (
        ", labels at " + ("last step only" if args.last_step_only else "every step") if args.method == "prm" else ""
    )
    print(
        f"\n{cpu_description()}, {args.method}, {args.shape}, {args.steps} steps x {args.batch} rows, "
        f"<= {args.max_length} tokens{labels}, {runs[0]['mixed_precision']}"
        + (f", {' '.join(args.set)}" if args.set else "")
        + "\n"
    )
    print(f"| setting | train s | peak RSS MiB | last train loss | held-out {metric} |\n|---|---|---|---|---|")
    for r in runs:
        print(
            f"| {r['setting']} | {r['train_seconds']:.1f} | {r['peak_rss_mib']:.0f} | {r['last_loss']:.6f} "
            f"| {r['eval_metric']:.4f} |"
        )
    bench.print_paired_ratios(runs, "read tokens only", "every position")
    suffix = "-last-step" if args.method == "prm" and args.last_step_only else ""
    suffix += "".join(f"-{override.split('=')[0].rsplit('.', 1)[-1]}" for override in args.set)
    path = args.out / f"reads_only-{args.method}-{args.shape}-{args.hardware}{suffix}.json"
    bench.write_runs(path, args, cpu_description(), runs)


if __name__ == "__main__":
    main()
