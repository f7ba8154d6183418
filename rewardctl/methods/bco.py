"""Binary Classifier Optimization (arXiv 2404.04656): a causal-LM policy whose implicit reward
``r = beta * (log pi(y|x) - log pi_ref(y|x))`` separates desirable from undesirable completions.

Rows: ``prompt``, ``completion``, ``label`` (bool), standard or conversational; paired rows
(``prompt?``, ``chosen``, ``rejected``) are unpaired on the fly. The reference is, in this order: an
explicit ``method.ref_model``; the policy with its LoRA adapter disabled; precomputed log-probs
(one pass before training, kept in checkpoints); a frozen copy of the starting weights.
``delta`` is the running count-weighted mean of every training reward, reduced across processes,
updated per micro-batch before it is read, frozen in eval and saved in checkpoints and in the final
model's config.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, Features, Json, Value
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from rewardctl.config.schema import BcoConfig, Overlength, RunConfig, TruncationMode
from rewardctl.data.collate import pad_sequences
from rewardctl.data.packing import unpad_index
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
from rewardctl.errors import ConfigError, DataError, RowError
from rewardctl.methods.base import (
    Method,
    Metric,
    PreparedSplit,
    Runtime,
    StepOutput,
    budget_label,
    check_token_budget,
    feature_key,
    token_budget,
)
from rewardctl.methods.udm import PromptClassifier, fit_balanced_logistic_regression
from rewardctl.modeling.adapters import (
    is_adapter_model,
    quantization_config,
    read_saved_meta,
    save_model_dir,
    wants_merged_copy,
    wrap_with_adapter,
)
from rewardctl.modeling.causal import build_causal_lm, completion_logps, frozen_copy, load_causal_lm, mean_pooled_prompt
from rewardctl.modeling.tokenizer import load_tokenizer, tokenizer_identity

log = logging.getLogger(__name__)
INDEX_COLUMN = "_index"  # position in the prepared split: the key of per-row tables (reference log-probs, UDM weights)
SIDE_COLUMN = "_side"  # which field of a paired row an unpaired row came from, so errors name it


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


class RunningMean:
    """delta: the count-weighted mean of every training reward seen so far, on every process alike.

    ``total`` and ``count`` are float64 tensors that move to the rewards' device on the first update
    and stay there: a training step never waits for the host. ``tensor`` is what the loss reads;
    ``value`` (a host float, one synchronisation) is for eval summaries, logs and saved models.
    """

    def __init__(self) -> None:
        self.total = torch.zeros((), dtype=torch.float64)
        self.count = torch.zeros((), dtype=torch.float64)

    @property
    def tensor(self) -> Tensor:
        """delta as a 0-dim float64 tensor on the device of ``total`` (0 before any reward)."""
        return torch.where(self.count > 0, self.total / self.count, torch.zeros_like(self.total))

    @property
    def value(self) -> float:
        return self.tensor.item()

    def update(self, rewards: Tensor, runtime: Runtime) -> None:
        size = torch.full((), float(rewards.numel()), dtype=torch.float64, device=rewards.device)  # no host copy
        summed = runtime.all_reduce_sum(torch.stack([rewards.detach().double().sum(), size]))
        self.total = self.total.to(summed.device) + summed[0]
        self.count = self.count.to(summed.device) + summed[1]


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
        self, tokenizer: PreTrainedTokenizerBase, cfg: BcoConfig, max_length: int, overlength: Overlength
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


class BcoMethod(Method):
    config_class = BcoConfig
    primary_metric = "accuracy"
    item_name = "rows"
    supports_adapters = True
    padding_free_model = "AutoModelForCausalLM"
    cfg: BcoConfig

    def __init__(self, cfg: BcoConfig, run: RunConfig) -> None:
        super().__init__(cfg, run)
        self.delta = RunningMean()
        self.runtime: Runtime = LocalRuntime()
        self.reference: nn.Module | None = None
        self.ref_tables: dict[str, Tensor] = {}  # split -> log pi_ref per _index
        self.udm: PromptClassifier | None = None
        self.udm_weights: Tensor | None = None  # per train _index (1 for desirable rows)
        self.splits: dict[str, Dataset] = {}

    @property
    def max_length(self) -> int:
        return token_budget(self.cfg, self.run)

    @classmethod
    def check_config(cls, run: RunConfig) -> None:
        super().check_config(run)
        m: BcoConfig = run.method
        check_token_budget(m, run)
        if m.beta <= 0:
            raise ConfigError("method.beta", f"must be > 0 (got {m.beta})")
        if not 0 < m.min_density_ratio <= m.max_density_ratio:
            raise ConfigError(
                "method.min_density_ratio",
                f"need 0 < min_density_ratio <= max_density_ratio (got {m.min_density_ratio}, {m.max_density_ratio})",
            )
        if m.prompt_sample_size < 2:
            raise ConfigError("method.prompt_sample_size", f"must be >= 2 (got {m.prompt_sample_size})")
        if m.udm.l2 <= 0:
            raise ConfigError("method.udm.l2", f"must be > 0 (got {m.udm.l2})")

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
        return wrap_with_adapter(model, self.run.peft, head=[], task_type="CAUSAL_LM")

    def load_trained(self, path: Path) -> nn.Module:
        model = load_causal_lm(path, self.run.model, disable_dropout=self.cfg.disable_dropout)
        saved = read_saved_meta(path)
        if "delta_total" in saved:
            self.delta.total = torch.tensor(saved["delta_total"], dtype=torch.float64)
            self.delta.count = torch.tensor(saved["delta_count"], dtype=torch.float64)
        return model

    def save_model(self, model: nn.Module, path: Path, state_dict: dict[str, Tensor] | None = None) -> None:
        meta = {
            "method": self.cfg.name,
            "beta": self.cfg.beta,
            "delta": self.delta.value,
            "delta_total": float(self.delta.total),
            "delta_count": float(self.delta.count),
        }
        save_model_dir(
            model,
            self.tokenizer,
            path,
            self.run.model,
            meta=meta,
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
        text_cells = cells_are_text(dataset)
        meaning = "true (desirable) or false (undesirable)"

        def featurize(row: dict[str, Any]) -> tuple[dict[str, Any], Fit]:
            label = check_bool(row["label"], "label", meaning, text_cells=text_cells)
            if row["prompt"] is None:
                raise RowError("prompt", "is missing (null)")
            try:
                prompt, completion = encoder.split_ids(row["prompt"], row["completion"])
            except RowError as exc:  # a paired row's completion is its chosen or rejected field
                if exc.field == "completion" and row.get(SIDE_COLUMN):
                    raise RowError(row[SIDE_COLUMN], exc.reason) from None
                raise
            prompt, completion, fit = encoder.fit(prompt, completion)
            return {"input_ids": prompt + completion, "prompt_length": len(prompt), "label": label}, fit

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
        if training and not (report["desirable"] and report["undesirable"]):
            raise DataError(
                source,
                "BCO needs both desirable (label true) and undesirable (label false) rows; "
                f"found {report['desirable']} and {report['undesirable']}",
            )
        self.splits["train" if training else "eval"] = featurized
        return PreparedSplit(featurized, report)

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
        """Right-padded ``input_ids``; ``completion_mask`` marks the tokens whose log-probs count."""
        sequences = [f["input_ids"] for f in features]
        input_ids, attention_mask = pad_sequences(
            sequences, self.tokenizer.pad_token_id, side="right", multiple_of=self.run.data.pad_to_multiple_of
        )
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
        for column, key in ((ROW_COLUMN, "row"), (INDEX_COLUMN, "index")):
            if column in features[0]:
                batch[key] = torch.tensor([f[column] for f in features], dtype=torch.long)
        return batch

    # ---- references, delta, UDM ---------------------------------------------------------------------
    def on_train_start(self, model: nn.Module, runtime: Runtime, *, resuming: bool) -> None:
        self.runtime = runtime
        base = getattr(model, "module", model)
        if self.cfg.ref_model:
            self.reference = runtime.prepare_frozen(self._load_reference())
        elif _adapter_model(base) is not None:
            log.info("reference: the policy with its adapter disabled (no second copy)")
        elif self.cfg.precompute_ref_log_probs:
            if not resuming:
                with eval_mode(model):
                    for split, dataset in self.splits.items():
                        self.ref_tables[split] = self._table(dataset, lambda b: self._logps(model, b)[0])
                log.info(
                    "reference log-probs precomputed for %s",
                    ", ".join(f"{len(d)} {s} rows" for s, d in self.splits.items()),
                )
        else:
            self.reference = runtime.prepare_frozen(frozen_copy(base))
        if self.cfg.udm.enabled and not resuming:
            with eval_mode(model):
                self._fit_udm(model)

    def on_eval_start(self, model: nn.Module, runtime: Runtime) -> None:
        """``rewardctl eval``: the reference is rebuilt (explicit model, or the starting weights).
        Precomputed tables restored from a checkpoint describe the training run's rows, not the rows
        being evaluated now: they are dropped."""
        self.runtime = runtime
        self.ref_tables.clear()
        if _adapter_model(getattr(model, "module", model)) is not None:
            return
        if self.cfg.ref_model:
            self.reference = runtime.prepare_frozen(self._load_reference())
        else:
            from accelerate.utils import set_seed

            set_seed(self.run.train.seed)  # the starting weights, also for a from-scratch model
            self.reference = runtime.prepare_frozen(self.build_model())

    def _load_reference(self) -> nn.Module:
        return load_causal_lm(self.cfg.ref_model, self.run.model, disable_dropout=self.cfg.disable_dropout)

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
            adapter = _adapter_model(getattr(model, "module", model))
            if adapter is not None:
                with adapter.disable_adapter(), eval_mode(model):
                    return self._logps(model, batch)[0]
        raise RuntimeError("BCO has no reference: call on_train_start or on_eval_start first")

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

    def _fit_udm(self, model: nn.Module) -> None:
        dataset = self.splits["train"]
        labels = torch.tensor(dataset["label"], dtype=torch.bool)
        generator = torch.Generator().manual_seed(self.run.train.seed)
        sample = []
        for side in (True, False):
            candidates = torch.nonzero(labels == side).flatten()
            take = min(len(candidates), self.cfg.prompt_sample_size)
            sample += candidates[torch.randperm(len(candidates), generator=generator)[:take]].tolist()
        embed = self._prompt_embedder(model)
        probe = embed({k: v.to(self.runtime.device) for k, v in self.collate([dataset[sample[0]]]).items()})
        features = self._table(dataset, embed, rows=sample, width=probe.shape[-1])
        self.udm = fit_balanced_logistic_regression(
            features, labels[sample].double(), l2=self.cfg.udm.l2, standardize=self.cfg.udm.standardize
        )
        predicted = self.udm.prob_desirable(features) > 0.5
        truth = labels[sample]
        log.info(
            "UDM prompt classifier on %d + %d prompts: accuracy %.3f on desirable, %.3f on undesirable",
            int(truth.sum()),
            int((~truth).sum()),
            float((predicted[truth]).double().mean()),
            float((~predicted[~truth]).double().mean()),
        )
        undesirable = torch.nonzero(~labels).flatten().tolist()
        embeddings = self._table(dataset, embed, rows=undesirable, width=probe.shape[-1])
        weights = torch.ones(len(dataset))
        weights[undesirable] = self.udm.density_ratio(
            embeddings, self.cfg.min_density_ratio, self.cfg.max_density_ratio
        )
        self.udm_weights = weights

    def _prompt_embedder(self, model: nn.Module) -> Any:
        """Prompt embeddings: mean-pooled last hidden states of the reference (the starting policy when
        no explicit reference is given), or of ``method.udm.embedding_model``."""
        if self.cfg.udm.embedding_model:
            from transformers import AutoModel, AutoTokenizer

            name = self.cfg.udm.embedding_model
            encoder = self.runtime.prepare_frozen(AutoModel.from_pretrained(name))
            embed_tokenizer = AutoTokenizer.from_pretrained(name)

            def embed_other(batch: dict[str, Tensor]) -> Tensor:
                texts = [
                    self.tokenizer.decode(ids[:n], skip_special_tokens=True)
                    for ids, n in zip(batch["input_ids"].tolist(), batch["prompt_length"].tolist(), strict=True)
                ]
                encoded = embed_tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(
                    self.runtime.device
                )
                return mean_pooled_prompt(encoder, encoded["input_ids"], encoded["attention_mask"])

            return embed_other
        source = self.reference if self.reference is not None else model

        def embed_reference(batch: dict[str, Tensor]) -> Tensor:
            positions = torch.arange(batch["input_ids"].shape[1], device=batch["input_ids"].device)
            prompt_mask = (positions[None, :] < batch["prompt_length"][:, None]).long()
            return mean_pooled_prompt(source, batch["input_ids"], prompt_mask)

        return embed_reference

    # ---- steps ----------------------------------------------------------------------------------
    def batch_weight(self, batch: dict[str, Tensor]) -> Tensor:
        """Rows, made on the batch's device (a fill, not a host-to-device copy)."""
        labels = batch["label"]
        return torch.full((), float(labels.shape[0]), device=labels.device)

    def _rewards(
        self, model: nn.Module, batch: dict[str, Tensor], split: str
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        logps, aux = self._logps(model, batch)
        ref = self._reference_logps(model, batch, split).to(logps.dtype)
        return self.cfg.beta * (logps - ref), logps, ref, aux

    def _losses(self, rewards: Tensor, labels: Tensor, delta: Tensor | float, weights: Tensor | None) -> Tensor:
        shifted = rewards - delta
        desirable = -nn.functional.logsigmoid(shifted)
        undesirable = -nn.functional.logsigmoid(-shifted)
        if weights is not None:
            undesirable = undesirable * weights.to(undesirable.dtype)
        return torch.where(labels, desirable, undesirable)

    def train_step(self, model: nn.Module, batch: dict[str, Tensor]) -> StepOutput:
        rewards, logps, _, aux = self._rewards(model, batch, "train")
        self.delta.update(rewards, self.runtime)  # before it is read, as the paper's running shift
        delta = self.delta.tensor  # stays on the device: reading it as a float would wait for the step
        weights = None
        if self.udm_weights is not None and "index" in batch:
            self.udm_weights = self.udm_weights.to(rewards.device)  # moved once, not copied every step
            weights = self.udm_weights[batch["index"]]
        labels = batch["label"]
        losses = self._losses(rewards, labels, delta, weights)
        loss_sum = losses.sum()
        if aux is not None:
            coefficient = getattr(getattr(model, "module", model).config, "router_aux_loss_coef", 0.0)
            loss_sum = loss_sum + coefficient * aux * labels.shape[0]  # the loop divides by rows: coef * aux per row
        detached = rewards.detach().float()
        correct = torch.where(labels, detached > delta, detached < delta).float()
        desirable, undesirable = labels.sum(), (~labels).sum()  # counts as device tensors
        metrics = {
            "loss": Metric.mean_of(losses),
            "accuracy": Metric.mean_of(correct),
            "rewards/chosen": Metric(masked_sum(detached, labels), desirable),
            "rewards/rejected": Metric(masked_sum(detached, ~labels), undesirable),
            "logps/chosen": Metric(masked_sum(logps.detach(), labels), desirable),
            "logps/rejected": Metric(masked_sum(logps.detach(), ~labels), undesirable),
            "delta": Metric(delta, 1.0),
            "tokens": Metric.total(batch["attention_mask"].sum()),
            "rows": Metric.total(labels.shape[0]),
        }
        if weights is not None:  # emitted for every micro-batch (count 0 allowed): every process logs the same keys
            metrics["udm_weight"] = Metric(masked_sum(weights, ~labels), undesirable)
        if aux is not None:
            metrics["aux_loss"] = Metric(aux.detach().float(), 1.0)
        return StepOutput(loss_sum=loss_sum, metrics=metrics)

    def eval_step(self, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        rewards, logps, ref, _ = self._rewards(model, batch, "eval")
        out = {
            "reward": rewards.float(),
            "logps": logps.float(),
            "ref_logps": ref.float(),
            "label": batch["label"].long(),
            "loss": self._losses(rewards, batch["label"], self.delta.tensor, None).float(),
        }
        if "row" in batch:
            out["row"] = batch["row"]
        return out

    def eval_metrics(self, outputs: dict[str, Tensor]) -> dict[str, float]:
        rewards, labels = outputs["reward"].double(), outputs["label"].bool()
        delta = self.delta.value
        correct = torch.where(labels, rewards > delta, rewards < delta)
        chosen, rejected = rewards[labels], rewards[~labels]
        metrics = {
            "loss": outputs["loss"].double().mean().item(),
            "accuracy": correct.double().mean().item(),
            "delta": delta,
            "rows": float(labels.numel()),
        }
        if chosen.numel() and rejected.numel():
            metrics.update(
                {
                    "rewards/chosen": chosen.mean().item(),
                    "rewards/rejected": rejected.mean().item(),
                    "rewards/margin": (chosen.mean() - rejected.mean()).item(),
                    "logps/chosen": outputs["logps"].double()[labels].mean().item(),
                    "logps/rejected": outputs["logps"].double()[~labels].mean().item(),
                    "auc": _auc(chosen, rejected),
                }
            )
        return metrics

    def predictions(self, outputs: dict[str, Tensor]) -> list[dict[str, Any]]:
        rows = outputs.get("row")
        delta = self.delta.value
        records = []
        for i, (reward, logp, ref, label) in enumerate(
            zip(
                outputs["reward"].tolist(),
                outputs["logps"].tolist(),
                outputs["ref_logps"].tolist(),
                outputs["label"].tolist(),
                strict=True,
            )
        ):
            records.append(
                {
                    "row": int(rows[i]) + 1 if rows is not None else i + 1,
                    "label": bool(label),
                    "reward": reward,
                    "logp": logp,
                    "ref_logp": ref,
                    "correct": (reward > delta) if label else (reward < delta),
                }
            )
        return sorted(records, key=lambda record: (record["row"], not record["label"]))

    # ---- state carried in checkpoints ---------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        state = {"delta_total": self.delta.total.clone(), "delta_count": self.delta.count.clone()}
        for split, table in self.ref_tables.items():
            state[f"ref_logps.{split}"] = table
        if self.udm is not None:
            state.update(self.udm.state_dict("udm."))
        if self.udm_weights is not None:
            state["udm_weights"] = self.udm_weights
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if "delta_total" in state:
            self.delta.total = state["delta_total"].double().clone()
            self.delta.count = state["delta_count"].double().clone()
        for key, value in state.items():
            if key.startswith("ref_logps."):
                self.ref_tables[key.removeprefix("ref_logps.")] = value
        self.udm = PromptClassifier.from_state_dict(state, "udm.") or self.udm
        if "udm_weights" in state:
            self.udm_weights = state["udm_weights"]


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


def _adapter_model(model: nn.Module) -> Any:
    """The PEFT model when the policy carries an adapter (its reference is the adapter disabled)."""
    return model if is_adapter_model(model) else None


def _auc(positives: Tensor, negatives: Tensor) -> float:
    """P(reward of a desirable row > reward of an undesirable row), ties counting one half; O(n log n)."""
    ordered = negatives.sort().values
    below = torch.searchsorted(ordered, positives, right=False).double()
    at_or_below = torch.searchsorted(ordered, positives, right=True).double()
    return ((below + 0.5 * (at_or_below - below)).sum() / (positives.numel() * negatives.numel())).item()
