"""From a row's text fields to token ids, identically for training, evaluation and scoring.

Two row formats exist (as in TRL): *standard* rows hold strings, *conversational* rows hold chat
message lists. A prompt is optional (implicit prompt: the response field holds the whole sequence).
Standard text is tokenised in one piece (prompt + response, no separator, so BPE merges match the
real text) with the tokenizer's special tokens and an EOS appended when absent; conversational rows
go through the chat template and end as the template ends them (no extra EOS; with ChatML that is
``<|im_end|>`` and a newline, so the reward is read at that newline, in training as in stock
transformers scoring).
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any

from transformers import PreTrainedTokenizerBase

from rewardctl.config.schema import Overlength, Truncation
from rewardctl.data.packing import shared_prefix_length
from rewardctl.errors import RowError


class Fit(IntEnum):
    """Outcome of fitting a sequence into the token budget."""

    fits = 0
    truncated = 1
    too_long = 2  # overlength=drop: the row is removed and counted


def is_conversational(value: Any) -> bool:
    return isinstance(value, list) and len(value) > 0 and isinstance(value[0], dict) and "role" in value[0]


def check_messages(value: Any, field: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise RowError(field, "must be a non-empty list of chat messages")
    for index, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RowError(field, f"message {index} must be an object with a string 'role'")
        if not isinstance(message.get("content"), str):
            raise RowError(field, f"message {index} must have a string 'content'")
    return value


def check_text(value: Any, field: str, *, allow_empty: bool = False) -> str:
    if value is None:
        raise RowError(field, "is missing (null)")
    if not isinstance(value, str):
        raise RowError(field, f"must be a string or a list of chat messages, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RowError(field, "is empty")
    return value


def check_token_ids(value: Any, field: str, vocab_size: int) -> list[int]:
    if not isinstance(value, list) or not value:
        raise RowError(field, "must be a non-empty list of token ids")
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise RowError(field, "must hold integers only")
    low, high = min(value), max(value)
    if low < 0 or high >= vocab_size:
        raise RowError(field, f"holds id {high if high >= vocab_size else low}, outside the vocabulary [0, {vocab_size})")
    return list(value)


class SequenceEncoder:
    """Encodes (prompt, response) pairs and fits them into ``max_length`` tokens."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int, overlength: Overlength) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.overlength = overlength
        self.eos_id = tokenizer.eos_token_id
        # A leading BOS / [CLS] survives truncation: models are trained with it at position 0.
        self.keep_first = {t for t in (tokenizer.bos_token_id, tokenizer.cls_token_id) if t is not None}
        self.vocab_size = len(tokenizer)

    def encode(self, prompt: Any, response: Any, *, prompt_field: str = "prompt", response_field: str) -> list[int]:
        if is_conversational(response) or (isinstance(response, list) and not response):
            messages = check_messages(response, response_field)
            if prompt is not None and prompt != "":
                if not is_conversational(prompt):
                    raise RowError(prompt_field, f"is a string but '{response_field}' is a message list; use one format per row")
                messages = check_messages(prompt, prompt_field) + messages
            return self._apply_template(messages, response_field)
        text = check_text(response, response_field)
        if prompt is not None:
            if is_conversational(prompt):
                raise RowError(prompt_field, f"is a message list but '{response_field}' is a string; use one format per row")
            text = check_text(prompt, prompt_field, allow_empty=True) + text
        ids = list(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        if self.eos_id is not None and (not ids or ids[-1] != self.eos_id):
            ids.append(self.eos_id)
        return ids

    def _apply_template(self, messages: list[dict[str, Any]], field: str) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise RowError(field, "is a chat message list but the tokenizer has no chat template "
                                  "(set model.chat_template to a .jinja file)")
        out = self.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
        if isinstance(out, dict) or hasattr(out, "keys"):
            out = out["input_ids"]
        return list(out)

    def fit(self, ids: list[int]) -> tuple[list[int], Fit]:
        """Truncation keeps the sequence's end (response and EOS) and a leading BOS / [CLS]."""
        if len(ids) <= self.max_length:
            return ids, Fit.fits
        if self.overlength == Overlength.drop:
            return ids, Fit.too_long
        keep = 1 if ids[0] in self.keep_first else 0
        return ids[:keep] + ids[len(ids) - (self.max_length - keep):], Fit.truncated

    def fit_group(self, sequences: list[list[int]], rule: Truncation) -> tuple[list[list[int]], Fit]:
        """Fit the responses of one row (a pair, a list) into the budget together.

        ``sequence_end``: each sequence by ``fit``. ``prompt_end``: the row's shared prefix (the prompt)
        keeps its end, cut to what the longest response leaves but never below half the budget (a
        leading BOS / [CLS] survives); each response keeps its start and its final token (EOS, or the
        chat template's last token, where the reward is read). Responses that differ anywhere in the
        budget stay distinct, and all still share one prefix.
        """
        if all(len(ids) <= self.max_length for ids in sequences):
            return sequences, Fit.fits
        if self.overlength == Overlength.drop:
            return sequences, Fit.too_long
        if rule == Truncation.sequence_end:
            return [self.fit(ids)[0] for ids in sequences], Fit.truncated
        shared = shared_prefix_length(sequences)
        prefix, tails = sequences[0][:shared], [ids[shared:] for ids in sequences]
        room = min(shared, max(self.max_length - max(len(t) for t in tails), self.max_length // 2))
        if room < shared:
            lead = 1 if prefix[0] in self.keep_first else 0
            prefix = prefix[:lead] + prefix[len(prefix) - max(room - lead, 0):] if room > lead else prefix[:lead]
        room = self.max_length - len(prefix)
        return [prefix + (t if len(t) <= room else t[:room - 1] + t[-1:]) for t in tails], Fit.truncated


def fit_prompt_completion(
    prompt: list[int],
    completion: list[int],
    *,
    max_length: int,
    max_prompt_length: int | None,
    max_completion_length: int | None,
    overlength: Overlength,
    keep_prompt_end: bool = True,
    bos_id: int | None = None,
) -> tuple[list[int], list[int], Fit]:
    """Fit a (prompt, completion) pair for methods that score the completion (BCO, PRM).

    A pair within every limit is returned as is; with ``overlength=drop`` an over-long pair is marked
    ``too_long``. Otherwise, in order: the completion to ``max_completion_length`` (its start kept);
    the prompt to an explicit ``max_prompt_length``; if still over ``max_length``, the prompt down to
    what the completion leaves but never below half the budget (its end kept with ``keep_prompt_end``;
    a leading BOS always survives); then the completion to the room left. The completion keeps at
    least one token.
    """
    over = len(prompt) + len(completion) > max_length or bool(
        (max_completion_length and len(completion) > max_completion_length)
        or (max_prompt_length and len(prompt) > max_prompt_length))
    if not over:
        return prompt, completion, Fit.fits
    if overlength == Overlength.drop:
        return prompt, completion, Fit.too_long

    def cut_prompt(ids: list[int], size: int) -> list[int]:
        if len(ids) <= size:
            return ids
        keep_bos = 1 if ids and bos_id is not None and ids[0] == bos_id else 0
        room = max(size - keep_bos, 0)
        kept = ids[len(ids) - room:] if keep_prompt_end else ids[keep_bos:keep_bos + room]
        return ids[:keep_bos] + (kept if room else [])

    if max_completion_length:
        completion = completion[:max_completion_length]
    if max_prompt_length:
        prompt = cut_prompt(prompt, max_prompt_length)
    if len(prompt) + len(completion) > max_length:
        prompt = cut_prompt(prompt, max(max_length - len(completion), max_length // 2))
    room = max_length - len(prompt)
    if room < 1:
        raise RowError("prompt", f"fills the whole budget ({len(prompt)} tokens of max_length {max_length}); "
                                 "set method.max_prompt_length below the max_length")
    return prompt, completion[:room], Fit.truncated
