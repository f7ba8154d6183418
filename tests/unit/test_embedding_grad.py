"""The input embedding's warm gradient buffer (rewardctl/modeling/embedding_grad.py): the same gradient,
bit for bit, as the stock dense backward across accumulation windows, padding rows and skipped
optimizer steps (within fp32 rounding when a tied layer also uses the weight); attached only where
it can be."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForSequenceClassification

from rewardctl.modeling import embedding_grad
from rewardctl.modeling.sequence import SequenceRewardModel

from ..conftest import TINY


def _model() -> SequenceRewardModel:
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(TINY, num_labels=1)
    classifier = AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa")
    return SequenceRewardModel(classifier)


def _windows(vocab: int, pad: int, n_windows: int = 4, accumulate: int = 2) -> list[list[torch.Tensor]]:
    """Micro-batches whose ids repeat within a row (a row's sum runs over several tokens), include
    the padding id, and touch different rows from window to window."""
    generator = torch.Generator().manual_seed(1)
    windows = []
    for w in range(n_windows):
        window = []
        for _ in range(accumulate):
            ids = torch.randint(0, vocab // (w + 1), (3, 9), generator=generator)
            ids[:, -2:] = pad
            window.append(ids)
        windows.append(window)
    return windows


def _train(model: SequenceRewardModel, windows, warm: bool, poisoned: frozenset[int] = frozenset()):
    """AdamW over the windows the way the loop steps: clipping, no step when the gradient norm is
    not finite (the windows in ``poisoned`` get a NaN loss), zero_grad to None after each. Returns
    the embedding gradient of each window after clipping."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    attached = embedding_grad.attach(model, optimizer) if warm else None
    weight = embedding_grad.input_embedding(model).weight
    grads = []
    for w, window in enumerate(windows):
        for ids in window:
            loss = model(ids, (ids != 0).long()).float().pow(2).sum()
            (loss * float("nan") if w in poisoned else loss).backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        grads.append(weight.grad.clone())
        if torch.isfinite(norm):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return grads, attached


def test_gradients_and_weights_equal_the_dense_backward_bit_for_bit():
    stock, warm = _model(), _model()
    pad = warm.classifier.config.pad_token_id or 0
    windows = _windows(warm.classifier.config.vocab_size, pad)
    (expected, _), (got, attached) = _train(stock, windows, warm=False), _train(warm, windows, warm=True)
    assert attached is not None and embedding_grad.input_embedding(warm).sparse
    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a, b)
    # Later windows touch fewer rows: the buffer was zeroed on the earlier windows' rows.
    assert got[0].abs().sum(1).count_nonzero() > got[-1].abs().sum(1).count_nonzero() > 0
    for (name, a), b in zip(stock.named_parameters(), warm.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_a_skipped_non_finite_window_leaves_no_nan_behind():
    """Clipping by a NaN norm writes NaN into every row of the buffer, touched or not; the next
    window must start from zeros all the same."""
    stock, warm = _model(), _model()
    windows = _windows(warm.classifier.config.vocab_size, 0)
    (expected, _), (got, _) = (_train(m, windows, warm=m is warm, poisoned=frozenset({1})) for m in (stock, warm))
    assert got[1].isnan().all()
    for a, b in zip(expected[2:], got[2:], strict=True):
        assert torch.isfinite(b).all() and torch.equal(a, b)
    for a, b in zip(stock.parameters(), warm.parameters(), strict=True):
        assert torch.equal(a, b)


def _sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.0)


def test_attach_is_idempotent_and_the_buffer_is_reused():
    model = _model()
    optimizer = _sgd(model)
    first = embedding_grad.attach(model, optimizer)
    assert embedding_grad.attach(model, optimizer) is first
    weight = embedding_grad.input_embedding(model).weight
    assert len(weight._backward_hooks) == 1
    pointers = set()
    for window in _windows(model.classifier.config.vocab_size, 0):
        for ids in window:
            model(ids, torch.ones_like(ids)).sum().backward()
        pointers.add(weight.grad.data_ptr())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert pointers == {first.buffer.data_ptr()}


class _Tied(torch.nn.Module):
    """An embedding whose weight also scores the output densely (a tied LM head)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(50, 8, padding_idx=0)

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.embed

    def forward(self, ids: torch.Tensor, dense_first: bool) -> torch.Tensor:
        hidden = self.embed(ids).tanh()
        logits = hidden @ self.embed.weight.T
        # the order in which the two gradients reach the weight follows the graph
        return (logits.pow(2).sum() + hidden.sum() * 3) if dense_first else (hidden.sum() * 3 + logits.pow(2).sum())


@pytest.mark.parametrize("dense_first", [True, False])
def test_a_tied_dense_use_of_the_weight_still_gives_the_dense_gradient(dense_first):
    stock, warm = _Tied(), _Tied()
    optimizer = _sgd(warm)
    embedding_grad.attach(warm, optimizer)
    generator = torch.Generator().manual_seed(2)
    for step in range(4):
        ids = torch.randint(0, 50 // (step + 1), (2, 6), generator=generator)
        for model in (stock, warm):
            model(ids, dense_first).backward()
        # the same terms, summed in another order: equal within fp32 rounding
        torch.testing.assert_close(warm.embed.weight.grad, stock.embed.weight.grad, rtol=1e-6, atol=1e-6)
        optimizer.step()
        stock.embed.weight.grad = warm.embed.weight.grad = None


def test_not_attached_to_a_frozen_embedding_or_a_model_without_one():
    lora = get_peft_model(
        _model().classifier, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")
    )
    assert embedding_grad.attach(lora, _sgd(lora)) is None
    assert not embedding_grad.input_embedding(lora).sparse
    linear = torch.nn.Linear(3, 3)
    assert embedding_grad.attach(linear, _sgd(linear)) is None


def test_a_deep_copy_for_a_frozen_reference_carries_no_hook():
    model = _model()
    embedding_grad.attach(model, _sgd(model))
    reference = copy.deepcopy(model).requires_grad_(False)
    assert not embedding_grad.input_embedding(reference).weight._backward_hooks
