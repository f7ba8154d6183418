"""Shared-prefix packing: the responses of one row (a pair, a ranked list) as ONE sequence.

Every response of a preference row repeats the same prompt. Stacking them (one padded sequence per
response) computes the prompt K times; packing computes it once. For a row with token sequences
s_1..s_K whose longest common prefix has p tokens, the packed sequence is

    s_1[:p] + s_1[p:] + s_2[p:] + ... + s_K[p:]

with *segment ids* 0 for the prefix, k for the tokens of response k (1-based) and -1 for padding.
Position ids restart at p in every response block, and a causal decoder given the mask built by
``segment_attention_mask`` (a response token sees the prefix and the earlier tokens of its own
response only) computes for every token exactly what the stacked forward computes: the same keys at
the same positions. Response k's reward is read at the last token of its block.

Everything here is pure tensor/list code so it is unit-tested by hand; the collators call
``pack_rows``, the model calls ``segment_attention_mask``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from rewardctl.data.collate import long_tensor, padded_length

PAD_SEGMENT = -1


def shared_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the longest common token prefix, capped so every sequence keeps at least one token
    of its own (its reward is read at that token; two identical sequences share all but the last)."""
    if not sequences:
        raise ValueError("no sequences")
    first = sequences[0]
    length = max(min(len(s) for s in sequences) - 1, 0)
    for other in sequences[1:]:  # zip, not an index per position: 7x faster per collated batch
        same = 0
        for a, b in zip(first[:length], other, strict=False):  # other may be longer
            if a != b:
                break
            same += 1
        length = same
    return length


def packed_length(lengths: Sequence[int], prefix: int) -> int:
    """Tokens of the packed row: the prefix once plus every response's remainder."""
    return prefix + sum(n - prefix for n in lengths)


def pack_rows(
    rows: Sequence[Sequence[Sequence[int]]],
    pad_value: int,
    *,
    multiple_of: int | None = None,
    buckets: int = 0,
) -> dict[str, Tensor]:
    """Pack each row's sequences into one padded sequence (right padding).

    Returns ``input_ids``, ``position_ids`` and ``segment_ids`` of shape (rows, L) and
    ``reward_index`` of shape (rows, K_max): the flat index (row * L + column) of each response's
    last token, -1 where a row has fewer than K_max responses. The prefix of each row is
    ``shared_prefix_length`` of its sequences.
    """
    if not rows:
        raise ValueError("cannot pack an empty batch")
    prefixes = [shared_prefix_length(seqs) for seqs in rows]
    length = max(packed_length([len(s) for s in seqs], p) for seqs, p in zip(rows, prefixes, strict=True))
    length = padded_length(length, multiple_of=multiple_of, buckets=buckets)
    width = max(len(seqs) for seqs in rows)
    input_ids, position_ids, segment_ids, reward_index = [], [], [], []
    for b, (seqs, p) in enumerate(zip(rows, prefixes, strict=True)):
        ids = list(seqs[0][:p])
        positions = list(range(p))
        segments = [0] * p
        ends = []
        for k, seq in enumerate(seqs, start=1):
            tail = seq[p:]
            ids += tail
            positions += range(p, p + len(tail))
            segments += [k] * len(tail)
            ends.append(b * length + len(ids) - 1)
        pad = length - len(ids)
        input_ids.append(ids + [pad_value] * pad)
        position_ids.append(positions + [0] * pad)
        segment_ids.append(segments + [PAD_SEGMENT] * pad)
        reward_index.append(ends + [-1] * (width - len(ends)))
    return {
        "input_ids": long_tensor(input_ids),
        "position_ids": long_tensor(position_ids),
        "segment_ids": long_tensor(segment_ids),
        "reward_index": long_tensor(reward_index),
    }


def segment_attention_mask(segment_ids: Tensor) -> Tensor:
    """(rows, 1, L, L) boolean mask, True where query i may attend key j.

    Causal (j <= i) and, for a response token, only the prefix (segment 0) or its own response.
    Padding attends only to itself (never an empty row, whose softmax would be NaN) and is never
    attended to.
    """
    length = segment_ids.shape[-1]
    query = segment_ids[:, :, None]
    key = segment_ids[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    visible = causal & (key != PAD_SEGMENT) & (query != PAD_SEGMENT) & ((key == 0) | (key == query))
    visible = visible | torch.eye(length, dtype=torch.bool, device=segment_ids.device)
    return visible[:, None, :, :]


def concat_sequences(sequences: Sequence[Sequence[int]]) -> dict[str, Tensor]:
    """Padding-free layout: every sequence back to back in ONE row, position ids restarting at 0 for
    each. Given no attention mask, transformers reads the sequence boundaries from the position ids
    (flash_attention_2: variable-length kernels; flex_attention, sdpa, eager: a block-diagonal causal
    mask), so no token attends across sequences and none is padding.

    Returns ``input_ids`` and ``position_ids`` of shape (1, T) and ``reward_index`` of shape (N,):
    the position of each sequence's last token.
    """
    if not sequences:
        raise ValueError("cannot concatenate an empty batch")
    ids = [token for sequence in sequences for token in sequence]
    positions = [p for sequence in sequences for p in range(len(sequence))]
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "reward_index": lengths.cumsum(0) - 1,
    }


def unpad_index(attention_mask: Tensor) -> dict[str, Tensor]:
    """Padding-free companion of a padded (rows, L) batch, computed at collate time (no device sync):
    ``flat_index``, the flat positions (row * L + column) of the real tokens in order, and
    ``flat_position_ids`` (1, T), each row's positions restarting at 0."""
    flat_index = attention_mask.flatten().nonzero().squeeze(1)
    positions = (attention_mask.long().cumsum(-1) - 1).flatten()[flat_index]
    return {"flat_index": flat_index, "flat_position_ids": positions[None]}


#: A policy's completion-predicting columns come in one of this many widths per doubling (at most 1/8
#: more slots than the batch's row with the most needs, never past the batch's width; ``padded_length``),
#: so the tensors made at them come in few sizes: with exact widths every batch's (rows, K, ...) buffers
#: had a size of their own and the heap fragmented. BCO on the benchmark decoder (HH-RLHF unpaired rows,
#: 30 steps of 8, bf16, a 1,024-token vocabulary) peaked at 1736-1750 MiB with the last layer at the
#: positions and exact widths, 1562 at multiples of 32. Buckets rather than a fixed multiple: each
#: spare slot costs a row of vocabulary logits (and its float32 copy), 151,936 wide for Qwen2.5, so a
#: batch of short completions must not triple them.
LOGIT_COLUMN_BUCKETS = 8


def _left_aligned(mask: Tensor, buckets: int = 0) -> tuple[Tensor, Tensor]:
    """Each row's True columns of ``mask`` (rows, L) in column order, left-aligned: (order, valid), both
    (rows, K) with K the most any row has (at least 1), rounded up to one of ``buckets`` widths per
    doubling (``padded_length``; at most L); ``order`` is arbitrary where ``valid`` is False."""
    counts = mask.sum(1)
    most = max(int(counts.max()) if counts.numel() else 0, 1)
    width = max(min(padded_length(most, buckets=buckets), mask.shape[1]), most)
    # A stable sort of "not in the mask" lists each row's True columns first, in column order.
    order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices[:, :width]
    return order, torch.arange(width)[None, :] < counts[:, None]


def completion_logit_index(completion_mask: Tensor, flat_index: Tensor | None = None) -> dict[str, Tensor]:
    """Where a policy's logits are needed, computed at collate time (no device sync): token t of a
    completion is predicted by the logits at t - 1, so only those positions need the (usually huge)
    vocabulary projection; the prompt's positions and the padding never do.

    ``logit_columns`` (rows, K): each row's predicting columns in order, left-aligned, K the most any
    row has rounded up to one of ``LOGIT_COLUMN_BUCKETS`` widths per doubling (at most L); the spare entries repeat column 0 and ``logit_valid`` (rows, K) is False there. With a
    padding-free batch's ``flat_index`` (``unpad_index``) the one concatenated row is read at exactly
    the N predicting positions, ``logit_packed`` (N,), in row order, and ``logit_slots`` (rows, K)
    says which of the N each valid entry is (0 at the spare ones). A batch with no completion token
    still gets one spare entry per row, so no tensor is empty."""
    predicting = torch.zeros_like(completion_mask, dtype=torch.bool)
    predicting[:, :-1] = completion_mask[:, 1:].bool()
    order, valid = _left_aligned(predicting, LOGIT_COLUMN_BUCKETS)
    columns = torch.where(valid, order, 0)
    out = {"logit_columns": columns, "logit_valid": valid}
    if flat_index is not None:
        packed_at = torch.zeros(completion_mask.numel(), dtype=torch.long)
        packed_at[flat_index] = torch.arange(flat_index.numel())
        flat = torch.arange(completion_mask.shape[0])[:, None] * completion_mask.shape[1] + columns
        packed = packed_at[flat[valid]]  # row by row, column order: the order of ``valid``'s True entries
        slots = torch.zeros(valid.shape, dtype=torch.long)
        slots[valid] = torch.arange(packed.numel())
        out["logit_packed"] = packed if packed.numel() else torch.zeros(1, dtype=torch.long)
        out["logit_slots"] = slots
    return out


def token_read_index(read_mask: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
    """Where a token classifier's logits are read (a PRM: its labelled tokens), computed at collate
    time (no device sync): ``read_columns`` (rows, R), each row's read columns in order, left-aligned,
    R the most any row has (at least 1), and ``read_valid`` (rows, R). A row's spare entries (and a
    row with no read) repeat its last real token, so every entry's query attends over something (a row
    must hold a real token; every collated PRM row does)."""
    order, valid = _left_aligned(read_mask.bool() & attention_mask.bool())
    last_real = (torch.arange(attention_mask.shape[1]) * attention_mask.bool().long()).argmax(1)
    return {"read_columns": torch.where(valid, order, last_real[:, None]), "read_valid": valid}
