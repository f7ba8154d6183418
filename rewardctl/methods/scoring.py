"""New rows for a scalar reward model to score: one response, a pair or a list per row, unlabelled.

``rewardctl score`` and ``rewardctl serve`` read rows in whichever shape a user has: a single
``response`` (or ``completion``), a ``chosen``/``rejected`` pair, or a ``responses`` list, each with
an optional ``prompt`` (text or chat messages). Every response is encoded by the training encoder and
a row's responses are fitted into the budget together by ``data.truncation`` (``fit_group``), so a
pair or a list gets exactly the tokens training gave it and scores exactly as ``rewardctl eval`` does.
A single response keeps its end (the rule the saved tokenizer applies too).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from rewardctl.config.schema import RunConfig
from rewardctl.data.packing import shared_prefix_length
from rewardctl.data.prepare import featurize_split, require_columns
from rewardctl.data.text import Fit, SequenceEncoder, is_conversational
from rewardctl.errors import RowError
from rewardctl.methods.base import PreparedSplit
from rewardctl.modeling.tokenizer import tokenizer_identity

#: Feature column: each row's responses, tokenised and fitted.
SCORE_IDS = "score_ids"
#: Per-row feature: tokens the row's responses share at their start.
SCORE_PREFIX = "prefix_length"
#: Input shapes a row may have, first match wins, and the output columns each gives.
LAYOUTS: tuple[tuple[str, ...], ...] = (("responses",), ("chosen", "rejected"), ("response",), ("completion",))
#: Columns the scores are written to (also what ``normalize=true`` rescales).
REWARD_COLUMNS = ("reward", "chosen_reward", "rejected_reward", "rewards")


@dataclass(frozen=True)
class ResponseLayout:
    """Which input columns hold the responses of a row, and where their rewards go."""

    fields: tuple[str, ...]

    def responses(self, row: dict[str, Any]) -> list[tuple[str, Any]]:
        """(field name for errors, response) of every response of ``row``."""
        if self.fields == ("responses",):
            values = row["responses"]
            if not isinstance(values, list) or not values:
                raise RowError("responses", "must be a non-empty list of responses")
            return [(f"responses[{k}]", v) for k, v in enumerate(values)]
        return [(name, row[name]) for name in self.fields]

    def columns(self, values: list[Any]) -> dict[str, Any]:
        """The output columns of one row from its responses' rewards, in input order."""
        if self.fields == ("responses",):
            return {"rewards": values}
        if self.fields == ("chosen", "rejected"):
            return {"chosen_reward": values[0], "rejected_reward": values[1]}
        return {"reward": values[0]}

    def empty_columns(self) -> dict[str, Any]:
        """The columns of a row that could not be scored (skipped as bad, or too long)."""
        if self.fields == ("responses",):
            return {"rewards": None}
        if self.fields == ("chosen", "rejected"):
            return {"chosen_reward": None, "rejected_reward": None}
        return {"reward": None}


def response_layout(dataset: Any, source: str) -> ResponseLayout:
    return ResponseLayout(require_columns(dataset, source, *LAYOUTS))


def prepare_responses(
    dataset: Any, source: str, layout: ResponseLayout, tokenizer: Any, run: RunConfig, *, alone: bool = False
) -> PreparedSplit:
    """Tokenise and fit every row's responses as training does; bad rows by ``data.bad_rows``.
    ``alone``: each response fitted by itself (a method that trains on single responses, regression)."""
    encoder = SequenceEncoder(tokenizer, run.model.max_length, run.data.overlength)
    has_prompt = "prompt" in dataset.column_names
    truncation = run.data.truncation

    def featurize(row: dict[str, Any]) -> tuple[dict[str, Any], Fit]:
        prompt = row["prompt"] if has_prompt else None
        responses = layout.responses(row)
        if len({is_conversational(r) for _, r in responses}) > 1:
            raise RowError(responses[-1][0], "mixes strings and chat message lists; a row must use one format")
        encoded = [encoder.encode(prompt, response, response_field=name) for name, response in responses]
        if alone:
            fits = [encoder.fit(ids) for ids in encoded]
            fitted, fit = [ids for ids, _ in fits], max((f for _, f in fits), key=int)
        else:
            fitted, fit = encoder.fit_group(encoded, truncation)
        return {SCORE_IDS: fitted, SCORE_PREFIX: shared_prefix_length(fitted)}, fit

    featurized, report = featurize_split(
        dataset,
        featurize,
        source=source,
        bad_rows=run.data.bad_rows,
        num_proc=run.data.num_proc,
        cache_key=("score", layout.fields, alone, run.model.max_length, run.data.overlength, truncation)
        + (tokenizer_identity(tokenizer),),
    )
    report["layout"] = "/".join(layout.fields)
    return PreparedSplit(featurized, report)


def rows_of_rewards(values: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Flat per-response values (responses, ...) laid out row by row into (rows, K, ...) with a
    (rows, K) presence mask, K the longest row: what the eval gather pads and concatenates."""
    width = int(counts.max()) if counts.numel() else 0
    present = torch.arange(width, device=counts.device)[None, :] < counts[:, None]
    out = values.new_zeros((counts.shape[0], width, *values.shape[1:]))
    out[present] = values
    return out, present


def records_from_outputs(
    outputs: dict[str, Tensor], layout: ResponseLayout, convert: Callable[[Tensor], Any]
) -> dict[int, dict[str, Any]]:
    """Score columns of each scored row (0-based position), ``convert`` turning one response's
    value into JSON (a float, or a mapping of attribute -> float)."""
    present = outputs["present"].bool()
    records = {}
    for b in range(present.shape[0]):
        values = [convert(outputs["scores"][b, k]) for k in range(int(present[b].sum()))]
        records[int(outputs["row"][b])] = layout.columns(values)
    return records
