"""Where a training step's time goes: one `rewardctl train` run of benchmarks/gpu_methods.py, in this
process, with torch.profiler over a few steps after the warm-up.

The first GPU lease (2026-12-04, H200) measured 2-7% MFU on the Qwen2.5-0.5B shape at batch 8: about
0.36 s a step where the weights' matmuls need about 8 ms at the bf16 peak. Whether the rest is the host (Python, the collator,
kernel launches), waiting on the device, or slow kernels decides what to fix, and one lease has no
time to guess. Per profiled step this prints and writes:

- wall ms (``torch.cuda.synchronize`` around each step, here only, so a step's queued kernels count
  in it) and the device's busy ms (the kernels' own time): busy / wall near 1 is device-bound,
  far below 1 is host- or launch-bound;
- the host's self time per step, over every thread (autograd's backward thread too, so it can exceed
  the wall time);
- the top operators by device self time and by host self time (``key_averages``).

    python benchmarks/gpu_profile.py --methods pairwise --layouts padded        # a GPU
    python benchmarks/gpu_profile.py --shape tiny --hardware cpu --steps 6 --profile-steps 2 \\
        --methods pairwise --layouts shared                                     # plumbing check here

Writes <--out>/gpu_profile-<method>-<layout>.txt for each run.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

HERE = Path(__file__).resolve().parent


def _gpu_methods() -> Any:
    spec = importlib.util.spec_from_file_location("gpu_methods", HERE / "gpu_methods.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kernel_time_us(events: Any) -> float:
    """The device's busy time: the self time of the device's own rows only (the kernels and copies), as
    ``EventList.table`` totals it. A CPU operator's row also carries its kernels' time, and a
    ``record_function`` label gets a device row spanning its whole range: counting those too would
    count each kernel two or three times."""
    return sum(
        e.self_device_time_total
        for e in events
        if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
    )


class StepProfiler:
    """Wraps ``TrainingLoop._optimizer_step``: steps ``[start, start + count)`` run under the profiler,
    each between two device synchronisations so its wall time holds its own kernels."""

    def __init__(self, start: int, count: int, cuda: bool) -> None:
        self.start, self.count, self.cuda = start, count, cuda
        self.calls = 0
        self.walls: list[float] = []
        self.stack = ExitStack()
        self.profiler: profile | None = None

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def wrap(self, step: Any) -> Any:
        def profiled(loop: Any, stream: Any) -> Any:
            index = self.calls
            self.calls += 1
            if not self.start <= index < self.start + self.count:
                return step(loop, stream)
            if index == self.start:
                activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
                self.profiler = self.stack.enter_context(profile(activities=activities))
            self._sync()
            began = time.perf_counter()
            with record_function("optimizer_step"):
                bad = step(loop, stream)
            self._sync()
            self.walls.append(time.perf_counter() - began)
            if index == self.start + self.count - 1:
                self.stack.close()
            return bad

        return profiled

    def train(self, overrides: list[str]) -> int:
        """``rewardctl train <overrides>`` in this process with its steps wrapped; its exit status. The
        loop is restored and the profiler stopped however the run ends (inside the profiled steps too)."""
        from rewardctl import cli
        from rewardctl.training.loop import TrainingLoop

        original = TrainingLoop._optimizer_step
        TrainingLoop._optimizer_step = self.wrap(original)
        try:
            return cli.main(["train", *overrides])
        except SystemExit as exit_:  # a failed run exits through Hydra or rewardctl's one-line error
            return 0 if exit_.code is None else exit_.code if isinstance(exit_.code, int) else 1
        finally:
            TrainingLoop._optimizer_step = original
            self.stack.close()

    def report(self, title: str) -> str:
        if self.profiler is None or not self.walls:
            return f"{title}: no step was profiled (the run had {self.calls} steps; lower --warmup-steps)\n"
        events = self.profiler.key_averages()
        device_us = kernel_time_us(events)
        host_us = sum(e.self_cpu_time_total for e in events)
        wall_ms = 1000 * sum(self.walls) / len(self.walls)
        busy_ms = device_us / 1000 / len(self.walls)
        lines = [
            title,
            f"steps profiled: {len(self.walls)}; wall per step {wall_ms:.1f} ms "
            f"({', '.join(f'{1000 * w:.1f}' for w in self.walls)})",
            f"device busy per step: {busy_ms:.1f} ms ({100 * busy_ms / wall_ms:.0f}% of wall)"
            if self.cuda
            else "device busy: n/a (no CUDA)",
            f"host self time per step (all operators, every thread): {host_us / 1000 / len(self.walls):.1f} ms",
            "",
        ]
        if self.cuda:
            lines += [
                "top operators by device self time:",
                events.table(sort_by="self_device_time_total", row_limit=25),
            ]
        lines += ["top operators by host self time:", events.table(sort_by="self_cpu_time_total", row_limit=25)]
        return "\n".join(lines) + "\n"


def main() -> None:
    bench = _gpu_methods()
    parser = bench.argument_parser(__doc__.splitlines()[0])
    parser.set_defaults(methods="pairwise", layouts="padded", steps=12)
    parser.add_argument("--warmup-steps", type=int, default=None, help="default: steps - profile-steps - 1")
    parser.add_argument("--profile-steps", type=int, default=3)
    args = bench.resolve_arguments(parser, parser.parse_args())
    warmup = args.warmup_steps if args.warmup_steps is not None else max(0, args.steps - args.profile_steps - 1)
    args.out.mkdir(parents=True, exist_ok=True)

    cuda = torch.cuda.is_available() and args.hardware != "cpu"
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            for layout in args.layouts.split(","):
                overrides = bench.train_overrides(method, layout, args, Path(tmp) / f"{method}-{layout}")
                if overrides is None:
                    continue
                profiler = StepProfiler(warmup, args.profile_steps, cuda)
                code = profiler.train(overrides)
                title = f"{method} / {layout} on {args.device or 'CPU'} (exit {code})"
                report = profiler.report(title)
                print(report, flush=True)
                (args.out / f"gpu_profile-{method}-{layout}.txt").write_text(report)
                failed = failed or code != 0
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
