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
) -> Path:
    """Collective: every process calls it (each writes its own RNG state)."""
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
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


def load_checkpoint(accelerator: Accelerator, path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    accelerator.load_state(str(path))
    trainer_state = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
    method_file = path / METHOD_STATE
    method_state = load_file(str(method_file)) if method_file.exists() else {}
    return trainer_state, method_state
