"""Padding helpers shared by the methods' collators."""

from __future__ import annotations

import torch
from torch import Tensor


def pad_sequences(
    sequences: list[list[int]], pad_value: int, *, side: str = "right", multiple_of: int | None = None
) -> tuple[Tensor, Tensor]:
    """Pad to the longest sequence (rounded up to ``multiple_of``): returns (values, attention_mask)."""
    if not sequences:
        raise ValueError("cannot pad an empty list of sequences")
    length = max(len(s) for s in sequences)
    if multiple_of:
        length = -(-length // multiple_of) * multiple_of
    values = torch.full((len(sequences), length), pad_value, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        n = len(seq)
        if side == "left":
            values[row, length - n :] = torch.as_tensor(seq, dtype=torch.long)
            mask[row, length - n :] = 1
        else:
            values[row, :n] = torch.as_tensor(seq, dtype=torch.long)
            mask[row, :n] = 1
    return values, mask
