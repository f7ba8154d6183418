"""A policy's completion log-probs with the vocabulary projection at the predicting positions only.

Every value and gradient is compared with the plain computation written out here: every position's
logits, log-softmax, the completion tokens' entries summed."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from rewardctl.data import packing
from rewardctl.data.packing import LOGIT_COLUMN_BUCKETS, completion_logit_index, unpad_index
from rewardctl.modeling.causal import completion_logps, mean_pooled_prompt
from rewardctl.modeling.common import takes_logit_positions, takes_logits_to_keep, transformers_model

SHAPE = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 97,
    "max_position_embeddings": 64,
}


def llama() -> nn.Module:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SHAPE, pad_token_id=0, tie_word_embeddings=False)).float()


def qwen2() -> nn.Module:
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(**SHAPE, pad_token_id=0, tie_word_embeddings=True)).float()


def batch_of(lengths: list[int], prompts: list[int], *, padding_free: bool) -> dict[str, torch.Tensor]:
    """Right-padded rows of random tokens, as the policy collator lays them out."""
    generator = torch.Generator().manual_seed(1)
    width = max(lengths)
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, length in enumerate(lengths):
        input_ids[row, :length] = torch.randint(1, SHAPE["vocab_size"], (length,), generator=generator)
        attention_mask[row, :length] = 1
    columns = torch.arange(width)
    completion_mask = (columns[None, :] >= torch.tensor(prompts)[:, None]).long() * attention_mask
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}
    if padding_free:
        batch.update(unpad_index(attention_mask))
    batch.update(completion_logit_index(completion_mask, batch.get("flat_index")))
    return batch


def every_position_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The written-out reference: V logits at every position of the padded batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logprobs = logits[:, :-1].float().log_softmax(-1)
    picked = logprobs.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (picked * batch["completion_mask"][:, 1:]).sum(-1)


def test_logit_index_lists_each_rows_predicting_columns_and_their_packed_positions():
    completion_mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1], [0, 0, 0, 1, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    found = completion_logit_index(completion_mask, unpad_index(attention_mask)["flat_index"])
    # token t is predicted at t - 1; rows hold 2, 4 and 1 completion tokens (K = 4: up to 8, exact)
    assert found["logit_columns"].tolist() == [[1, 2, 0, 0], [0, 1, 2, 3], [2, 0, 0, 0]]
    assert found["logit_valid"].tolist() == [
        [True, True, False, False],
        [True, True, True, True],
        [True, False, False, False],
    ]
    # the packed row holds rows 0, 1, 2 at positions 0-3, 4-8, 9-12: exactly the 7 predicting ones
    assert found["logit_packed"].tolist() == [1, 2, 4, 5, 6, 7, 11]
    assert found["logit_slots"].tolist() == [[0, 1, 0, 0], [2, 3, 4, 5], [6, 0, 0, 0]]
    assert "logit_packed" not in completion_logit_index(completion_mask)
    none = completion_logit_index(torch.zeros(2, 3, dtype=torch.long), torch.tensor([0, 1, 3]))
    assert none["logit_valid"].tolist() == [[False], [False]] and none["logit_packed"].tolist() == [0]


def test_logit_columns_come_in_few_widths_and_never_past_the_batch():
    """Few buffer sizes (``LOGIT_COLUMN_BUCKETS`` widths per doubling, at most 1/8 spare): 33 predicting
    columns take 36 slots in a 70-wide batch, 31 take 32, 8 take 8, and 65 in a 66-wide batch take 66
    (72 would pass the batch's width); the extra slots are spare."""
    assert LOGIT_COLUMN_BUCKETS == 8
    for width, tokens, slots in [(70, 33, 36), (70, 31, 32), (70, 8, 8), (66, 65, 66)]:
        completion_mask = torch.zeros(2, width, dtype=torch.long)
        completion_mask[0, width - tokens :] = 1
        completion_mask[1, width - 3 :] = 1
        found = completion_logit_index(completion_mask)
        assert found["logit_columns"].shape == (2, slots)
        assert found["logit_valid"].sum(1).tolist() == [tokens, 3]
        assert found["logit_columns"][0, :tokens].tolist() == list(range(width - tokens - 1, width - 1))


@pytest.mark.parametrize("build", [llama, qwen2], ids=["llama", "qwen2-tied"])
@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding-free"])
def test_logps_and_gradients_equal_every_position_logits(build, padding_free, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(packing, "LOGIT_COLUMN_BUCKETS", 0)  # exact widths: the projection sees the needed rows only
    lengths, prompts = [9, 14, 6, 12], [3, 10, 5, 2]
    batch = batch_of(lengths, prompts, padding_free=padding_free)
    model = build()
    assert takes_logit_positions(model)
    projected: list[tuple[int, ...]] = []
    hook = model.lm_head.register_forward_hook(lambda _m, args, _o: projected.append(tuple(args[0].shape)))
    got = completion_logps(model, batch)[0]
    hook.remove()
    got.sum().backward()
    got_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    want = every_position_logps(model, batch)
    want.sum().backward()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(got_grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)
    completions = [length - prompt for length, prompt in zip(lengths, prompts, strict=True)]  # 6, 4, 1, 10
    # padded: 4 x 10 positions (the most any row needs, per row), not 4 x 14; one row: the 21 needed
    assert projected == ([(1, sum(completions), 32)] if padding_free else [(4, max(completions), 32)])


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding-free"])
@pytest.mark.parametrize(
    ("lengths", "prompts"),
    [([5, 7, 3], [5, 2, 1]), ([4, 6], [4, 6]), ([1, 3], [1, 0]), ([6], [0])],
    ids=["a-row-without-completion", "no-completion-at-all", "a-one-token-row", "empty-prompt"],
)
def test_edge_batches_equal_every_position_logits(lengths, prompts, padding_free):
    batch = batch_of(lengths, prompts, padding_free=padding_free)
    model = llama()
    with torch.no_grad():
        got = completion_logps(model, batch)[0]
        torch.testing.assert_close(got, every_position_logps(model, batch), atol=1e-5, rtol=1e-5)
    assert got[[p >= n for n, p in zip(lengths, prompts, strict=True)]].eq(0).all()


def test_a_batch_built_by_hand_gets_its_index_on_the_fly():
    batch = batch_of([7, 11], [2, 6], padding_free=False)
    for key in ("logit_columns", "logit_valid"):
        del batch[key]
    model = llama()
    with torch.no_grad():
        torch.testing.assert_close(completion_logps(model, batch)[0], every_position_logps(model, batch))


class NoLogitsToKeep(nn.Module):
    """A causal LM whose forward takes no ``logits_to_keep`` (remote code, an older head)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)


def test_a_model_without_logits_to_keep_gets_every_positions_logits():
    batch = batch_of([7, 11], [2, 6], padding_free=False)
    inner = llama()
    model = NoLogitsToKeep(inner)
    assert not takes_logit_positions(model) and not takes_logits_to_keep(model)
    projected: list[tuple[int, ...]] = []
    inner.lm_head.register_forward_hook(lambda _m, args, _o: projected.append(tuple(args[0].shape)))
    with torch.no_grad():
        got = completion_logps(model, batch)[0]
        torch.testing.assert_close(got, every_position_logps(inner, batch))
    assert projected[0] == (2, 11, 32)


class OwnForward(LlamaForCausalLM):
    """A subclass overriding forward (as remote code does): judged by its own forward, not Llama's."""

    def forward(self, input_ids=None, attention_mask=None, logits_to_keep=0, **kwargs):
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def test_only_a_forward_that_slices_with_transformers_helper_gets_positions():
    from transformers.models.csm.configuration_csm import CsmDepthDecoderConfig
    from transformers.models.csm.modeling_csm import CsmDepthDecoderForCausalLM

    with torch.device("meta"):
        config = LlamaConfig(**SHAPE)
        # its module imports the helper, but its forward slices by hand with the tensor
        csm = CsmDepthDecoderForCausalLM(CsmDepthDecoderConfig(**SHAPE, backbone_hidden_size=32))
        assert takes_logit_positions(LlamaForCausalLM(config))
        assert not takes_logit_positions(OwnForward(config))
        assert not takes_logit_positions(csm)
        assert takes_logits_to_keep(csm)


def test_lora_and_wrappers_are_looked_through():
    from peft import LoraConfig, get_peft_model

    base = llama()
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    wrapped = nn.Module()
    wrapped.module = model  # what DDP and DeepSpeed look like from outside
    assert transformers_model(wrapped) is base
    assert transformers_model(torch.compile(model)) is base  # OptimizedModule keeps it in _orig_mod
    assert takes_logit_positions(model) and takes_logit_positions(wrapped)
    batch = batch_of([8, 5, 10], [4, 1, 9], padding_free=False)
    with torch.no_grad():
        torch.testing.assert_close(completion_logps(model, batch)[0], every_position_logps(model, batch))


def test_prompt_embeddings_project_one_position_onto_the_vocabulary():
    batch = batch_of([6, 9], [6, 9], padding_free=False)
    model = llama().eval()
    projected: list[tuple[int, ...]] = []
    model.lm_head.register_forward_hook(lambda _m, args, _o: projected.append(tuple(args[0].shape)))
    with torch.no_grad():
        got = mean_pooled_prompt(model, batch["input_ids"], batch["attention_mask"])
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    torch.testing.assert_close(got, (hidden * mask).sum(1) / mask.sum(1))
    assert projected == [(2, 1, 32)]
