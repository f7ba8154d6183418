"""Binary Classifier Optimization (arXiv 2404.04656): a causal-LM policy whose implicit reward
``r = beta * (log pi(y|x) - log pi_ref(y|x))`` separates desirable from undesirable completions.

What every policy method shares (model IO, the reference, the prompt/completion encoder, unpairing,
the per-row pre-pass, eval mode) is ``PolicyMethod``'s (``rewardctl.methods.policy``). Here: BCO's
config checks, ``delta`` (the running count-weighted mean of every training reward, reduced across
processes, updated per micro-batch before it is read, frozen in eval and saved in checkpoints and in
the final model's config), UDM weights (``udm.py``), ``bco_loss`` and BCO's metrics.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor, nn

from rewardctl.config.schema import MethodConfig, RunConfig
from rewardctl.data.prepare import require_columns
from rewardctl.errors import ConfigError, DataError
from rewardctl.methods.base import Metric, PreparedSplit, Runtime, StepOutput
from rewardctl.methods.policy import (
    LocalRuntime,
    PolicyMethod,
    PromptCompletionEncoder,
    TruncationMode,
    eval_mode,
    implicit_rewards,
    masked_sum,
)
from rewardctl.methods.udm import PromptClassifier, fit_balanced_logistic_regression
from rewardctl.modeling.causal import mean_pooled_prompt

# LocalRuntime and PromptCompletionEncoder moved to policy.py; still importable from here.
__all__ = ["BcoConfig", "BcoMethod", "LocalRuntime", "PromptCompletionEncoder", "RunningMean", "UdmConfig", "bco_loss"]
log = logging.getLogger(__name__)


@dataclass
class UdmConfig:
    """Underlying distribution matching: reweight undesirable rows whose prompts look desirable."""

    enabled: bool = False
    # null: mean-pooled last hidden states of the reference model; else an AutoModel path or hub id.
    embedding_model: Optional[str] = None
    # L2 penalty of the logistic regression (sklearn's C = 1 / l2).
    l2: float = 1.0
    # Standardise each embedding dimension (train-sample mean and std) before the fit. TRL fits the raw
    # embeddings; there a fixed l2 means something different for every model's hidden-state scale
    # (mean-pooled states range from ~0.1 to ~100 across models), so the same l2 over- or
    # under-regularises; standardised, it is scale-free. false: TRL's fit exactly.
    standardize: bool = True


@dataclass
class BcoConfig(MethodConfig):
    """Binary Classifier Optimization (arXiv 2404.04656) on unpaired thumbs-up / thumbs-down rows.

    r = beta * (log pi(y|x) - log pi_ref(y|x)) summed over completion tokens; delta is the running
    count-weighted mean of all training rewards; L = -log sigma(r - delta) for desirable rows,
    -log sigma(-(r - delta)) (times the UDM weight) for undesirable ones.
    """

    _target_: str = "rewardctl.methods.bco.BcoMethod"
    name: str = "bco"
    beta: float = 0.1
    # Token budget of prompt + completion; null: model.max_length.
    max_length: Optional[int] = None
    # An over-long row's prompt is cut to this many tokens first (by truncation_mode), the completion
    # then to what is left; null: half of max_length.
    max_prompt_length: Optional[int] = None
    max_completion_length: Optional[int] = None
    truncation_mode: TruncationMode = TruncationMode.keep_end
    # An explicit reference model (path or hub id); null: adapter disabled with LoRA, else
    # precomputed log-probs or a frozen copy of the starting weights.
    ref_model: Optional[str] = None
    # One no-grad pass over train and eval rows before training, kept in checkpoints; frees the copy.
    precompute_ref_log_probs: bool = False
    udm: UdmConfig = field(default_factory=UdmConfig)
    # Prompts sampled per side (desirable / undesirable) to fit the UDM classifier.
    prompt_sample_size: int = 1024
    min_density_ratio: float = 0.5
    max_density_ratio: float = 10.0
    # Dropout off in policy and reference, so log-prob ratios are not noise (as TRL does).
    disable_dropout: bool = True


def bco_loss(
    rewards: Tensor, labels: Tensor, delta: Tensor | float, undesirable_weights: Tensor | None = None
) -> Tensor:
    """Per-row BCO loss (arXiv 2404.04656), shape (B,): logistic regression on the logit ``r - delta``.

    BCO trains the policy as a binary classifier whose logit is the implicit reward shifted by delta:
    desirable completions are pushed above the running mean reward, undesirable ones below it::

        L = -log sigma(r - delta)            for a desirable row (label true)
        L = -w * log sigma(-(r - delta))     for an undesirable row (label false)

    Same as TRL's ``BCOTrainer.bco_loss`` (0.29), which takes the two sides as separate tensors.

    Args:
        rewards (Tensor): implicit rewards ``beta * (log pi(y|x) - log pi_ref(y|x))``, shape (B,);
            0 while the policy is the reference, typically within about [-5, 5] during training.
        labels (Tensor): bool, shape (B,): true for desirable, false for undesirable rows.
        delta (Tensor | float): the reward shift, the running mean of every training reward so far
            (a 0-dim tensor or a float); near 0 early on, typically a few tenths in magnitude.
        undesirable_weights (Tensor | None): UDM density ratios, shape (B,), multiplying undesirable
            rows' losses only (clamped to ``[min_density_ratio, max_density_ratio]``, by default
            [0.5, 10]); None: weight 1.

    Returns:
        Tensor: per-row losses, shape (B,), in ``rewards``' dtype; each >= 0: log 2 ~ 0.693 at
        ``r = delta`` (where training starts), towards 0 as a row lands on its side of delta, about
        ``|r - delta|`` (times w) on the wrong side.
    """
    if rewards.ndim != 1 or labels.shape != rewards.shape or labels.dtype != torch.bool:
        raise ValueError(
            f"rewards must have shape (B,) and labels be bool of the same shape; got rewards "
            f"{tuple(rewards.shape)}, labels {tuple(labels.shape)} {labels.dtype}"
        )
    if undesirable_weights is not None and undesirable_weights.shape != rewards.shape:
        raise ValueError(
            f"undesirable_weights must have shape {tuple(rewards.shape)}; got {tuple(undesirable_weights.shape)}"
        )
    shifted = rewards - delta
    desirable = -nn.functional.logsigmoid(shifted)
    undesirable = -nn.functional.logsigmoid(-shifted)
    if undesirable_weights is not None:
        undesirable = undesirable * undesirable_weights.to(undesirable.dtype)
    return torch.where(labels, desirable, undesirable)


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


class BcoMethod(PolicyMethod):
    config_class = BcoConfig
    primary_metric = "accuracy"
    report_metrics = ("auc", "delta")

    def verdict(self, final: dict[str, Any]) -> str | None:
        auc, rows = final.get("auc"), final.get("rows", 0)
        good = final.get("desirable", rows / 2)
        bad = rows - good
        if auc is None or good <= 0 or bad <= 0:
            return None
        # AUC under "no separation" has standard error sqrt((n1 + n2 + 1) / (12 n1 n2)) (Hanley & McNeil).
        if abs(auc - 0.5) <= 2 * ((good + bad + 1) / (12 * good * bad)) ** 0.5:
            return (
                f"the implicit reward separates desirable from undesirable rows no better than chance (AUC {auc:.3f} "
                f"on {good:.0f} desirable and {bad:.0f} undesirable rows)"
            )
        return None

    cfg: BcoConfig

    def __init__(self, cfg: BcoConfig, run: RunConfig) -> None:
        super().__init__(cfg, run)
        self.delta = RunningMean()
        self.udm: PromptClassifier | None = None
        self.udm_weights: Tensor | None = None  # per train _index (1 for desirable rows)

    @classmethod
    def check_config(cls, run: RunConfig) -> None:
        super().check_config(run)
        m: BcoConfig = run.method
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

    # ---- the saved model and the data ---------------------------------------------------------------
    def saved_meta(self) -> dict[str, Any]:
        """delta travels with the model: it is the classifier's threshold (eval, export, serving)."""
        return {
            **super().saved_meta(),
            "beta": self.cfg.beta,
            "delta": self.delta.value,
            "delta_total": float(self.delta.total),
            "delta_count": float(self.delta.count),
        }

    def restore_saved_meta(self, saved: dict[str, Any]) -> None:
        if "delta_total" in saved:
            self.delta.total = torch.tensor(saved["delta_total"], dtype=torch.float64)
            self.delta.count = torch.tensor(saved["delta_count"], dtype=torch.float64)

    def check_prepared(self, report: dict[str, Any], source: str, *, training: bool) -> None:
        """delta and the classifier need both sides in training (eval may hold one)."""
        if training and not (report["desirable"] and report["undesirable"]):
            raise DataError(
                source,
                "BCO needs both desirable (label true) and undesirable (label false) rows; "
                f"found {report['desirable']} and {report['undesirable']}",
            )

    # ---- UDM ------------------------------------------------------------------------------------------
    def on_train_start(self, model: nn.Module, runtime: Runtime, *, resuming: bool) -> None:
        super().on_train_start(model, runtime, resuming=resuming)
        if self.cfg.udm.enabled and not resuming:
            with eval_mode(model):
                self._fit_udm(model)

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
        logps, ref, aux = self._policy_and_reference_logps(model, batch, split)
        return implicit_rewards(logps, ref, self.cfg.beta), logps, ref, aux

    def _losses(self, rewards: Tensor, labels: Tensor, delta: Tensor | float, weights: Tensor | None) -> Tensor:
        return bco_loss(rewards, labels, delta, weights)

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
        loss_sum = self.with_router_aux_loss(model, losses.sum(), aux, labels.shape[0])
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
            "desirable": float(labels.sum().item()),
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

    def figure_data(self, outputs: dict[str, Tensor]) -> dict[str, Any]:
        """Desirable against undesirable implicit rewards with delta, the classifier's threshold, drawn
        in: a row is called desirable when its reward lies right of the line."""
        rewards, labels = outputs["reward"].double(), outputs["label"].bool()
        if rewards.numel() == 0:
            return {}
        delta = self.delta.value
        correct = torch.where(labels, rewards > delta, rewards < delta).double().mean().item()
        return {
            "reward_histogram": {
                "title": f"Eval implicit rewards, {rewards.numel()} rows: on their side of δ in {correct:.1%}",
                "panels": [
                    {
                        "xlabel": "implicit reward r = β·(log π − log π_ref)",
                        "series": {"desirable": rewards[labels].tolist(), "undesirable": rewards[~labels].tolist()},
                        "markers": {f"δ = {delta:.4g}": delta},
                    }
                ],
            }
        }

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

    # ---- scoring new rows ----------------------------------------------------------------------
    reward_columns = ("reward",)

    def score_prepare(self, dataset: Any, source: str) -> PreparedSplit:
        """Rows of ``prompt`` + ``completion`` (a ``label`` is optional and ignored for the scores)."""
        require_columns(dataset, source, ("prompt", "completion"))
        if "label" not in dataset.column_names:
            dataset = dataset.add_column("label", [True] * len(dataset))
        return self.prepare(dataset, source, training=False)

    def score_records(self, outputs: dict[str, Tensor]) -> dict[int, dict[str, Any]]:
        """``reward = beta * log(pi / pi_ref) - delta`` and the classifier's P(desirable) = sigma(reward)."""
        delta = self.delta.value
        records = {}
        for i, row in enumerate(outputs["row"].tolist()):
            implicit = float(outputs["reward"][i])
            shifted = torch.tensor(implicit - delta, dtype=torch.float64)
            records[int(row)] = {
                "reward": float(shifted),
                "probability": float(torch.sigmoid(shifted)),
                "implicit_reward": implicit,
                "logp": float(outputs["logps"][i]),
                "ref_logp": float(outputs["ref_logps"][i]),
            }
        return records

    def reward_stats(self, outputs: dict[str, Tensor]) -> tuple[float, float]:
        rewards = outputs["reward"].double() - self.delta.value
        return rewards.mean().item(), rewards.std(unbiased=False).item()

    # ---- state carried in checkpoints ---------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        state = {"delta_total": self.delta.total.clone(), "delta_count": self.delta.count.clone()}
        state.update(super().state_dict())
        if self.udm is not None:
            state.update(self.udm.state_dict("udm."))
        if self.udm_weights is not None:
            state["udm_weights"] = self.udm_weights
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if "delta_total" in state:
            self.delta.total = state["delta_total"].double().clone()
            self.delta.count = state["delta_count"].double().clone()
        super().load_state_dict(state)
        self.udm = PromptClassifier.from_state_dict(state, "udm.") or self.udm
        if "udm_weights" in state:
            self.udm_weights = state["udm_weights"]


def _auc(positives: Tensor, negatives: Tensor) -> float:
    """P(reward of a desirable row > reward of an undesirable row), ties counting one half; O(n log n)."""
    ordered = negatives.sort().values
    below = torch.searchsorted(ordered, positives, right=False).double()
    at_or_below = torch.searchsorted(ordered, positives, right=True).double()
    return ((below + 0.5 * (at_or_below - below)).sum() / (positives.numel() * negatives.numel())).item()
