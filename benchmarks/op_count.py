"""Operator calls per training step: rewardctl's step against a bare transformers step of the same
model and batch, counted with torch.profiler on the CPU.

Why: on an H200 the Qwen2.5-0.5B-shaped pairwise step at batch 8 took 0.36 s for matmuls worth 8 ms
(docs/benchmarks.md, "GPU"). When the host cannot issue operators as fast as the GPU runs them, the
step costs (operator calls) x (host time per call) whatever the width, so the count, not the speed, is
what this machine can measure for a GPU: same layer count and heads as the Qwen2.5-0.5B shape, narrow
width (the count does not depend on it).

    python benchmarks/op_count.py                   # 24 layers, 8 pairs, padded (about 1 minute)
    python benchmarks/op_count.py --layers 2        # the per-layer share: (count(24) - count(2)) / 22

The bare step: forward under bf16 autocast, the Bradley-Terry loss, backward, gradient clipping and
fused AdamW, as any trainer built on transformers does it (TRL's RewardTrainer included).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TINY = REPO / "rewardctl" / "assets" / "tiny-llama"
SHARED = REPO.parent / "shared" / "data" / "hh_rlhf_pairwise"
WARMUP, COUNTED = 4, 2


def aten_calls(events: Any) -> tuple[int, int]:
    """(top-level aten calls, every aten event) in a profiler's raw ``events()``. A top-level call is
    one no other aten call encloses: what Python dispatches, each paying the dispatcher and autograd
    once. The events nested inside it (a linear under autocast: a cast, a transpose, an addmm, ...)
    run in C++ and cost far less each."""
    top = every = 0
    for event in events:
        if not event.name.startswith("aten::"):
            continue
        every += 1
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        top += parent is None
    return top, every


def rewardctl_step_calls(layers: int, batch: int, layout: str) -> tuple[float, float]:
    """aten calls per step of `rewardctl train` (pairwise), profiled inside its own loop."""
    spec = importlib.util.spec_from_file_location("gpu_profile", HERE / "gpu_profile.py")
    gpu_profile = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_profile)
    data = []
    if (SHARED / "train.jsonl").is_file():
        data = [f"data.train={SHARED / 'train.jsonl'}", f"data.eval={SHARED / 'test.jsonl'}"]
    layout_overrides, _ = gpu_profile._gpu_methods().LAYOUTS[layout]
    profiler = gpu_profile.StepProfiler(WARMUP, COUNTED, cuda=False)
    with tempfile.TemporaryDirectory() as tmp:
        code = profiler.train(
            [
                "method=pairwise",
                "model=tiny",
                f"+model.config_overrides.num_hidden_layers={layers}",
                "+model.config_overrides.num_key_value_heads=2",
                *data,
                *layout_overrides,
                f"data.max_train_rows={batch * (WARMUP + COUNTED)}",
                "data.max_eval_rows=8",
                "model.max_length=512",
                f"train.max_steps={WARMUP + COUNTED}",
                f"train.per_device_batch_size={batch}",
                "train.eval_every=0",
                "train.eval_at_start=false",
                "train.save_every=0",
                "train.progress_bar=false",
                "hardware.mixed_precision=bf16",
                f"output_dir={tmp}/run",
            ]
        )
    if code != 0 or profiler.profiler is None:
        raise SystemExit(f"the rewardctl run failed (exit {code})")
    top, every = aten_calls(profiler.profiler.events())
    return top / len(profiler.walls), every / len(profiler.walls)


def bare_step_calls(layers: int, batch: int, length: int = 200) -> tuple[float, float]:
    """aten calls per step of a plain transformers training step on the same model and batch shape."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = json.loads((TINY / "config.json").read_text())
    for key in ("architectures", "transformers_version"):
        config.pop(key, None)
    config.update(num_hidden_layers=layers, num_key_value_heads=2, num_labels=1, pad_token_id=0)
    model = LlamaForSequenceClassification(LlamaConfig(**config))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    ids = torch.randint(2, config["vocab_size"], (2 * batch, length))
    mask = torch.ones_like(ids)
    mask[::2, length * 3 // 4 :] = 0  # some padding, as a length-grouped batch has

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rewards = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
        loss = -torch.nn.functional.logsigmoid(rewards[::2] - rewards[1::2]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(WARMUP):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as counted:
        for _ in range(COUNTED):
            step()
    top, every = aten_calls(counted.events())
    return top / COUNTED, every / COUNTED


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--batch", type=int, default=8, help="pairs per step")
    parser.add_argument("--layout", choices=["padded", "shared"], default="padded")
    args = parser.parse_args()
    ours = rewardctl_step_calls(args.layers, args.batch, args.layout)
    bare = bare_step_calls(args.layers, args.batch)
    print(f"{args.layers} layers, {args.batch} pairs, {args.layout}: aten calls per training step (top-level / all)")
    print(f"  rewardctl train:        {ours[0]:,.0f} / {ours[1]:,.0f}")
    print(f"  bare transformers step: {bare[0]:,.0f} / {bare[1]:,.0f}")
    print(f"  difference:             {ours[0] - bare[0]:+,.0f} / {ours[1] - bare[1]:+,.0f}")


if __name__ == "__main__":
    main()
