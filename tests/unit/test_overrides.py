"""Command-line overrides are checked before Hydra runs a command: one line naming the key, a "did
you mean", and `+key` refused outside free-form mappings (rewardctl.config.overrides)."""

from __future__ import annotations

import pytest

from rewardctl.config.overrides import check_overrides, is_swept
from rewardctl.config.store import register
from rewardctl.errors import ConfigError

register()


@pytest.mark.parametrize(
    ("overrides", "key", "message"),
    [
        (["train.lrr=1"], "train.lrr", "no such key (did you mean train.lr?)"),
        (["model.max_lenght=3"], "model.max_lenght", "no such key (did you mean model.max_length?)"),
        (["method=bco", "method.betaa=1"], "method.betaa", "no such key (did you mean method.beta?)"),
        (
            ["method=pairwse"],
            "method=pairwse",
            "method has no option 'pairwse' (did you mean method=pairwise?) "
            "(options: bco, pairwise, prm, ranklist, regression)",
        ),
        (["hardware=gpuu"], "hardware=gpuu", "(did you mean hardware=gpu?)"),
        (["train.lr=fast"], "train.lr", "Value 'fast' of type 'str' could not be converted to Float"),
        (
            ["+train.lrr=1e-3"],
            "+train.lrr",
            "adds a key no setting reads (did you mean train.lr?); `+` adds keys only inside free-form mappings",
        ),
        (["++model.max_lenght=3"], "++model.max_lenght", "(did you mean model.max_length?)"),
        (
            ["data.train=[a,b]"],
            "data.train",
            "quote the text for the shell and for Hydra, e.g. data.train='\"<text>\"'",
        ),
        (["data.share_prefix=[1"], "data.share_prefix=[1", "no viable alternative"),
        # optional groups (data, experiment) would drop an unknown option without a word
        (
            ["data=ultrafeedbak"],
            "data=ultrafeedbak",
            "data has no option 'ultrafeedbak' (did you mean data=ultrafeedback?)",
        ),
        (["experiment=smok"], "experiment=smok", "(did you mean experiment=smoke?)"),
    ],
)
def test_a_bad_override_is_one_error_naming_its_key(overrides: list[str], key: str, message: str):
    with pytest.raises(ConfigError) as refused:
        check_overrides("train", overrides)
    assert refused.value.key == key and message in refused.value.reason
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["train.lr=3e-5", "method=ranklist", "method.loss=listmle"],
        ["+data.columns.chosen=response_a"],  # a Dict[str, str] field: any key is a value
        ["+model.config_overrides.rope_scaling.factor=8"],  # nested inside a free-form mapping
        ["+mygroup=option"],  # adds a config group (e.g. from hydra.searchpath): Hydra checks it
        ["method=regression", "+method.weights.helpfulness=2"],
        ["++train.lr=1e-4"],  # over an existing key
        ["+hydra.job.env_set.FOO=1"],
        ["+method.bogus=1"],  # the method's own schema refuses it once the class is known (test_config)
    ],
)
def test_good_overrides_pass(overrides: list[str]):
    check_overrides("train", overrides)


def test_in_a_sweep_swept_values_are_left_to_each_job_and_the_fixed_ones_are_checked():
    assert is_swept("train.lr=1e-5,3e-5") and is_swept("train.seed=range(3)") and not is_swept("train.lr=1e-5")
    check_overrides("train", ["train.lr=1e-5,3e-5", "method=pairwise,ranklist"], sweep=True)
    with pytest.raises(ConfigError, match="did you mean train.lr"):
        check_overrides("train", ["train.lr=1e-5,3e-5", "train.lrr=2"], sweep=True)
    # a swept group changes which keys exist (peft.r is lora's): each job composes and checks its own
    check_overrides("train", ["peft=lora,none", "peft.r=8"], sweep=True)


def test_eval_and_export_overrides_are_checked_against_their_own_configs():
    check_overrides("eval", ["run_dir=somewhere", "batch_size=4"])
    with pytest.raises(ConfigError, match="batch_siz.*did you mean batch_size"):
        check_overrides("eval", ["run_dir=somewhere", "batch_siz=4"])
