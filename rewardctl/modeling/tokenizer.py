"""Loading a tokenizer and making it safe for reward modelling.

The one non-obvious job: the pad token must differ from EOS. Stock transformers sequence classifiers
find the scored position as the rightmost token that is not the pad id; when pad == eos, a sequence
that ends with EOS is scored one token early (trl#937, trl#2758, transformers#35352). rewardctl reads
the reward from the attention mask during training, and makes the saved model agree with it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from rewardctl.config.schema import ModelConfig
from rewardctl.errors import ConfigError

log = logging.getLogger(__name__)

PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]")


def ensure_distinct_pad_token(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Give the tokenizer a pad token distinct from EOS; True when a new token was added (resize!)."""
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return False
    vocab = tokenizer.get_vocab()
    for candidate in PAD_CANDIDATES:
        if candidate in vocab and vocab[candidate] != tokenizer.eos_token_id:
            tokenizer.pad_token = candidate
            log.info(
                "using %s as the pad token (it was %s)", candidate, "missing" if tokenizer.pad_token is None else "EOS"
            )
            return False
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    log.info("added a dedicated <|pad|> token: the tokenizer had none distinct from EOS")
    return True


def read_chat_template(value: str) -> str:
    path = Path(value).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if "{%" in value or "{{" in value:
        return value
    raise ConfigError("model.chat_template", f"{value!r} is neither a file nor a Jinja template")


def load_tokenizer(model_cfg: ModelConfig) -> PreTrainedTokenizerBase:
    name = model_cfg.tokenizer or model_cfg.name_or_path
    key = "model.tokenizer" if model_cfg.tokenizer else "model.name_or_path"
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        detail = str(exc).strip().splitlines()[0]
        raise ConfigError(key, f"cannot load a tokenizer from {name!r}: {detail}") from None
    if model_cfg.chat_template:
        tokenizer.chat_template = read_chat_template(model_cfg.chat_template)
    tokenizer.padding_side = model_cfg.padding_side.value
    ensure_distinct_pad_token(tokenizer)
    return tokenizer


def tokenizer_identity(tokenizer: PreTrainedTokenizerBase) -> tuple[Any, ...]:
    """What about a tokenizer changes token ids (origin, size, special tokens, template): part of the
    tokenisation cache key of every method."""
    return (
        tokenizer.name_or_path,
        len(tokenizer),
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
        getattr(tokenizer, "chat_template", None),
        type(tokenizer).__name__,
    )
