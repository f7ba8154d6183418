"""The public method API: everything a method module needs, in one import.

A new method (built in, or a user's own, loaded through ``hydra.searchpath``)
imports from here only, so the package's internal layout can change without breaking it. What is
here is covered by the tests of the built-in methods that use it.

- ``Method`` (the interface the loop drives), ``ScalarRewardMethod`` (a sequence classifier as the
  model: tokenizer, build/save/load, stacked or shared-prefix batches), ``Metric``/``Reduce``/
  ``StepOutput``/``PreparedSplit`` (what a step and a split return), ``Runtime``.
- ``PolicyMethod`` (a causal-LM policy scored against a reference on unpaired desirable/undesirable
  rows: model IO, the reference, encoding, unpairing, the per-row pre-pass; BCO's base, and a
  KTO-style method's), ``implicit_rewards``, ``masked_sum``, ``LocalRuntime`` (a one-process
  ``Runtime`` for unit tests).
- Losses, pure functions of tensors: ``bco_loss``.
- Config: ``MethodConfig`` (extend it with a dataclass; the YAML's ``_target_`` names the class,
  which sets ``config_class``), ``RunConfig``, ``ConfigError``.
- Data: ``featurize_split`` (tokenise every row, bad rows named or skipped), ``require_columns``,
  ``SequenceEncoder`` (prompt + response → token ids within the budget), ``check_number``/
  ``check_text``/``check_token_ids``, ``RowError`` (a bad field in one row), ``ROW_COLUMN``,
  ``cells_are_text``, ``list_lengths``, ``feature_key``/``tokenizer_identity`` (tokenisation cache keys).
- Saved models: ``read_saved_meta`` (the facts ``saved_facts`` wrote, read before loading the weights).
"""

from __future__ import annotations

from rewardctl.config.schema import MethodConfig, RunConfig, Truncation
from rewardctl.data.prepare import ROW_COLUMN, cells_are_text, featurize_split, list_lengths, require_columns
from rewardctl.data.text import Fit, SequenceEncoder, check_number, check_text, check_token_ids, is_conversational
from rewardctl.errors import ConfigError, DataError, RowError
from rewardctl.methods.base import (
    Method,
    Metric,
    PreparedSplit,
    Reduce,
    Runtime,
    StepOutput,
    feature_key,
    within_chance,
)
from rewardctl.methods.bco import bco_loss
from rewardctl.methods.policy import LocalRuntime, PolicyMethod, implicit_rewards, masked_sum
from rewardctl.methods.scalar import ScalarRewardMethod
from rewardctl.modeling.adapters import read_saved_meta
from rewardctl.modeling.tokenizer import tokenizer_identity

__all__ = [
    "ROW_COLUMN",
    "ConfigError",
    "DataError",
    "Fit",
    "LocalRuntime",
    "Method",
    "MethodConfig",
    "Metric",
    "PolicyMethod",
    "PreparedSplit",
    "Reduce",
    "RowError",
    "RunConfig",
    "Runtime",
    "ScalarRewardMethod",
    "SequenceEncoder",
    "StepOutput",
    "Truncation",
    "bco_loss",
    "cells_are_text",
    "check_number",
    "check_text",
    "check_token_ids",
    "feature_key",
    "featurize_split",
    "implicit_rewards",
    "is_conversational",
    "list_lengths",
    "masked_sum",
    "read_saved_meta",
    "require_columns",
    "tokenizer_identity",
    "within_chance",
]
