"""BCO: exact tokenisation, loss and running delta by hand, UDM weights, references and parity with TRL;
the training runs are in tests/e2e/test_bco_runs.py."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from rewardctl.data.loading import load_rows
from rewardctl.errors import ConfigError, DataError
from rewardctl.methods.api import bco_loss, implicit_rewards
from rewardctl.methods.bco import BcoMethod, LocalRuntime, RunningMean
from rewardctl.methods.registry import to_run_config
from rewardctl.methods.udm import PromptClassifier, fit_balanced_logistic_regression

from ..conftest import (
    compose_train,
    optional_module,
    read_jsonl,
    write_jsonl,
)


def make_method(*overrides: str) -> BcoMethod:
    run = to_run_config(compose_train(["method=bco", *overrides]))
    return BcoMethod(run.method, run)


def nll_sigmoid(x: float) -> float:
    return math.log1p(math.exp(-x))


def prepared(method: BcoMethod, path: Path, *, training: bool = False) -> list[dict]:
    rows = load_rows(str(path), split="train")
    return list(method.prepare(rows, str(path), training=training).dataset)


# ---- tokenisation ---------------------------------------------------------------------------------
def test_standard_row_exact_ids_boundary_and_labels(tmp_path: Path):
    method = make_method()
    tok = method.tokenizer
    rows = [
        {"prompt": "User: Is the sky blue?\nAssistant:", "completion": " Yes.", "label": True},
        {"prompt": "User: Is grass red?\nAssistant:", "completion": " No.", "label": False},
    ]
    features = prepared(method, write_jsonl(tmp_path / "rows.jsonl", rows))
    prompt = tok("User: Is the sky blue?\nAssistant:", add_special_tokens=False)["input_ids"]
    full = tok("User: Is the sky blue?\nAssistant: Yes.", add_special_tokens=False)["input_ids"]
    assert tok.bos_token_id is None  # the tiny tokenizer has none: nothing is prepended
    assert features[0]["input_ids"] == full + [tok.eos_token_id] and features[0]["prompt_length"] == len(prompt)
    assert full[: len(prompt)] == prompt
    assert [f["label"] for f in features] == [True, False]
    batch = method.collate(features)
    n = len(full) + 1
    assert batch["completion_mask"][0].tolist() == [0] * len(prompt) + [1] * (n - len(prompt)) + [0] * (
        batch["input_ids"].shape[1] - n
    )
    assert batch["label"].tolist() == [True, False] and batch["index"].tolist() == [0, 1]
    # The causal LM's labels are the completion tokens only: -100 on the prompt and padding.
    labels = torch.where(batch["completion_mask"] == 1, batch["input_ids"], -100)
    assert labels[0].tolist()[: len(prompt)] == [-100] * len(prompt)
    assert labels[0].tolist()[len(prompt) : n] == full[len(prompt) :] + [tok.eos_token_id]
    assert labels[0].tolist()[n:] == [-100] * (batch["input_ids"].shape[1] - n)


def test_a_bos_token_is_prepended_once_and_eos_never_doubled(tmp_path: Path):
    method = make_method()
    tok = method.tokenizer
    tok.bos_token = "<|im_start|>"
    rows = [{"prompt": "Q:", "completion": " done<|endoftext|>", "label": True}]
    (feature,) = prepared(method, write_jsonl(tmp_path / "rows.jsonl", rows))
    assert (
        feature["input_ids"] == [tok.bos_token_id] + tok("Q: done<|endoftext|>", add_special_tokens=False)["input_ids"]
    )
    assert feature["input_ids"].count(tok.eos_token_id) == 1 and feature["prompt_length"] == 1 + len(
        tok("Q:")["input_ids"]
    )


def test_conversational_rows_use_the_template_with_no_second_eos(tmp_path: Path):
    method = make_method()
    tok = method.tokenizer
    prompt = [{"role": "user", "content": "Is the sky blue?"}]
    completion = [{"role": "assistant", "content": "Yes."}]
    (feature,) = prepared(
        method, write_jsonl(tmp_path / "chat.jsonl", [{"prompt": prompt, "completion": completion, "label": True}])
    )
    text = "<|im_start|>user\nIs the sky blue?<|im_end|>\n<|im_start|>assistant\nYes.<|im_end|>\n"
    assert tok.decode(feature["input_ids"]) == text
    assert (
        tok.decode(feature["input_ids"][: feature["prompt_length"]])
        == "<|im_start|>user\nIs the sky blue?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.eos_token_id not in feature["input_ids"]


def test_truncation_keeps_the_prompt_end_and_the_completion_start_never_emptying_it():
    from rewardctl.config.schema import Overlength
    from rewardctl.methods.bco import PromptCompletionEncoder

    method = make_method("method.max_length=10", "method.max_prompt_length=4")
    encoder = PromptCompletionEncoder(method.tokenizer, method.cfg, 10, Overlength.truncate)
    prompt, completion = list(range(100, 108)), list(range(200, 209))
    assert encoder.fit(prompt[:3], completion[:5]) == (prompt[:3], completion[:5], 0)
    p, c, fit = encoder.fit(prompt, completion)
    assert p == prompt[-4:] and c == completion[:6] and fit == 1
    keep_start = make_method("method.max_length=10", "method.max_prompt_length=4", "method.truncation_mode=keep_start")
    p, c, _ = PromptCompletionEncoder(keep_start.tokenizer, keep_start.cfg, 10, Overlength.truncate).fit(
        prompt, completion
    )
    assert p == prompt[:4] and c == completion[:6]
    capped = make_method("method.max_length=10", "method.max_completion_length=3")
    p, c, _ = PromptCompletionEncoder(capped.tokenizer, capped.cfg, 10, Overlength.truncate).fit(prompt, completion)
    assert p == prompt[-7:] and c == completion[:3]  # no prompt cap: as much prompt as the budget leaves
    p, c, _ = PromptCompletionEncoder(capped.tokenizer, capped.cfg, 10, Overlength.truncate).fit(prompt, completion[:1])
    assert p == prompt[-8:] and c == completion[:1]  # the whole prompt fits beside a 1-token completion
    long_both = PromptCompletionEncoder(
        method.tokenizer, make_method("method.max_length=10").cfg, 10, Overlength.truncate
    )
    p, c, _ = long_both.fit(prompt, completion)
    assert p == prompt[-5:] and c == completion[:5]  # both long: the prompt keeps half the budget
    dropping = PromptCompletionEncoder(method.tokenizer, method.cfg, 10, Overlength.drop)
    assert dropping.fit(prompt, completion)[2] == 2


def test_paired_rows_are_unpaired_on_the_fly(tmp_path: Path):
    method = make_method()
    rows = [
        {"prompt": "Q1:", "chosen": " good", "rejected": " bad"},
        {"prompt": "Q2:", "chosen": " yes", "rejected": " no"},
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    split = method.prepare(load_rows(str(path), split="train"), str(path), training=True)
    assert split.report["desirable"] == split.report["undesirable"] == 2 and split.report["unpaired_from_pairs"]
    assert [f["label"] for f in split.dataset] == [True, False, True, False]
    assert [f["_row"] for f in split.dataset] == [0, 0, 1, 1]  # errors and predictions name the file row
    tok = method.tokenizer
    assert split.dataset[1]["input_ids"] == tok("Q1: bad", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (
            [{"prompt": "Q", "completion": " a", "label": True}, {"prompt": "Q", "completion": " b", "label": "no"}],
            "row 2, field 'label': must be true (desirable) or false",
        ),
        (
            [{"prompt": "Q", "completion": " a", "label": True}, {"prompt": "Q", "completion": " ", "label": False}],
            "row 2, field 'completion': is empty",
        ),
        (
            [{"prompt": "Q", "completion": " a", "label": True}, {"prompt": "Q", "completion": " b", "label": True}],
            "needs both desirable (label true) and undesirable",
        ),
    ],
)
def test_bad_rows_are_refused_by_name(tmp_path: Path, rows, message):
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        prepared(make_method(), write_jsonl(tmp_path / "bad.jsonl", rows), training=True)


def test_config_checks_name_the_key():
    with pytest.raises(ConfigError, match="method.beta"):
        make_method("method.beta=0")
    with pytest.raises(ConfigError, match="method.max_prompt_length"):
        make_method("method.max_prompt_length=128")  # the tiny model's whole budget
    with pytest.raises(ConfigError, match="method.min_density_ratio"):
        make_method("method.min_density_ratio=5", "method.max_density_ratio=2")


# ---- loss, delta, UDM -------------------------------------------------------------------------------
class UniformLM(nn.Module):
    """Zero logits: every token has log-prob -log(V), so a reward is set through the reference table."""

    def __init__(self, vocab: int = 1024) -> None:
        super().__init__()
        self.config = SimpleNamespace(output_router_logits=False)
        self.vocab = vocab
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask, **_):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab) + self.bias)


def rows_with_rewards(method: BcoMethod, rewards: list[float], labels: list[bool], start: int):
    """Features whose completion has 2 predicted tokens, and reference log-probs giving ``rewards``."""
    features = [
        {"input_ids": [5, 6, 7], "prompt_length": 1, "label": label, "_index": start + i}
        for i, label in enumerate(labels)
    ]
    logp = -2 * math.log(1024)
    table = method.ref_tables.setdefault("train", torch.zeros(16))
    for i, reward in enumerate(rewards):
        table[start + i] = logp - reward / method.cfg.beta
    return method.collate(features)


def test_loss_and_delta_over_three_micro_batches_by_hand():
    method = make_method()
    model = UniformLM()
    expected_delta = [0.0, 1.0, 1 / 3]
    batches = [([1.0, -1.0], [True, False]), ([3.0], [True]), ([-2.0, 0.5, 0.5], [False, True, False])]
    by_hand = [
        nll_sigmoid(1.0) + nll_sigmoid(1.0),
        nll_sigmoid(2.0),
        nll_sigmoid(2.0 + 1 / 3) + nll_sigmoid(0.5 - 1 / 3) + nll_sigmoid(-(0.5 - 1 / 3)),
    ]
    start = 0
    for (rewards, labels), delta, loss in zip(batches, expected_delta, by_hand, strict=True):
        out = method.train_step(model, rows_with_rewards(method, rewards, labels, start))
        start += len(rewards)
        assert out.metrics["delta"].value.item() == pytest.approx(delta, abs=1e-6)  # updated before it is read
        assert out.loss_sum.item() == pytest.approx(loss, abs=1e-5)
        assert out.metrics["accuracy"].value.item() == sum(
            (r > delta) if lab else (r < delta) for r, lab in zip(rewards, labels, strict=True)
        )
    assert method.delta.count.item() == 6 and method.delta.value == pytest.approx(1 / 3)
    batch = rows_with_rewards(method, [0.5], [True], 10)
    method.ref_tables["eval"] = method.ref_tables["train"]
    frozen = method.eval_step(model, batch)
    assert method.delta.count.item() == 6  # eval never moves delta
    assert frozen["loss"].item() == pytest.approx(nll_sigmoid(0.5 - 1 / 3), abs=1e-5)


def test_bco_loss_by_hand_on_exact_tensors():
    """The pure loss: -log sigma(r - delta) for a desirable row, -w * log sigma(-(r - delta)) for an
    undesirable one (its UDM weight; a desirable row's weight is ignored)."""

    def sigma(x: float) -> float:
        return 1 / (1 + math.exp(-x))

    rewards, labels = torch.tensor([0.3, -0.2]), torch.tensor([True, False])
    desirable = -math.log(sigma(0.3 - 0.05))  # -log sigma(0.25) = 0.575939...
    undesirable = -math.log(sigma(-(-0.2 - 0.05)))  # -log sigma(0.25) as well
    assert desirable == pytest.approx(0.5759394, abs=1e-7)
    torch.testing.assert_close(
        bco_loss(rewards, labels, 0.05, torch.tensor([1.0, 2.0])), torch.tensor([desirable, 2 * undesirable])
    )
    torch.testing.assert_close(
        bco_loss(rewards, labels, 0.05, torch.tensor([7.0, 2.0])), torch.tensor([desirable, 2 * undesirable])
    )  # a desirable row's weight is never used
    torch.testing.assert_close(bco_loss(rewards, labels, 0.05), torch.tensor([desirable, undesirable]))
    # delta as the running mean's 0-dim float64 tensor leaves the losses in the rewards' dtype
    same = bco_loss(rewards, labels, torch.tensor(0.05, dtype=torch.float64))
    assert same.dtype == torch.float32
    torch.testing.assert_close(same, torch.tensor([desirable, undesirable]))
    # the wrong side of delta costs about |r - delta|, the right side tends to 0; log 2 at r = delta
    far = bco_loss(torch.tensor([-10.0, -10.0, 0.0]), torch.tensor([True, False, True]), 0.0)
    torch.testing.assert_close(
        far, torch.tensor([10.0 + math.log1p(math.exp(-10)), math.log1p(math.exp(-10)), math.log(2)])
    )


def test_bco_loss_refuses_mismatched_shapes_and_non_bool_labels():
    with pytest.raises(ValueError, match="shape"):
        bco_loss(torch.zeros(2, 1), torch.tensor([True, False]), 0.0)
    with pytest.raises(ValueError, match="bool"):
        bco_loss(torch.zeros(2), torch.tensor([1, 0]), 0.0)
    with pytest.raises(ValueError, match="undesirable_weights"):
        bco_loss(torch.zeros(2), torch.tensor([True, False]), 0.0, torch.ones(3))


def test_implicit_rewards_are_beta_times_the_log_ratio():
    rewards = implicit_rewards(torch.tensor([-12.0, -30.0]), torch.tensor([-14.0, -25.0]), 0.1)
    torch.testing.assert_close(rewards, torch.tensor([0.2, -0.5]))


def test_running_mean_is_count_weighted_and_reduced_across_processes():
    class TwoProcesses(LocalRuntime):
        def all_reduce_sum(self, tensor):
            return tensor * 2  # another process with identical rewards

    delta = RunningMean()
    delta.update(torch.tensor([1.0, 2.0, 3.0]), TwoProcesses())
    delta.update(torch.tensor([10.0]), LocalRuntime())
    assert delta.count.item() == 7 and delta.value == pytest.approx((12 + 10) / 7)


def test_udm_weights_clamp_the_density_ratio_and_apply_to_undesirable_rows_only():
    classifier = PromptClassifier(
        torch.tensor([1.0], dtype=torch.float64),
        torch.tensor(0.0, dtype=torch.float64),
        torch.zeros(1, dtype=torch.float64),
        torch.ones(1, dtype=torch.float64),
    )
    ratios = classifier.density_ratio(torch.tensor([[-2.0], [0.0], [1.0], [5.0]]), 0.5, 10.0)
    torch.testing.assert_close(ratios, torch.tensor([0.5, 1.0, math.e, 10.0]))
    assert classifier.prob_desirable(torch.tensor([[1.0]])).item() == pytest.approx(1 / (1 + math.exp(-1)))
    method = make_method()
    method.udm_weights = torch.tensor([3.0, 3.0, 0.5, 1.0] + [1.0] * 12)
    out = method.train_step(UniformLM(), rows_with_rewards(method, [1.0, 1.0, -1.0], [True, False, False], 0))
    # delta = 1/3; row 0 desirable (weight ignored), rows 1-2 undesirable with weights 3 and 0.5.
    expected = nll_sigmoid(2 / 3) + 3 * nll_sigmoid(-2 / 3) + 0.5 * nll_sigmoid(4 / 3)
    assert out.loss_sum.item() == pytest.approx(expected, abs=1e-5)
    assert out.metrics["udm_weight"].value.item() == pytest.approx(3.5) and out.metrics["udm_weight"].count == 2
    only_desirable = method.train_step(UniformLM(), rows_with_rewards(method, [1.0], [True], 3))
    assert only_desirable.metrics["udm_weight"].count == 0  # same metric keys on every process, every step


def test_balanced_logistic_regression_solves_its_objective():
    generator = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(30, 3, generator=generator) + 1.0, torch.randn(90, 3, generator=generator) - 0.5])
    y = torch.cat([torch.ones(30), torch.zeros(90)])
    clf = fit_balanced_logistic_regression(x, y, l2=1.0)
    weight = clf.weight.clone().requires_grad_(True)
    bias = clf.bias.clone().requires_grad_(True)
    z = ((x.double() - clf.mean) / clf.scale) @ weight + bias
    class_weight = torch.where(y == 1, 120 / 60, 120 / 180).double()
    objective = (class_weight * nn.functional.binary_cross_entropy_with_logits(z, y.double(), reduction="none")).sum()
    (objective + 0.5 * weight.pow(2).sum()).backward()
    assert weight.grad.abs().max() < 1e-5 and bias.grad.abs() < 1e-5  # the optimum of the balanced, L2 objective
    balanced_accuracy = (
        (clf.prob_desirable(x[:30]) > 0.5).double().mean() + (clf.prob_desirable(x[30:]) <= 0.5).double().mean()
    ) / 2
    assert balanced_accuracy > 0.8
    state = clf.state_dict("udm.")
    again = PromptClassifier.from_state_dict(state, "udm.")
    torch.testing.assert_close(again.logits(x), clf.logits(x))


@pytest.mark.parametrize("standardize", [True, False])
def test_the_udm_fit_equals_scikit_learns_on_raw_or_standardised_embeddings(standardize: bool):
    """standardize=false is TRL's fit (sklearn on the raw embeddings); true, our default, is sklearn on
    StandardScaler'd embeddings. Features on a scale of ~30, where the two fits differ."""
    linear_model = optional_module("sklearn.linear_model", "parity")
    generator = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(40, 4, generator=generator) * 30 + 5, torch.randn(80, 4, generator=generator) * 30 - 5])
    y = torch.cat([torch.ones(40), torch.zeros(80)])
    ours = fit_balanced_logistic_regression(x, y, l2=2.0, standardize=standardize)
    features = ((x - x.mean(0)) / x.std(0, unbiased=False)) if standardize else x
    theirs = linear_model.LogisticRegression(C=1 / 2.0, class_weight="balanced", tol=1e-12, max_iter=10_000)
    theirs.fit(features.double().numpy(), y.numpy())
    probabilities = torch.from_numpy(theirs.predict_proba(features.double().numpy())[:, 1])
    torch.testing.assert_close(ours.prob_desirable(x), probabilities, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.weight, torch.from_numpy(theirs.coef_[0]), atol=1e-4, rtol=1e-4)


def test_moe_router_aux_loss_is_added_with_its_coefficient():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=1024,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=4,
        num_experts_per_tok=2,
        output_router_logits=True,
        router_aux_loss_coef=0.25,
    )
    model = MixtralForCausalLM(config)
    method = make_method()
    batch = rows_with_rewards(method, [0.0, 0.0], [True, False], 0)
    out = method.train_step(model, batch)
    aux = out.metrics["aux_loss"].value
    assert aux.item() > 0
    plain = method._losses(*_rewards_and_labels(method, model, batch)).sum()
    assert out.loss_sum.item() == pytest.approx(plain.item() + 0.25 * aux.item() * 2, rel=1e-5)


def _rewards_and_labels(method: BcoMethod, model, batch):
    rewards = method._rewards(model, batch, "train")[0]
    return rewards, batch["label"], method.delta.value, None


# ---- references -----------------------------------------------------------------------------------
def test_precomputed_reference_log_probs_equal_the_frozen_copy(tmp_path: Path):
    from accelerate.utils import set_seed

    path = write_jsonl(tmp_path / "rows.jsonl", read_jsonl(Path(make_method().run.data.train))[:24])
    method = make_method("method.precompute_ref_log_probs=true", "train.per_device_batch_size=5")
    split = method.prepare(load_rows(str(path), split="train"), str(path), training=True)
    set_seed(0)
    model = method.build_model()
    method.on_train_start(model, LocalRuntime(), resuming=False)
    assert method.reference is None and method.ref_tables["train"].shape == (24,)
    on_the_fly = make_method()
    on_the_fly.prepare(load_rows(str(path), split="train"), str(path), training=True)
    on_the_fly.on_train_start(model, LocalRuntime(), resuming=False)
    batch = method.collate([split.dataset[i] for i in range(24)])
    expected = on_the_fly._reference_logps(model, {k: v for k, v in batch.items() if k != "index"}, "train")
    torch.testing.assert_close(method._reference_logps(model, batch, "train"), expected, atol=1e-5, rtol=1e-5)


# ---- parity with TRL, explicit and rebuilt references -----------------------------------------------


def test_loss_and_delta_match_trl_0_29_bco_over_three_micro_batches():
    """Parity with TRL 0.29.1's BCOTrainer.bco_loss (RunningMoments delta), when trl is installed."""
    trl_bco = optional_module("trl.experimental.bco.bco_trainer", "parity")
    from accelerate import Accelerator

    trainer = SimpleNamespace(
        beta=0.1, running=trl_bco.RunningMoments(Accelerator(cpu=True)), match_underlying_distribution=False
    )
    method = make_method("method.beta=0.1")
    generator = torch.Generator().manual_seed(3)
    for chosen_n, rejected_n in ((3, 2), (1, 4), (5, 5)):
        pc, rc = -20 * torch.rand(chosen_n, generator=generator), -20 * torch.rand(chosen_n, generator=generator)
        pr, rr = -20 * torch.rand(rejected_n, generator=generator), -20 * torch.rand(rejected_n, generator=generator)
        theirs, _, _, their_delta = trl_bco.BCOTrainer.bco_loss(trainer, pc, pr, rc, rr, None, None, do_train=True)
        rewards = 0.1 * torch.cat([pc - rc, pr - rr])
        labels = torch.tensor([True] * chosen_n + [False] * rejected_n)
        method.delta.update(rewards, LocalRuntime())
        ours = method._losses(rewards, labels, method.delta.value, None)
        assert method.delta.value == pytest.approx(float(their_delta), abs=1e-6)
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)


def test_an_explicit_reference_model_is_loaded_frozen(tmp_path: Path):
    from accelerate.utils import set_seed

    method = make_method()
    set_seed(7)
    other = method.build_model()
    other.save_pretrained(tmp_path / "ref")
    with_ref = make_method(f"method.ref_model={tmp_path / 'ref'}")
    set_seed(0)
    policy = with_ref.build_model()
    with_ref.on_train_start(policy, LocalRuntime(), resuming=False)
    assert with_ref.reference is not None and not any(p.requires_grad for p in with_ref.reference.parameters())
    batch = with_ref.collate([{"input_ids": [5, 6, 7, 8], "prompt_length": 2, "label": True}])
    from rewardctl.modeling.causal import completion_logps

    with torch.no_grad():
        expected = completion_logps(other.eval(), batch)[0]
        policy_logps = completion_logps(policy, batch)[0]
    got = with_ref._reference_logps(policy, batch, "train")
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, policy_logps)


def test_eval_drops_precomputed_tables_and_rebuilds_the_reference():
    method = make_method("method.precompute_ref_log_probs=true")
    method.ref_tables = {"eval": torch.zeros(3), "train": torch.zeros(3)}  # as restored from a checkpoint
    method.on_eval_start(method.build_model(), LocalRuntime())
    assert method.ref_tables == {} and method.reference is not None


def test_the_log_says_where_the_policy_projects_onto_its_vocabulary(caplog, monkeypatch):
    from rewardctl.methods import policy

    with caplog.at_level("INFO", logger="rewardctl.methods.policy"):
        make_method().build_model()
        monkeypatch.setattr(policy, "takes_logit_positions", lambda model: False)
        make_method().build_model()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("vocabulary logits")]
    assert lines == [
        "vocabulary logits at the completion-predicting positions only",
        "vocabulary logits at every position: LlamaForCausalLM's forward does not slice with transformers' "
        "slice_logits_to_keep",
    ]
