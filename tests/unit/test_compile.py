"""train.compile: refused where it cannot work (the compiled run against an eager one is in
tests/e2e/test_compile_runs.py)."""

from __future__ import annotations

import pytest

from rewardctl.config.schema import Strategy
from rewardctl.errors import ConfigError
from rewardctl.machine import check_compile
from rewardctl.methods.registry import to_run_config

from ..conftest import compose_train


def test_compile_with_deepspeed_is_refused():
    run = to_run_config(compose_train(["train.compile=true"]))
    run.hardware.strategy = Strategy.deepspeed  # the preset itself needs deepspeed and GPUs to validate
    with pytest.raises(ConfigError) as info:
        check_compile(run)
    assert info.value.key == "train.compile" and "deepspeed" in str(info.value)


def test_compile_without_a_cpu_compiler_is_refused(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler++")
    with pytest.raises(ConfigError) as info:
        to_run_config(compose_train(["train.compile=true"]))
    assert info.value.key == "train.compile" and "no-such-compiler++" in str(info.value)
