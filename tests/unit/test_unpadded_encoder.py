"""An encoder's layers on the real tokens only (rewardctl/modeling/unpadded_encoder.py): the same rewards
and gradients as the stock padded encoder, layers that really see fewer rows, and the stock encoder
wherever the layout cannot be used."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from accelerate.hooks import ModelHook, add_hook_to_module
from transformers import AutoModelForSequenceClassification

from rewardctl.modeling import unpadded_encoder
from rewardctl.modeling.first_token_layer import is_first_token_only
from rewardctl.modeling.sequence import SequenceRewardModel
from rewardctl.modeling.unpadded_encoder import TOKEN_ROWS_MULTIPLE, skips_padding, token_layout

from .test_final_layer import _changed_attention_output, _encoder

LENGTHS = (40, 7, 3, 19, 1, 33, 12, 25)  # 140 real tokens in 8 x 40 = 320: 256 rows with the spare ones


def _batch(lengths: tuple[int, ...] = LENGTHS, width: int = 40):
    ids = torch.randint(5, 60, (len(lengths), width), generator=torch.Generator().manual_seed(3))
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    return ids * mask, mask


def _rewards_and_grads(model: SequenceRewardModel, ids: torch.Tensor, mask: torch.Tensor):
    model.zero_grad(set_to_none=True)
    rewards = model(ids, mask)
    weights = torch.linspace(-2.0, 3.0, rewards.numel())
    (rewards * weights).sum().backward()
    return rewards.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(fast, stock) -> None:
    """Rewards and every gradient of two ``_rewards_and_grads`` results, fp32."""
    torch.testing.assert_close(fast[0], stock[0], atol=1e-5, rtol=0)
    assert fast[1].keys() == stock[1].keys()
    for name in stock[1]:
        torch.testing.assert_close(fast[1][name], stock[1][name], atol=1e-5, rtol=1e-4, msg=name)


def _rows_seen(model: SequenceRewardModel) -> tuple[list[tuple[int, ...]], list]:
    """Input shapes of every layer's feed-forward block, in call order (hooks returned for removal)."""
    shapes: list[tuple[int, ...]] = []
    classifier = model.classifier
    hf = classifier.get_base_model() if hasattr(classifier, "get_base_model") else classifier  # under peft
    layers = hf.base_model.encoder.layer
    hooks = [
        layer.intermediate.register_forward_hook(lambda _m, args, _o: shapes.append(tuple(args[0].shape)))
        for layer in layers
    ]
    return shapes, hooks


def _skipping_then_stock(model: SequenceRewardModel, ids: torch.Tensor, mask: torch.Tensor):
    """(feed-forward input shapes of both runs, skipping run, stock run): the same model and batch with
    ``skip_padding`` on, then off."""
    shapes, hooks = _rows_seen(model)
    fast = _rewards_and_grads(model, ids, mask)
    model.skip_padding = False
    stock = _rewards_and_grads(model, ids, mask)
    for hook in hooks:
        hook.remove()
    return shapes, fast, stock


def test_the_layout_lists_the_real_tokens_row_by_row_and_rounds_the_rows_up():
    ids, mask = _batch()
    layout = token_layout(mask)
    real = sum(LENGTHS)
    assert layout.lengths == LENGTHS and layout.rows == 8 and layout.width == 40
    assert layout.spare == -real % TOKEN_ROWS_MULTIPLE == 116 and layout.index.numel() == 256
    expected = [row * 40 + col for row, n in enumerate(LENGTHS) for col in range(n)]
    assert layout.index[:real].tolist() == expected
    assert not mask.flatten()[layout.index[real:]].any()  # the spare rows copy a padding position
    assert layout.starts.tolist() == [0, 40, 47, 50, 69, 70, 103, 115]
    assert layout.split_sizes == [*LENGTHS, 116]


def test_the_stock_padded_encoder_runs_where_the_layout_would_not_pay_or_be_exact():
    _, mask = _batch()
    assert token_layout(torch.ones(8, 40, dtype=torch.long)) is None  # no padding
    assert token_layout(mask[:, :20].flip(-1)) is None  # left padding: the pooler reads column 0 as it is
    assert token_layout(mask[:2, :30]) is None  # 41 real tokens + 87 spare rows >= 60 padded positions
    assert token_layout(mask.to("meta")) is None  # off the CPU: no host reads, no per-sequence launches


@pytest.mark.parametrize(
    ("kind", "attention", "first_token"),
    [
        ("bert", "sdpa", True),
        ("bert", "sdpa", False),
        ("bert", "eager", True),
        ("roberta", "sdpa", True),
        ("xlm-roberta", "eager", False),
        ("electra", "sdpa", True),
    ],
)
def test_rewards_and_every_gradient_equal_the_stock_padded_encoder(kind: str, attention: str, first_token: bool):
    """fp32, right-padded rows of 1 to 40 tokens, with the spare rows; the layers must see 256 rows."""
    model = SequenceRewardModel(_encoder(kind, attention, layers=3), final_layer_at_reads=first_token)
    model.train()
    assert model.skip_padding and skips_padding(model.classifier) and model.skip_padding_blocker() is None
    assert is_first_token_only(model.classifier.base_model.encoder.layer[-1]) == first_token
    ids, mask = _batch()
    shapes, fast, stock = _skipping_then_stock(model, ids, mask)
    assert not skips_padding(model.classifier) and model.skip_padding_blocker() == "model.skip_padding=false"
    last = (8, 1, 32) if first_token else (256, 32)
    assert shapes == [(256, 32), (256, 32), last, (8, 40, 32), (8, 40, 32), (8, 1, 32) if first_token else (8, 40, 32)]
    _assert_same(fast, stock)
    assert len(stock[1]) > 30


def test_without_spare_rows_the_layers_see_exactly_the_real_tokens(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(unpadded_encoder, "TOKEN_ROWS_MULTIPLE", 1)
    model = SequenceRewardModel(_encoder("bert", layers=2), final_layer_at_reads=False)
    model.train()
    ids, mask = _batch()
    shapes, fast, stock = _skipping_then_stock(model, ids, mask)
    assert shapes[:2] == [(140, 32), (140, 32)]
    _assert_same(fast, stock)


def test_gradient_checkpointing_keeps_the_stock_checkpointed_layers():
    """The layers must run through their own checkpointed ``__call__``: the padded encoder runs."""
    model = SequenceRewardModel(_encoder("bert", layers=2))
    model.classifier.activation_checkpointing_enable({"use_reentrant": False})
    model.train()
    ids, mask = _batch()
    shapes, hooks = _rows_seen(model)
    checkpointed = _rewards_and_grads(model, ids, mask)
    for hook in hooks:
        hook.remove()
    assert shapes[0] == (8, 40, 32)
    assert model.skip_padding_blocker() == "gradient checkpointing (the layers run their own checkpointed call)"
    model.classifier.activation_checkpointing_disable()
    assert model.skip_padding_blocker() is None
    fast = _rewards_and_grads(model, ids, mask)
    torch.testing.assert_close(fast[0], checkpointed[0], atol=1e-5, rtol=0)


def test_lora_trains_the_adapters_and_head_only_and_matches_the_padded_encoder():
    from peft import LoraConfig, get_peft_model

    classifier = get_peft_model(
        _encoder("bert", layers=2),
        LoraConfig(
            r=4, lora_alpha=8, target_modules=["query", "key", "value", "dense"], modules_to_save=["classifier"]
        ),
    )
    model = SequenceRewardModel(classifier)
    model.train()
    assert skips_padding(classifier.get_base_model())
    ids, mask = _batch()
    with torch.no_grad():  # a non-zero B, so the adapters change the rewards and get query gradients
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    shapes, fast, stock = _skipping_then_stock(model, ids, mask)
    assert shapes == [(256, 32), (8, 1, 32), (8, 40, 32), (8, 1, 32)]  # the layout got through peft's forward
    assert all("lora_" in name or "classifier" in name for name in stock[1])
    assert any("query.lora_A" in name for name in stock[1])
    _assert_same(fast, stock)


def test_the_saved_model_is_a_stock_classifier_and_a_copy_skips_padding_with_its_own_weights(tmp_path: Path):
    model = SequenceRewardModel(_encoder("bert", layers=2))
    model.eval()
    ids, mask = _batch()
    with torch.no_grad():
        ours = model(ids, mask)
    encoder = model.classifier.bert.encoder
    assert type(encoder).__name__ == "BertEncoder" and type(encoder).__module__ == unpadded_encoder.__name__
    model.classifier.save_pretrained(tmp_path)
    stock = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert type(stock.bert.encoder).__module__ != unpadded_encoder.__name__
    with torch.no_grad():
        torch.testing.assert_close(
            stock(input_ids=ids, attention_mask=mask).logits.squeeze(-1), ours, atol=1e-5, rtol=0
        )
        twin = copy.deepcopy(model)
        assert skips_padding(twin.classifier)
        for parameter in twin.parameters():
            parameter.add_(0.5)
        assert (twin(ids, mask) - ours).abs().max() > 1e-3


def test_decoders_and_unknown_encoders_keep_their_own_layout():
    from transformers import DistilBertConfig

    from .test_final_layer import _tiny

    decoder = SequenceRewardModel(_tiny())  # its own gathered path: tests/unit/test_unpadded_decoder.py
    assert decoder.skip_padding and decoder.skip_padding_blocker().startswith("hidden size 64 < 256")
    assert not skips_padding(decoder.classifier)  # no encoder class swapped
    distil = SequenceRewardModel(
        AutoModelForSequenceClassification.from_config(
            DistilBertConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=32, num_labels=1)
        )
    )
    assert distil.skip_padding_blocker() == "DistilBertForSequenceClassification is not a BERT-family classifier"
    flex = SequenceRewardModel(_encoder("bert", "flex_attention"))
    assert flex.skip_padding_blocker() == "attn_implementation=flex_attention is not sdpa or eager"
    assert not skips_padding(flex.classifier)


def test_a_pairwise_step_on_an_encoder_is_the_same_with_the_switch_on_and_off(tmp_path: Path):
    """``model.skip_padding`` (default on) reaches the model a method builds; the collated batch, the
    loss and every gradient of a real pairwise step agree with it off."""
    import random

    from transformers import AutoTokenizer, BertConfig

    from rewardctl.methods.pairwise import PairwiseMethod
    from rewardctl.methods.registry import to_run_config

    from ..conftest import TINY, _features, _pair_rows, compose_train

    tokenizer = AutoTokenizer.from_pretrained(TINY)
    bert = tmp_path / "bert"
    BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    ).save_pretrained(bert)
    tokenizer.save_pretrained(bert)
    assert to_run_config(compose_train([])).model.skip_padding is True
    models, results = {}, {}
    for switch in ("true", "false"):
        run = to_run_config(
            compose_train([f"model.name_or_path={bert}", "model.from_scratch=true", f"model.skip_padding={switch}"])
        )
        method = PairwiseMethod(run.method, run)
        torch.manual_seed(0)
        models[switch] = model = method.build_model()
        model.train()
        features = _features(method, _pair_rows(random.Random(2), 16, False))
        batch = method.collate(features)
        model.zero_grad(set_to_none=True)
        shapes, hooks = _rows_seen(model)
        out = method.train_step(model, batch)
        out.loss_sum.backward()
        for hook in hooks:
            hook.remove()
        assert len(shapes[0]) == (2 if switch == "true" else 3)  # (T', H) on the real tokens, else (B, L, H)
        results[switch] = out.loss_sum.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
        assert token_layout(batch["attention_mask"]) is not None  # the batch has padding worth skipping
    assert models["true"].skip_padding and not models["false"].skip_padding
    torch.testing.assert_close(results["true"][0], results["false"][0], atol=1e-5, rtol=0)
    for name, grad in results["false"][1].items():
        torch.testing.assert_close(results["true"][1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_an_electra_with_a_narrower_embedding_projects_it_before_the_layers():
    from transformers import ElectraConfig

    torch.manual_seed(0)
    config = ElectraConfig(
        vocab_size=60,
        embedding_size=16,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=1,
    )
    model = SequenceRewardModel(AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa"))
    model.train()
    assert hasattr(model.classifier.electra, "embeddings_project")
    ids, mask = _batch()
    shapes, fast, stock = _skipping_then_stock(model, ids, mask)
    assert shapes[0] == (256, 32)
    _assert_same(fast, stock)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_each_sequence_attends_through_the_models_own_attention_function(
    attention: str, monkeypatch: pytest.MonkeyPatch
):
    """sdpa goes through transformers' registry (where rewardctl's fp32 CPU attention sits under bf16),
    eager through BERT's eager function: one call per sequence per layer, none given a mask."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.bert import modeling_bert

    calls: list[tuple[tuple[int, ...], object]] = []

    def spying(function):
        def call(module, query, key, value, attention_mask, **kwargs):
            calls.append((tuple(query.shape), attention_mask))
            return function(module, query, key, value, attention_mask, **kwargs)

        return call

    if attention == "sdpa":
        monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "sdpa", spying(ALL_ATTENTION_FUNCTIONS["sdpa"]))
    else:
        monkeypatch.setattr(modeling_bert, "eager_attention_forward", spying(modeling_bert.eager_attention_forward))
    model = SequenceRewardModel(_encoder("bert", attention, layers=2))
    model.eval()
    ids, mask = _batch()
    with torch.no_grad():
        model(ids, mask)
    assert len(calls) == 2 * len(LENGTHS) and all(mask_given is None for _, mask_given in calls)
    assert [shape for shape, _ in calls[:8]] == [(1, 4, n, 8) for n in LENGTHS]
    assert [shape for shape, _ in calls[8:]] == [(1, 4, 1, 8)] * 8  # the last layer's [CLS] queries


def test_requested_hidden_states_come_from_the_stock_padded_encoder():
    """transformers collects hidden states with hooks on the stock layers' calls: the padded encoder runs."""
    model = SequenceRewardModel(_encoder("bert", layers=2), final_layer_at_reads=False)
    model.eval()
    ids, mask = _batch()
    shapes, hooks = _rows_seen(model)
    with torch.no_grad():
        out = model.classifier(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        layout = {unpadded_encoder.LAYOUT_KEY: token_layout(mask)}
        with_layout = model.classifier(input_ids=ids, attention_mask=mask, output_hidden_states=True, **layout)
    for hook in hooks:
        hook.remove()
    assert len(out.hidden_states) == 3 and len(with_layout.hidden_states) == 3
    assert all(shape == (8, 40, 32) for shape in shapes)
    torch.testing.assert_close(with_layout.logits, out.logits, atol=0, rtol=0)


class _FlippedOutput(ModelHook):
    """An accelerate hook (it replaces the module's ``forward``, no torch hook) that changes the output."""

    def post_forward(self, module, output):
        return (output[0].flip(-1), *output[1:]) if isinstance(output, tuple) else output.flip(-1)


@pytest.mark.parametrize("where", ["torch hook on the attention", "accelerate hook on the layer"])
def test_hooks_on_a_layer_or_its_attention_keep_the_stock_layers(where: str):
    """The gathered forward calls each layer's parts directly. A hook there, added after the model was
    set up (as a user or library would), sends the batch through the stock layers, so the hook runs:
    the rewards are the padded forward's with the hook, and differ from those without it."""
    model = SequenceRewardModel(_encoder("bert", layers=2), final_layer_at_reads=False)
    model.eval()
    ids, mask = _batch()
    layer = model.classifier.bert.encoder.layer[0]
    with torch.no_grad():
        plain = model(ids, mask)
        if where == "torch hook on the attention":
            layer.attention.self.register_forward_hook(_changed_attention_output)
        else:
            add_hook_to_module(layer, _FlippedOutput())
        hooked = model(ids, mask)
        model.skip_padding = False
        torch.testing.assert_close(hooked, model(ids, mask), atol=1e-6, rtol=0)
    assert (hooked - plain).abs().max() > 1e-4  # rewards of about 0.03: the hook shows
    expected = "BertSelfAttention" if where.startswith("torch") else "BertLayer"
    hooked_at_setup = copy.deepcopy(model.classifier)
    assert SequenceRewardModel(hooked_at_setup).skip_padding_blocker() == (
        f"hooks on {expected} (the gathered forward would skip them)"
    )
