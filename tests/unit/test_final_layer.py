"""The last decoder layer at the read tokens only (rewardctl/modeling/final_layer.py): the same rewards,
losses and gradients as the full layer, for every batch layout, and the full layer where it cannot
be recomputed."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, BertConfig, GPT2Config

from rewardctl.data.packing import concat_sequences, pack_rows
from rewardctl.methods.pairwise import PairwiseMethod
from rewardctl.methods.ranklist import RanklistMethod
from rewardctl.methods.registry import to_run_config
from rewardctl.modeling.first_token_layer import is_first_token_only
from rewardctl.modeling.sequence import SequenceRewardModel

from ..conftest import TINY, _features, _pair_rows, _words, compose_train
from .test_packing import _model_dir


def _tiny(attn_implementation: str = "sdpa"):
    """The bundled tiny Llama as a one-output classifier, randomly initialised (it ships no weights)."""
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(TINY, num_labels=1)
    return AutoModelForSequenceClassification.from_config(config, attn_implementation=attn_implementation)


def _method(cls, model_dir: Path, *overrides: str):
    prefix = ["method=ranklist"] if cls is RanklistMethod else []
    run = to_run_config(
        compose_train([*prefix, f"model.name_or_path={model_dir}", "model.from_scratch=true", *overrides])
    )
    return cls(run.method, run)


def _step(method, model, batch):
    model.zero_grad(set_to_none=True)
    out = method.train_step(model, batch)
    out.loss_sum.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return method.eval_step(model, batch), out.loss_sum.detach(), grads


def _assert_read_only_equals_full(method, model, batch, keys):
    """Same model, same batch: the read-only last layer against the full one, fp32, through the stock
    padded forward (the gathered one has its own comparison: test_unpadded_decoder.py)."""
    model.skip_padding = False
    assert model.read_only_blocker() is None
    fast = _step(method, model, batch)
    model.final_layer_at_reads = False
    full = _step(method, model, batch)
    model.final_layer_at_reads = True
    _assert_steps_equal(fast, full, keys)


def _assert_steps_equal(fast, reference, keys) -> None:
    """Two `_step` results of one model on one batch: the rewards under `keys` and the loss within
    1e-5, and every gradient (more than five of them) within 1e-5 + 1e-4 relative, fp32."""
    for key in keys:
        torch.testing.assert_close(fast[0][key], reference[0][key], atol=1e-5, rtol=0, msg=key)
    torch.testing.assert_close(fast[1], reference[1], atol=1e-5, rtol=0)
    assert fast[2].keys() == reference[2].keys() and len(fast[2]) > 5
    for name in reference[2]:
        torch.testing.assert_close(fast[2][name], reference[2][name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("kind", ["tiny", "llama", "qwen2"])
@pytest.mark.parametrize(
    "layout",
    [
        ("data.share_prefix=true", "model.padding_side=right"),
        ("data.share_prefix=false", "data.padding_free=false", "model.padding_side=right"),
        ("data.share_prefix=false", "data.padding_free=false", "model.padding_side=left"),
        ("data.share_prefix=false", "data.padding_free=true"),
    ],
    ids=["shared-prefix", "stacked-right", "stacked-left", "padding-free"],
)
def test_pairwise_rewards_loss_and_gradients_equal_the_full_last_layer(tmp_path: Path, kind: str, layout):
    method = _method(PairwiseMethod, _model_dir(tmp_path, kind), *layout, "method.center_rewards_coefficient=0.01")
    torch.manual_seed(0)
    model = method.build_model()
    features = _features(method, _pair_rows(random.Random(kind), 6, conversational=kind == "tiny"))
    _assert_read_only_equals_full(method, model, method.collate(features), ("chosen_reward", "rejected_reward"))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_ranklist_k_2_to_9_equals_the_full_last_layer(tmp_path: Path, attention: str):
    method = _method(RanklistMethod, _model_dir(tmp_path, "qwen2"), f"model.attn_implementation={attention}")
    torch.manual_seed(0)
    model = method.build_model()
    _assert_read_only_equals_full(method, model, method.collate(_features(method, lists_k_2_to_9())), ("rewards",))


def lists_k_2_to_9(seed: int = 5) -> list[dict]:
    """Eight ranked-list rows, K = 2..9 answers, prompts of 2-30 words and answers of 1-20."""
    rng = random.Random(seed)
    return [
        {
            "prompt": f"Q: {_words(rng, rng.randint(2, 30))}?",
            "responses": [" " + _words(rng, rng.randint(1, 20)) for _ in range(k)],
        }
        for k in range(2, 10)
    ]


def test_the_last_layer_computes_queries_and_mlp_at_the_read_tokens_only(tmp_path: Path):
    """What makes it faster: the last layer's MLP and query projection see one token per reward, its
    key projection every token; the layers before see every token."""
    tokenizer = AutoTokenizer.from_pretrained(TINY)
    model = SequenceRewardModel(_tiny())
    rows = [[[5, 6, 7, 8, 9], [5, 6, 7, 10]], [[5, 11, 12], [5, 13], [5, 14, 15, 16]]]
    batch = pack_rows(rows, tokenizer.pad_token_id)
    reads = batch.pop("reward_index").flatten()
    reads = reads[reads >= 0]
    seen: dict[str, list[int]] = {}
    layers = model.classifier.model.layers
    watched = {"first.mlp": layers[0].mlp, "last.mlp": layers[-1].mlp}
    watched |= {"last.q_proj": layers[-1].self_attn.q_proj, "last.k_proj": layers[-1].self_attn.k_proj}
    for name, module in watched.items():
        module.register_forward_hook(lambda m, args, out, name=name: seen.setdefault(name, []).append(args[0].shape))
    rewards = model(batch["input_ids"], reward_index=reads, **{k: batch[k] for k in ("segment_ids", "position_ids")})
    tokens = batch["input_ids"].numel()
    assert rewards.shape == (5,)
    assert seen["last.mlp"][0][:-1].numel() == 5 and seen["last.q_proj"][0][:-1].numel() == 5
    assert seen["last.k_proj"][0][:-1].numel() == tokens and seen["first.mlp"][0][:-1].numel() == tokens


def test_stacked_rows_without_padding_read_the_causal_row_the_kernel_would_use():
    """No padding: the model hands its layers no mask (sdpa's is_causal); the read row is rebuilt."""
    model = SequenceRewardModel(_tiny())
    ids = torch.randint(5, 100, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        fast = model(ids, mask)
        model.final_layer_at_reads = False
        full = model(ids, mask)
    torch.testing.assert_close(fast, full, atol=1e-6, rtol=0)


def test_gradient_checkpointing_and_lora_keep_the_read_only_layer_exact(tmp_path: Path):
    method = _method(
        PairwiseMethod,
        TINY,
        "peft=lora",
        "peft.dropout=0.0",
        "train.gradient_checkpointing=true",
        "data.share_prefix=true",
    )
    torch.manual_seed(0)
    model = method.build_model()
    model.train()
    features = _features(method, _pair_rows(random.Random(2), 4, False))
    _assert_read_only_equals_full(method, model, method.collate(features), ("chosen_reward", "rejected_reward"))


def test_the_full_last_layer_runs_where_it_cannot_be_recomputed(tmp_path: Path):
    def blocker(classifier, **kwargs) -> str | None:
        return SequenceRewardModel(classifier, **kwargs).read_only_blocker()

    tiny = _tiny()
    assert blocker(tiny) is None
    assert blocker(tiny, final_layer_at_reads=False) == "model.final_layer_at_reads=false"
    bert = AutoModelForSequenceClassification.from_config(
        BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    )
    assert blocker(bert) is None  # its last layer at the pooled first token (first_token_layer.py)
    gpt2 = AutoModelForSequenceClassification.from_config(
        GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, pad_token_id=0, num_labels=1)
    )
    assert "no decoder layer list" in blocker(gpt2)
    flex = _tiny(attn_implementation="flex_attention")
    assert "flex_attention takes no dense mask" in blocker(flex)
    # a GPT-2 reward model still scores (the full forward), padding-free rows included
    ids = concat_sequences([[1, 2, 3], [4, 5]])
    assert SequenceRewardModel(gpt2)(ids["input_ids"], torch.ones_like(ids["input_ids"])).shape == (1,)


def test_the_switch_is_a_model_setting_that_defaults_on():
    run = to_run_config(compose_train([]))
    assert run.model.final_layer_at_reads is True
    assert to_run_config(compose_train(["model.final_layer_at_reads=false"])).model.final_layer_at_reads is False


@pytest.mark.parametrize("layout", ["stacked", "shared_prefix"])
def test_torch_compile_traces_the_whole_model_without_a_graph_break(layout: str):
    """The read-only path stops the model with a hook and an exception: traced by dynamo, that broke
    the graph inside the decoder's layer loop, so `train.compile` left every layer eager. Under
    tracing the full forward is taken instead, and gives the same rewards."""
    import torch._dynamo

    tokenizer = AutoTokenizer.from_pretrained(TINY)
    model = SequenceRewardModel(_tiny())
    if layout == "stacked":
        ids = torch.randint(5, 100, (3, 9), generator=torch.Generator().manual_seed(0))
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    else:
        batch = pack_rows([[[5, 6, 7, 8, 9], [5, 6, 7, 10]], [[5, 11, 12], [5, 13]]], tokenizer.pad_token_id)
        reads = batch["reward_index"].flatten()
        inputs = {k: batch[k] for k in ("input_ids", "segment_ids", "position_ids")} | {"reward_index": reads}
    assert model.read_only_blocker() is None
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(**inputs)
    assert explained.graph_break_count == 0, explained.break_reasons
    with torch.no_grad():
        eager = model(**inputs)
        traced = torch.compile(model, backend="eager")(**inputs)
    torch.testing.assert_close(traced, eager, atol=1e-5, rtol=0)


# ---- encoders: the last layer at the pooled first token only (first_token_layer.py) ----------------
def _encoder(kind: str, attn_implementation: str = "sdpa", layers: int = 2):
    from transformers import ElectraConfig, RobertaConfig, XLMRobertaConfig

    torch.manual_seed(0)
    shape = dict(vocab_size=60, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64)
    shape |= dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=1)
    config = {
        "bert": lambda: BertConfig(**shape),
        "roberta": lambda: RobertaConfig(**shape, pad_token_id=1),
        "xlm-roberta": lambda: XLMRobertaConfig(**shape, pad_token_id=1),
        "electra": lambda: ElectraConfig(**shape, embedding_size=32),
    }[kind]()
    return AutoModelForSequenceClassification.from_config(config, attn_implementation=attn_implementation)


def _padded_batch(lengths: tuple[int, ...] = (11, 7, 3, 9)):
    ids = torch.randint(5, 60, (4, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    for row, length in enumerate(lengths):
        mask[row, length:] = 0
        ids[row, length:] = 0
    return ids, mask


def _rewards_and_grads(model, ids, mask):
    model.zero_grad(set_to_none=True)
    rewards = model(ids, mask)
    (rewards * torch.tensor([1.0, -2.0, 0.5, 3.0])).sum().backward()
    return rewards.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    ("kind", "attention", "lengths"),
    [
        ("bert", "sdpa", (11, 7, 3, 9)),
        ("bert", "eager", (11, 7, 3, 9)),
        ("bert", "sdpa", (11, 11, 11, 11)),  # no padding: sdpa's layers get no mask at all
        ("roberta", "sdpa", (11, 7, 3, 9)),
        ("xlm-roberta", "eager", (11, 7, 3, 9)),
        ("electra", "sdpa", (11, 7, 3, 9)),
    ],
)
def test_an_encoders_last_layer_at_its_first_token_equals_the_full_layer(
    kind: str, attention: str, lengths: tuple[int, ...]
):
    """Rewards and every gradient of the first-token last layer against the stock full layer, fp32,
    on right-padded rows of different lengths (the mask row of the first token is sliced, not dropped)."""
    model = SequenceRewardModel(_encoder(kind, attention), skip_padding=False)  # the padded layer (see
    model.train()  # test_unpadded_encoder.py for the layer on the real tokens only)
    assert model.pooling == "native" and model.read_only_blocker() is None
    layer = model.classifier.base_model.encoder.layer[-1]
    stock = type(model.classifier.base_model.encoder.layer[0])
    assert is_first_token_only(layer) and type(layer).__name__ == stock.__name__  # FSDP auto-wrap finds it by name
    ids, mask = _padded_batch(lengths)
    widths = []
    hook = layer.intermediate.register_forward_hook(lambda _m, args, _out: widths.append(args[0].shape[1]))
    fast = _rewards_and_grads(model, ids, mask)
    model.final_layer_at_reads = False
    assert type(layer) is stock
    full = _rewards_and_grads(model, ids, mask)
    hook.remove()
    assert widths == [1, 11]  # the feed-forward block ran at the first token, then at all 11
    torch.testing.assert_close(fast[0], full[0], atol=1e-5, rtol=0)
    assert fast[1].keys() == full[1].keys() and len(full[1]) > 20
    for name in full[1]:
        torch.testing.assert_close(fast[1][name], full[1][name], atol=1e-5, rtol=1e-4, msg=name)
    [ffn] = [name for name in fast[1] if name.endswith("encoder.layer.1.intermediate.dense.weight")]
    assert fast[1][ffn].abs().sum() > 0  # the last layer's feed-forward still learns, from the first token


def test_the_first_token_layer_saves_a_stock_model_and_a_copy_keeps_its_own_weights(tmp_path: Path):
    import copy

    model = SequenceRewardModel(_encoder("bert"))
    model.eval()
    ids, mask = _padded_batch()
    with torch.no_grad():
        ours = model(ids, mask)
    model.classifier.save_pretrained(tmp_path)
    stock = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert not is_first_token_only(stock.bert.encoder.layer[-1])
    assert set(stock.state_dict()) == set(model.classifier.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(
            stock(input_ids=ids, attention_mask=mask).logits.squeeze(-1), ours, atol=1e-5, rtol=0
        )
        twin = copy.deepcopy(model)
        for p in twin.parameters():
            p.add_(0.5)
        assert (twin(ids, mask) - ours).abs().max() > 1e-3  # the copy computes with its own weights
        torch.testing.assert_close(model(ids, mask), ours, atol=0, rtol=0)


def test_an_encoder_whose_last_layer_cannot_be_recomputed_runs_it_in_full():
    from transformers import DistilBertConfig

    distil = AutoModelForSequenceClassification.from_config(
        DistilBertConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=32, num_labels=1)
    )
    assert SequenceRewardModel(distil).read_only_blocker() == (
        "DistilBertForSequenceClassification is not a classifier known to read only its first token"
    )
    flex = SequenceRewardModel(_encoder("bert", "flex_attention"))
    assert flex.read_only_blocker() == "attn_implementation=flex_attention takes no dense mask"
    assert not is_first_token_only(flex.classifier.bert.encoder.layer[-1])
    off = SequenceRewardModel(_encoder("bert"), final_layer_at_reads=False)
    assert off.read_only_blocker() == "model.final_layer_at_reads=false"
    assert not is_first_token_only(off.classifier.bert.encoder.layer[-1])


def test_fsdp_auto_wrap_finds_the_layer_class_of_a_one_layer_encoder():
    """accelerate's transformer auto-wrap looks the classes of ``_no_split_modules`` up by name; with a
    single layer, the first-token layer is the only one to find."""
    from accelerate.utils.dataclasses import get_module_class_from_name

    model = SequenceRewardModel(_encoder("bert", layers=1))
    [layer] = model.classifier.bert.encoder.layer
    assert is_first_token_only(layer) and "BertLayer" in model._no_split_modules
    assert get_module_class_from_name(model, "BertLayer") is type(layer)


# ---- hooks: what the faster forwards would skip keeps the stock call; what runs anyway does not ------
def _changed_attention_output(_module, _args, out):
    """A forward hook that changes its module's output (an attention's (output, weights) tuple), so a
    forward skipping it would show."""
    return (out[0].flip(-1) * 3.0, *out[1:])


def test_hooks_on_the_last_decoder_layer_keep_or_run_with_the_read_only_layer():
    """A hook on the last layer's attention (whose call the read-only layer skips) or a forward hook on
    the layer or the backbone (their outputs are never made) turns the read-only layer off, and the
    rewards are the full layer's with the hook; a pre-forward hook on the layer (which runs before the
    read-only layer takes over) leaves it on and still acts."""
    ids, mask = _padded_batch()
    model = SequenceRewardModel(_tiny(), skip_padding=False)
    last = model.classifier.model.layers[-1]
    handle = last.self_attn.register_forward_hook(_changed_attention_output)
    assert model.read_only_blocker() == "hooks on LlamaAttention (the last layer at the reads would skip them)"
    with torch.no_grad():
        hooked = model(ids, mask)
        model.final_layer_at_reads = False
        torch.testing.assert_close(hooked, model(ids, mask), atol=1e-6, rtol=0)
        handle.remove()
        model.final_layer_at_reads = True
        assert (model(ids, mask) - hooked).abs().max() > 1e-3  # the hook changed the rewards
    handle = last.register_forward_hook(lambda _m, _a, out: out)
    assert model.read_only_blocker() == "hooks on LlamaDecoderLayer (the last layer at the reads would skip them)"
    handle.remove()
    # the backbone's call is stopped inside its forward: its forward hooks would never see the output
    handle = model.classifier.model.register_forward_hook(
        lambda _m, _a, out: type(out)(last_hidden_state=out.last_hidden_state.flip(-1))
    )
    assert model.read_only_blocker() == "hooks on LlamaModel (the last layer at the reads would skip them)"
    with torch.no_grad():
        hooked = model(ids, mask)
        model.final_layer_at_reads = False
        torch.testing.assert_close(hooked, model(ids, mask), atol=1e-6, rtol=0)
        model.final_layer_at_reads = True
    handle.remove()
    handle = last.register_forward_pre_hook(lambda _m, args: (args[0] * 0.5, *args[1:]))
    assert model.read_only_blocker() is None
    with torch.no_grad():
        read_only = model(ids, mask)
        model.final_layer_at_reads = False
        torch.testing.assert_close(read_only, model(ids, mask), atol=1e-5, rtol=0)
        handle.remove()
        assert (model(ids, mask) - read_only).abs().max() > 1e-3  # the pre-hook acted on both


def test_a_hook_on_an_encoders_last_attention_keeps_the_full_layer():
    """The first-token layer calls its attention modules' parts directly: a hook on them (added after the
    model was set up, as a user or library would) makes the layer run its stock forward, hook included."""
    ids, mask = _padded_batch()
    model = SequenceRewardModel(_encoder("bert"), skip_padding=False)
    model.eval()
    attention = model.classifier.bert.encoder.layer[-1].attention.self
    with torch.no_grad():
        plain = model(ids, mask)
        handle = attention.register_forward_hook(_changed_attention_output)
        assert SequenceRewardModel(_encoder("bert"), skip_padding=False).read_only_blocker() is None
        hooked = model(ids, mask)
        assert (hooked - plain).abs().max() > 1e-4  # rewards of about 0.03: the hook shows
        model.final_layer_at_reads = False  # the stock full layer, the same hook
        torch.testing.assert_close(hooked, model(ids, mask), atol=1e-6, rtol=0)
    fresh = _encoder("bert")
    fresh.bert.encoder.layer[-1].attention.self.register_forward_hook(_changed_attention_output)
    assert SequenceRewardModel(fresh, skip_padding=False).read_only_blocker() == (
        "hooks on BertSelfAttention (the last layer at the first token would skip them)"
    )
    handle.remove()
