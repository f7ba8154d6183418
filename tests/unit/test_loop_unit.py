"""The shared training loop and its helpers, driven directly: a linear regression stands in for a
method (no transformers model, tokenizer, dataset files or Hydra), so every number is checkable by hand."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from rewardctl.config.schema import Device, HardwareConfig, Scheduler, TrainConfig
from rewardctl.data.batching import EpochBatchSampler
from rewardctl.methods.base import Method, Metric, StepOutput
from rewardctl.training.checkpoint import latest_checkpoint, list_checkpoints, register_scheduler
from rewardctl.training.loop import TrainingLoop
from rewardctl.training.metrics import MetricsLog, MetricTracker
from rewardctl.training.optim import build_optimizer, build_scheduler
from rewardctl.training.runtime import build_accelerator
from rewardctl.utils.fs import atomic_directory, replace_directory, write_json_atomic, write_text_atomic

from ..conftest import reset_accelerate

# Seven rows: with per_device_batch_size=3 an epoch is the micro-batches [0, 1, 2], [3, 4, 5], [6]
# (unshuffled), so an accumulation window of 2 mixes a batch of 3 rows with one of 3 or of 1.
X = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, -1.0], [-1.0, 0.5], [0.5, 2.0], [-2.0, -1.0]]
Y = [0.5, -1.0, 2.0, 5.0, -2.5, 1.0, 2.5]
ROWS = [{"x": x, "y": y} for x, y in zip(X, Y, strict=True)]
EVAL_ROWS = [{"x": [1.0, -1.0], "y": 1.0}, {"x": [0.0, 0.0], "y": -0.5}, {"x": [3.0, 1.0], "y": 4.0}]
TIMING = {"train_seconds", "eval_seconds", "rows_per_sec"}


class LinearRegression(Method):
    """Squared error of ``nn.Linear(2, 1)``; one loss item per row. Reports data-only metrics (of the
    targets ``y``) next to the loss, so the loop's aggregation is checkable without replaying training."""

    config_class = SimpleNamespace
    primary_metric = "mae"
    item_name = "rows"

    def __init__(self) -> None:
        super().__init__(SimpleNamespace(name="linreg"), None)
        self.seen = torch.zeros((), dtype=torch.float64)  # running state carried in checkpoints

    def load_tokenizer(self):
        raise NotImplementedError

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def load_trained(self, path: Path) -> nn.Module:
        raise NotImplementedError

    def save_model(self, model: nn.Module, path: Path, state_dict: dict[str, Tensor] | None = None) -> None:
        raise NotImplementedError

    def prepare(self, dataset: Any, source: str, *, training: bool):
        raise NotImplementedError

    def collate(self, features: list[dict[str, Any]]) -> dict[str, Tensor]:
        return {"x": torch.tensor([f["x"] for f in features]), "y": torch.tensor([f["y"] for f in features])}

    def batch_weight(self, batch: dict[str, Tensor]) -> Tensor:
        return torch.tensor(float(len(batch["y"])))

    def train_step(self, model: nn.Module, batch: dict[str, Tensor]) -> StepOutput:
        errors = (model(batch["x"]).squeeze(-1) - batch["y"]) ** 2
        y = batch["y"]
        self.seen += len(y)
        return StepOutput(
            errors.sum(),
            {
                "loss": Metric.mean_of(errors),
                "target": Metric.mean_of(y),
                "rows": Metric.total(len(y)),
                "y_min": Metric.min_of(y),
                "y_max": Metric.max_of(y),
            },
        )

    def eval_step(self, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"err": model(batch["x"]).squeeze(-1) - batch["y"]}

    def eval_metrics(self, outputs: dict[str, Tensor]) -> dict[str, float]:
        err = outputs["err"]
        return {"loss": (err**2).mean().item(), "mae": err.abs().mean().item(), "rows": float(err.numel())}

    def state_dict(self) -> dict[str, Tensor]:
        return {"seen": self.seen.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.seen = state["seen"].clone()


def train_cfg(**overrides: Any) -> TrainConfig:
    base = TrainConfig(
        per_device_batch_size=3,
        grad_accum=2,
        lr=0.1,
        log_every=1,
        eval_every=0,
        eval_at_start=False,
        save_every=0,
        max_grad_norm=0.0,
        scheduler=Scheduler.constant,
        progress_bar=False,
        seed=7,
    )
    return replace(base, **overrides)


def initial_model(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(2, 1)


def make_loop(
    run_dir: Path,
    cfg: TrainConfig,
    max_steps: int,
    *,
    rows: list[dict] = ROWS,
    optimizer: str = "sgd",
    fused: bool = False,
    shuffle: bool = False,
    model: nn.Module | None = None,
    eval_rows: list[dict] | None = None,
    on_eval=None,
) -> TrainingLoop:
    """What ``session._train_in`` assembles, with the regression in place of a real method."""
    run_dir.mkdir(parents=True, exist_ok=True)  # the session creates it before the loop
    accelerator = build_accelerator(HardwareConfig(name="cpu", device=Device.cpu), [])
    method = LinearRegression()
    model = model if model is not None else initial_model()
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    else:
        opt = build_optimizer(model, cfg, fused=fused)
    scheduler = build_scheduler(opt, cfg, max_steps)
    model, opt = accelerator.prepare(model, opt)
    register_scheduler(accelerator, scheduler)
    sampler = EpochBatchSampler(len(rows), cfg.per_device_batch_size, seed=cfg.seed, shuffle=shuffle)
    train_loader = DataLoader(rows, batch_sampler=sampler, collate_fn=method.collate)
    eval_loader = None
    if eval_rows is not None:
        eval_loader = accelerator.prepare(DataLoader(eval_rows, batch_size=2, shuffle=False, collate_fn=method.collate))
    metrics_log = MetricsLog(run_dir / "metrics.jsonl", enabled=True)
    return TrainingLoop(
        accelerator=accelerator,
        method=method,
        model=model,
        optimizer=opt,
        scheduler=scheduler,
        train_loader=train_loader,
        batch_sampler=sampler,
        eval_loader=eval_loader,
        cfg=cfg,
        max_steps=max_steps,
        run_dir=run_dir,
        metrics_log=metrics_log,
        on_eval=on_eval,
    )


def records(run_dir: Path, split: str) -> list[dict[str, Any]]:
    return [r for r in MetricsLog(run_dir / "metrics.jsonl", enabled=True).records() if r["split"] == split]


def without_timing(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def rows_tensors(indices: list[int]) -> tuple[Tensor, Tensor]:
    return torch.tensor([X[i] for i in indices]), torch.tensor([Y[i] for i in indices])


def squared_errors(model: nn.Module, indices: list[int]) -> Tensor:
    x, y = rows_tensors(indices)
    return (model(x).squeeze(-1) - y) ** 2


# ---- 1. accumulation normalisation ---------------------------------------------------------------
@pytest.mark.parametrize("max_grad_norm", [0.0, 0.5])
def test_an_accumulation_window_of_unequal_micro_batches_steps_on_the_mean_over_all_its_rows(
    tmp_path: Path, max_grad_norm: float
):
    """Micro-batches of 3 and 2 rows (5 rows, batch 3, grad_accum 2): one SGD step must equal one on
    the mean squared error of all 5 rows, not the mean of the two micro-batch means; the logged grad
    norm is that gradient's norm before clipping, the logged loss the 5-row mean."""
    lr = 0.1
    reference = initial_model()
    errors = squared_errors(reference, [0, 1, 2, 3, 4])
    errors.mean().backward()
    grads = [p.grad.clone() for p in reference.parameters()]
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    clip = min(1.0, max_grad_norm / (norm.item() + 1e-6)) if max_grad_norm > 0 else 1.0
    expected = [p.detach() - lr * clip * g for p, g in zip(reference.parameters(), grads, strict=True)]

    naive = initial_model()  # what an un-normalised accumulation (mean of micro-batch means) would do
    (0.5 * (squared_errors(naive, [0, 1, 2]).mean() + squared_errors(naive, [3, 4]).mean())).backward()
    naive_update = [p.detach() - lr * clip * p.grad for p in naive.parameters()]
    assert max((a - b).abs().max().item() for a, b in zip(expected, naive_update, strict=True)) > 1e-3

    loop = make_loop(tmp_path, train_cfg(lr=lr, max_grad_norm=max_grad_norm), max_steps=1, rows=ROWS[:5])
    assert [len(b) for b in loop.batch_sampler] == [3, 2]
    result = loop.run()
    assert result.status == "completed" and result.step == 1
    for got, want in zip(loop.model.parameters(), expected, strict=True):
        torch.testing.assert_close(got.detach(), want, rtol=0, atol=1e-6)
    [record] = records(tmp_path, "train")
    assert record["loss"] == pytest.approx(errors.mean().item(), rel=1e-6)
    assert record["grad_norm"] == pytest.approx(norm.item(), rel=1e-5)
    if max_grad_norm:
        assert norm.item() > max_grad_norm  # clipping really acted
    assert record["rows"] == 5.0 and result.totals == {"rows": 5.0}


# ---- 2. metric reduction -------------------------------------------------------------------------
@pytest.fixture
def accelerator():
    acc = build_accelerator(HardwareConfig(name="cpu", device=Device.cpu), [])
    yield acc
    reset_accelerate()


def test_the_tracker_reduces_mean_sum_min_and_max_exactly_over_each_window(accelerator):
    tracker = MetricTracker()
    tracker.add(
        {
            "acc": Metric(torch.tensor(3.0), 4.0),
            "n": Metric.total(5),
            "lo": Metric.min_of(torch.tensor([2.0, -1.0])),
            "hi": Metric.max_of(torch.tensor([0.5, 7.0])),
        }
    )
    tracker.add(
        {
            "acc": Metric(torch.tensor(1.0), torch.tensor(6.0)),
            "n": Metric.total(2),  # a tensor count
            "lo": Metric.min_of(torch.tensor([0.0])),
            "hi": Metric.max_of(torch.tensor([3.0])),
        }
    )
    values, window_sums = tracker.reduce(accelerator)
    # mean: (3 + 1) / (4 + 6), not the mean of the batch means (0.75 + 0.1667) / 2
    assert values == {"acc": 0.4, "n": 7.0, "lo": -1.0, "hi": 7.0}
    assert window_sums == {"n": 7.0} and tracker.window == {}

    tracker.add(
        {
            "acc": Metric.mean_of(torch.tensor([1.0, 0.0, 1.0])),
            "n": Metric.total(3),
            "lo": Metric.min_of(torch.tensor([4.0, 6.0])),
            "hi": Metric.max_of(torch.tensor([1.0])),
        }
    )
    tracker.add({"acc": Metric(torch.tensor(0.0), 0.0)})
    values, window_sums = tracker.reduce(accelerator)
    # sum is cumulative over the run; min and max only over the new window
    assert values == {"acc": pytest.approx(2 / 3, abs=1e-15), "n": 10.0, "lo": 4.0, "hi": 1.0}
    assert window_sums == {"n": 3.0} and tracker.totals == {"n": 10.0}

    tracker.add({"acc": Metric(torch.tensor(0.0), 0.0), "n": Metric.total(0)})
    assert tracker.reduce(accelerator) == ({"n": 10.0}, {"n": 0.0})  # a mean over no items is not logged


def test_a_window_carried_through_a_checkpoint_reduces_as_the_original(accelerator):
    def filled() -> MetricTracker:
        tracker = MetricTracker()
        tracker.add(
            {"acc": Metric(torch.tensor(0.1), 3.0), "n": Metric.total(4), "lo": Metric.min_of(torch.tensor([0.3]))}
        )
        tracker.add(
            {"acc": Metric(torch.tensor(0.7), 2.0), "n": Metric.total(1), "lo": Metric.min_of(torch.tensor([0.2]))}
        )
        tracker.totals = {"n": 11.0}
        return tracker

    original = filled()
    restored = MetricTracker()
    restored.load_window_state(json.loads(json.dumps(original.window_state())))
    restored.totals = dict(original.totals)
    assert restored.window_state() == original.window_state()
    assert (
        restored.reduce(accelerator)
        == filled().reduce(accelerator)
        == ({"acc": pytest.approx(0.8 / 5.0, rel=1e-6), "n": 16.0, "lo": pytest.approx(0.2, rel=1e-6)}, {"n": 5.0})
    )


def test_train_records_in_metrics_jsonl_reduce_each_log_window(tmp_path: Path):
    """Unshuffled batches [0,1,2] [3,4,5] [6], two per step, log_every=2, five steps: the windows are
    steps 1-2 (rows 0-6, 0-2), steps 3-4 (rows 3-6, 0-5) and the final step 5 (rows 6, 0-2)."""
    loop = make_loop(tmp_path, train_cfg(log_every=2, lr=0.01, scheduler=Scheduler.linear), max_steps=5)
    result = loop.run()
    train = records(tmp_path, "train")
    assert [r["step"] for r in train] == [2, 4, 5]
    assert set(train[0]) == {
        "step",
        "split",
        "epoch",
        "lr",
        "grad_norm",
        "loss",
        "target",
        "rows",
        "y_min",
        "y_max",
        "rows_per_sec",
        "train_seconds",
        "skipped_steps",
    }
    got = [{k: r[k] for k in ("epoch", "target", "rows", "y_min", "y_max", "skipped_steps")} for r in train]
    assert got == [
        {
            "epoch": 1.3333,
            "target": pytest.approx(9.0 / 10),
            "rows": 10.0,
            "y_min": -2.5,
            "y_max": 5.0,
            "skipped_steps": 0,
        },
        {
            "epoch": 2.6667,
            "target": pytest.approx(11.0 / 10),
            "rows": 20.0,
            "y_min": -2.5,
            "y_max": 5.0,
            "skipped_steps": 0,
        },
        # mean of the batch means would be (2.5 + 0.5) / 2 = 1.5
        {
            "epoch": 3.3333,
            "target": pytest.approx(4.0 / 4),
            "rows": 24.0,
            "y_min": -1.0,
            "y_max": 2.5,
            "skipped_steps": 0,
        },
    ]
    # linear decay over 5 steps, stepped once per optimizer step (not per micro-batch)
    assert [r["lr"] for r in train] == pytest.approx([0.01 * 3 / 5, 0.01 * 1 / 5, 0.0], abs=1e-12)
    assert result.totals == {"rows": 24.0} and result.train == train[-1]
    assert loop.micro_batches == 10 and loop.method.seen.item() == 24.0


# ---- 3. eval cadence -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("eval_every", "eval_at_start", "max_steps", "expected"),
    [
        (2, True, 5, [0, 2, 4, 5]),
        (2, False, 5, [2, 4, 5]),
        (2, False, 4, [2, 4]),  # the final step is an eval step: evaluated once
        (3, True, 7, [0, 3, 6, 7]),
        (0, True, 3, [0, 3]),
        (0, False, 3, [3]),
    ],
)
def test_eval_records_appear_exactly_at_the_cadence_and_the_final_step(
    tmp_path: Path, eval_every: int, eval_at_start: bool, max_steps: int, expected: list[int]
):
    calls: list[int] = []
    start = initial_model()
    loop = make_loop(
        tmp_path,
        train_cfg(eval_every=eval_every, eval_at_start=eval_at_start, log_every=2),
        max_steps=max_steps,
        eval_rows=EVAL_ROWS,
        on_eval=lambda: calls.append(loop.step),
    )
    result = loop.run()
    evals = records(tmp_path, "eval")
    assert [r["step"] for r in evals] == expected == calls
    assert [r["step"] for r in result.evals] == expected
    assert [r["step"] for r in records(tmp_path, "train")] == sorted({*range(2, max_steps + 1, 2), max_steps})
    assert all(r["rows"] == 3.0 for r in evals)
    with torch.no_grad():
        x, y = torch.tensor([r["x"] for r in EVAL_ROWS]), torch.tensor([r["y"] for r in EVAL_ROWS])
        start_err = start(x).squeeze(-1) - y
        end_err = loop.model(x).squeeze(-1) - y
    if eval_at_start:
        assert evals[0]["loss"] == pytest.approx((start_err**2).mean().item(), rel=1e-6)
    assert evals[-1]["mae"] == pytest.approx(end_err.abs().mean().item(), rel=1e-6)
    assert evals[-1]["epoch"] == round(2 * max_steps / 3, 4)


# ---- 4. stop and resume --------------------------------------------------------------------------
RESUMABLE = {
    "log_every": 2,
    "eval_every": 2,
    "eval_at_start": True,
    "save_every": 2,
    "keep_checkpoints": 2,
    "lr": 0.05,
    "warmup_steps": 1,
    "scheduler": Scheduler.linear,
    "max_grad_norm": 1.0,
}


def resumable_loop(run_dir: Path, model_seed: int, **overrides: Any) -> TrainingLoop:
    return make_loop(
        run_dir,
        train_cfg(**RESUMABLE, **overrides),
        max_steps=6,
        optimizer="adamw",
        shuffle=True,
        model=initial_model(model_seed),
        eval_rows=EVAL_ROWS,
    )


@pytest.mark.parametrize("stop_after", [3, 4])
def test_a_stopped_run_resumed_from_its_checkpoint_ends_as_the_uninterrupted_run(tmp_path: Path, stop_after: int):
    """AdamW with warm-up and linear decay, shuffled epochs, a window still open at step 3: weights,
    optimizer, schedule, data position, the unlogged window, metric totals and method state must all
    come back for the resumed run to match bit for bit."""
    full = resumable_loop(tmp_path / "full", model_seed=0)
    full_result = full.run()
    reset_accelerate()

    part_dir = tmp_path / "part"
    first = resumable_loop(part_dir, model_seed=0, stop_after_steps=stop_after)
    stopped = first.run()
    assert (stopped.status, stopped.step) == ("stopped", stop_after)
    assert [s for s, _ in list_checkpoints(part_dir / "checkpoints")] == ([2, 3] if stop_after == 3 else [2, 4])
    assert bool(first.tracker.window) == (stop_after == 3)  # step 3 is not a log step: its window is carried
    reset_accelerate()

    second = resumable_loop(part_dir, model_seed=123, stop_after_steps=stop_after)  # other weights: restore wins
    second.restore(latest_checkpoint(part_dir / "checkpoints"))
    assert second.step == stop_after and second.micro_batches == 2 * stop_after
    resumed = second.run()

    assert (full_result.status, resumed.status, resumed.step) == ("completed", "completed", 6)
    for a, b in zip(full.model.parameters(), second.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert without_timing(records(part_dir, "train")) == without_timing(records(tmp_path / "full", "train"))
    assert without_timing(records(part_dir, "eval")) == without_timing(records(tmp_path / "full", "eval"))
    assert [r["step"] for r in records(part_dir, "eval")] == [0, 2, 4, 6]
    assert without_timing(resumed.evals) == without_timing(full_result.evals)
    assert resumed.totals == full_result.totals == {"rows": 28.0}  # 12 micro-batches: 4 epochs of 7 rows
    assert second.method.seen.item() == full.method.seen.item() == 28.0
    assert second.scheduler.get_last_lr() == full.scheduler.get_last_lr()


def test_a_run_resumed_from_its_final_step_checkpoint_does_not_evaluate_again(tmp_path: Path):
    """The process died after the final checkpoint (eval already logged at step 6) but before the model
    was saved: the rerun resumes at step 6 and must not add a second step-6 eval record."""
    first = resumable_loop(tmp_path, model_seed=0)
    assert first.run().status == "completed"
    reset_accelerate()
    again = resumable_loop(tmp_path, model_seed=0)
    again.restore(latest_checkpoint(tmp_path / "checkpoints"))
    result = again.run()
    assert result.status == "completed" and result.step == 6
    assert [r["step"] for r in records(tmp_path, "eval")] == [0, 2, 4, 6]
    assert [r["step"] for r in result.evals] == [0, 2, 4, 6]


# ---- 5. optimizer and schedule -------------------------------------------------------------------
class Tower(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 4)
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 1)
        self.scale = nn.Parameter(torch.ones(4))  # a 1-D parameter that is neither a bias nor a norm
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_clipping_folded_into_the_fused_adamw_trains_as_accelerates_clip_then_step(tmp_path: Path):
    """The loop hands the clipping coefficient to a fused AdamW (``GradientClipper.folded``) and
    clips through accelerate otherwise; with a threshold that clips every step, both runs log the
    same gradient norms and end on the same weights (fp32 rounding apart)."""
    cfg = train_cfg(max_grad_norm=0.05, weight_decay=0.1)
    runs = {}
    for fused in (True, False):
        loop = make_loop(tmp_path / f"fused-{fused}", cfg, 6, optimizer="adamw", fused=fused)
        assert loop.clip.folded is fused
        result = loop.run()
        assert result.status == "completed"
        norms = [r["grad_norm"] for r in records(tmp_path / f"fused-{fused}", "train")]
        runs[fused] = ([p.detach().clone() for p in loop.model.parameters()], norms)
    (folded, folded_norms), (plain, plain_norms) = runs[True], runs[False]
    assert len(folded_norms) == 6 and min(plain_norms) > 0.05  # every step was clipped
    assert folded_norms == pytest.approx(plain_norms, rel=1e-5)
    for a, b in zip(folded, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(folded[0], initial_model().weight)


def test_build_optimizer_decays_matrices_only_and_leaves_frozen_parameters_out():
    model = Tower()
    cfg = TrainConfig(lr=3e-4, weight_decay=0.05, adam_beta1=0.8, adam_beta2=0.95, adam_eps=1e-7)
    optimizer = build_optimizer(model, cfg)
    assert isinstance(optimizer, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [([names[id(p)] for p in g["params"]], g["weight_decay"]) for g in optimizer.param_groups]
    # The rule is the number of dimensions, not the name: embeddings decay, every 1-D tensor does not.
    assert groups == [
        (["embed.weight", "proj.weight", "head.weight"], 0.05),
        (["scale", "proj.bias", "norm.weight", "norm.bias", "head.bias"], 0.0),
    ]
    assert all((g["lr"], g["betas"], g["eps"]) == (3e-4, (0.8, 0.95), 1e-7) for g in optimizer.param_groups)

    no_bias = nn.Sequential(nn.Linear(3, 3, bias=False), nn.Linear(3, 1, bias=False))
    [group] = build_optimizer(no_bias, cfg).param_groups  # an empty group is dropped
    assert group["weight_decay"] == 0.05 and len(group["params"]) == 2


@pytest.mark.parametrize(
    ("cfg", "lrs"),
    [
        (TrainConfig(lr=1.0, warmup_steps=2, scheduler=Scheduler.linear), [0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0]),
        # warmup_ratio 0.2 of 6 steps: ceil(1.2) = 2 warm-up steps
        (TrainConfig(lr=1.0, warmup_ratio=0.2, scheduler=Scheduler.constant), [0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0]),
    ],
)
def test_build_scheduler_warms_up_then_follows_its_shape(cfg: TrainConfig, lrs: list[float]):
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = build_scheduler(optimizer, cfg, total_steps=6)
    seen = [scheduler.get_last_lr()[0]]
    for _ in range(6):
        optimizer.step()
        scheduler.step()
        seen.append(scheduler.get_last_lr()[0])
    assert seen == pytest.approx(lrs, abs=1e-12)


# ---- the data position ---------------------------------------------------------------------------
def test_the_batch_sampler_restarts_an_epoch_at_any_offset_with_the_same_batches():
    sampler = EpochBatchSampler(7, 3, seed=11)
    sampler.set_epoch(2)
    whole = list(sampler)
    assert len(sampler) == 3 and sorted(i for b in whole for i in b) == list(range(7))
    assert sorted(len(b) for b in whole) == [1, 3, 3]
    sampler.set_epoch(2, 2)
    assert list(sampler) == whole[2:]
    sampler.set_epoch(3)
    assert list(sampler) != whole  # each epoch is shuffled anew
    shards = [list(EpochBatchSampler(7, 2, seed=11, num_replicas=3, rank=r)) for r in range(3)]
    assert [len(s) for s in shards] == [2, 2, 2]  # 4 batches padded to 6 by repeating the first ones
    assert shards[1][1] == shards[0][0] and shards[2][1] == shards[1][0]


# ---- 6. atomic writes ----------------------------------------------------------------------------
def test_write_json_atomic_replaces_the_content_and_leaves_no_temporary_file(tmp_path: Path):
    path = tmp_path / "summary.json"
    write_json_atomic(path, {"step": 1})
    write_json_atomic(path, {"step": 2, "dir": tmp_path / "x"})
    assert path.read_text(encoding="utf-8") == json.dumps({"step": 2, "dir": str(tmp_path / "x")}, indent=2) + "\n"
    write_text_atomic(tmp_path / "notes.txt", "a")
    write_text_atomic(tmp_path / "notes.txt", "b")
    assert (tmp_path / "notes.txt").read_text(encoding="utf-8") == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "summary.json"]


def test_atomic_directory_keeps_the_old_directory_when_the_block_raises(tmp_path: Path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights.bin").write_text("old", encoding="utf-8")
    used: list[Path] = []

    def fail_half_way() -> None:
        with atomic_directory(target) as tmp:
            used.append(tmp)
            assert tmp != target and tmp.parent == tmp_path and tmp.is_dir()
            (tmp / "weights.bin").write_text("half", encoding="utf-8")
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        fail_half_way()
    assert len(used) == 1 and not used[0].exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert [(p.name, p.read_text(encoding="utf-8")) for p in target.iterdir()] == [("weights.bin", "old")]

    with atomic_directory(target) as tmp:
        (tmp / "config.json").write_text("new", encoding="utf-8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert [(p.name, p.read_text(encoding="utf-8")) for p in target.iterdir()] == [("config.json", "new")]


def test_atomic_directory_creates_missing_parents_and_clears_a_stale_temporary(tmp_path: Path):
    target = tmp_path / "a" / "b" / "model"
    stale = target.parent / f".model.tmp-{os.getpid()}"
    stale.mkdir(parents=True)
    (stale / "leftover").write_text("x", encoding="utf-8")
    with atomic_directory(target) as tmp:
        assert tmp == stale and list(tmp.iterdir()) == []
        (tmp / "f").write_text("y", encoding="utf-8")
    assert [p.name for p in target.parent.iterdir()] == ["model"] and [p.name for p in target.iterdir()] == ["f"]


def test_replace_directory_swaps_in_the_new_directory(tmp_path: Path):
    src, dst = tmp_path / "new", tmp_path / "dst"
    src.mkdir()
    (src / "a").write_text("new", encoding="utf-8")
    replace_directory(src, dst)  # no old one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"] and (dst / "a").read_text(encoding="utf-8") == "new"

    src.mkdir()
    (src / "b").write_text("newer", encoding="utf-8")
    replace_directory(src, dst)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]
    assert [(p.name, p.read_text(encoding="utf-8")) for p in dst.iterdir()] == [("b", "newer")]


def test_replace_directory_survives_an_aside_copy_left_by_a_crash_with_the_same_pid(tmp_path: Path):
    """A crash between moving the old directory aside and deleting it leaves ``.dst.old-<pid>``; a
    later process with the same pid (containers reuse small pids) must still be able to save."""
    src, dst = tmp_path / "new", tmp_path / "dst"
    dst.mkdir()
    (dst / "a").write_text("old", encoding="utf-8")
    stale = tmp_path / f".dst.old-{os.getpid()}"
    stale.mkdir()
    (stale / "left").write_text("from the crash", encoding="utf-8")
    src.mkdir()
    (src / "b").write_text("new", encoding="utf-8")
    replace_directory(src, dst)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]
    assert [(p.name, p.read_text(encoding="utf-8")) for p in dst.iterdir()] == [("b", "new")]
