"""The policy-method family: a causal LM trained on its log-probability ratio to a reference.

BCO (and any KTO-style method) trains a causal-LM policy on unpaired rows, ``prompt``,
``completion``, ``label`` (bool: desirable or undesirable), standard or conversational; paired rows
(``prompt?``, ``chosen``, ``rejected``) are unpaired on the fly. What such methods share lives here,
so a method module holds only its loss, its metrics and its own state:

- model IO: the policy is a stock ``AutoModelForCausalLM`` (or a PEFT adapter over one), built and
  reloaded with dropout off when ``method.disable_dropout``; the saved directory carries the
  method's facts (``saved_meta``) in its config;
- the reference, in this order: an explicit ``method.ref_model``; the policy with its LoRA adapter
  disabled; precomputed log-probs (one pass before training, kept in checkpoints); a frozen copy of
  the starting weights;
- the prompt/completion encoder, unpairing, the batch layout;
- the per-row pre-pass (``_table``), shared out across processes through the ``Runtime`` the loop
  hands over: a method never talks to accelerate or torch.distributed itself;
- eval mode (``eval_mode``) for reference and embedding passes, and ``rewardctl eval``'s reference.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from datasets import Dataset, Features, Json, Value
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from rewardctl.config.schema import Overlength, RunConfig
from rewardctl.data.collate import pad_sequences
from rewardctl.data.packing import completion_logit_index, unpad_index
from rewardctl.data.prepare import (
    ROW_COLUMN,
    ROW_ERROR_COLUMN,
    SOURCE_ROW_COLUMN,
    cells_are_text,
    decode_json,
    featurize_split,
    list_lengths,
    raw_json,
    require_columns,
    row_error_marker,
)
from rewardctl.data.text import (
    Fit,
    apply_chat_template,
    check_bool,
    check_messages,
    check_response_messages,
    check_text,
    fit_prompt_completion,
    is_conversational,
)
from rewardctl.errors import RowError
from rewardctl.methods.base import (
    Method,
    PreparedSplit,
    Runtime,
    budget_label,
    check_token_budget,
    feature_key,
    token_budget,
)
from rewardctl.modeling.adapters import (
    is_adapter_model,
    quantization_config,
    read_saved_meta,
    save_model_dir,
    wants_merged_copy,
    wrap_with_adapter,
)
from rewardctl.modeling.causal import (
    build_causal_lm,
    completion_logps,
    compute_predicting_positions_only,
    frozen_copy,
    load_causal_lm,
)
from rewardctl.modeling.common import takes_logit_positions
from rewardctl.modeling.tokenizer import load_tokenizer, tokenizer_identity

log = logging.getLogger(__name__)
INDEX_COLUMN = "_index"  # position in the prepared split: the key of per-row tables (reference log-probs, UDM weights)
SIDE_COLUMN = "_side"  # which field of a paired row an unpaired row came from, so errors name it


class TruncationMode(str, Enum):
    """Which part of an over-long prompt survives (a leading BOS always does)."""

    keep_end = "keep_end"  # the question, right before the completion
    keep_start = "keep_start"


class PolicyConfig(Protocol):
    """The fields of a method config that ``PolicyMethod`` and ``PromptCompletionEncoder`` read
    (``BcoConfig`` has them all; a KTO-style config would too)."""

    name: str
    max_length: int | None
    max_prompt_length: int | None
    max_completion_length: int | None
    truncation_mode: TruncationMode
    ref_model: str | None
    precompute_ref_log_probs: bool
    disable_dropout: bool


class LocalRuntime:
    """The runtime of a single process (unit tests, or before the loop hands over its own)."""

    device = torch.device("cpu")
    num_processes = 1
    process_index = 0
    is_main_process = True

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        return tensor

    def prepare_frozen(self, module: nn.Module) -> nn.Module:
        module.requires_grad_(False)
        return module.eval()


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers (or PEFT) model inside a DDP / accelerate wrapper, which keeps it in ``.module``:
    the one place policy methods look through wrappers (adapter checks, the model's config)."""
    return getattr(model, "module", model)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Reference and embedding passes run without dropout, whatever mode the policy is in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def masked_sum(values: Tensor, mask: Tensor) -> Tensor:
    """Sum of ``values`` where ``mask`` holds. Boolean indexing (``values[mask]``) would size its
    result on the host, a synchronisation per call; ``where`` keeps the shape fixed."""
    return torch.where(mask, values, torch.zeros_like(values)).sum()


def implicit_rewards(policy_logps: Tensor, reference_logps: Tensor, beta: float) -> Tensor:
    """The implicit reward of each completion, ``r = beta * (log pi(y|x) - log pi_ref(y|x))``, shape (B,).

    Args:
        policy_logps (Tensor): summed log-probabilities of each completion under the policy, shape (B,);
            negative, typically -5 to -500 (about -1 to -3 per completion token).
        reference_logps (Tensor): the same under the reference, shape (B,).
        beta (float): how far the policy may drift from the reference, typically 0.01 to 0.5.

    Returns:
        Tensor: rewards, shape (B,); exactly 0 while the policy is the reference, then typically
        within a few units of 0 (beta times a log-ratio of a few nats).
    """
    return beta * (policy_logps - reference_logps)


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class PromptCompletionEncoder:
    """(prompt ids, completion ids) exactly as the full text tokenises, then fitted to the budget.

    The prompt and prompt + completion are tokenised as wholes and split at their common prefix, so
    BPE merges across the boundary match real text. Standard rows get BOS (when the tokenizer has
    one) before the prompt and EOS after the completion; conversational rows end as the chat template
    ends them (no second EOS). Truncation (``fit_prompt_completion``): the completion to
    ``max_completion_length`` (its start kept), the prompt to ``max_prompt_length`` and, when still
    over budget, down to what the completion leaves but not below half of ``max_length`` (by
    ``truncation_mode``, BOS kept), then the completion to the room left; never to nothing.
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, cfg: PolicyConfig, max_length: int, overlength: Overlength
    ) -> None:
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.max_length = max_length
        self.overlength = overlength
        self.bos = tokenizer.bos_token_id
        self.eos = tokenizer.eos_token_id

    def _template(self, messages: list[dict[str, Any]], field: str, *, generation_prompt: bool) -> list[int]:
        return apply_chat_template(self.tokenizer, messages, field, add_generation_prompt=generation_prompt)

    def split_ids(self, prompt: Any, completion: Any) -> tuple[list[int], list[int]]:
        if is_conversational(completion) or (isinstance(completion, list) and not completion):
            completion = check_response_messages(completion, "completion")
            prompt = check_messages(prompt, "prompt") if prompt not in (None, "", []) else []
            if not getattr(self.tokenizer, "chat_template", None):
                raise RowError("completion", "is a chat message list but the tokenizer has no chat template")
            prompt_ids = self._template(prompt, "prompt", generation_prompt=True) if prompt else []
            full = self._template(prompt + completion, "completion", generation_prompt=False)
        else:
            text = check_text(completion, "completion")
            if is_conversational(prompt):
                raise RowError("prompt", "is a message list but 'completion' is a string; use one format per row")
            prompt_text = check_text(prompt, "prompt", allow_empty=True) if prompt is not None else ""
            prompt_ids = list(self.tokenizer(prompt_text, add_special_tokens=False)["input_ids"]) if prompt_text else []
            full = list(self.tokenizer(prompt_text + text, add_special_tokens=False)["input_ids"])
            if self.bos is not None:
                prompt_ids, full = [self.bos, *prompt_ids], [self.bos, *full]
            if self.eos is not None and full[-1] != self.eos:
                full.append(self.eos)
        boundary = common_prefix_length(prompt_ids, full)
        if boundary >= len(full):
            raise RowError("completion", "adds no token after the prompt")
        return full[:boundary], full[boundary:]

    def fit(self, prompt: list[int], completion: list[int]) -> tuple[list[int], list[int], Fit]:
        cfg = self.cfg
        return fit_prompt_completion(
            prompt,
            completion,
            max_length=self.max_length,
            max_prompt_length=cfg.max_prompt_length,
            max_completion_length=cfg.max_completion_length,
            overlength=self.overlength,
            keep_prompt_end=cfg.truncation_mode == TruncationMode.keep_end,
            bos_id=self.bos,
        )

    def encode_row(self, row: dict[str, Any]) -> tuple[list[int], list[int], Fit]:
        """A row's fitted (prompt, completion) ids; an unpaired row's errors name its source field
        (``chosen`` or ``rejected``), as that is what the user wrote."""
        if row["prompt"] is None:
            raise RowError("prompt", "is missing (null)")
        try:
            prompt, completion = self.split_ids(row["prompt"], row["completion"])
        except RowError as exc:  # a paired row's completion is its chosen or rejected field
            if exc.field == "completion" and row.get(SIDE_COLUMN):
                raise RowError(row[SIDE_COLUMN], exc.reason) from None
            raise
        return self.fit(prompt, completion)


def unpair(dataset: Dataset) -> Dataset:
    """Paired rows (prompt?, chosen, rejected) become two unpaired rows, keeping their file row.

    A row that cannot be unpaired (unreadable, or chosen identical to rejected: one completion both
    desirable and undesirable) becomes one placeholder row carrying its error. Prompts and
    completions travel as JSON text, so rows mixing strings and chat lists unpair too.
    """
    dataset, paths = raw_json(dataset)
    has_prompt = "prompt" in dataset.column_names
    has_source = SOURCE_ROW_COLUMN in dataset.column_names
    has_error = ROW_ERROR_COLUMN in dataset.column_names
    columns = ("prompt", "completion", "label", SOURCE_ROW_COLUMN, SIDE_COLUMN, ROW_ERROR_COLUMN)

    def split(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {name: [] for name in columns}
        for i, index in enumerate(indices):
            row = decode_json({key: values[i] for key, values in batch.items()}, paths)
            source_row = row[SOURCE_ROW_COLUMN] if has_source else index
            error = row[ROW_ERROR_COLUMN] if has_error else None
            if error is None and row["chosen"] is not None and row["chosen"] == row["rejected"]:
                error = row_error_marker(
                    "is identical to 'chosen', so one completion would be both desirable and "
                    "undesirable; data.bad_rows=skip leaves such rows out",
                    "rejected",
                )
            if error is not None:
                for name, value in zip(columns, (None, None, None, source_row, None, error), strict=True):
                    out[name].append(value)
                continue
            prompt = row["prompt"] if has_prompt else None
            chosen, rejected = row["chosen"], row["rejected"]
            if prompt is None:
                prompt, chosen, rejected = _implicit_prompt(chosen, rejected)
            for completion, label, side in ((chosen, True, "chosen"), (rejected, False, "rejected")):
                values = (_json_text(prompt), _json_text(completion), label, source_row, side, None)
                for name, value in zip(columns, values, strict=True):
                    out[name].append(value)
        return out

    features = Features(
        {
            "prompt": Json(decode=False),
            "completion": Json(decode=False),
            "label": Value("bool"),
            SOURCE_ROW_COLUMN: Value("int64"),
            SIDE_COLUMN: Value("string"),
            ROW_ERROR_COLUMN: Value("string"),
        }
    )
    return dataset.map(
        split, batched=True, with_indices=True, remove_columns=dataset.column_names, features=features, desc="unpairing"
    )


def _json_text(value: Any) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False)


def _implicit_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """The shared beginning of chosen and rejected is the prompt (whole messages, or text)."""
    if is_conversational(chosen) and is_conversational(rejected):
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        return chosen[:n], chosen[n:], rejected[n:]
    if isinstance(chosen, str) and isinstance(rejected, str):
        n = len(chosen[: len(rejected)])
        for i, (a, b) in enumerate(zip(chosen, rejected, strict=False)):
            if a != b:
                n = i
                break
        n = min(n, len(chosen) - 1, len(rejected) - 1)
        return chosen[:n], chosen[n:], rejected[n:]
    return "", chosen, rejected


def _row_featurizer(
    encoder: PromptCompletionEncoder, *, text_cells: bool, meaning: str
) -> Callable[[dict[str, Any]], tuple[dict[str, Any], Fit]]:
    """One unpaired row's features. A plain closure over the encoder (not the method), so
    ``featurize_split`` can hand it to worker processes without the models."""

    def featurize(row: dict[str, Any]) -> tuple[dict[str, Any], Fit]:
        label = check_bool(row["label"], "label", meaning, text_cells=text_cells)
        prompt, completion, fit = encoder.encode_row(row)
        return {"input_ids": prompt + completion, "prompt_length": len(prompt), "label": label}, fit

    return featurize


class PolicyMethod(Method):
    """Base of causal-LM policy methods on unpaired desirable / undesirable rows (BCO, KTO-style).

    A subclass supplies ``config_class`` (a config with the ``PolicyConfig`` fields), its loss and
    metrics (``batch_weight``, ``train_step``, ``eval_step``, ``eval_metrics``), and extends
    ``saved_meta`` / ``restore_saved_meta``, ``state_dict`` / ``load_state_dict``, ``check_prepared``
    and ``on_train_start`` with its own state.
    """

    item_name = "rows"
    supports_adapters = True
    padding_free_model = "AutoModelForCausalLM"
    #: What a row's ``label`` means, as a refused row's error says it.
    label_meaning: ClassVar[str] = "true (desirable) or false (undesirable)"
    cfg: PolicyConfig

    def __init__(self, cfg: Any, run: RunConfig) -> None:
        super().__init__(cfg, run)
        self.runtime: Runtime = LocalRuntime()
        self.reference: nn.Module | None = None
        self.ref_tables: dict[str, Tensor] = {}  # split -> log pi_ref per _index
        self.splits: dict[str, Dataset] = {}

    @property
    def max_length(self) -> int:
        return token_budget(self.cfg, self.run)

    @classmethod
    def check_config(cls, run: RunConfig) -> None:
        super().check_config(run)
        check_token_budget(run.method, run)

    # ---- tokenizer and models -------------------------------------------------------------------
    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        tokenizer = load_tokenizer(self.run.model)
        tokenizer.padding_side = "right"
        return tokenizer

    def build_model(self) -> nn.Module:
        model = build_causal_lm(
            self.run.model,
            self.tokenizer,
            self.run.train,
            disable_dropout=self.cfg.disable_dropout,
            quantization=quantization_config(self.run.peft),
        )
        log.info(
            "vocabulary logits %s",
            "at the completion-predicting positions only"
            if takes_logit_positions(model)
            else f"at every position: {type(model).__name__}'s forward does not slice with transformers' "
            "slice_logits_to_keep",
        )
        model = wrap_with_adapter(model, self.run.peft, head=[], task_type="CAUSAL_LM")
        return compute_predicting_positions_only(model, self.run.model, compiled=self.run.train.compile)

    def load_trained(self, path: Path) -> nn.Module:
        model = load_causal_lm(path, self.run.model, disable_dropout=self.cfg.disable_dropout)
        model = compute_predicting_positions_only(model, self.run.model)
        saved = read_saved_meta(path)
        self.restore_saved_meta(saved)
        self.adopt_reward_stats(saved)
        return model

    def saved_meta(self) -> dict[str, Any]:
        """rewardctl's facts written with the final model (config.json, or rewardctl.json beside an
        adapter); a subclass adds what eval needs back (e.g. BCO's delta)."""
        return {"method": self.cfg.name}

    def restore_saved_meta(self, saved: dict[str, Any]) -> None:
        """Take back what ``saved_meta`` wrote, when ``rewardctl eval`` loads the final model."""

    def save_model(self, model: nn.Module, path: Path, state_dict: dict[str, Tensor] | None = None) -> None:
        save_model_dir(
            model,
            self.tokenizer,
            path,
            self.run.model,
            meta={**self.saved_meta(), **(self.reward_normalization or {})},
            state_dict=state_dict,
            save_merged=wants_merged_copy(self.run.peft),
        )

    # ---- data -----------------------------------------------------------------------------------
    def prepare(self, dataset: Any, source: str, *, training: bool) -> PreparedSplit:
        columns = require_columns(dataset, source, ("prompt", "completion", "label"), ("chosen", "rejected"))
        paired = columns == ("chosen", "rejected")
        if paired:
            dataset = unpair(dataset)
        encoder = PromptCompletionEncoder(self.tokenizer, self.cfg, self.max_length, self.run.data.overlength)
        featurize = _row_featurizer(encoder, text_cells=cells_are_text(dataset), meaning=self.label_meaning)
        featurized, report = featurize_split(
            dataset,
            featurize,
            source=source,
            bad_rows=self.run.data.bad_rows,
            num_proc=self.run.data.num_proc,
            cache_key=self.feature_cache_key(),
        )
        featurized = featurized.add_column(INDEX_COLUMN, list(range(len(featurized))))
        labels = featurized["label"]
        report["desirable"] = sum(labels)
        report["undesirable"] = len(labels) - sum(labels)
        report["unpaired_from_pairs"] = paired
        report["budget"] = budget_label(self.cfg, self.run)
        report["truncation_note"] = f"prompt {self.cfg.truncation_mode.value}, completion start kept"
        report["details"] = f"{report['desirable']} desirable, {report['undesirable']} undesirable" + (
            ", unpaired from chosen/rejected" if paired else ""
        )
        self.check_prepared(report, source, training=training)
        self.splits["train" if training else "eval"] = featurized
        return PreparedSplit(featurized, report)

    def check_prepared(self, report: dict[str, Any], source: str, *, training: bool) -> None:
        """Refuse a split the method cannot use (raise DataError naming ``source``); default: any."""

    def feature_cache_key(self) -> tuple[Any, ...]:
        """What shapes the features (``PromptCompletionEncoder``): the truncation settings, the
        effective budget, ``data.overlength`` and the tokenizer. Loss settings (``beta``, delta, UDM,
        the reference) are left out, so a sweep over them tokenises once."""
        return (
            feature_key(self.cfg, "max_prompt_length", "max_completion_length", "truncation_mode"),
            self.max_length,
            self.run.data.overlength,
            tokenizer_identity(self.tokenizer),
        )

    def lengths(self, dataset: Any) -> list[int]:
        return list_lengths(dataset, "input_ids")

    def collate(self, features: list[dict[str, Any]]) -> dict[str, Tensor]:
        """Right-padded ``input_ids``; ``completion_mask`` marks the tokens whose log-probs count, and
        ``completion_logit_index`` the positions whose logits they need."""
        sequences = [f["input_ids"] for f in features]
        input_ids, attention_mask = pad_sequences(sequences, self.tokenizer.pad_token_id, side="right", **self.padding)
        positions = torch.arange(input_ids.shape[1])
        prompt_lengths = torch.tensor([f["prompt_length"] for f in features], dtype=torch.long)
        completion_mask = (positions[None, :] >= prompt_lengths[:, None]).long() * attention_mask
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "completion_mask": completion_mask,
            "prompt_length": prompt_lengths,
            "label": torch.tensor([f["label"] for f in features], dtype=torch.bool),
        }
        if self.padding_free:
            batch.update(unpad_index(attention_mask))
        batch.update(completion_logit_index(completion_mask, batch.get("flat_index")))
        for column, key in ((ROW_COLUMN, "row"), (INDEX_COLUMN, "index")):
            if column in features[0]:
                batch[key] = torch.tensor([f[column] for f in features], dtype=torch.long)
        return batch

    # ---- the reference ----------------------------------------------------------------------------
    def on_train_start(self, model: nn.Module, runtime: Runtime, *, resuming: bool) -> None:
        """Choose the reference while ``model`` holds the starting weights (see the module docstring);
        precomputed tables are restored by ``load_state_dict`` on resume, not recomputed."""
        self.runtime = runtime
        base = unwrap(model)
        if self.cfg.ref_model:
            self.reference = runtime.prepare_frozen(self._load_reference())
        elif is_adapter_model(base):
            log.info("reference: the policy with its adapter disabled (no second copy)")
        elif self.cfg.precompute_ref_log_probs:
            if not resuming:
                self._precompute_reference(model)
        else:
            self.reference = runtime.prepare_frozen(frozen_copy(base))

    def _precompute_reference(self, model: nn.Module) -> None:
        """One no-grad pass of the starting policy over every prepared split: no second model in memory."""
        with eval_mode(model):
            for split, dataset in self.splits.items():
                self.ref_tables[split] = self._table(dataset, lambda b: self._logps(model, b)[0])
        log.info(
            "reference log-probs precomputed for %s",
            ", ".join(f"{len(d)} {s} rows" for s, d in self.splits.items()),
        )

    def on_eval_start(self, model: nn.Module, runtime: Runtime) -> None:
        """``rewardctl eval``: the reference is rebuilt (explicit model, or the starting weights).
        Precomputed tables restored from a checkpoint describe the training run's rows, not the rows
        being evaluated now: they are dropped."""
        self.runtime = runtime
        self.ref_tables.clear()
        if is_adapter_model(unwrap(model)):
            return
        if self.cfg.ref_model:
            self.reference = runtime.prepare_frozen(self._load_reference())
        else:
            from transformers import set_seed  # what the loop's seeding does on CPU / CUDA, without accelerate

            set_seed(self.run.train.seed)  # the starting weights, also for a from-scratch model
            self.reference = runtime.prepare_frozen(self.build_model())

    def _load_reference(self) -> nn.Module:
        reference = load_causal_lm(self.cfg.ref_model, self.run.model, disable_dropout=self.cfg.disable_dropout)
        return compute_predicting_positions_only(reference, self.run.model)

    def _logps(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        return completion_logps(model, batch)

    def _reference_logps(self, model: nn.Module, batch: dict[str, Tensor], split: str) -> Tensor:
        table = self.ref_tables.get(split)
        if table is not None and "index" in batch:
            self.ref_tables[split] = table = table.to(batch["index"].device)  # moved once, not copied every step
            return table[batch["index"]]
        with torch.no_grad():
            if self.reference is not None:
                return self._logps(self.reference, batch)[0]
            base = unwrap(model)
            if is_adapter_model(base):
                with base.disable_adapter(), eval_mode(model):
                    return self._logps(model, batch)[0]
        raise RuntimeError(f"{type(self).__name__} has no reference: call on_train_start or on_eval_start first")

    def _policy_and_reference_logps(
        self, model: nn.Module, batch: dict[str, Tensor], split: str
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """(log pi, log pi_ref in log pi's dtype, the MoE auxiliary loss or None), each of shape (B,)."""
        logps, aux = self._logps(model, batch)
        ref = self._reference_logps(model, batch, split).to(logps.dtype)
        return logps, ref, aux

    @staticmethod
    def with_router_aux_loss(model: nn.Module, loss_sum: Tensor, aux: Tensor | None, rows: int) -> Tensor:
        """``loss_sum`` plus an MoE policy's router loss, ``router_aux_loss_coef * aux`` per row (the loop
        divides the loss sum by rows)."""
        if aux is None:
            return loss_sum
        coefficient = getattr(unwrap(model).config, "router_aux_loss_coef", 0.0)
        return loss_sum + coefficient * aux * rows

    # ---- the per-row pre-pass -------------------------------------------------------------------------
    @torch.no_grad()
    def _table(self, dataset: Dataset, compute: Any, rows: list[int] | None = None, width: int | None = None) -> Tensor:
        """Per-row values (scalars, or vectors of ``width``) over ``rows`` of a split, computed in
        batches shared out across processes and summed back, so every process holds the whole table."""
        rows = list(range(len(dataset))) if rows is None else rows
        size = self.run.train.per_device_eval_batch_size or self.run.train.per_device_batch_size
        runtime = self.runtime
        table = torch.zeros((len(rows), width) if width else (len(rows),), dtype=torch.float32, device=runtime.device)
        chunks = [rows[i : i + size] for i in range(0, len(rows), size)]
        for number, chunk in enumerate(chunks):
            if number % runtime.num_processes != runtime.process_index:
                continue
            batch = {k: v.to(runtime.device) for k, v in self.collate([dataset[i] for i in chunk]).items()}
            start = number * size
            table[start : start + len(chunk)] = compute(batch).float()
        return runtime.all_reduce_sum(table).cpu()

    # ---- state carried in checkpoints ---------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        """Precomputed reference log-probs, so a resume does not recompute them."""
        return {f"ref_logps.{split}": table for split, table in self.ref_tables.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for key, value in state.items():
            if key.startswith("ref_logps."):
                self.ref_tables[key.removeprefix("ref_logps.")] = value
