"""The distribution contracts checked through real CPU runs: what the loop tells DeepSpeed's engine
about accumulation boundaries, the update when the engine divides by its accumulation count, and the
read-only last layer under FSDP2 in two gloo processes (FSDP's auto-wrap policy and the launcher's
arguments are in tests/unit/test_distributed.py)."""

from __future__ import annotations

import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from ..conftest import read_jsonl, run_training


def test_only_the_last_micro_batch_of_a_window_is_a_sync_boundary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """DeepSpeed's engine reduces and steps exactly when accelerate's sync_gradients is set."""
    flags: list[bool] = []
    original = Accelerator.backward

    def recording(self: Accelerator, loss: torch.Tensor, **kwargs) -> None:
        flags.append(self.sync_gradients)
        original(self, loss, **kwargs)

    monkeypatch.setattr(Accelerator, "backward", recording)
    summary, _ = run_training(
        tmp_path,
        [
            "experiment=smoke",
            "train.max_steps=4",
            "train.grad_accum=3",
            "train.per_device_batch_size=2",
            "train.save_every=0",
        ],
    )
    assert summary["status"] == "completed"
    assert flags == [False, False, True] * 4


def test_an_engine_that_divides_by_its_accumulation_count_gets_the_same_update(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Under DeepSpeed accelerate's gradient_accumulation_steps is the engine's count and the engine
    divides each loss by it. Emulated here by setting that count, which makes accelerate divide:
    the loop must undo it, so the run equals one with the count at 1."""
    common = [
        "experiment=smoke",
        "train.max_steps=4",
        "train.log_every=1",
        "train.save_every=0",
        "train.eval_every=0",
        "train.grad_accum=3",
        "train.per_device_batch_size=2",
    ]
    plain, plain_dir = run_training(tmp_path, common, name="plain")
    from rewardctl.training import session

    build = session.build_accelerator

    def with_engine_count(*args, **kwargs) -> Accelerator:
        accelerator = build(*args, **kwargs)
        accelerator.gradient_accumulation_steps = 3
        return accelerator

    monkeypatch.setattr(session, "build_accelerator", with_engine_count)
    emulated, emulated_dir = run_training(tmp_path, common, name="emulated")
    a = [r for r in read_jsonl(plain_dir / "metrics.jsonl") if r["split"] == "train"]
    b = [r for r in read_jsonl(emulated_dir / "metrics.jsonl") if r["split"] == "train"]
    assert len(a) == len(b) == 4
    for x, y in zip(a, b, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-6) and x["grad_norm"] == pytest.approx(
            y["grad_norm"], rel=1e-5
        )
    wa, wb = (
        load_file(str(plain_dir / "model/model.safetensors")),
        load_file(str(emulated_dir / "model/model.safetensors")),
    )
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def _evaluate_train_evaluate_step(model: torch.nn.Module, forward, weights: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """An evaluation forward, two accumulated backward passes, another evaluation before the optimizer
    step and a forward after it: the outputs of the four stacked, and every gathered gradient."""
    with torch.no_grad():
        before = forward()  # an evaluation first: no backward follows this forward
    for _ in range(2):
        trained = forward()
        (trained * weights).sum().backward()
    grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
    with torch.no_grad():  # between the backward and the step: the last layer must not stay gathered
        between = forward()  # (FSDP2 itself then drops the root's gradients, the stock layer too)
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    with torch.no_grad():
        after = forward()  # the sharded weights took the step, the last layer's included
    assert (after - before).abs().max() > 1e-3
    return torch.stack([before, trained.detach(), between, after]), grads


def _fsdp2_case(
    kind: str, at_reads: bool, rank: int
) -> tuple[torch.nn.Module, torch.nn.Module, Any, torch.Tensor, int]:
    """One model of the FSDP2 test, sharded as accelerate's transformer auto-wrap does (each layer,
    then the root): the root, the transformers model, the forward giving its outputs at the reads,
    the weights of those outputs in the loss, and how many tokens the last layer's MLP runs on at the
    reads (3 rows of 7 tokens, one of them 5 long: 21 positions)."""
    from torch.distributed.fsdp import fully_shard
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
        LlamaConfig,
    )

    from rewardctl.data.packing import completion_logit_index, token_read_index
    from rewardctl.modeling.causal import completion_logps
    from rewardctl.modeling.causal_reads import compute_positions_only
    from rewardctl.modeling.common import token_logits
    from rewardctl.modeling.read_slots import ReadSettings
    from rewardctl.modeling.sequence import SequenceRewardModel
    from rewardctl.modeling.token_reads import compute_reads_only

    shape = dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(1 + rank)  # each rank its own batch
    ids = torch.randint(1, 64, (3, 7), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    settings = ReadSettings(skip_padding=False, last_at_reads=at_reads)
    torch.manual_seed(0)
    if kind == "sequence":
        classifier = AutoModelForSequenceClassification.from_config(
            LlamaConfig(**shape, num_labels=1), attn_implementation="sdpa"
        )
        model = SequenceRewardModel(classifier, final_layer_at_reads=at_reads, skip_padding=False)
        forward, weights, reads = (lambda: model(ids, mask)), torch.tensor([1.0, -2.0, 0.5]), 3
    elif kind == "token":  # a PRM's labelled step ends
        read = torch.zeros_like(ids, dtype=torch.bool)
        read[0, [2, 6]] = read[1, 4] = read[2, [1, 3, 6]] = True
        batch = {"input_ids": ids, "attention_mask": mask, **token_read_index(read, mask)}
        model = classifier = AutoModelForTokenClassification.from_config(
            LlamaConfig(**shape, num_labels=2, classifier_dropout=0.0), attn_implementation="sdpa"
        )  # no dropout before the head: both ways draw no random masks
        compute_reads_only(model, settings)
        forward, weights = (lambda: token_logits(model, batch)[0][read]), torch.linspace(-1.0, 2.0, 12).view(6, 2)
        reads = batch["read_columns"].numel()  # 3 rows x 3 read slots
    else:  # a BCO policy's completion tokens
        completion = torch.zeros_like(ids)
        completion[0, 3:] = completion[1, 2:5] = completion[2, 5:] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "completion_mask": completion}
        batch |= completion_logit_index(completion)
        model = classifier = AutoModelForCausalLM.from_config(LlamaConfig(**shape), attn_implementation="sdpa")
        compute_positions_only(model, settings)
        forward, weights = (lambda: completion_logps(model, batch)[0]), torch.tensor([1.0, -2.0, 0.5])
        reads = batch["logit_columns"].numel()  # the predicting positions' slots
    for layer in classifier.model.layers:
        fully_shard(layer)
    fully_shard(model)  # the root: the module the loop prepares
    assert type(classifier.model.layers[-1]).__name__ == "FSDPLlamaDecoderLayer"
    if kind == "sequence":  # FSDP2's class and hooks do not turn it off
        assert (model.read_only_blocker() is None) == at_reads
    return model, classifier, forward, weights, reads


def _fsdp2_read_only_worker(rank: int, store: str) -> None:
    """One of two gloo processes: a Llama reward model, PRM token classifier and BCO policy under FSDP2
    (``_fsdp2_case``), each through ``_evaluate_train_evaluate_step`` with the last layer at the reads
    and then in full; outputs, every gathered gradient and the stepped outputs must agree, and FSDP2
    must not warn that a faster forward returned a view."""
    import torch.distributed as dist

    dist.init_process_group(  # a desynchronised regression fails within two minutes instead of hanging
        "gloo", init_method=f"file://{store}", rank=rank, world_size=2, timeout=timedelta(seconds=120)
    )
    views: list[str] = []  # the stock token classifier's and causal LM's outputs are views (``nn.Linear``
    # on (B, L, H) returns one): only the faster forwards' count
    with warnings.catch_warnings(record=True) as seen_warnings:
        warnings.simplefilter("always")
        for kind in ("sequence", "token", "policy"):
            results = []
            for at_reads in (True, False):
                model, classifier, forward, weights, reads = _fsdp2_case(kind, at_reads, rank)
                seen: list[int] = []  # tokens the last layer's MLP ran on: the reads only, or every position
                classifier.model.layers[-1].mlp.register_forward_hook(
                    lambda _m, args, _o, seen=seen: seen.append(args[0].shape[:-1].numel())
                )
                results.append(_evaluate_train_evaluate_step(model, forward, weights))
                assert seen == [reads if at_reads else 21] * 5, kind  # five forwards
                if at_reads:
                    views += [str(w.message) for w in seen_warnings if "returned a view tensor" in str(w.message)]
                seen_warnings.clear()
            (fast, fast_grads), (full, full_grads) = results
            torch.testing.assert_close(fast, full, atol=1e-5, rtol=0, msg=kind)
            assert fast_grads.keys() == full_grads.keys() and len(full_grads) > 20
            for name, grad in full_grads.items():
                torch.testing.assert_close(fast_grads[name], grad, atol=1e-5, rtol=1e-4, msg=f"{kind}: {name}")
    assert not views, views  # FSDP2 warns when its root module returns a view (in-place risk)
    dist.destroy_process_group()


def test_the_last_layer_at_the_reads_under_fsdp2_equals_the_full_layer(tmp_path: Path):
    """The read-only last layer stops the layer's call after its pre-forward hooks, where FSDP2 gathers
    the weights and hooks the gradients' reduce-scatter, and replays FSDP2's post-forward hook on its own
    output (reshard, re-gather in the backward): two gloo processes on this CPU (a few seconds, so in
    ``make test``) check that the sharded gradients and the stepped weights come out the full layer's,
    an evaluation between the backward and the step included (without the replay it left the weights
    gathered and the step missed them), for a pairwise reward model, a PRM's token classifier at its
    labelled tokens and a BCO policy at its completion-predicting positions."""
    import torch.multiprocessing as mp

    mp.spawn(_fsdp2_read_only_worker, args=(str(tmp_path / "store"),), nprocs=2, join=True)
