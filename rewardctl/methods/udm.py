"""UDM's prompt classifier: class-balanced, L2-regularised logistic regression, fitted in torch.

BCO's underlying distribution matching asks how much more likely a prompt is to come with a
desirable answer than with an undesirable one. A linear classifier on prompt embeddings estimates
p = P(desirable | prompt); undesirable losses are weighted by clamp(p / (1 - p), min, max). TRL fits
sklearn's LogisticRegression(class_weight="balanced") on the raw embeddings and pickles it; this is
the same objective (balanced log-loss + l2/2 |w|^2), by default on standardised features (a
deliberate deviation: the penalty then means the same for every model's hidden-state scale;
``method.udm.standardize=false`` is TRL's fit), fitted with L-BFGS, and its state is four
tensors that go into a safetensors checkpoint: no pickle, no scikit-learn dependency.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class PromptClassifier:
    weight: Tensor  # (d,)
    bias: Tensor  # ()
    mean: Tensor  # (d,) feature standardisation
    scale: Tensor  # (d,)

    def logits(self, embeddings: Tensor) -> Tensor:
        x = (embeddings.double() - self.mean) / self.scale
        return x @ self.weight + self.bias

    def prob_desirable(self, embeddings: Tensor) -> Tensor:
        return torch.sigmoid(self.logits(embeddings))

    def density_ratio(self, embeddings: Tensor, low: float, high: float) -> Tensor:
        """clamp(p / (1 - p), low, high) = clamp(exp(logit), low, high), computed without 1 - p underflow."""
        return self.logits(embeddings).exp().clamp(low, high).float()

    def state_dict(self, prefix: str) -> dict[str, Tensor]:
        return {
            f"{prefix}{k}": getattr(self, k).detach().cpu().contiguous() for k in ("weight", "bias", "mean", "scale")
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor], prefix: str) -> PromptClassifier | None:
        if f"{prefix}weight" not in state:
            return None
        return cls(**{k: state[f"{prefix}{k}"].double() for k in ("weight", "bias", "mean", "scale")})


def fit_balanced_logistic_regression(
    features: Tensor, labels: Tensor, *, l2: float = 1.0, max_iter: int = 200, standardize: bool = True
) -> PromptClassifier:
    """Minimise sum_i c_i * logloss_i + l2/2 |w|^2 with c_i = n / (2 n_class(i)) (sklearn's 'balanced'),
    on standardised features (``standardize``, our default: the penalty is then scale-free) or on the
    raw ones (TRL's fit: sklearn's ``LogisticRegression(class_weight="balanced")`` on the embeddings)."""
    x = features.double()
    y = labels.double()
    if not ((y == 0).any() and (y == 1).any()):
        raise ValueError("UDM needs prompts of both desirable and undesirable rows")
    if standardize:
        mean = x.mean(0)
        scale = x.std(0, unbiased=False).clamp_min(1e-12)
    else:
        mean, scale = torch.zeros(x.shape[1], dtype=x.dtype), torch.ones(x.shape[1], dtype=x.dtype)
    x = (x - mean) / scale
    n = y.numel()
    positives = y.sum()
    class_weight = torch.where(y == 1, n / (2 * positives), n / (2 * (n - positives)))
    weight = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-10,
        tolerance_change=1e-12,
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        losses = nn.functional.binary_cross_entropy_with_logits(x @ weight + bias, y, reduction="none")
        loss = (class_weight * losses).sum() + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return PromptClassifier(weight.detach(), bias.detach(), mean, scale)
