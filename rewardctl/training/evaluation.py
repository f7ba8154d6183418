"""One eval pass, shared by the training loop and `rewardctl eval` so both report identical numbers."""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from torch.utils.data import DataLoader

from rewardctl.config.schema import RunConfig
from rewardctl.data.prepare import by_length
from rewardctl.methods.base import Method


@contextlib.contextmanager
def preserved_rng(accelerator: Accelerator) -> Iterator[None]:
    """Evaluation must not move the training RNG: a resumed run replays the same dropout masks."""
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


def concat_ragged(chunks: list[Tensor]) -> Tensor:
    """Concatenate along dim 0, zero-padding trailing dims (ragged lists come with their own masks)."""
    if chunks[0].ndim <= 1:
        return torch.cat(chunks)
    width = max(c.shape[1] for c in chunks)
    padded = [torch.nn.functional.pad(c, (0, 0) * (c.ndim - 2) + (0, width - c.shape[1])) for c in chunks]
    return torch.cat(padded)


def eval_loader(method: Method, run: RunConfig, accelerator: Accelerator, dataset: Any) -> Any:
    """A prepared split's rows for one eval pass: length-grouped, in order, sharded across processes
    (``rewardctl eval`` and the end-of-run statistics; the training loop adds its data workers)."""
    batch_size = run.train.per_device_eval_batch_size or run.train.per_device_batch_size
    ordered = by_length(dataset, method.lengths(dataset))
    return accelerator.prepare(DataLoader(ordered, batch_size=batch_size, shuffle=False, collate_fn=method.collate))


def gather_outputs(
    accelerator: Accelerator,
    step: Callable[[nn.Module, dict[str, Tensor]], dict[str, Tensor]],
    model: nn.Module,
    loader: Iterable,
    *,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Collective: ``step``'s per-item outputs of every batch from every process, on the CPU, with
    the duplicates of uneven sharding removed by ``gather_for_metrics``. ``progress``: a bar on the
    main process (``rewardctl score``)."""
    was_training = model.training
    model.eval()
    chunks: dict[str, list[Tensor]] = defaultdict(list)
    batches = loader
    if progress and accelerator.is_main_process:
        from tqdm.auto import tqdm

        batches = tqdm(loader, desc="scoring", unit="batch", disable=None)
    with torch.no_grad(), preserved_rng(accelerator):
        for batch in batches:
            out = {k: v.detach() for k, v in step(model, batch).items()}
            if accelerator.num_processes > 1:
                out = {k: accelerator.pad_across_processes(v, dim=1) if v.ndim > 1 else v for k, v in out.items()}
            out = accelerator.gather_for_metrics(out)
            for key, value in out.items():
                chunks[key].append(value.cpu())
    if was_training:
        model.train()
    return {key: concat_ragged(values) for key, values in chunks.items()}


def run_evaluation(
    accelerator: Accelerator, method: Method, model: nn.Module, loader: Iterable
) -> tuple[dict[str, float], dict[str, Tensor]]:
    """Collective: the method's eval outputs of every item (``gather_outputs``) and its metrics."""
    outputs = gather_outputs(accelerator, method.eval_step, model, loader)
    return method.eval_metrics(outputs), outputs
