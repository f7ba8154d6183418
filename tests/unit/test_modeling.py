"""The reward is read at the last attended token, whatever the padding side, exactly as stock transformers reads it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate.utils import set_seed
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rewardctl.config.schema import ModelConfig, TrainConfig
from rewardctl.data.collate import pad_sequences
from rewardctl.errors import ConfigError
from rewardctl.modeling.sequence import (
    SequenceRewardModel,
    build_sequence_classifier,
    last_attended_index,
    rewards_of,
)
from rewardctl.modeling.tokenizer import ensure_distinct_pad_token, load_tokenizer

from ..conftest import TINY

TEXTS = [
    "User: hi\nAssistant: Hello!<|endoftext|>",
    "Short.<|endoftext|>",
    "User: What is the capital of Peru?\nAssistant: Lima is the capital of Peru.<|endoftext|>",
]


def tiny_model(tokenizer, **overrides) -> SequenceRewardModel:
    set_seed(0)
    cfg = ModelConfig(name_or_path=str(TINY), from_scratch=True, **overrides)
    return SequenceRewardModel(build_sequence_classifier(cfg, tokenizer, TrainConfig())).eval()


def test_last_attended_index_for_both_padding_sides():
    right = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 0, 1], [1, 1, 1, 1]])
    assert last_attended_index(right).tolist() == [2, 0, 3]
    assert last_attended_index(left).tolist() == [3, 3, 3]


def test_left_and_right_padding_give_the_same_rewards(tiny_tokenizer):
    model = tiny_model(tiny_tokenizer)
    sequences = [tiny_tokenizer(t)["input_ids"] for t in TEXTS]
    with torch.no_grad():
        right = model(*pad_sequences(sequences, tiny_tokenizer.pad_token_id, side="right"))
        left = model(*pad_sequences(sequences, tiny_tokenizer.pad_token_id, side="left"))
        alone = torch.cat([model(*pad_sequences([s], tiny_tokenizer.pad_token_id)) for s in sequences])
    assert right.shape == (3,) and right.dtype == torch.float32
    torch.testing.assert_close(left, right, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone, right, atol=1e-5, rtol=1e-5)


def test_rewards_equal_stock_transformers_forward(tiny_tokenizer, tmp_path: Path):
    model = tiny_model(tiny_tokenizer)
    model.classifier.save_pretrained(tmp_path)
    stock = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    batch = tiny_tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = model(batch["input_ids"], batch["attention_mask"])
        theirs = stock(**batch).logits.squeeze(-1)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert stock.config.num_labels == 1 and stock.config.problem_type == "regression"


def test_seeded_construction_reproduces_the_head(tiny_tokenizer):
    first, second = tiny_model(tiny_tokenizer), tiny_model(tiny_tokenizer)
    assert torch.equal(first.classifier.score.weight, second.classifier.score.weight)
    set_seed(1)
    other = SequenceRewardModel(
        build_sequence_classifier(ModelConfig(name_or_path=str(TINY), from_scratch=True), tiny_tokenizer, TrainConfig())
    )
    assert not torch.equal(first.classifier.score.weight, other.classifier.score.weight)


def test_a_multi_output_head_is_refused_before_loading_weights(tiny_tokenizer, tmp_path: Path):
    config_model = tiny_model(tiny_tokenizer).classifier
    config_model.config.num_labels = 2
    config_model.config.architectures = ["LlamaForSequenceClassification"]
    config_model.config.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ConfigError) as info:
        build_sequence_classifier(ModelConfig(name_or_path=str(tmp_path)), tiny_tokenizer, TrainConfig())
    assert "2-output classification head" in str(info.value) and info.value.key == "model.name_or_path"
    assert "needs exactly one output" in str(info.value)
    with pytest.raises(ConfigError, match=r"has exactly one output \(reward\); leave num_labels out"):
        build_sequence_classifier(
            ModelConfig(name_or_path=str(TINY), from_scratch=True, config_overrides={"num_labels": 3}),
            tiny_tokenizer,
            TrainConfig(),
        )


def test_dropout_is_disabled_by_default_and_kept_on_request(tiny_tokenizer):
    off = tiny_model(tiny_tokenizer, config_overrides={"attention_dropout": 0.3})
    on = tiny_model(tiny_tokenizer, config_overrides={"attention_dropout": 0.3}, disable_dropout=False)
    assert off.classifier.config.attention_dropout == 0.0
    assert on.classifier.config.attention_dropout == 0.3
    assert all(m.p == 0.0 for m in off.modules() if isinstance(m, nn.Dropout))


def test_pad_equal_to_eos_is_replaced_by_a_distinct_token(tmp_path: Path, tiny_tokenizer):
    tiny_tokenizer.pad_token = tiny_tokenizer.eos_token
    tiny_tokenizer.save_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert ensure_distinct_pad_token(tokenizer) is False  # <|pad|> already exists in this vocabulary
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.pad_token_id != tokenizer.eos_token_id


def test_a_tokenizer_without_any_pad_gets_one_and_the_embeddings_grow(tmp_path: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(c): i for i, c in enumerate(range(97, 123))} | {"<eos>": 26}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")
    tokenizer.save_pretrained(tmp_path)
    assert tokenizer.pad_token is None and len(tokenizer) == 27
    assert ensure_distinct_pad_token(tokenizer) is True
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.pad_token_id == 27 and len(tokenizer) == 28
    set_seed(0)
    cfg = ModelConfig(name_or_path=str(TINY), from_scratch=True, config_overrides={"vocab_size": 27})
    model = build_sequence_classifier(cfg, tokenizer, TrainConfig())
    assert model.get_input_embeddings().num_embeddings == 28 and model.config.pad_token_id == 27


def test_load_tokenizer_errors_name_the_key(tmp_path: Path):
    with pytest.raises(ConfigError) as info:
        load_tokenizer(ModelConfig(name_or_path=str(tmp_path / "absent")))
    assert info.value.key == "model.name_or_path"
    with pytest.raises(ConfigError) as info:
        load_tokenizer(ModelConfig(name_or_path=str(TINY), chat_template="not a template"))
    assert info.value.key == "model.chat_template"


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_tokenizer):
    sequences = [tiny_tokenizer(t)["input_ids"] for t in TEXTS]
    ids, mask = pad_sequences(sequences, tiny_tokenizer.pad_token_id)
    results = []
    for checkpointing in (False, True):
        set_seed(0)
        cfg = ModelConfig(name_or_path=str(TINY), from_scratch=True)
        model = SequenceRewardModel(
            build_sequence_classifier(cfg, tiny_tokenizer, TrainConfig(gradient_checkpointing=checkpointing))
        )
        model.train()
        loss = model(ids, mask).pow(2).sum()
        loss.backward()
        results.append((loss.detach(), model.classifier.score.weight.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_parameter_counts_see_through_zero3_partitioning_and_4bit_packing():
    from rewardctl.modeling.common import count_parameters, parameter_count

    partitioned = nn.Parameter(torch.empty(0))
    partitioned.ds_numel = 1000  # what deepspeed.zero.Init leaves on a parameter
    assert parameter_count(partitioned) == 1000

    class Params4bit(nn.Parameter):  # bitsandbytes' class name: two 4-bit values per storage byte
        pass

    packed = Params4bit(torch.zeros(50, dtype=torch.uint8), requires_grad=False)
    packed.quant_storage = torch.uint8
    assert parameter_count(packed) == 100

    model = nn.Linear(3, 2)
    model.bias.requires_grad_(False)
    assert count_parameters(model) == {"total": 8, "trainable": 6}


def test_a_saved_classifier_keeps_its_head_dropout_off_after_a_stock_reload(tmp_path: Path):
    """Llama's token-classification head falls back to dropout 0.1 when its config has no
    classifier_dropout: the config we save states 0.0, so `.train()` after a stock reload trains as we did."""
    from transformers import AutoModelForTokenClassification

    from rewardctl.modeling.common import load_config

    config = load_config(ModelConfig(name_or_path=str(TINY), from_scratch=True))
    assert config.classifier_dropout == 0.0
    AutoModelForTokenClassification.from_config(config).save_pretrained(tmp_path)
    reloaded = AutoModelForTokenClassification.from_pretrained(tmp_path).train()
    assert [m.p for m in reloaded.modules() if isinstance(m, nn.Dropout)] == [0.0]


def test_a_saved_classifier_with_other_outputs_is_refused_by_name(tiny_tokenizer, tmp_path: Path):
    from rewardctl.errors import ModelMismatchError
    from rewardctl.modeling.sequence import load_saved_classifier

    cfg = ModelConfig(name_or_path=str(TINY), from_scratch=True)
    build_sequence_classifier(cfg, tiny_tokenizer, TrainConfig(), labels=("helpfulness", "verbosity")).save_pretrained(
        tmp_path
    )
    assert load_saved_classifier(tmp_path, cfg, labels=("helpfulness", "verbosity")).config.num_labels == 2
    with pytest.raises(
        ModelMismatchError, match=r"outputs \['helpfulness', 'verbosity'\], not the expected \['reward'\]"
    ):
        load_saved_classifier(tmp_path, cfg)
    with pytest.raises(ModelMismatchError, match=r"not the expected \['verbosity', 'helpfulness'\]"):
        load_saved_classifier(tmp_path, cfg, labels=("verbosity", "helpfulness"))


def test_rewards_are_float32_tensors_of_their_own_one_or_several_per_item():
    """What the reward wrapper returns is never a view of the head's output (FSDP2 warns on a root
    module returning one): (N, 1) becomes (N,) rewards, (N, K) stays one column per output."""
    scalar = torch.tensor([[0.5], [-1.25]], dtype=torch.bfloat16)
    single = torch.tensor([[0.5], [-1.25]])
    several = torch.tensor([[0.5, 2.0], [-1.25, 3.0]])
    for scores, expected in ((scalar, [0.5, -1.25]), (single, [0.5, -1.25]), (several, several.tolist())):
        rewards = rewards_of(scores)
        assert rewards.dtype == torch.float32 and rewards.tolist() == expected
        assert not rewards._is_view() and rewards.data_ptr() != scores.data_ptr()
