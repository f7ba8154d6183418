"""The distribution contracts that a CPU can check without training: how FSDP2 wraps each method's
model and the arguments of the launcher (the accumulation boundaries DeepSpeed's engine is told, through
real runs, are in tests/e2e/test_distributed_runs.py)."""

from __future__ import annotations

import pytest
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

from rewardctl.config.schema import HardwareConfig, Strategy
from rewardctl.methods.registry import method_class, to_run_config
from rewardctl.training import launch

from ..conftest import compose_train


@pytest.mark.parametrize("peft", ["none", "lora"])
@pytest.mark.parametrize("method", ["pairwise", "ranklist", "bco", "prm"])
def test_fsdp_auto_wrap_shards_each_decoder_layer_of_every_method(method: str, peft: str):
    """accelerate's own FSDP2 policy over the module the loop prepares (a reward wrapper, a PEFT
    model or a plain transformers model) picks every decoder layer, not just the root."""
    run = to_run_config(compose_train([f"method={method}", f"peft={peft}", "experiment=smoke", "output_dir=unused"]))
    model = method_class(run.method._target_)(run.method, run).build_model()
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    plugin.set_auto_wrap_policy(model)  # what accelerate's fsdp2_prepare_model does first
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    wrapped = [m for m in model.modules() if policy(m)]
    layers = [m for m in model.modules() if type(m).__name__ == "LlamaDecoderLayer"]
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    assert len(layers) == 2 and wrapped == layers


def hardware(**values) -> HardwareConfig:
    return HardwareConfig(**{"name": "test", "num_processes": 2, **values})


def test_fsdp_launch_arguments(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(launch, "free_port", lambda: 12345)
    monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", raising=False)
    args, env = launch.launcher_arguments(hardware(strategy=Strategy.fsdp, fsdp_sharding_strategy="SHARD_GRAD_OP"))
    joined = " ".join(args)
    assert "--use_fsdp --fsdp_version 2 --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP" in joined
    assert "--fsdp_reshard_after_forward false" in joined and "--main_process_port 12345" in joined
    # No CPU/gloo settings under FSDP: only the workers' marker and the time they get to checkpoint on a signal.
    assert "--num_processes 2" in joined and "--multi_gpu" not in args
    assert env == {"REWARDCTL_SELF_LAUNCHED": "1", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "600"}
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "45")  # a user's own setting wins
    assert launch.launcher_arguments(hardware(strategy=Strategy.fsdp))[1]["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "45"


def test_deepspeed_zero3_launch_arguments_gather_a_16bit_model(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(launch, "free_port", lambda: 12345)
    args, _ = launch.launcher_arguments(hardware(strategy=Strategy.deepspeed, zero_stage=3, offload_optimizer=True))
    joined = " ".join(args)
    assert "--use_deepspeed --zero_stage 3 --offload_optimizer_device cpu" in joined
    assert "--zero3_save_16bit_model true" in joined


def test_multi_machine_launch_uses_the_configured_rendezvous():
    args, _ = launch.launcher_arguments(
        hardware(num_machines=2, machine_rank=1, main_process_ip="10.0.0.1", main_process_port=29555)
    )
    joined = " ".join(args)
    assert "--num_processes 4 --num_machines 2 --machine_rank 1 --main_process_port 29555" in joined
    assert "--main_process_ip 10.0.0.1" in joined
