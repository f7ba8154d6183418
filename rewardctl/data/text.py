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

import math
import re
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


#: Roles chat templates accept: OpenAI's and Hugging Face's (``tool``; Llama 3's ``ipython``; the
#: o1-era ``developer``). Anything else is a typo that some templates render silently and others refuse.
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "ipython")
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?|[+-]?(nan|inf|infinity)", re.IGNORECASE)


def describe_value(value: Any, limit: int = 40) -> str:
    """A value as an error message shows it: its repr, cut to ``limit`` characters (one line)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def json_kind(value: Any) -> str:
    """A value's JSON type, as messages name it. Not its Python type: Arrow widens a column of ints
    holding one float to floats, and a row's error must read the same in any file."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "a list" if isinstance(value, list) else "a JSON object"


def is_conversational(value: Any) -> bool:
    """A list of objects is a chat message list; ``check_messages`` says what is wrong with one.
    (Not "has a 'role' key": Arrow gives every message of a column the keys any message has.)"""
    return isinstance(value, list) and len(value) > 0 and isinstance(value[0], dict)


def check_messages(value: Any, field: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise RowError(field, "must be a non-empty list of chat messages")
    for index, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RowError(field, f"message {index} must be an object with a string 'role'")
        if message["role"] not in CHAT_ROLES:
            raise RowError(
                field, f"message {index} has role {describe_value(message['role'])}; roles are {', '.join(CHAT_ROLES)}"
            )
        if not isinstance(message.get("content"), str):
            raise RowError(field, f"message {index} must have a string 'content'")
    return value


def check_response_messages(value: Any, field: str) -> list[dict[str, Any]]:
    """A response (chosen, rejected, completion, a ranked response) must end in a non-empty answer of
    the assistant: the reward is read there, and a trailing user turn would score the question."""
    messages = check_messages(value, field)
    last = messages[-1]
    if last["role"] != "assistant":
        raise RowError(field, f"ends with a {last['role']!r} message; a response must end with the assistant's answer")
    if not last["content"].strip():
        raise RowError(field, f"message {len(messages) - 1} (the assistant's answer) is empty")
    return messages


def apply_chat_template(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], field: str, **kwargs: Any
) -> list[int]:
    """Token ids of ``messages``; a template that refuses the conversation (e.g. roles out of order)
    becomes a RowError naming the field, not a Jinja traceback."""
    try:
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)
    except Exception as exc:  # noqa: BLE001 - jinja2 raises TemplateError and plain exceptions from raise_exception()
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RowError(field, f"the chat template refused it ({detail})") from None
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def check_text(value: Any, field: str, *, allow_empty: bool = False) -> str:
    if value is None:
        raise RowError(field, "is missing (null)")
    if not isinstance(value, str):
        raise RowError(field, f"must be a string or a list of chat messages, got {json_kind(value)}")
    if not allow_empty and not value.strip():
        raise RowError(field, "is empty")
    return value


def check_number(value: Any, field: str, *, text_cells: bool = False) -> float:
    """A finite number. Text is a number only where every cell is text (CSV/TSV); elsewhere ``"1"``
    is a string written where a number belongs, and coercing it would hide a broken export."""
    if isinstance(value, str) and text_cells and _NUMBER.fullmatch(value.strip()):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        hint = "; write numbers without quotes" if isinstance(value, str) and _NUMBER.fullmatch(value.strip()) else ""
        raise RowError(field, f"must be a finite number, got {describe_number(value)}{hint}")
    if not math.isfinite(value):
        raise RowError(field, f"must be a finite number, got {_float_name(value)}")
    return float(value)


def check_bool(value: Any, field: str, meaning: str, *, text_cells: bool = False) -> bool:
    """true or false; in CSV/TSV cells also the words true/false in any case, nothing else."""
    if isinstance(value, str) and text_cells and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if not isinstance(value, bool):
        raise RowError(field, f"must be {meaning}, got {describe_number(value)}")
    return value


def describe_number(value: Any) -> str:
    """A wrong value where a number belongs, as messages name it: NaN as NaN (not a null), a string
    as the string it is."""
    if isinstance(value, float) and not math.isfinite(value):
        return _float_name(value)
    if isinstance(value, str):
        return f"the string {describe_value(value)}"
    if value is None:
        return "null (missing)"
    if isinstance(value, (list, dict)):
        return f"a {'list' if isinstance(value, list) else 'JSON object'} ({describe_value(value)})"
    if (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and float(value).is_integer()
        and abs(value) < 1e15
    ):
        return str(int(value))  # 1 and 1.0 alike: Arrow may widen a column's ints to floats
    return describe_value(value)


def _float_name(value: float) -> str:
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def check_token_ids(value: Any, field: str, vocab_size: int) -> list[int]:
    """Integer ids. Integral floats pass as the integers they are: Arrow widens a whole list column to
    floats when one row holds a non-integer, and that row, not every other, is the one to blame."""
    if not isinstance(value, list) or not value:
        raise RowError(field, "must be a non-empty list of token ids")
    ids = []
    for position, token in enumerate(value):
        if isinstance(token, float) and token.is_integer():
            token = int(token)
        if isinstance(token, bool) or not isinstance(token, int):
            raise RowError(field, f"must hold integers only; position {position} holds {describe_number(token)}")
        ids.append(token)
    low, high = min(ids), max(ids)
    if low < 0 or high >= vocab_size:
        raise RowError(
            field, f"holds id {high if high >= vocab_size else low}, outside the vocabulary [0, {vocab_size})"
        )
    return ids


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
            messages = check_response_messages(response, response_field)
            if prompt is not None and prompt != "":
                if not is_conversational(prompt):
                    raise RowError(
                        prompt_field, f"is a string but '{response_field}' is a message list; use one format per row"
                    )
                messages = check_messages(prompt, prompt_field) + messages
            return self._apply_template(messages, response_field)
        text = check_text(response, response_field)
        if prompt is not None:
            if is_conversational(prompt):
                raise RowError(
                    prompt_field, f"is a message list but '{response_field}' is a string; use one format per row"
                )
            text = check_text(prompt, prompt_field, allow_empty=True) + text
        ids = list(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        if self.eos_id is not None and (not ids or ids[-1] != self.eos_id):
            ids.append(self.eos_id)
        return ids

    def _apply_template(self, messages: list[dict[str, Any]], field: str) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise RowError(
                field,
                "is a chat message list but the tokenizer has no chat template "
                "(set model.chat_template to a .jinja file)",
            )
        return apply_chat_template(self.tokenizer, messages, field)

    def fit(self, ids: list[int]) -> tuple[list[int], Fit]:
        """Truncation keeps the sequence's end (response and EOS) and a leading BOS / [CLS]."""
        if len(ids) <= self.max_length:
            return ids, Fit.fits
        if self.overlength == Overlength.drop:
            return ids, Fit.too_long
        keep = 1 if ids[0] in self.keep_first else 0
        return ids[:keep] + ids[len(ids) - (self.max_length - keep) :], Fit.truncated

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
            prefix = prefix[:lead] + prefix[len(prefix) - max(room - lead, 0) :] if room > lead else prefix[:lead]
        room = self.max_length - len(prefix)
        return [prefix + (t if len(t) <= room else t[: room - 1] + t[-1:]) for t in tails], Fit.truncated


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
        or (max_prompt_length and len(prompt) > max_prompt_length)
    )
    if not over:
        return prompt, completion, Fit.fits
    if overlength == Overlength.drop:
        return prompt, completion, Fit.too_long

    def cut_prompt(ids: list[int], size: int) -> list[int]:
        if len(ids) <= size:
            return ids
        keep_bos = 1 if ids and bos_id is not None and ids[0] == bos_id else 0
        room = max(size - keep_bos, 0)
        kept = ids[len(ids) - room :] if keep_prompt_end else ids[keep_bos : keep_bos + room]
        return ids[:keep_bos] + (kept if room else [])

    if max_completion_length:
        completion = completion[:max_completion_length]
    if max_prompt_length:
        prompt = cut_prompt(prompt, max_prompt_length)
    if len(prompt) + len(completion) > max_length:
        prompt = cut_prompt(prompt, max(max_length - len(completion), max_length // 2))
    room = max_length - len(prompt)
    if room < 1:
        raise RowError(
            "prompt",
            f"fills the whole budget ({len(prompt)} tokens of max_length {max_length}); "
            "set method.max_prompt_length below the max_length",
        )
    return prompt, completion[:room], Fit.truncated
