"""``model.skip_padding`` off against on, paired per batch: the loop's own batches, each trained forward +
backward both ways on the same model, the order alternating.

Why: whole runs of one setting moved by 10-25% from run to run on the project's shared 2-core host,
more than the 4-20% this lever is worth; pairing every batch cancels that drift. The batches are the
ones `rewardctl train` builds (its sampler, collator, shared prefixes and padding buckets), recorded
from a short run with the switch off, so the replay measures the model's forward and backward only.

    python benchmarks/skip_padding_replay.py <train overrides...>
    python benchmarks/skip_padding_replay.py model=minilm model.name_or_path=DIR model.from_scratch=true \\
        data.train=pairs.jsonl data.eval=test.jsonl model.max_length=256 hardware.mixed_precision=no \\
        train.max_steps=60 train.per_device_batch_size=8

Prints the real share of the batches' positions, how many batches the gathered forward takes, the
forward + backward seconds of each setting over every batch, and their ratio. Pairwise and ranklist
(scalar reward models) only.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from rewardctl import cli
from rewardctl.methods.pairwise import PairwiseMethod
from rewardctl.methods.ranklist import RanklistMethod
from rewardctl.methods.scalar import ScalarRewardMethod


def record_batches(overrides: list[str], out: Path) -> tuple[list[dict[str, Any]], Any, Any]:
    """Train with the switch off; keep every training batch, and the method and model of the run."""
    seen: list[dict[str, Any]] = []
    kept: dict[str, Any] = {}
    originals = {cls: cls.train_step for cls in (PairwiseMethod, RanklistMethod)}

    def recorder(original: Any) -> Any:
        def recording(self: ScalarRewardMethod, model: Any, batch: dict[str, Any]) -> Any:
            if model.training:
                seen.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
                kept["method"], kept["model"] = self, model
            return original(self, model, batch)

        return recording

    for cls, original in originals.items():
        cls.train_step = recorder(original)
    try:
        cli.main(["train", *overrides, "model.skip_padding=false", "train.progress_bar=false", f"output_dir={out}"])
    except SystemExit as exit_:
        if exit_.code not in (None, 0):
            raise
    finally:
        for cls, original in originals.items():
            cls.train_step = original
    if not seen:
        raise SystemExit("the run trained no batch of a scalar reward method (pairwise or ranklist)")
    return seen, kept["method"], kept["model"]


def real_share(batch: dict[str, Any]) -> tuple[int, int]:
    """(real positions, all positions) of a collated batch."""
    if "segment_ids" in batch:
        return int((batch["segment_ids"] >= 0).sum()), batch["segment_ids"].numel()
    mask = batch.get("attention_mask")
    return (int(mask.sum()), mask.numel()) if mask is not None else (batch["input_ids"].numel(),) * 2


def main() -> int:
    overrides = sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        batches, method, model = record_batches(overrides, Path(tmp) / "run")
    from rewardctl.modeling import unpadded_decoder

    gathered = {"count": 0}
    original = unpadded_decoder.hidden_at_reads

    def counting(*args: Any, **kwargs: Any) -> Any:
        gathered["count"] += 1
        return original(*args, **kwargs)

    unpadded_decoder.hidden_at_reads = counting
    model.train()
    totals = {False: 0.0, True: 0.0}
    for index, batch in enumerate(batches):
        for skip in (False, True) if index % 2 == 0 else (True, False):
            model.skip_padding = skip
            model.zero_grad(set_to_none=True)
            started = time.perf_counter()
            method.train_step(model, batch).loss_sum.backward()
            totals[skip] += time.perf_counter() - started
    real = sum(real_share(b)[0] for b in batches)
    positions = sum(real_share(b)[1] for b in batches)
    print(f"{len(batches)} batches; {real} of {positions} positions real ({real / positions:.1%})")
    print(f"gathered forward taken by {gathered['count']} of {len(batches)} batches (decoders; encoders swap a class)")
    print(
        f"forward + backward: skip_padding=false {totals[False]:.1f} s, true {totals[True]:.1f} s, "
        f"ratio {totals[False] / totals[True]:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
