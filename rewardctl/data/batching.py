"""Which rows form each micro-batch of each process, as a pure function of (seed, epoch, position).

Owning this (rather than relying on a sampler's hidden iterator state) is what makes resume exact:
a checkpoint records how many micro-batches were consumed, and the resumed run rebuilds the same
batches and starts at the same place, on every process.

Length grouping (on by default) cuts padding: the shuffled rows are cut into mega-batches of
``group_batches`` batches, each mega-batch is sorted by row length and split into batches, and the
batches are shuffled again. Batches stay random in content but hold rows of similar length. On the
HH-RLHF pairs this raises the share of real (non-pad) tokens from 57% to over 90%.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class EpochBatchSampler(Sampler[list[int]]):
    """Shuffled batches for one process: batch i of the epoch goes to process i % num_replicas.

    Every process gets the same number of batches: the global batch list is padded by repeating its
    first batches (as DistributedSampler repeats rows), so collective operations never deadlock.
    """

    def __init__(
        self,
        num_rows: int,
        batch_size: int,
        *,
        seed: int,
        shuffle: bool = True,
        lengths: Sequence[int] | None = None,
        group_batches: int = 50,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if num_rows < 1:
            raise ValueError("cannot batch an empty dataset")
        if lengths is not None and len(lengths) != num_rows:
            raise ValueError(f"got {len(lengths)} lengths for {num_rows} rows")
        self.num_rows = num_rows
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.lengths = list(lengths) if lengths is not None else None
        self.group_batches = group_batches
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate epoch ``epoch`` from this process's batch number ``start``."""
        self.epoch = epoch
        self.start = start

    def _grouped(self, order: list[int], generator: torch.Generator) -> list[list[int]]:
        lengths = self.lengths
        span = self.batch_size * self.group_batches
        batches = []
        for i in range(0, len(order), span):
            chunk = sorted(order[i : i + span], key=lambda row: -lengths[row])
            batches += [chunk[j : j + self.batch_size] for j in range(0, len(chunk), self.batch_size)]
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        longest = max(range(len(batches)), key=lambda b: max(lengths[row] for row in batches[b]))
        batches[0], batches[longest] = batches[longest], batches[0]  # any out-of-memory shows at step 1
        return batches

    def global_batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.shuffle:
            order = torch.randperm(self.num_rows, generator=generator).tolist()
        else:
            order = list(range(self.num_rows))
        if self.shuffle and self.lengths is not None:
            batches = self._grouped(order, generator)
        else:
            batches = [order[i : i + self.batch_size] for i in range(0, self.num_rows, self.batch_size)]
        padded = math.ceil(len(batches) / self.num_replicas) * self.num_replicas
        return batches + [batches[i % len(batches)] for i in range(padded - len(batches))]

    def __len__(self) -> int:
        """Batches per process per epoch (independent of ``start``)."""
        return math.ceil(math.ceil(self.num_rows / self.batch_size) / self.num_replicas)

    def __iter__(self) -> Iterator[list[int]]:
        mine = self.global_batches()[self.rank :: self.num_replicas]
        yield from mine[self.start :]
