"""Resumable checkpoints with no pickle in them: tensors in safetensors, everything else in JSON.

Unpickling runs whatever code a file names, so a checkpoint copied from elsewhere (or tampered
with) could execute code on resume; safetensors and JSON hold data only. ``checkpoints/step-N/``::

    model.safetensors            the unwrapped model's state dict (tied weights stored once per name)
    optimizer.safetensors        optimizer state tensors, keyed state.<param index>.<name>
    optimizer.json               param_groups and non-tensor optimizer state
    scheduler.json               the LR scheduler's state_dict()
    scaler.json                  the fp16 GradScaler's state (only when there is one)
    rng_state_<rank>.safetensors torch CPU / CUDA and numpy RNG tensors; python and numpy scalars as
                                 JSON in its metadata (one per process)
    process_state_<rank>.json    the loop's unlogged window (one per process)
    method_state.safetensors     the method's running state
    trainer_state.json           the loop's position; world_size says how many RNG files to expect
    checkpoint.json              layout and every file's size, written last: damage shows up
                                 (``validate_checkpoint``) before anything loads

Sharded runs (FSDP, DeepSpeed) keep the weights and optimizer in accelerate's / DeepSpeed's own
formats (no single process holds them); the rest is as above. The directory is filled under a
temporary name and renamed when complete, so a crash mid-save never leaves a checkpoint that looks
valid.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from rewardctl.errors import ConfigError
from rewardctl.utils.fs import replace_directory, write_json_atomic

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d+)$")
TRAINER_STATE = "trainer_state.json"
METHOD_STATE = "method_state.safetensors"
PROCESS_STATE = "process_state_{}.json"
MANIFEST = "checkpoint.json"
MODEL = "model.safetensors"
OPTIMIZER = "optimizer.safetensors"
OPTIMIZER_META = "optimizer.json"
SCHEDULER = "scheduler.json"
SCALER = "scaler.json"
RNG_STATE = "rng_state_{}.safetensors"
RNG_META = "rewardctl.rng"
FORMAT = 1
LAYOUTS = {DistributedType.FSDP: "fsdp", DistributedType.DEEPSPEED: "deepspeed"}  # anything else: "safetensors"

# Schedulers whose state checkpoints carry, per accelerator. Not accelerate's register_for_checkpointing:
# accelerate would pickle them and load them back with weights_only=False.
_SCHEDULERS: weakref.WeakKeyDictionary[Accelerator, list[Any]] = weakref.WeakKeyDictionary()


class _Damaged(Exception):
    """A checkpoint file is missing or unreadable; the message names it."""


def register_scheduler(accelerator: Accelerator, scheduler: Any) -> None:
    """Carry ``scheduler`` in this accelerator's checkpoints (as JSON)."""
    _SCHEDULERS.setdefault(accelerator, []).append(scheduler)


# ---- finding checkpoints -----------------------------------------------------------------------
def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Every ``step-N`` directory, oldest first, intact or not (``validate_checkpoint`` tells)."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = STEP_DIR.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def newest_intact_checkpoint(
    root: Path, below: int | None = None, on_damaged: Callable[[Path, str], None] | None = None
) -> Path | None:
    """The newest checkpoint under ``root`` (before step ``below``) that validates; each damaged one
    passed over goes to ``on_damaged`` with its reason."""
    for step, path in reversed(list_checkpoints(root)):
        if below is not None and step >= below:
            continue
        reason = validate_checkpoint(path)
        if reason is None:
            return path
        if on_damaged is not None:
            on_damaged(path, reason)
    return None


# ---- validation --------------------------------------------------------------------------------
def validate_checkpoint(path: Path) -> str | None:
    """None if ``path`` is complete and readable, else a one-line reason naming the bad file.

    Reads JSON files and safetensors headers and compares sizes with the manifest: cheap, so a
    damaged checkpoint is found before the data or the model load."""
    path = Path(path)
    try:
        state = _read_json(path, TRAINER_STATE)
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise _Damaged(f"{TRAINER_STATE} does not hold a step")
        manifest = _read_manifest(path)
        for name in _required_files(state, manifest):
            if not (path / name).is_file():
                raise _Damaged(f"{name} is missing")
        for name, size in manifest["files"].items():
            _check_file(path, name, size)
    except _Damaged as damage:
        return " ".join(str(damage).split())
    return None


def _read_manifest(path: Path) -> dict[str, Any]:
    if not (path / MANIFEST).is_file():
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in (".pkl", ".bin"))
        hint = f" (pickled state such as {pickled[0]}, from an older rewardctl, is never loaded)" if pickled else ""
        raise _Damaged(f"{MANIFEST} is missing{hint}")
    manifest = _read_json(path, MANIFEST)
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT
        or not isinstance(manifest.get("files"), dict)
    ):
        raise _Damaged(f"{MANIFEST} is not a format-{FORMAT} rewardctl checkpoint manifest")
    return manifest


def _required_files(state: dict[str, Any], manifest: dict[str, Any]) -> list[str]:
    """What every checkpoint holds, whatever its manifest lists: a lost manifest entry hides nothing."""
    world = state.get("world_size", manifest.get("world_size", 1))
    if not isinstance(world, int) or world < 1:
        raise _Damaged(f"{TRAINER_STATE} holds no valid world_size ({world!r})")
    names = [METHOD_STATE, SCHEDULER, *(RNG_STATE.format(rank) for rank in range(world))]
    if manifest.get("layout") == "safetensors":
        names += [MODEL, OPTIMIZER, OPTIMIZER_META]
    return names


def _check_file(root: Path, name: str, size: Any) -> None:
    if not isinstance(size, int) or Path(name).is_absolute() or ".." in Path(name).parts:
        raise _Damaged(f"{MANIFEST} lists {name!r} with size {size!r}")
    path = root / name
    if not path.is_file():
        raise _Damaged(f"{name} is missing")
    actual = path.stat().st_size
    if actual == 0 and size:
        raise _Damaged(f"{name} is empty ({size} bytes were written)")
    if actual != size:
        raise _Damaged(f"{name} has {actual} bytes, {size} were written (truncated or overwritten)")
    if name.endswith(".json"):
        _read_json(root, name)
    elif name.endswith(".safetensors"):
        try:
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for each kind of damage
            raise _Damaged(f"{name} is not a readable safetensors file ({err})") from None


def _read_json(root: Path, name: str) -> Any:
    path = root / name
    if not path.is_file():
        raise _Damaged(f"{name} is missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise _Damaged(f"{name} is not valid JSON ({err})") from None


def _unknown_files(path: Path) -> list[str]:
    """Files a rewardctl checkpoint never holds (they are ignored, never loaded)."""
    listed = set(json.loads((path / MANIFEST).read_text(encoding="utf-8"))["files"]) | {MANIFEST}
    return sorted(name for name in _walk(path) if name not in listed)


# ---- saving ------------------------------------------------------------------------------------
def save_checkpoint(
    accelerator: Accelerator,
    root: Path,
    step: int,
    trainer_state: dict[str, Any],
    method_state: dict[str, torch.Tensor],
    keep: int,
    process_state: dict[str, Any] | None = None,
) -> Path:
    """Collective: every process calls it (each writes its own RNG state and ``process_state``)."""
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp"
    main = accelerator.is_main_process
    if main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    try:
        _save_model_and_optimizer(accelerator, tmp)
        _save_rng(accelerator, tmp / RNG_STATE.format(accelerator.process_index))
        if process_state is not None:
            write_json_atomic(tmp / PROCESS_STATE.format(accelerator.process_index), process_state)
        if main:
            _write_json(tmp / SCHEDULER, [scheduler.state_dict() for scheduler in _SCHEDULERS.get(accelerator, [])])
            if accelerator.scaler is not None:
                _write_json(tmp / SCALER, accelerator.scaler.state_dict())
            write_json_atomic(tmp / TRAINER_STATE, trainer_state)
            save_file({k: v.detach().cpu().contiguous() for k, v in method_state.items()}, str(tmp / METHOD_STATE))
        accelerator.wait_for_everyone()
        if main:
            _write_manifest(tmp, _layout(accelerator), accelerator.num_processes)
            replace_directory(tmp, final)
    except OSError:  # a full disk: give back what the partial checkpoint took; the older ones are untouched
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if main:
        _prune(root, step, keep)
    accelerator.wait_for_everyone()
    return final


def _layout(accelerator: Accelerator) -> str:
    return LAYOUTS.get(accelerator.distributed_type, "safetensors")


def _indexed(name: str, index: int) -> str:
    """accelerate's naming for a second model or optimizer: model_1.safetensors."""
    stem, dot, suffix = name.partition(".")
    return name if index == 0 else f"{stem}_{index}{dot}{suffix}"


def _save_model_and_optimizer(accelerator: Accelerator, tmp: Path) -> None:
    layout = _layout(accelerator)
    if layout == "fsdp":
        from accelerate.utils import save_fsdp_model, save_fsdp_optimizer

        plugin = accelerator.state.fsdp_plugin
        for i, model in enumerate(accelerator._models):
            save_fsdp_model(plugin, accelerator, model, str(tmp), i)
        for i, optimizer in enumerate(accelerator._optimizers):
            save_fsdp_optimizer(plugin, accelerator, optimizer, accelerator._models[i], str(tmp), i)
    elif layout == "deepspeed":  # the engine holds the optimizer and saves both, collectively
        for i, model in enumerate(accelerator._models):
            model.save_checkpoint(str(tmp), "pytorch_model" if i == 0 else f"pytorch_model_{i}")
    elif accelerator.is_main_process:  # DDP replicas are identical: one copy
        for i, model in enumerate(accelerator._models):
            weights = _unaliased(accelerator.unwrap_model(model).state_dict())
            save_file(weights, str(tmp / _indexed(MODEL, i)), metadata={"format": "pt"})
        for i, optimizer in enumerate(accelerator._optimizers):
            _save_optimizer(optimizer.state_dict(), tmp, i)


def _unaliased(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU tensors safetensors accepts: a tensor sharing memory with an earlier one (tied weights) is
    copied, so every key of the state dict is kept and loads back as it was."""
    seen: set[int] = set()
    out = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen and tensor.numel():
            tensor = tensor.clone()
        seen.add(storage)
        out[name] = tensor
    return out


def _save_optimizer(state: dict[str, Any], tmp: Path, index: int) -> None:
    tensors: dict[str, torch.Tensor] = {}
    other: dict[str, dict[str, Any]] = {}
    for param, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"state.{param}.{name}"] = value
            else:
                other.setdefault(str(param), {})[name] = value
    save_file(_unaliased(tensors), str(tmp / _indexed(OPTIMIZER, index)))
    _write_json(tmp / _indexed(OPTIMIZER_META, index), {"param_groups": state["param_groups"], "state": other})


def _save_rng(accelerator: Accelerator, path: Path) -> None:
    """This process's generators: torch (CPU, each CUDA device), numpy, python, accelerate's step."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64))}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    version, internal, gauss_next = random.getstate()
    scalars = {
        "python": [version, list(internal), gauss_next],
        "numpy": [kind, int(pos), int(has_gauss), float(gauss)],
        "accelerator_step": accelerator.step,
    }
    save_file(tensors, str(path), metadata={RNG_META: _dumps(scalars)})


def _write_manifest(tmp: Path, layout: str, world_size: int) -> None:
    files = {name: (tmp / name).stat().st_size for name in sorted(_walk(tmp))}
    _write_json(tmp / MANIFEST, {"format": FORMAT, "layout": layout, "world_size": world_size, "files": files})


def _walk(root: Path) -> Iterator[str]:
    for path in root.rglob("*"):
        if path.is_file() and path.name != MANIFEST:
            yield path.relative_to(root).as_posix()


def _prune(root: Path, step: int, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints; drop any newer than ``step``: they belong to a future this
    run rewound from (e.g. a damaged checkpoint passed over on resume), and a later resume must not
    pick them up."""
    found = list_checkpoints(root)
    stale = [path for s, path in found if s > step]
    current = [path for s, path in found if s <= step]
    for old in stale + (current[:-keep] if keep > 0 else []):
        shutil.rmtree(old, ignore_errors=True)


def _dumps(payload: Any) -> str:
    return json.dumps(payload, default=_not_json)


def _write_json(path: Path, payload: Any) -> None:
    path.write_text(_dumps(payload) + "\n", encoding="utf-8")


def _not_json(value: Any) -> Any:
    """Refuse rather than stringify: a function or tensor in a state dict cannot round-trip through JSON."""
    raise TypeError(f"cannot store {type(value).__name__} {value!r:.80} in a JSON checkpoint file")


# ---- loading -----------------------------------------------------------------------------------
def read_trainer_state(path: Path) -> dict[str, Any]:
    """The loop's position in a checkpoint; cheap, so compatibility is checked before anything loads."""
    return json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))


def load_checkpoint(
    accelerator: Accelerator, path: Path
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """(trainer state, method state, this process's state) after restoring weights, optimizer,
    scheduler, scaler and RNG. Only safetensors and JSON are read (sharded layouts: their own formats)."""
    path = Path(path)
    reason = validate_checkpoint(path)
    if reason is not None:
        raise ConfigError("train.resume", f"{path} is damaged: {reason}")
    manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    if manifest["layout"] != _layout(accelerator):
        raise ConfigError(
            "train.resume",
            f"{path} holds {manifest['layout']} weights, this run needs "
            f"{_layout(accelerator)} (the distribution strategy changed)",
        )
    unknown = _unknown_files(path)
    if unknown and accelerator.is_main_process:
        log.warning("%s: ignoring files rewardctl did not write (never loaded): %s", path, ", ".join(unknown))
    _load_scaler(accelerator, path)  # before the optimizer: FSDP2's optimizer load steps through the scaler
    _load_model_and_optimizer(accelerator, path)
    _load_schedulers(accelerator, path)
    _load_rng(accelerator, path / RNG_STATE.format(accelerator.process_index))
    method_file = path / METHOD_STATE
    method_state = load_file(str(method_file)) if method_file.exists() else {}
    process_file = path / PROCESS_STATE.format(accelerator.process_index)
    process_state = json.loads(process_file.read_text(encoding="utf-8")) if process_file.exists() else {}
    return read_trainer_state(path), method_state, process_state


def _load_scaler(accelerator: Accelerator, path: Path) -> None:
    scaler = accelerator.scaler
    if scaler is None:
        return
    if not (path / SCALER).is_file():
        raise ConfigError("train.resume", f"{path} has no {SCALER}; it was written without fp16 mixed precision")
    scaler.load_state_dict(json.loads((path / SCALER).read_text(encoding="utf-8")))
    if getattr(accelerator, "is_fsdp2", False):
        scaler._lazy_init_scale_growth_tracker(scaler._device)


def _load_model_and_optimizer(accelerator: Accelerator, path: Path) -> None:
    layout = _layout(accelerator)
    if layout == "fsdp":
        from accelerate.utils import load_fsdp_model, load_fsdp_optimizer

        plugin = accelerator.state.fsdp_plugin
        for i, model in enumerate(accelerator._models):
            load_fsdp_model(plugin, accelerator, model, str(path), i)
        for i, optimizer in enumerate(accelerator._optimizers):
            load_fsdp_optimizer(plugin, accelerator, optimizer, accelerator._models[i], str(path), i)
        return
    if layout == "deepspeed":
        for i, model in enumerate(accelerator._models):
            loaded, _ = model.load_checkpoint(str(path), "pytorch_model" if i == 0 else f"pytorch_model_{i}")
            if loaded is None:  # DeepSpeed reports a failed load by returning None, not by raising
                raise ConfigError("train.resume", f"DeepSpeed could not load the engine state in {path}")
        return
    for i, model in enumerate(accelerator._models):
        try:
            accelerator.unwrap_model(model).load_state_dict(load_file(str(path / _indexed(MODEL, i))))
        except RuntimeError as exc:  # missing/unexpected keys or other shapes: another model's checkpoint
            if "Error(s) in loading state_dict" not in str(exc):  # e.g. out of memory: not a mismatch
                raise
            first = str(exc).strip().splitlines()[0]
            raise ConfigError(
                "train.resume",
                f"{path} holds weights of another model ({first}); resume with the "
                "model.* settings it was written with, or choose another output_dir",
            ) from None
    for i, optimizer in enumerate(accelerator._optimizers):
        optimizer.load_state_dict(_read_optimizer(path, i, optimizer.state_dict()["param_groups"]))


def _read_optimizer(path: Path, index: int, live_groups: list[dict[str, Any]]) -> dict[str, Any]:
    meta = json.loads((path / _indexed(OPTIMIZER_META, index)).read_text(encoding="utf-8"))
    state: dict[int, dict[str, Any]] = {int(param): dict(values) for param, values in meta["state"].items()}
    for key, tensor in load_file(str(path / _indexed(OPTIMIZER, index))).items():
        _, param, name = key.split(".", 2)
        state.setdefault(int(param), {})[name] = tensor
    groups = meta["param_groups"]
    for saved, live in zip(groups, live_groups, strict=False):  # JSON has no tuples: betas come back as tuples
        for key, value in saved.items():
            if isinstance(live.get(key), tuple) and isinstance(value, list):
                saved[key] = tuple(value)
    return {"state": state, "param_groups": groups}


def _load_schedulers(accelerator: Accelerator, path: Path) -> None:
    states = json.loads((path / SCHEDULER).read_text(encoding="utf-8"))
    schedulers = _SCHEDULERS.get(accelerator, [])
    if len(states) != len(schedulers):
        raise ConfigError(
            "train.resume",
            f"{path / SCHEDULER} holds {len(states)} scheduler states, this run has {len(schedulers)} schedulers",
        )
    for scheduler, state in zip(schedulers, states, strict=True):
        scheduler.load_state_dict(state)


def _load_rng(accelerator: Accelerator, path: Path) -> None:
    with safe_open(str(path), framework="pt") as handle:
        scalars = json.loads(handle.metadata()[RNG_META])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    version, internal, gauss_next = scalars["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, pos, has_gauss, gauss = scalars["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(tensors["torch"])
    devices = sum(key.startswith("cuda.") for key in tensors)
    if devices and torch.cuda.is_available():
        for device in range(min(devices, torch.cuda.device_count())):
            torch.cuda.set_rng_state(tensors[f"cuda.{device}"], device)
    accelerator.step = scalars["accelerator_step"]
