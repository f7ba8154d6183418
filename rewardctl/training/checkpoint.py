"""Resumable checkpoints: accelerate state plus the loop's position and the method's state.

``checkpoints/step-N/`` holds what ``Accelerator.save_state`` writes (weights, optimizer, scheduler,
every process's RNG states) plus ``trainer_state.json`` (step, micro-batches consumed, metric totals)
and ``method_state.safetensors``. The directory is filled under a temporary name and renamed when
complete, so a crash mid-save never leaves a checkpoint that looks valid.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from rewardctl.utils.fs import replace_directory, write_json_atomic

STEP_DIR = re.compile(r"^step-(\d+)$")
TRAINER_STATE = "trainer_state.json"
METHOD_STATE = "method_state.safetensors"
PROCESS_STATE = "process_state_{}.json"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = STEP_DIR.match(child.name)
        if match and (child / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


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
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if process_state is not None:
        write_json_atomic(tmp / PROCESS_STATE.format(accelerator.process_index), process_state)
    if accelerator.is_main_process:
        write_json_atomic(tmp / TRAINER_STATE, trainer_state)
        save_file({k: v.detach().cpu().contiguous() for k, v in method_state.items()}, str(tmp / METHOD_STATE))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        replace_directory(tmp, final)
        if keep > 0:
            for _, old in list_checkpoints(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def read_trainer_state(path: Path) -> dict[str, Any]:
    """The loop's position in a checkpoint; cheap, so compatibility is checked before anything loads."""
    return json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))


def load_checkpoint(
    accelerator: Accelerator, path: Path
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """(trainer state, method state, this process's state) after restoring the accelerate state."""
    accelerator.load_state(str(path))
    method_file = path / METHOD_STATE
    method_state = load_file(str(method_file)) if method_file.exists() else {}
    process_file = path / PROCESS_STATE.format(accelerator.process_index)
    process_state = json.loads(process_file.read_text(encoding="utf-8")) if process_file.exists() else {}
    return read_trainer_state(path), method_state, process_state
