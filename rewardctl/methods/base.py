"""The Method interface: everything method-specific, behind a surface the shared loop drives blindly.

A method builds its model(s), turns raw rows into features, collates batches, computes a loss and
metrics for a batch, and aggregates eval outputs. It never touches devices, processes or files; the
loop hands it a ``Runtime`` for the few collective operations a method may need (e.g. a running mean
reduced across processes). Adding a method is one module and one YAML whose ``_target_`` names the
class, so a user's own method plugs in without editing rewardctl.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from rewardctl.config.schema import MethodConfig, RunConfig


#: flex_attention's default key/query block, in tokens (torch's ``_DEFAULT_SPARSE_BLOCK_SIZE``, not
#: imported: that module pulls in the compiler stack at import): padded batches are widened to it.
FLEX_BLOCK_TOKENS = 128
#: The checkpoint key of the reward statistics (``Method.checkpoint_state``).
REWARD_STATS_KEY = "reward_stats.mean_std"


class Reduce(str, Enum):
    """How the loop combines a metric over micro-batches, log windows and processes."""

    mean = "mean"  # sum of values / sum of counts
    sum = "sum"  # cumulative over the run (e.g. tokens seen); also reported per second
    min = "min"
    max = "max"


@dataclass
class Metric:
    """One training metric of one micro-batch, in a form that aggregates exactly."""

    value: Tensor
    count: Tensor | float = 1.0
    reduce: Reduce = Reduce.mean

    @staticmethod
    def mean_of(values: Tensor) -> Metric:
        values = values.detach().float()
        return Metric(values.sum(), float(values.numel()), Reduce.mean)

    @staticmethod
    def total(value: Tensor | float) -> Metric:
        return Metric(torch.as_tensor(value, dtype=torch.float64), 1.0, Reduce.sum)

    @staticmethod
    def min_of(values: Tensor) -> Metric:
        return Metric(values.detach().float().min(), 1.0, Reduce.min)

    @staticmethod
    def max_of(values: Tensor) -> Metric:
        return Metric(values.detach().float().max(), 1.0, Reduce.max)


@dataclass
class StepOutput:
    """What a training step returns.

    ``loss_sum`` is the *sum* of per-item losses of the micro-batch. The loop divides it by the total
    weight (see ``Method.batch_weight``) of the whole accumulation window across all processes, so
    gradient accumulation and data parallelism never change the loss scale.
    """

    loss_sum: Tensor
    metrics: dict[str, Metric] = field(default_factory=dict)


class Runtime(Protocol):
    """The few distributed facilities a method may use, without knowing how they are provided."""

    device: torch.device
    num_processes: int
    process_index: int
    is_main_process: bool

    def all_reduce_sum(self, tensor: Tensor) -> Tensor: ...

    def prepare_frozen(self, module: nn.Module) -> nn.Module: ...


@dataclass
class PreparedSplit:
    """Features ready for the collator plus the counts reported before training starts."""

    dataset: Any  # datasets.Dataset of features
    report: dict[str, Any]


def within_chance(value: float, chance: float, count: float) -> bool:
    """Whether a rate measured on ``count`` independent items is within two standard errors of what
    guessing gives (``chance``): a binomial test at about 95%."""
    if count <= 0:
        return True
    return abs(value - chance) <= 2 * (chance * (1 - chance) / count) ** 0.5


class Method(ABC):
    """Base class of pairwise, ranklist, bco and prm (and of a user's own method)."""

    #: The dataclass schema of this method's config group option.
    config_class: ClassVar[type]
    #: Metric drawn next to the loss in curves.png and shown in the end-of-run summary.
    primary_metric: ClassVar[str] = "accuracy"
    #: Whether a larger ``primary_metric`` is better (accuracy, Spearman); False for a loss-like one.
    #: The sweep report ranks the jobs of a sweep by it.
    primary_metric_higher_is_better: ClassVar[bool] = True
    #: What ``batch_weight`` counts, used to name throughput (e.g. pairs_per_sec).
    item_name: ClassVar[str] = "items"
    #: Whether ``build_model``/``save_model``/``load_trained`` handle PEFT adapters (peft=lora).
    supports_adapters: ClassVar[bool] = False
    #: Name of the transformers Auto class of the trainable model, when the method's collator offers a
    #: padding-free layout for it (``data.padding_free``); None: always padded.
    padding_free_model: ClassVar[str | None] = None
    #: Eval metrics the end-of-run report shows beside the primary metric and the loss: those that tell
    #: a useful model from a degenerate one (e.g. prm's wrong-step F1 next to its step accuracy).
    report_metrics: ClassVar[tuple[str, ...]] = ()

    def verdict(self, final: dict[str, Any]) -> str | None:  # noqa: ARG002 - a hook: methods read it
        """In words, when the final eval shows a degenerate model (at chance, the majority class only):
        the end-of-run report says so instead of a reassuring "0.48 -> 0.93". None: nothing to say."""
        return None

    def __init__(self, cfg: MethodConfig, run: RunConfig) -> None:
        self.cfg = cfg
        self.run = run
        self._tokenizer: PreTrainedTokenizerBase | None = None
        #: ``reward_mean`` / ``reward_std`` of the last eval (``record_reward_stats``), or None.
        self.reward_normalization: dict[str, float] | None = None

    @property
    def padding(self) -> dict[str, Any]:
        """How far a collator pads a batch beyond its longest row (``padded_length``'s settings).

        Under flex_attention a padded batch is as wide as a whole number of the kernel's key blocks
        (``FLEX_BLOCK_TOKENS``): the kernel evaluates the padding mask over whole blocks, so a width
        that ends inside one has it read past the mask's end (torch 2.13, CPU: NaN rewards for the
        last row in 4 of 8 runs at width 88, none in 8 at 128). The extra columns are padding, a block
        the kernel skips as fully masked."""
        multiple_of = self.run.data.pad_to_multiple_of
        if self.run.model.attn_implementation == "flex_attention":
            multiple_of = math.lcm(multiple_of or 1, FLEX_BLOCK_TOKENS)
        return {"multiple_of": multiple_of, "buckets": self.run.data.pad_buckets}

    @classmethod
    def check_config(cls, run: RunConfig) -> None:
        """Method-specific config checks that run before anything loads; raise ConfigError.
        Subclasses call ``super().check_config(run)``."""
        if run.data.padding_free == "true":
            blocker = cls._padding_free_blocker(run, forced=True)
            if blocker is not None:
                from rewardctl.errors import ConfigError

                raise ConfigError(
                    "data.padding_free",
                    f"true cannot work for {run.model.name_or_path!r} ({blocker}); use data.padding_free=auto or false",
                )

    @classmethod
    def _padding_free_blocker(cls, run: RunConfig, *, forced: bool) -> str | None:
        if cls.padding_free_model is None:
            return f"method {run.method.name} has no padding-free layout"
        import transformers

        from rewardctl.machine import wants_gpu
        from rewardctl.modeling.common import padding_free_blocker

        return padding_free_blocker(
            run.model, getattr(transformers, cls.padding_free_model), on_gpu=wants_gpu(run.hardware), forced=forced
        )

    @cached_property
    def padding_free(self) -> bool:
        """Whether batches hold only real tokens, concatenated in one row (``data.padding_free``): auto
        turns it on for causal decoders on a GPU with flash_attention_2 / flex_attention."""
        mode = self.run.data.padding_free
        if mode == "false" or (mode == "auto" and getattr(self.run.data, "share_prefix", "auto") == "true"):
            return False
        blocker = self._padding_free_blocker(self.run, forced=mode == "true")
        if blocker is not None:
            logging.getLogger(__name__).info("padding-free batches off: %s", blocker)
        return blocker is None

    # ---- tokenizer and models -------------------------------------------------------------------
    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            self._tokenizer = self.load_tokenizer()
        return self._tokenizer

    def use_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Adopt an already-loaded tokenizer (eval loads the one saved with the model)."""
        self._tokenizer = tokenizer

    @abstractmethod
    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer of ``run.model``, ready for this method (pad token, padding side)."""

    @abstractmethod
    def build_model(self) -> nn.Module:
        """The trainable module; the loop seeds the RNG just before calling this."""

    @abstractmethod
    def load_trained(self, path: Path) -> nn.Module:
        """The trainable module as saved by ``save_model`` (for ``rewardctl eval``)."""

    @abstractmethod
    def save_model(self, model: nn.Module, path: Path, state_dict: dict[str, Tensor] | None = None) -> None:
        """Write a directory that stock transformers (or peft) loads; ``model`` is unwrapped.

        ``state_dict`` is the full state gathered by the loop when the module is sharded.
        """

    # ---- data -----------------------------------------------------------------------------------
    @abstractmethod
    def prepare(self, dataset: Any, source: str, *, training: bool) -> PreparedSplit:
        """Validate and tokenise raw rows; raise DataError naming source, row and field."""

    def lengths(self, dataset: Any) -> list[int] | None:  # noqa: ARG002 - the hook's signature
        """Per-row padded cost (tokens), used to group rows of similar length; None disables grouping."""
        return None

    @abstractmethod
    def collate(self, features: list[dict[str, Any]]) -> dict[str, Tensor]:
        """Pad a list of features into a batch. The loop never looks inside a batch."""

    # ---- steps ----------------------------------------------------------------------------------
    @abstractmethod
    def batch_weight(self, batch: dict[str, Tensor]) -> Tensor:
        """How many loss items the batch holds (pairs, lists, labelled tokens): the normaliser."""

    @abstractmethod
    def train_step(self, model: nn.Module, batch: dict[str, Tensor]) -> StepOutput:
        """Forward + loss for one micro-batch (the loop does backward, clipping and stepping)."""

    @abstractmethod
    def eval_step(self, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per-item outputs (first dimension = items); gathered across processes without duplicates."""

    @abstractmethod
    def eval_metrics(self, outputs: dict[str, Tensor]) -> dict[str, float]:
        """Aggregate metrics from all gathered per-item outputs of the eval set."""

    def figure_data(self, outputs: dict[str, Tensor]) -> dict[str, Any]:  # noqa: ARG002 - the hook's signature
        """The series behind the end-of-run and ``rewardctl eval`` pictures, from the gathered eval
        outputs: plain numbers and lists keyed by picture, so the method decides what is worth drawing
        while all plotting stays in ``rewardctl.training.figures`` (methods import no matplotlib).

        - ``reward_histogram``: ``{"title", "panels": [{"title"?, "xlabel", "series": {label: [x]},
          "markers"?: {label: x}}]}``: distributions overlaid per panel, a vertical line per marker.
        - ``calibration``: ``{"title"?, "bins": calibration_table(...), "ece": float, "pairs": int}``.
        - ``step_accuracy``: ``{"title", "steps": [tick labels], "accuracy": [...], "count": [...],
          "majority": [...]}``: per step index, over the rows that have that step.
        - ``prediction_scatter``: ``{"title", "panels": [{"title", "target": [...], "prediction": [...]}]}``.

        ``{}`` (the default, e.g. a user's own method): no pictures."""
        return {}

    def predictions(self, outputs: dict[str, Tensor]) -> list[dict[str, Any]]:  # noqa: ARG002 - the hook's signature
        """One JSON-able record per eval row for ``rewardctl eval``'s predictions.jsonl."""
        return []

    # ---- scoring new rows (rewardctl score / serve) --------------------------------------------
    #: Output columns of ``score_records`` holding rewards: ``normalize=true`` rescales them by the
    #: saved ``reward_mean`` / ``reward_std`` (numbers, or lists of numbers).
    reward_columns: ClassVar[tuple[str, ...]] = ()

    def score_prepare(self, dataset: Any, source: str) -> PreparedSplit:  # noqa: ARG002 - the hook's signature
        """Tokenise rows to score, labelled or not, exactly as training built its sequences; raise
        DataError / RowError as ``prepare`` does. Every feature row keeps ``ROW_COLUMN``."""
        from rewardctl.errors import ConfigError

        raise ConfigError("method", f"{self.cfg.name} models do not score new rows (no score_prepare)")

    def score_lengths(self, dataset: Any) -> list[int] | None:
        """Per-row padded cost of ``score_prepare``'s features, for length-grouped batches."""
        return self.lengths(dataset)

    def score_collate(self, features: list[dict[str, Any]]) -> dict[str, Tensor]:
        """A batch of ``score_prepare``'s features (default: the training collator)."""
        return self.collate(features)

    def score_step(self, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per-row outputs (first dimension = rows, with ``row``), gathered like ``eval_step``'s."""
        return self.eval_step(model, batch)

    def score_records(self, outputs: dict[str, Tensor]) -> dict[int, dict[str, Any]]:  # noqa: ARG002 - the hook's signature
        """The score columns of each scored row, keyed by its 0-based position in the scored rows."""
        return {}

    def reward_stats(self, outputs: dict[str, Tensor]) -> tuple[float, float] | None:  # noqa: ARG002 - a hook
        """Mean and standard deviation of the reward ``score_records`` reports, over eval outputs:
        saved with the model so scores can be normalised. None: the method has no scalar reward."""
        return None

    def record_reward_stats(self, outputs: dict[str, Tensor]) -> None:
        """Keep the latest eval's reward statistics; they travel in checkpoints and the saved model."""
        stats = self.reward_stats(outputs)
        if stats is not None and all(v == v for v in stats):  # NaN-free
            self.reward_normalization = {"reward_mean": float(stats[0]), "reward_std": float(stats[1])}

    def adopt_reward_stats(self, facts: dict[str, Any]) -> None:
        """Take back ``reward_mean`` / ``reward_std`` from a saved model's metadata."""
        if facts.get("reward_mean") is not None and facts.get("reward_std") is not None:
            self.reward_normalization = {"reward_mean": facts["reward_mean"], "reward_std": facts["reward_std"]}

    # ---- state carried in checkpoints ---------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        """Tensors that must survive a resume (e.g. a running reward mean). Saved as safetensors."""
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore what ``state_dict`` returned."""

    def checkpoint_state(self, *, with_reward_stats: bool = True) -> dict[str, Tensor]:
        """What a checkpoint holds of the method: its ``state_dict`` plus the reward statistics, which
        the loop includes only when they describe the weights saved (an eval at the checkpoint's step)."""
        state = dict(self.state_dict())
        if with_reward_stats and self.reward_normalization is not None:
            stats = self.reward_normalization
            state[REWARD_STATS_KEY] = torch.tensor([stats["reward_mean"], stats["reward_std"]], dtype=torch.float64)
        return state

    def restore_checkpoint_state(self, state: dict[str, Tensor]) -> None:
        """Take back what ``checkpoint_state`` wrote."""
        state = dict(state)
        stats = state.pop(REWARD_STATS_KEY, None)
        if stats is not None:
            self.reward_normalization = {"reward_mean": float(stats[0]), "reward_std": float(stats[1])}
        self.load_state_dict(state)

    def on_train_start(self, model: nn.Module, runtime: Runtime, *, resuming: bool) -> None:
        """Hook after the model is placed and before the first step, while ``model`` still holds the
        starting weights (e.g. copy a reference, precompute reference log-probs). With ``resuming``,
        ``load_state_dict`` follows with the checkpoint's method state: skip what it restores."""

    def on_eval_start(self, model: nn.Module, runtime: Runtime) -> None:
        """Hook of ``rewardctl eval`` after the trained model is placed (e.g. load a reference)."""


def feature_key(cfg: Any, *fields: str) -> tuple[Any, ...]:
    """The part of a tokenisation cache key that comes from a method config: its schema's name and
    the named fields, nothing else.

    Keying on the whole config would re-tokenise every sweep job that changes only a loss setting
    (``beta``, a margin scale); listing the fields explicitly keeps that from happening. Name every
    field the featurizer reads, directly or through an encoder built from the config; values that do
    not live on the config (the effective token budget, ``data.overlength``, the tokenizer's
    identity) are added to the key by the caller.
    """
    return (type(cfg).__name__, *(getattr(cfg, name) for name in fields))


def token_budget(method_cfg: Any, run: RunConfig) -> int:
    """Tokens per sequence for methods with their own ``method.max_length`` (null: ``model.max_length``)."""
    return method_cfg.max_length or run.model.max_length


def budget_label(method_cfg: Any, run: RunConfig) -> str:
    """The key that sets the budget and its value, as data reports name it."""
    key = "method.max_length" if method_cfg.max_length else "model.max_length"
    return f"{key}={token_budget(method_cfg, run)}"


def check_token_budget(method_cfg: Any, run: RunConfig) -> None:
    """The ``method.max_length`` / ``max_prompt_length`` / ``max_completion_length`` triple shared by
    methods that score a completion after a prompt (bco, prm): a prompt cap must leave room."""
    from rewardctl.errors import ConfigError

    budget = token_budget(method_cfg, run)
    if method_cfg.max_length is not None and method_cfg.max_length < 8:
        raise ConfigError("method.max_length", f"must be >= 8 or null (got {method_cfg.max_length})")
    if method_cfg.max_prompt_length is not None and not 1 <= method_cfg.max_prompt_length < budget:
        raise ConfigError(
            "method.max_prompt_length",
            f"must be in [1, {budget}) so a completion fits (got {method_cfg.max_prompt_length})",
        )
    if method_cfg.max_completion_length is not None and method_cfg.max_completion_length < 1:
        raise ConfigError("method.max_completion_length", "must be >= 1 or null")
