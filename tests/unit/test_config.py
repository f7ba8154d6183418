"""Every YAML under conf/ composes and validates; bad keys, types and values are refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from rewardctl.config.schema import DType, RunConfig
from rewardctl.errors import ConfigError
from rewardctl.methods.pairwise import PairwiseConfig
from rewardctl.methods.registry import load_run_config, to_run_config

from ..conftest import REPO, compose_train

CONF = REPO / "conf"


def group_options() -> list[tuple[str, str]]:
    """(group, option) for every YAML below conf/, found recursively (torchtune's test only looked one level)."""
    found = []
    for path in sorted(CONF.rglob("*.yaml")):
        relative = path.relative_to(CONF)
        if len(relative.parts) > 1:
            found.append(("/".join(relative.parts[:-1]), path.stem))
    return found


def test_the_glob_sees_every_group():
    groups = {g for g, _ in group_options()}
    assert {"method", "model", "data", "peft", "hardware", "experiment"} <= groups


# Presets that leave a value for the user (``???``), and what a user would pass.
REQUIRED = {("data", "rlhf_glm"): ["data.train=data/reward_datasets/sentiment_analysis"]}


@pytest.mark.parametrize(("group", "option"), group_options())
def test_every_group_option_composes_and_validates(group: str, option: str):
    required = REQUIRED.get((group, option), [])
    if required:
        with pytest.raises(ConfigError, match=required[0].split("=")[0]):
            to_run_config(compose_train([f"{group}={option}"]))  # refused by name until given
    cfg = compose_train([f"{group}={option}", *required])
    # GPU presets validate fully except what needs this machine to have GPUs (tested separately below).
    needs_gpu = (group == "hardware" and option != "cpu") or (group, option) == ("peft", "qlora")
    run = to_run_config(cfg, for_training=not needs_gpu)
    assert isinstance(run, RunConfig)
    assert OmegaConf.select(cfg, "hydra") is None  # the run config never carries Hydra's own node


def test_primary_configs_compose():
    run = to_run_config(compose_train([]))
    assert run.method.name == "pairwise" and isinstance(run.method, PairwiseConfig)
    assert Path(run.model.name_or_path).is_dir() and run.model.from_scratch
    assert Path(run.data.train).is_file() and Path(run.data.eval).is_file()
    with initialize_config_module(config_module="rewardctl.conf", version_base="1.3"):
        cfg = compose(config_name="eval", overrides=["run_dir=somewhere"])
    assert cfg.run_dir == "somewhere" and cfg.checkpoint is None


def test_defaults_are_typed():
    run = to_run_config(compose_train(["model=qwen2.5-0.5b", "data=ultrafeedback"]))
    assert run.model.dtype is DType.float32
    assert run.model.name_or_path == "Qwen/Qwen2.5-0.5B-Instruct"
    assert run.data.train == "trl-lib/ultrafeedback_binarized" and run.data.eval_split == "test"
    assert run.train.lr == 1e-5  # the schema default: the tiny preset's 1e-3 must not leak


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.lrr=1", "train.lrr"),
        ("model.max_lenght=12", "model.max_lenght"),
        ("method.coefficient=1", "method.coefficient"),
        ("train.lr=abc", "train.lr"),
        ("train.max_steps=1.5", "train.max_steps"),
        ("data.overlength=cut", "data.overlength"),
        ("model.padding_side=middle", "model.padding_side"),
    ],
)
def test_unknown_keys_and_bad_types_are_refused_at_composition(override: str, key: str):
    with pytest.raises(ConfigCompositionException) as info:
        compose_train([override])
    message = str(info.value) + str(info.value.__cause__)
    assert key in message


@pytest.mark.parametrize(
    ("override", "key", "text"),
    [
        ("data.train=???", "data.train", "required"),
        ("train.per_device_batch_size=0", "train.per_device_batch_size", ">= 1"),
        ("train.grad_accum=0", "train.grad_accum", ">= 1"),
        ("train.lr=-1", "train.lr", "> 0"),
        ("train.warmup_ratio=1.5", "train.warmup_ratio", "[0, 1)"),
        ("model.max_length=2", "model.max_length", ">= 8"),
        ("data.holdout_fraction=1.0", "data.holdout_fraction", "[0, 1)"),
        ("train.resume=/no/such/checkpoint", "train.resume", "does not exist"),
        ("train.report_to=[nonsense]", "train.report_to", "unknown tracker"),
        ("hardware.mixed_precision=fp16", "hardware.mixed_precision", "needs a GPU"),
        ("+method.bogus=1", "method.bogus", "not in 'PairwiseConfig'"),
        ("method.center_rewards_coefficient=[1]", "method.center_rewards_coefficient", ""),
        ("method._target_=collections.OrderedDict", "method._target_", "not a subclass"),
        ("method._target_=no.such.Method", "method._target_", "cannot import"),
        ("train.adam_beta1=1.5", "train.adam_beta1", "[0, 1)"),
        ("train.adam_eps=-1", "train.adam_eps", "> 0"),
        ("train.curves_every_s=-1", "train.curves_every_s", ">= 0"),
        ("method.center_rewards_coefficient=-5", "method.center_rewards_coefficient", ">= 0"),
        ("hardware.cpu_fused_kernels=maybe", "hardware.cpu_fused_kernels", "auto, true or false"),
    ],
)
def test_invalid_values_are_refused_before_anything_loads(override: str, key: str, text: str):
    try:
        cfg = compose_train([override])
    except ConfigCompositionException as exc:  # some are already caught while composing
        caught = exc
    else:
        caught = None
    if caught is not None:
        assert key in str(caught) + str(caught.__cause__)
        return
    with pytest.raises(ConfigError) as info:
        to_run_config(cfg)
    assert info.value.key == key and text in str(info.value)


def test_dict_valued_keys_take_new_entries_with_plus():
    cfg = compose_train(["+model.config_overrides.hidden_size=32", "+data.columns.chosen=good"])
    run = to_run_config(cfg)
    assert run.model.config_overrides == {"hidden_size": 32}
    assert run.data.columns == {"chosen": "good"}


def test_experiment_overlay_applies():
    run = to_run_config(compose_train(["experiment=smoke"]))
    assert run.train.max_steps == 6 and run.data.max_train_rows == 64 and run.train.save_every == 3


def test_saved_config_round_trips(tmp_path: Path):
    from rewardctl.training.run_directory import resolved_config_yaml

    cfg = compose_train(["train.lr=2e-4", "method.center_rewards_coefficient=0.01"])
    (tmp_path / "config.yaml").write_text(resolved_config_yaml(cfg, tmp_path))
    run = load_run_config(tmp_path / "config.yaml")
    assert run.train.lr == 2e-4 and run.method.center_rewards_coefficient == 0.01
    assert run.output_dir == str(tmp_path)
    moved = resolved_config_yaml(cfg, tmp_path).replace("resume: auto", "resume: /gone/step-5")
    (tmp_path / "config.yaml").write_text(moved.replace("report_to: []", "report_to: [wandb]"))
    assert load_run_config(tmp_path / "config.yaml").train.resume == "/gone/step-5"  # eval needs neither
    (tmp_path / "config.yaml").write_text(resolved_config_yaml(cfg, tmp_path).replace("lr: 0.0002", "lr: fast"))
    with pytest.raises(ConfigError) as info:
        load_run_config(tmp_path / "config.yaml")
    assert "train.lr" in str(info.value)


def test_max_length_beyond_learned_positions_is_refused_before_data(tmp_path: Path):
    from transformers import BertConfig

    from rewardctl.config.schema import ModelConfig
    from rewardctl.modeling.common import check_max_length

    BertConfig(
        vocab_size=100,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    ).save_pretrained(tmp_path)
    check_max_length(ModelConfig(name_or_path=str(tmp_path), max_length=64))
    with pytest.raises(ConfigError) as info:
        check_max_length(ModelConfig(name_or_path=str(tmp_path), max_length=65))
    assert info.value.key == "model.max_length" and "learned absolute positions; use <= 64" in str(info.value)
    check_max_length(
        ModelConfig(name_or_path=str(REPO / "rewardctl/assets/tiny-llama"), max_length=4096)
    )  # RoPE: warns


@pytest.mark.parametrize(
    ("overrides", "key", "text"),
    [
        (["hardware=deepspeed"], "hardware.strategy", "deepspeed is not installed"),
        (["hardware=fsdp"], "hardware.strategy", "fsdp shards over CUDA GPUs and torch sees none"),
        (["hardware=ddp"], "hardware.num_processes", "0 means one process per visible GPU and torch sees none"),
        (["hardware.num_processes=-1"], "hardware.num_processes", "must be >= 0"),
        (["hardware.num_machines=2"], "hardware.main_process_ip", "multi-machine run needs rank 0's address"),
        (["hardware.machine_rank=1"], "hardware.machine_rank", "must be in [0, 1)"),
        (["hardware.zero_stage=4"], "hardware.zero_stage", "must be 1, 2 or 3"),
        (["hardware.fsdp_sharding_strategy=SOME"], "hardware.fsdp_sharding_strategy", "must be one of"),
        (["hardware.device=gpu"], "hardware.device", "gpu requested but torch sees no CUDA device"),
        (["peft=qlora"], "peft", "needs a CUDA GPU; on CPU use peft=lora"),
    ],
)
def test_hardware_mistakes_are_refused_before_anything_loads(overrides, key, text):
    import importlib.util

    if "deepspeed" in overrides[0] and importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed here")
    with pytest.raises(ConfigError) as info:
        to_run_config(compose_train(overrides))
    assert info.value.key == key and text in str(info.value)


def test_training_with_flex_attention_is_refused_on_a_cpu():
    """transformers runs flex_attention compiled, and the compiled CPU kernel has no backward pass:
    training with it would die in the first step's forward with a traceback, so it is one line naming
    the key before anything loads. Eval (no backward) keeps it."""
    overrides = ["hardware.device=cpu", "model.attn_implementation=flex_attention"]
    with pytest.raises(ConfigError) as info:
        to_run_config(compose_train(overrides))
    assert info.value.key == "model.attn_implementation"
    assert str(info.value).startswith("model.attn_implementation: flex_attention has no backward pass on CPU")
    assert "\n" not in str(info.value)
    to_run_config(compose_train(overrides), for_training=False)  # eval and score
    to_run_config(compose_train([*overrides, "model.attn_implementation=sdpa"]))


def test_auto_precision_is_bf16_on_a_cpu_with_native_bf16_for_a_wide_enough_model(tmp_path: Path):
    from transformers import LlamaConfig

    from rewardctl.config.schema import MixedPrecision
    from rewardctl.machine import cpu_has_native_bf16
    from rewardctl.training.run_directory import resolved_config_yaml

    if not cpu_has_native_bf16():
        pytest.skip("this CPU has no native bf16 (AVX512-BF16 / AMX)")
    # the bundled 64-wide model: casts cost more than bf16 matmuls save, so auto keeps fp32
    assert to_run_config(compose_train(["hardware.mixed_precision=auto"])).hardware.mixed_precision == MixedPrecision.no
    LlamaConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6).save_pretrained(
        tmp_path / "m"
    )
    cfg = compose_train(
        ["hardware.mixed_precision=auto", f"model.name_or_path={tmp_path / 'm'}", "model.from_scratch=true"]
    )
    run = to_run_config(cfg)
    assert run.hardware.mixed_precision == MixedPrecision.bf16
    # What the run directory records (and the launcher's workers are given) is the resolved value.
    assert OmegaConf.create(resolved_config_yaml(cfg, tmp_path)).hardware.mixed_precision == "bf16"


def test_auto_precision_reads_the_width_the_config_overrides_give(monkeypatch):
    from rewardctl import machine
    from rewardctl.config.schema import MixedPrecision

    monkeypatch.setattr(machine, "cpu_has_native_bf16", lambda: True)
    plain = compose_train(["hardware.mixed_precision=auto"])  # the bundled model: 64 wide
    assert to_run_config(plain).hardware.mixed_precision == MixedPrecision.no
    wide = compose_train(["hardware.mixed_precision=auto", "+model.config_overrides.hidden_size=896"])
    assert to_run_config(wide).hardware.mixed_precision == MixedPrecision.bf16


def test_model_width_is_the_text_models_with_the_overrides_applied_as_the_build_applies_them(tmp_path: Path):
    from types import SimpleNamespace

    from transformers import LlamaConfig, LlavaConfig

    from rewardctl.machine import model_hidden_size

    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2)
    LlavaConfig(text_config=text.to_dict()).save_pretrained(tmp_path / "composite")
    text.save_pretrained(tmp_path / "plain")

    def model(path: Path | str, **overrides: object) -> SimpleNamespace:
        return SimpleNamespace(
            name_or_path=str(path), revision=None, trust_remote_code=False, config_overrides=overrides
        )

    assert model_hidden_size(model(tmp_path / "composite")) == 64  # the text model's width, not the vision tower's
    # A key the composite config does not have is load_config's error; it does not change the width read here.
    assert model_hidden_size(model(tmp_path / "composite", hidden_size=896)) == 64
    assert model_hidden_size(model(tmp_path / "plain", hidden_size=896)) == 896
    assert model_hidden_size(model(tmp_path / "missing", hidden_size=896)) == 896  # offline: taken as given
    assert model_hidden_size(model(tmp_path / "missing")) is None


def test_auto_precision_is_no_without_native_bf16(monkeypatch):
    from rewardctl import machine
    from rewardctl.config.schema import Device, MixedPrecision

    monkeypatch.setattr(machine, "cpu_has_native_bf16", lambda: False)
    cfg = compose_train(["hardware.mixed_precision=auto"])
    assert to_run_config(cfg).hardware.mixed_precision == MixedPrecision.no
    assert cfg.hardware.mixed_precision == MixedPrecision.no
    assert machine.check_precision(Device.cpu, MixedPrecision.auto, "mixed_precision") == MixedPrecision.no


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ("fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile", "Intel(R) Xeon(R) Platinum (amx_bf16, avx512_bf16)"),
        ("fpu avx2 avx512f avx512_bf16 avx512_vnni", "Intel(R) Xeon(R) Platinum (avx512_bf16)"),
        ("fpu avx2 fma", "Intel(R) Xeon(R) Platinum (no native bf16 flags)"),
    ],
)
def test_a_benchmark_names_the_cpu_by_how_it_computes_bf16(flags: str, expected: str):
    """Two processors (the first block wins); hosts of one model name differ in these flags only."""
    from rewardctl.machine import cpu_description

    block = "processor\t: {n}\nmodel name\t: {name}\nflags\t\t: {flags}\n"
    first = block.format(n=0, name="Intel(R) Xeon(R) Platinum", flags=flags)
    assert cpu_description(first + "\n" + block.format(n=1, name="other", flags="fpu amx_bf16")) == expected
    assert cpu_description("") == "unknown CPU (no native bf16 flags)"


def test_the_commented_loop_block_of_train_yaml_shows_every_loop_setting_with_its_schema_default():
    """conf/train.yaml documents the loop's settings as a commented block; the schema stays their only
    source, and this keeps the block from drifting (a renamed key, a changed default, a new setting)."""
    from rewardctl.config.schema import TrainConfig

    lines = (CONF / "train.yaml").read_text(encoding="utf-8").splitlines()
    start = lines.index("# train:") + 1
    block = []
    for line in lines[start:]:
        if not line.startswith("#   "):
            break
        if not line.startswith("#   #"):
            block.append(line[len("#   ") :])
    shown = OmegaConf.create("\n".join(block))
    schema = OmegaConf.to_container(OmegaConf.structured(TrainConfig), enum_to_str=True)
    assert list(shown.keys()) == list(schema.keys())  # every setting, in the schema's order
    for key, default in schema.items():
        assert shown[key] == default, f"train.{key}: the block shows {shown[key]!r}, the schema says {default!r}"


@pytest.mark.parametrize("path", sorted((CONF / "method").glob("*.yaml")), ids=lambda p: p.stem)
def test_a_method_yaml_restates_no_default_differently_from_its_schema(path: Path):
    """A method's YAML lists its keys (so `method.key=value` overrides work) but its schema, the
    dataclass beside the method class, decides every default: a value written in both must agree."""
    from rewardctl.methods.registry import method_class

    raw = OmegaConf.load(path)
    node = raw.method if "method" in raw else raw  # a `_global_` overlay nests it
    defaults = OmegaConf.to_container(OmegaConf.structured(method_class(node._target_).config_class), enum_to_str=True)
    written = OmegaConf.to_container(node, enum_to_str=True)
    for key, value in written.items():
        assert key in defaults, f"{path.name}: {key} is not a field of the method's schema"
        assert value == defaults[key], f"{path.name}: {key} is {value!r} here and {defaults[key]!r} in the schema"
