"""The tokenisation cache is keyed on what shapes the features, nothing else: a sweep over a loss
setting tokenises once, a change to the budget, truncation or separator tokenises again."""

from __future__ import annotations

from pathlib import Path

import pytest

import rewardctl.data.prepare as prepare_module
from rewardctl.data.loading import load_rows
from rewardctl.methods.base import feature_key
from rewardctl.methods.bco import BcoMethod
from rewardctl.methods.pairwise import PairwiseMethod
from rewardctl.methods.prm import PrmMethod
from rewardctl.methods.ranklist import RanklistMethod
from rewardctl.methods.registry import to_run_config

from ..conftest import compose_train, read_jsonl, write_jsonl

METHODS = {"bco": BcoMethod, "prm": PrmMethod, "pairwise": PairwiseMethod, "ranklist": RanklistMethod}
ROWS = 12


def make_method(name: str, *overrides: str):
    run = to_run_config(compose_train([f"method={name}", *overrides]))
    return METHODS[name](run.method, run)


@pytest.fixture
def featurized_rows(monkeypatch) -> list[int]:
    """Rows ``datasets.map`` ran the featurizer on (one entry per prepare call), counted where
    ``featurize_split`` hands each row over; a cache hit runs none."""
    counts: list[int] = []
    real = prepare_module._row_at

    def counting(batch, i):
        counts[-1] += 1
        return real(batch, i)

    monkeypatch.setattr(prepare_module, "_row_at", counting)
    return counts


def prepared(name: str, path: Path, counts: list[int], *overrides: str, training: bool = True):
    """Prepare ``path`` (loaded afresh, as a new run would) with ``overrides``; returns the dataset."""
    counts.append(0)
    method = make_method(name, *overrides)
    return method.prepare(load_rows(str(path), split="train"), str(path), training=training).dataset


def sample_file(name: str, tmp_path: Path) -> Path:
    """The first rows of the method's bundled sample, in a file no other test has tokenised."""
    source = Path(make_method(name).run.data.train)
    return write_jsonl(tmp_path / f"{name}.jsonl", read_jsonl(source)[:ROWS])


@pytest.mark.parametrize(
    ("name", "training", "loss_only", "shaping"),
    [
        ("bco", True, "method.beta=0.5", "method.max_length=64"),
        # PRM has no loss-only setting; the last-step rule moves training labels only, so an eval split
        # does not depend on it.
        ("prm", False, "method.train_on_last_step_only=true", "method.step_separator=' ; '"),
        ("pairwise", True, "method.center_rewards_coefficient=0.01", "model.max_length=120"),
        ("ranklist", True, "method.margin_scale=2.0", "model.max_length=120"),
    ],
)
def test_a_loss_setting_reuses_the_tokenised_split_and_a_feature_setting_does_not(
    name: str, training: bool, loss_only: str, shaping: str, tmp_path: Path, featurized_rows: list[int]
):
    path = sample_file(name, tmp_path)
    first = prepared(name, path, featurized_rows, training=training)
    again = prepared(name, path, featurized_rows, loss_only, training=training)
    changed = prepared(name, path, featurized_rows, shaping, training=training)
    assert featurized_rows[0] == ROWS  # tokenised once...
    assert featurized_rows[1] == 0, f"{loss_only} re-tokenised the split"  # ...and reused from the cache
    assert again._fingerprint == first._fingerprint and list(again) == list(first)
    assert featurized_rows[2] == ROWS, f"{shaping} reused features made without it"
    assert changed._fingerprint != first._fingerprint


def test_the_last_step_rule_retokenises_a_prm_training_split(tmp_path: Path, featurized_rows: list[int]):
    path = sample_file("prm", tmp_path)
    first = prepared("prm", path, featurized_rows)
    last_only = prepared("prm", path, featurized_rows, "method.train_on_last_step_only=true")
    assert featurized_rows == [ROWS, ROWS] and last_only._fingerprint != first._fingerprint


def test_feature_key_names_the_schema_and_only_the_listed_fields():
    first = make_method("bco").cfg
    other_beta = make_method("bco", "method.beta=0.5").cfg
    assert feature_key(first, "max_length", "truncation_mode") == ("BcoConfig", None, first.truncation_mode)
    assert feature_key(first, "max_length") == feature_key(other_beta, "max_length")
    assert feature_key(first, "beta") != feature_key(other_beta, "beta")
