"""The arithmetic of benchmarks/gpu_methods.py (MFU, steady rates, layouts), which a GPU session runs
once with no time to debug it: checked here on the CPU, by hand-computed values."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_methods.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("gpu_methods", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_flops_per_token_is_6n_over_matmul_weights_in_full_fine_tuning(bench):
    # tiny-llama's classifier: 166,272 parameters, of which the 1024 x 64 embedding table is a lookup.
    assert bench.train_flops_per_token(166_272, 166_272, 1024 * 64) == 6 * (166_272 - 65_536)


def test_train_flops_per_token_with_lora_counts_weight_gradients_of_the_adapters_only(bench):
    # 494M total, 136M embedding, 2M trainable (adapters + head): 4 x 358M + 2 x 2M.
    total, embedding, trainable = 494_000_000, 136_134_656, 2_000_000
    matmul = total - embedding
    assert bench.train_flops_per_token(total, trainable, embedding) == 4 * matmul + 2 * trainable


def test_gpu_peak_tflops_matches_torch_device_names(bench):
    assert bench.gpu_peak_tflops("NVIDIA H200") == 989.4
    assert bench.gpu_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert bench.gpu_peak_tflops("Tesla T4") is None
    assert bench.gpu_peak_tflops(None) is None


def test_steady_rate_is_the_median_of_the_train_windows_after_the_first(bench):
    records = [
        {"split": "train", "pairs_per_sec": 1.0},  # compilation and warm-up
        {"split": "eval", "pairs_per_sec": 100.0},
        {"split": "train", "pairs_per_sec": 10.0},
        {"split": "train", "pairs_per_sec": 14.0},
        {"split": "train", "pairs_per_sec": 11.0},
    ]
    assert bench.steady_rate(records, "pairs_per_sec") == 11.0
    assert bench.steady_rate(records[:1], "pairs_per_sec") == 1.0
    assert bench.steady_rate([], "pairs_per_sec") is None


def test_layouts_apply_to_the_methods_that_have_them(bench):
    assert bench.layout_overrides("shared", "bco", "flex_attention") is None
    assert bench.layout_overrides("shared", "pairwise", "flex_attention") == [
        "data.share_prefix=true",
        "data.padding_free=false",
    ]
    assert bench.layout_overrides("padding_free", "prm", "flash_attention_2") == [
        "data.share_prefix=false",
        "data.padding_free=true",
        "model.attn_implementation=flash_attention_2",
    ]


def test_a_run_gets_the_overrides_its_flags_ask_for_and_they_compose(bench, tmp_path):
    """What a lease runs: the Qwen2.5-0.5B shape, the layout, the batch and --compile reach
    ``rewardctl train`` as overrides the config accepts (composed here, without a GPU)."""
    from rewardctl.methods.registry import to_run_config

    from ..conftest import compose_train

    parser = bench.argument_parser("test")
    args = parser.parse_args(["--batch", "32", "--compile", "--steps", "10", "--data-root", str(tmp_path)])
    args.padding_free_attention = "flex_attention"
    overrides = bench.train_overrides("pairwise", "shared", args, tmp_path / "run")
    assert "train.compile=true" in overrides and "train.per_device_batch_size=32" in overrides
    assert "data.max_train_rows=320" in overrides and "+model.config_overrides.num_hidden_layers=24" in overrides
    assert bench.train_overrides("bco", "shared", args, tmp_path / "run") is None
    run = to_run_config(compose_train([o for o in overrides if not o.startswith("hardware=")]), for_training=False)
    assert run.train.compile and run.model.config_overrides["num_key_value_heads"] == 2
