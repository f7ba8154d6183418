"""Checkpoints hold no pickle (a tampered file cannot run code on resume), resume stays bit-exact, and
a damaged checkpoint is found before anything loads: auto falls back to the newest intact one, an
explicit one is refused naming the fallback."""

from __future__ import annotations

import json
import logging
import pathlib
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from rewardctl.errors import ConfigError
from rewardctl.training import session
from rewardctl.training.checkpoint import validate_checkpoint

from ..conftest import cli, read_jsonl, reset_accelerate, run_training

# Dropout on, so the RNG state matters; checkpoints at steps 4 and 8 of 12; the first invocation stops
# at step 8, the same command continues to 12.
RUN = [
    "experiment=smoke",
    "train.max_steps=12",
    "train.save_every=4",
    "train.eval_every=4",
    "train.log_every=4",
    "model.disable_dropout=false",
    "+model.config_overrides.attention_dropout=0.2",
]
CHUNKED = [*RUN, "train.stop_after_steps=8"]
TIMING = {"train_seconds", "eval_seconds", "pairs_per_sec", "tokens_per_sec"}
LAYOUT = {
    "checkpoint.json",
    "trainer_state.json",
    "method_state.safetensors",
    "model.safetensors",
    "optimizer.safetensors",
    "optimizer.json",
    "scheduler.json",
    "rng_state_0.safetensors",
    "process_state_0.json",
}


class Touch:
    """Unpickling this creates ``marker``: what a tampered checkpoint file could do on resume."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted 12-step run."""
    _, run_dir = run_training(tmp_path_factory.mktemp("reference"), RUN, name="full")
    return run_dir


@pytest.fixture(scope="module")
def stopped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same run stopped at step 8, with checkpoints step-4 and step-8 (copied before each use)."""
    summary, run_dir = run_training(tmp_path_factory.mktemp("stopped"), CHUNKED, name="part")
    assert summary["status"] == "stopped" and summary["step"] == 8
    return run_dir


def copy_run(stopped: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(stopped, tmp_path / "run"))


def assert_matches_reference(run_dir: Path, reference: Path) -> None:
    """Bit for bit: metrics (timings aside), metric totals and final weights."""

    def comparable(path: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in read_jsonl(path)]

    assert comparable(run_dir / "metrics.jsonl") == comparable(reference / "metrics.jsonl")
    ours, theirs = (json.loads((d / "summary.json").read_text()) for d in (run_dir, reference))
    assert ours["status"] == "completed" and ours["totals"] == theirs["totals"]
    a, b = load_file(str(run_dir / "model/model.safetensors")), load_file(str(reference / "model/model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_files_are_json_or_safetensors_never_pickle(stopped: Path):
    checkpoints = sorted((stopped / "checkpoints").iterdir())
    assert [p.name for p in checkpoints] == ["step-4", "step-8"]
    for checkpoint in checkpoints:
        assert {p.name for p in checkpoint.iterdir()} == LAYOUT
        assert validate_checkpoint(checkpoint) is None
        for path in checkpoint.iterdir():
            head = path.read_bytes()[:16]
            assert head[:4] != b"PK\x03\x04", f"{path.name} is a zip (torch.save)"
            if path.suffix == ".json":
                assert head[:1] != b"\x80", f"{path.name} starts like a pickle"
                json.loads(path.read_text(encoding="utf-8"))
            else:  # 8-byte header length, then the JSON header: never a pickle opcode stream
                assert path.suffix == ".safetensors" and head[8:9] == b"{", path.name
                with safe_open(str(path), framework="pt") as handle:
                    list(handle.keys())
    optimizer = json.loads((checkpoints[-1] / "optimizer.json").read_text())
    assert optimizer["param_groups"][0]["betas"] == [0.9, 0.999]
    assert any(k.endswith(".step") for k in load_file(str(checkpoints[-1] / "optimizer.safetensors")))


def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(stopped: Path, reference: Path, tmp_path: Path):
    run_dir = copy_run(stopped, tmp_path)
    summary, _ = run_training(tmp_path, CHUNKED, name="run")  # the same command continues from step-8
    assert summary["status"] == "completed" and summary["step"] == 12
    assert_matches_reference(run_dir, reference)


def test_planted_pickles_are_never_loaded(
    stopped: Path, reference: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """accelerate's own file names, holding code: resume ignores them (and says so)."""
    control, marker = tmp_path / "control.pkl", tmp_path / "pwned"
    torch.save(Touch(tmp_path / "control-ran"), control)
    torch.load(control, weights_only=False)  # what accelerate did with custom_checkpoint_0.pkl
    assert (tmp_path / "control-ran").exists()  # the payload works

    run_dir = copy_run(stopped, tmp_path)
    for name in ("custom_checkpoint_0.pkl", "optimizer.bin", "scheduler.bin", "random_states_0.pkl"):
        torch.save(Touch(marker), run_dir / "checkpoints" / "step-8" / name)
    with caplog.at_level(logging.WARNING, logger="rewardctl"):
        run_training(tmp_path, CHUNKED, name="run")
    assert not marker.exists()
    assert "ignoring files rewardctl did not write (never loaded): custom_checkpoint_0.pkl" in caplog.text
    assert_matches_reference(run_dir, reference)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def pickle_over(path: Path) -> None:
    torch.save(Touch(path.parent.parent.parent.parent / "pwned"), path)


DAMAGE: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "truncated weights": ("model.safetensors", truncate, "model.safetensors has"),
    "empty optimizer": ("optimizer.safetensors", lambda p: p.write_bytes(b""), "optimizer.safetensors is empty"),
    "garbage trainer state": (
        "trainer_state.json",
        lambda p: p.write_text("{not json"),
        "trainer_state.json is not valid JSON",
    ),
    "deleted RNG file": ("rng_state_0.safetensors", Path.unlink, "rng_state_0.safetensors is missing"),
    "pickle as optimizer": ("optimizer.safetensors", pickle_over, "optimizer.safetensors has"),
    "pickle as scheduler": ("scheduler.json", pickle_over, "scheduler.json has"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_auto_resume_passes_over_a_damaged_checkpoint(
    damage: str, stopped: Path, reference: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """The newest checkpoint is damaged: the run warns, continues from step-4, and ends exactly as the
    uninterrupted run (which resuming from step-4 is); a pickle put in place of a file never runs."""
    name, spoil, reason = DAMAGE[damage]
    run_dir = copy_run(stopped, tmp_path)
    newest = run_dir / "checkpoints" / "step-8"
    spoil(newest / name)
    assert reason in validate_checkpoint(newest)
    with caplog.at_level(logging.INFO, logger="rewardctl"):
        summary, _ = run_training(tmp_path, CHUNKED, name="run")
    assert f"checkpoint {newest} is damaged ({reason}" in caplog.text
    assert f"resumed from {run_dir / 'checkpoints' / 'step-4'} at step 4" in caplog.text
    assert not list(run_dir.glob("metrics.*.bak"))  # continued, not started over
    assert summary["step"] == 12 and not (tmp_path / "pwned").exists()
    assert_matches_reference(run_dir, reference)
    kept = sorted((run_dir / "checkpoints").iterdir())
    assert [p.name for p in kept] == ["step-12", "step-8"] and all(validate_checkpoint(p) is None for p in kept)


def fail_if_data_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the data was read before the damaged checkpoint was refused")

    monkeypatch.setattr(session, "prepare_data", refuse)


def test_explicit_resume_of_a_damaged_checkpoint_is_refused_before_the_data_loads(
    stopped: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    run_dir = copy_run(stopped, tmp_path)
    fail_if_data_loads(monkeypatch)
    step4, step8 = run_dir / "checkpoints" / "step-4", run_dir / "checkpoints" / "step-8"
    truncate(step8 / "model.safetensors")
    with pytest.raises(ConfigError) as info:
        run_training(tmp_path, [*CHUNKED, f"train.resume={step8}"], name="run")
    reset_accelerate()
    message = str(info.value)
    assert message.startswith(f"train.resume: {step8} is damaged: model.safetensors has ") and "\n" not in message
    assert message.endswith(f"; the previous intact checkpoint is {step4}")

    (step4 / "optimizer.json").unlink()
    with pytest.raises(ConfigError, match="; no earlier checkpoint is intact$"):
        run_training(tmp_path, [*CHUNKED, f"train.resume={step8}"], name="run")
    reset_accelerate()
    with pytest.raises(
        ConfigError,
        match=r"no checkpoint in .* is intact \(step-8: model.safetensors has .*; "
        r"step-4: optimizer.json is missing\)",
    ):
        run_training(tmp_path, CHUNKED, name="run")  # auto: nothing to fall back to, nothing discarded
    reset_accelerate()
    assert not (run_dir / "model").exists() and sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "step-4",
        "step-8",
    ]


def test_the_command_line_exits_with_one_line_naming_the_damage(stopped: Path, tmp_path: Path):
    run_dir = copy_run(stopped, tmp_path)
    step8 = run_dir / "checkpoints" / "step-8"
    (step8 / "rng_state_0.safetensors").unlink()
    result = cli("train", *CHUNKED, f"output_dir={run_dir}", f"train.resume={step8}", cwd=tmp_path)
    assert result.returncode == 2
    [line] = [line for line in result.stderr.splitlines() if line.startswith("rewardctl: error:")]
    assert line == (
        f"rewardctl: error: train.resume: {step8} is damaged: rng_state_0.safetensors is missing; "
        f"the previous intact checkpoint is {run_dir / 'checkpoints' / 'step-4'}"
    )


def test_another_methods_checkpoint_is_refused_in_one_line_before_the_data_loads(
    stopped: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    run_dir = copy_run(stopped, tmp_path)
    step8 = run_dir / "checkpoints" / "step-8"
    fail_if_data_loads(monkeypatch)
    for resume in (f"train.resume={step8}", "train.resume=auto"):
        with pytest.raises(ConfigError) as info:
            run_training(tmp_path, [*CHUNKED, "method=bco", resume], name="run")
        reset_accelerate()
        assert str(info.value) == (
            f"train.resume: {step8} was written by method=pairwise, this run is method=bco; "
            "resume it with method=pairwise or choose another output_dir"
        )


def test_another_models_checkpoint_is_refused_in_one_line(stopped: Path, tmp_path: Path):
    """Same method, same data order, but a smaller model: its weights do not fit (no library traceback)."""
    run_dir = copy_run(stopped, tmp_path)
    step8 = run_dir / "checkpoints" / "step-8"
    result = cli(
        "train",
        *CHUNKED,
        "+model.config_overrides.num_hidden_layers=1",
        f"output_dir={run_dir}",
        f"train.resume={step8}",
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("rewardctl: error:")]
    assert line.startswith(f"rewardctl: error: train.resume: {step8} holds weights of another model (")
    assert line.endswith("resume with the model.* settings it was written with, or choose another output_dir")


def test_a_full_disk_during_a_checkpoint_ends_in_one_line_and_keeps_the_older_checkpoint(
    stopped: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    """ENOSPC while step-12's weights are written: exit 2 with one line, step-8 untouched, no partial
    directory left behind; with --debug the same failure shows its full stack."""
    import errno

    from rewardctl import cli as command_line
    from rewardctl.training import checkpoint

    run_dir = copy_run(stopped, tmp_path)
    real_save = checkpoint.save_file

    def full_disk(tensors, filename, metadata=None):
        if ".step-12.tmp" in str(filename):
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    before = {p.name: p.read_bytes() for p in (run_dir / "checkpoints" / "step-8").iterdir()}
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exited:
        command_line.main(["train", *RUN, f"output_dir={run_dir}", "hydra.output_subdir=null"])
    reset_accelerate()
    err = capsys.readouterr().err
    assert exited.value.code == 2
    [line] = [line for line in err.splitlines() if line.startswith("rewardctl: error:")]
    assert line == (
        f"rewardctl: error: {run_dir / 'checkpoints' / '.step-12.tmp' / 'model.safetensors'}: No space "
        "left on device; every file written before (checkpoints included) is intact: free space and rerun "
        "the same command to resume"
    )
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-4", "step-8"]
    assert {p.name: p.read_bytes() for p in (run_dir / "checkpoints" / "step-8").iterdir()} == before
    assert not (run_dir / "model").exists()
