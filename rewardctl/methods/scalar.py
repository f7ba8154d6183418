"""What pairwise and ranklist share: a single-output sequence classifier as the reward model.

Both score a sequence with the same model, tokenizer and saved layout, so a model trained by either
method is scored identically (stock ``AutoModelForSequenceClassification`` or ``pipeline``).
"""

from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from rewardctl.config.schema import RunConfig, Truncation
from rewardctl.data.collate import pad_sequences
from rewardctl.data.packing import PAD_SEGMENT, concat_sequences, pack_rows
from rewardctl.data.prepare import ROW_COLUMN
from rewardctl.errors import ConfigError
from rewardctl.methods.base import Method, PreparedSplit
from rewardctl.methods.scoring import (
    REWARD_COLUMNS,
    SCORE_IDS,
    prepare_responses,
    records_from_outputs,
    response_layout,
    rows_of_rewards,
)
from rewardctl.modeling.adapters import quantization_config, read_saved_meta, wants_merged_copy, wrap_with_adapter
from rewardctl.modeling.sequence import (
    REWARD_LABELS,
    SequenceRewardModel,
    build_sequence_classifier,
    head_name,
    load_saved_classifier,
    prefix_sharing_blocker,
    save_sequence_classifier,
)
from rewardctl.modeling.tokenizer import load_tokenizer

log = logging.getLogger(__name__)
#: Per-row feature: tokens the row's responses share at their start (see rewardctl.data.packing).
PREFIX_COLUMN = "prefix_length"
#: Batch keys the reward model reads; everything else in a batch (ranks, margins, rows) is the loss's.
MODEL_INPUTS = ("input_ids", "attention_mask", "segment_ids", "position_ids", "reward_index")


class ScalarRewardMethod(Method):
    """A method whose trainable module maps a sequence to one reward."""

    supports_adapters = True
    padding_free_model = "AutoModelForSequenceClassification"

    @classmethod
    def check_config(cls, run: RunConfig) -> None:
        if run.data.padding_free == "true" and run.data.share_prefix == "true":
            raise ConfigError(
                "data.padding_free",
                "true and data.share_prefix=true exclude each other (a padding-free row holds no 4-D mask); choose one",
            )
        super().check_config(run)
        if run.data.share_prefix == "true":
            blocker = prefix_sharing_blocker(run.model)
            if blocker is not None:
                raise ConfigError(
                    "data.share_prefix",
                    f"true cannot be exact for {run.model.name_or_path!r} "
                    f"({blocker}); use data.share_prefix=auto or false",
                )

    @cached_property
    def shares_prefix(self) -> bool:
        """Whether batches pack each row's responses behind one shared prefix (``data.share_prefix``)."""
        if self.run.data.share_prefix == "false" or self.padding_free:
            return False
        blocker = prefix_sharing_blocker(self.run.model)
        if blocker is not None:
            log.info("shared-prefix batches off: %s", blocker)
        return blocker is None

    def response_batch(self, rows: list[list[list[int]]], *, response_major: bool) -> dict[str, Tensor]:
        """Model inputs for every response of every row (``rows[b][k]``), packed behind each row's shared
        prefix or stacked one per sequence. Rewards come out response-major (k, then b: a batch of pairs
        gives every chosen, then every rejected) or row-major (b, then k: list by list)."""
        if self.padding_free:
            order = range(len(rows[0])) if response_major else None
            sequences = [row[k] for k in order for row in rows] if order else [s for row in rows for s in row]
            return concat_sequences(sequences)
        if self.shares_prefix:
            packed = pack_rows(rows, self.tokenizer.pad_token_id, **self.padding)
            index = packed["reward_index"].T if response_major else packed["reward_index"]
            index = index.flatten()
            packed["reward_index"] = index[index >= 0]
            return packed
        if response_major:
            sequences = [row[k] for k in range(len(rows[0])) for row in rows]
        else:
            sequences = [sequence for row in rows for sequence in row]
        input_ids, attention_mask = pad_sequences(
            sequences,
            self.tokenizer.pad_token_id,
            side=self.tokenizer.padding_side,
            **self.padding,
        )
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def packed_lengths(self, dataset: Any, columns: tuple[str, ...]) -> list[int]:
        """Per-row tokens of the packed sequence: every response's tokens less the repeated prefixes."""
        totals, counts, prefixes = _row_token_counts(dataset, columns)
        return (totals - (counts - 1) * prefixes).tolist()

    def report_sharing(self, dataset: Any, report: dict[str, Any], columns: tuple[str, ...]) -> None:
        """Add the truncation rule and, with shared-prefix batches, the tokens the prefix saves."""
        rule = self.run.data.truncation
        report["truncation"] = rule.value
        report["truncation_note"] = (
            "prompt end, response starts and final tokens kept"
            if rule == Truncation.prompt_end
            else "sequence ends kept"
        )
        report["share_prefix"] = self.shares_prefix
        if not self.shares_prefix:
            return
        totals, counts, prefixes = _row_token_counts(dataset, columns)
        stacked, saved = int(totals.sum()), int(((counts - 1) * prefixes).sum())
        report["tokens_stacked"], report["tokens_packed"] = stacked, stacked - saved
        note = f"shared prefix: {stacked - saved} tokens instead of {stacked} ({saved / max(stacked, 1):.1%} saved)"
        report["details"] = f"{report['details']}; {note}" if report.get("details") else note

    @staticmethod
    def rewards(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """One reward per response of the batch, in the order ``response_batch`` laid out."""
        return model(**{key: batch[key] for key in MODEL_INPUTS if key in batch})

    @staticmethod
    def response_count(batch: dict[str, Tensor]) -> int:
        return batch["reward_index"].numel() if "reward_index" in batch else batch["input_ids"].shape[0]

    @staticmethod
    def token_count(batch: dict[str, Tensor]) -> Tensor:
        """Tokens the model computed (padding excluded; a shared prefix counts once)."""
        if "segment_ids" in batch:
            return (batch["segment_ids"] != PAD_SEGMENT).sum()
        if "attention_mask" in batch:
            return batch["attention_mask"].sum()
        return torch.tensor(batch["input_ids"].numel())

    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        return load_tokenizer(self.run.model)

    def _wrap(self, classifier: nn.Module) -> SequenceRewardModel:
        model = SequenceRewardModel(
            classifier,
            final_layer_at_reads=self.run.model.final_layer_at_reads,
            skip_padding=self.run.model.skip_padding,
        )
        blocker = model.read_only_blocker()
        if model.pooling == "last_token":
            where = f"at every token: {blocker}" if blocker else "at the reward tokens only"
            if not blocker and self.run.train.compile:
                where += " in eval (train.compile traces the full last layer: no graph break)"
            log.info("last layer %s", where)
        else:
            log.info("last layer %s", f"at every token: {blocker}" if blocker else "at the pooled first token only")
        skipping = model.skip_padding_blocker()
        if skipping is None and self.run.train.compile:
            skipping = "train.compile traces the padded layers in training"
        log.info(
            "%s layers %s",
            "decoder" if model.pooling == "last_token" else "encoder",
            f"over the padding too: {skipping}" if skipping else "on the real tokens of CPU batches only",
        )
        if model.pooling == "native" and self.tokenizer.padding_side != "right":
            log.warning("%s pools its first token ([CLS]); padding on the right", type(classifier).__name__)
            self.tokenizer.padding_side = "right"
        return model

    @property
    def output_labels(self) -> tuple[str, ...]:
        """The names of the model's outputs, saved as ``id2label``: one reward here; a method scoring
        several attributes names each."""
        return REWARD_LABELS

    def build_model(self) -> nn.Module:
        classifier = build_sequence_classifier(
            self.run.model,
            self.tokenizer,
            self.run.train,
            quantization_config(self.run.peft),
            labels=self.output_labels,
        )
        # With LoRA the head trains in full and is saved with the adapter (modules_to_save).
        classifier = wrap_with_adapter(classifier, self.run.peft, head=[head_name(classifier)], task_type="SEQ_CLS")
        return self._wrap(classifier)

    def load_trained(self, path: Path) -> nn.Module:
        classifier = load_saved_classifier(path, self.run.model, labels=self.output_labels)
        saved = read_saved_meta(path)
        self.restore_facts(saved)
        self.adopt_reward_stats(saved)
        return self._wrap(classifier)

    def save_model(self, model: nn.Module, path: Path, state_dict: dict[str, Tensor] | None = None) -> None:
        save_sequence_classifier(
            model,
            self.tokenizer,
            path,
            self.run.model,
            method=self.cfg.name,
            state_dict=state_dict,
            save_merged=wants_merged_copy(self.run.peft),
            facts={**self.saved_facts(), **(self.reward_normalization or {})},
        )

    def saved_facts(self) -> dict[str, Any]:
        """JSON facts a scorer needs besides the weights (e.g. how outputs map back to the data's
        scale), saved under ``rewardctl`` in the model's config.json."""
        return {}

    def restore_facts(self, facts: dict[str, Any]) -> None:
        """Take back what ``saved_facts`` wrote, when a saved model is loaded (``rewardctl eval``)."""

    # ---- scoring new rows (rewardctl score / serve) --------------------------------------------
    reward_columns = REWARD_COLUMNS
    #: Fit each response of a scored row by itself (the method trains on single responses).
    scores_responses_alone: bool = False

    def score_prepare(self, dataset: Any, source: str) -> PreparedSplit:
        self._score_layout = response_layout(dataset, source)
        return prepare_responses(
            dataset, source, self._score_layout, self.tokenizer, self.run, alone=self.scores_responses_alone
        )

    def score_lengths(self, dataset: Any) -> list[int]:
        """A row's cost in a batch: its packed length with a shared prefix, else its longest response."""
        if self.shares_prefix:
            return self.packed_lengths(dataset, (SCORE_IDS,))
        totals = dataset.with_format("arrow")[:][SCORE_IDS].combine_chunks()
        import pyarrow.compute as pc

        tokens = pc.list_value_length(totals.flatten()).to_numpy(zero_copy_only=False)
        return np.maximum.reduceat(tokens, totals.offsets.to_numpy()[:-1]).tolist()

    def score_collate(self, features: list[dict[str, Any]]) -> dict[str, Tensor]:
        batch = self.response_batch([f[SCORE_IDS] for f in features], response_major=False)
        batch["score_counts"] = torch.tensor([len(f[SCORE_IDS]) for f in features], dtype=torch.long)
        batch["row"] = torch.tensor([f[ROW_COLUMN] for f in features], dtype=torch.long)
        return batch

    def scored_values(self, rewards: Tensor) -> Tensor:
        """The model's outputs (responses, outputs) as the values to report; a method whose outputs
        are on another scale (regression's standardised targets) maps them back."""
        return rewards

    def score_step(self, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        counts = batch["score_counts"]
        rewards = self.rewards(model, batch).float().reshape(int(counts.sum()), -1)
        values = self.scored_values(rewards)
        values = values.squeeze(-1) if values.shape[-1] == 1 else values
        scores, present = rows_of_rewards(values, counts)
        return {"scores": scores, "present": present.long(), "row": batch["row"]}

    def score_records(self, outputs: dict[str, Tensor]) -> dict[int, dict[str, Any]]:
        labels = self.output_labels

        def convert(value: Tensor) -> Any:
            if value.ndim == 0:
                return float(value)
            return dict(zip(labels, (float(v) for v in value), strict=True))

        return records_from_outputs(outputs, self._score_layout, convert)


def _row_token_counts(dataset: Any, columns: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row, computed in Arrow: (tokens over all responses, number of responses, shared prefix).
    ``columns`` names one list-of-sequences column (a ranked list) or one column per response (a pair)."""
    import pyarrow.compute as pc

    table = dataset.with_format("arrow")[:]
    prefixes = table[PREFIX_COLUMN].to_numpy().astype(np.int64)
    if len(columns) == 1:
        lists = table[columns[0]].combine_chunks()
        tokens = pc.list_value_length(lists.flatten()).to_numpy(zero_copy_only=False).astype(np.int64)
        counts = pc.list_value_length(lists).to_numpy(zero_copy_only=False).astype(np.int64)
        return np.add.reduceat(tokens, lists.offsets.to_numpy()[:-1]), counts, prefixes
    tokens = sum(pc.list_value_length(table[c]).to_numpy(zero_copy_only=False).astype(np.int64) for c in columns)
    return tokens, np.full(len(prefixes), len(columns), dtype=np.int64), prefixes
