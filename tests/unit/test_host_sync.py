"""No host synchronisation per micro-batch: a training step, its backward and the metric tracker
never read a tensor on the host; the log step (``MetricTracker.reduce``) is where values come back,
exactly (sum / count over the window, min, max, run totals, a window carried through a checkpoint).

On a GPU, ``.item()``, ``float()``, ``int()``, ``bool()`` (a Python ``if`` on a tensor), ``.tolist()``
and ``.cpu()`` each wait for every queued kernel. On the CPU they copy nothing, but the calls are the
same, so counting them is the proxy: the test records every such call whose innermost caller outside
torch is rewardctl's code. Calls made by a library on its own (transformers' SDPA mask inspects the
attention mask once per forward) are rewardctl's to avoid only by changing its inputs, and are left
out of the assertion.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from accelerate.utils import set_seed

import rewardctl
from rewardctl.data.loading import load_rows
from rewardctl.methods.base import Metric, Reduce
from rewardctl.methods.bco import BcoMethod, LocalRuntime, RunningMean
from rewardctl.methods.pairwise import PairwiseMethod
from rewardctl.methods.prm import PrmMethod
from rewardctl.methods.ranklist import RanklistMethod
from rewardctl.methods.registry import to_run_config
from rewardctl.training.metrics import MetricTracker

from ..conftest import compose_train

SYNCING = ("item", "__float__", "__int__", "__bool__", "tolist", "cpu")
METHODS = {"bco": BcoMethod, "prm": PrmMethod, "pairwise": PairwiseMethod, "ranklist": RanklistMethod}
TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
REWARDCTL_DIR = os.path.dirname(rewardctl.__file__) + os.sep
SINGLE_PROCESS = SimpleNamespace(device=torch.device("cpu"), num_processes=1)  # what reduce reads of an Accelerator


def _origin() -> str:
    """``file:line`` of the innermost frame outside torch and outside this module's spy."""
    frame = sys._getframe(2)
    while frame is not None and (
        frame.f_code.co_filename.startswith(TORCH_DIR) or frame.f_code.co_filename == __file__
    ):
        frame = frame.f_back
    return "?" if frame is None else f"{frame.f_code.co_filename}:{frame.f_lineno}"


@contextlib.contextmanager
def host_syncs() -> Iterator[dict[str, list[str]]]:
    """Record the syncing Tensor calls made inside the block, split by who made them:
    ``{"rewardctl": [...], "other": [...]}`` with ``"name at file:line"`` entries."""
    found: dict[str, list[str]] = {"rewardctl": [], "other": []}

    def spy(name: str):
        original = getattr(torch.Tensor, name)

        def call(self, *args, **kwargs):
            where = _origin()
            found["rewardctl" if where.startswith(REWARDCTL_DIR) else "other"].append(f"{name} at {where}")
            return original(self, *args, **kwargs)

        return call

    with contextlib.ExitStack() as stack:
        for name in SYNCING:
            stack.enter_context(mock.patch.object(torch.Tensor, name, spy(name)))
        yield found


def make_method(name: str, *overrides: str):
    run = to_run_config(compose_train([f"method={name}", *overrides]))
    return METHODS[name](run.method, run)


def ready(name: str):
    """The method on the bundled tiny model, its first 8 sample rows prepared, after the start hook
    (BCO's reference), in train mode: what the loop hands to ``train_step``."""
    method = make_method(name)
    rows = load_rows(method.run.data.train, split="train").select(range(8))
    features = list(method.prepare(rows, method.run.data.train, training=True).dataset)
    set_seed(0)
    model = method.build_model()
    method.on_train_start(model, LocalRuntime(), resuming=False)
    model.train()
    return method, model, [method.collate(features[i : i + 2]) for i in (0, 2, 4)]


# ---- the step path ----------------------------------------------------------------------------------
def test_the_spy_sees_what_it_must():
    tensor = torch.tensor([1.0, 2.0])
    with host_syncs() as found:
        tensor.sum().item(), float(tensor[0]), int(tensor[1]), bool(tensor[0]), tensor.tolist(), tensor.cpu()
        if tensor[0] > 0:
            pass
    assert [entry.split(" at ")[0] for entry in found["other"]] == [*SYNCING, "__bool__"]
    assert found["rewardctl"] == []


@pytest.mark.parametrize("name", ["bco", "prm", "pairwise", "ranklist"])
def test_training_micro_batches_never_wait_for_the_device(name: str):
    method, model, batches = ready(name)
    tracker = MetricTracker()
    with host_syncs() as found:
        for batch in batches:
            method.batch_weight(batch)
            out = method.train_step(model, batch)
            out.loss_sum.backward()
            tracker.add(out.metrics)
    assert found["rewardctl"] == [], "host synchronisations on the step path:\n" + "\n".join(found["rewardctl"])
    values, _ = tracker.reduce(SINGLE_PROCESS)  # the log step reads them back
    assert torch.isfinite(torch.tensor(values["loss"])) and set(values) == set(out.metrics)


def test_bco_logs_the_exact_delta_and_keeps_it_on_the_rewards_device():
    method, model, batches = ready("bco")
    tracker = MetricTracker()
    deltas = []
    for batch in batches:
        out = method.train_step(model, batch)
        tracker.add(out.metrics)
        assert out.metrics["delta"].value.dtype == torch.float64  # the running mean itself, not a float32 copy
        deltas.append(out.metrics["delta"].value.item())
        assert deltas[-1] == (method.delta.total / method.delta.count).item()
    assert tracker.reduce(SINGLE_PROCESS)[0]["delta"] == (deltas[0] + deltas[1] + deltas[2]) / 3
    assert method.delta.total.device == method.delta.tensor.device == batches[0]["input_ids"].device
    restored = BcoMethod(method.cfg, method.run)
    restored.load_state_dict({k: v.cpu() for k, v in method.state_dict().items()})  # as a checkpoint holds it
    assert restored.delta.value == method.delta.value and restored.delta.count.item() == 6


def test_running_mean_before_any_reward_is_zero_without_a_host_read():
    delta = RunningMean()
    with host_syncs() as found:
        tensor = delta.tensor
        delta.update(torch.tensor([1.0, 2.0]), LocalRuntime())
        after = delta.tensor
    assert found["rewardctl"] == []
    assert tensor.item() == 0.0 and after.item() == 1.5 and after.dtype == torch.float64


# ---- MetricTracker ---------------------------------------------------------------------------------
def f64(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float64)


def micro_batches() -> list[dict[str, Metric]]:
    """Three micro-batches mixing tensor and Python counts; float64 values whose sums round."""
    return [
        {
            "loss": Metric(f64(0.1), torch.tensor(2)),
            "acc": Metric(f64(1.0), 3.0),
            "tokens": Metric.total(torch.tensor(7)),
            "low": Metric.min_of(torch.tensor([0.5, -0.25])),
            "high": Metric.max_of(torch.tensor([0.5, -0.25])),
            "udm": Metric(f64(0.0), torch.tensor(0)),
        },
        {
            "loss": Metric(f64(0.2), torch.tensor(1)),
            "acc": Metric(f64(2.0), 3.0),
            "tokens": Metric.total(torch.tensor(5)),
            "low": Metric.min_of(torch.tensor([-1.5])),
            "high": Metric.max_of(torch.tensor([2.75, 1.0])),
            "udm": Metric(f64(0.0), torch.tensor(0)),
        },
        {
            "loss": Metric(f64(0.3), torch.tensor(4)),
            "acc": Metric(f64(0.0), 1.0),
            "tokens": Metric.total(9),
            "low": Metric.min_of(torch.tensor([3.0])),
            "high": Metric.max_of(torch.tensor([-4.0])),
            "udm": Metric(f64(0.0), torch.tensor(0)),
        },
    ]


def test_reduce_gives_exact_window_means_extremes_and_run_totals():
    tracker = MetricTracker()
    with host_syncs() as found:
        for metrics in micro_batches():
            tracker.add(metrics)
    assert found["rewardctl"] == []
    values, window_sums = tracker.reduce(SINGLE_PROCESS)
    assert values["loss"] == (0.1 + 0.2 + 0.3) / 7  # sum / count over micro-batches, not a mean of means
    assert values["acc"] == 3.0 / 7
    assert values["low"] == -1.5 and values["high"] == 2.75
    assert values["tokens"] == 21.0 and window_sums == {"tokens": 21.0}
    assert "udm" not in values  # a window with no items has no mean (and no division by zero)
    assert tracker.window == {}
    tracker.add({"tokens": Metric.total(4), "loss": Metric(f64(1.0), 2.0)})
    values, window_sums = tracker.reduce(SINGLE_PROCESS)
    assert values == {"tokens": 25.0, "loss": 0.5} and window_sums == {"tokens": 4.0}  # sums are run-long totals
    assert tracker.totals == {"tokens": 25.0}
    assert tracker.reduce(SINGLE_PROCESS) == ({}, {})  # an empty window reduces to nothing


def test_a_window_carried_through_a_checkpoint_reduces_bit_for_bit():
    first, second, third = micro_batches()
    uninterrupted = MetricTracker()
    for metrics in (first, second, third):
        uninterrupted.add(metrics)
    interrupted = MetricTracker()
    for metrics in (first, second):
        interrupted.add(metrics)
    state = json.loads(json.dumps(interrupted.window_state()))  # as process_state_<i>.json holds it
    assert state["loss"] == ["mean", 0.1 + 0.2, 3.0] and state["low"][0] == "min"
    resumed = MetricTracker()
    resumed.load_window_state(state)
    resumed.add(third)
    assert resumed.reduce(SINGLE_PROCESS) == uninterrupted.reduce(SINGLE_PROCESS)


def test_a_window_state_saved_with_integer_counts_still_loads():
    tracker = MetricTracker()
    tracker.load_window_state({"loss": ["mean", 1.5, 3], "high": ["max", 2.0, 1]})
    assert tracker.window["loss"][0] == Reduce.mean and tracker.window["loss"][2].dtype == torch.float64
    tracker.add({"loss": Metric(f64(0.5), 1.0), "high": Metric.max_of(torch.tensor([1.0]))})
    assert tracker.reduce(SINGLE_PROCESS)[0] == {"loss": 0.5, "high": 2.0}
