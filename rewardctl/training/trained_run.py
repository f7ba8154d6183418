"""Open a trained run: the checkpoint or model a command asked for, its tokenizer and its weights.

Shared by ``rewardctl eval`` and ``rewardctl export`` (and whatever scores a run next), so each reads
a run directory the same way: ``model/`` by default, ``checkpoint=step-N`` or a path otherwise; a saved
model directory (stock transformers or a PEFT adapter) through the method's ``load_trained``, a
training checkpoint by rebuilding the method's model and loading its safetensors weights.
"""

from __future__ import annotations

import re
from pathlib import Path

from accelerate.utils import set_seed
from safetensors.torch import load_file
from torch import nn
from transformers import AutoTokenizer

from rewardctl.config.schema import RunConfig
from rewardctl.errors import ConfigError, ModelMismatchError
from rewardctl.methods.base import Method
from rewardctl.modeling import rotary
from rewardctl.modeling.adapters import has_adapter
from rewardctl.training.checkpoint import METHOD_STATE, STEP_DIR


def resolve_checkpoint(run_dir: Path, checkpoint: str | None) -> Path:
    if checkpoint is None:
        path = run_dir / "model"
        if not path.is_dir():
            raise ConfigError("checkpoint", f"{run_dir} has no model/ (the run did not finish); pass checkpoint=step-N")
        return path
    path = run_dir / "checkpoints" / checkpoint if STEP_DIR.match(checkpoint) else Path(checkpoint)
    if not path.is_dir():
        raise ConfigError("checkpoint", f"{path} is not a directory")
    return path


def is_saved_model(path: Path) -> bool:
    """A model/ directory (stock transformers or peft layout) rather than a training checkpoint."""
    if (path / "config.json").is_file() or has_adapter(path):
        return True
    if not (path / "model.safetensors").is_file():
        sharded = any(path.glob("pytorch_model_fsdp_*")) or any(path.glob("pytorch_model/*"))
        hint = (
            (
                ": it is a sharded FSDP / DeepSpeed checkpoint; use the run's final model/, or merge the shards "
                "first (accelerate merge-weights, DeepSpeed's zero_to_fp32.py)"
            )
            if sharded
            else ""
        )
        raise ConfigError(
            "checkpoint", f"{path} holds neither a saved model (config.json) nor checkpoint weights{hint}"
        )
    return False


def use_saved_tokenizer(method: Method, run: RunConfig, path: Path) -> None:
    """A saved model scores with the tokenizer saved beside it (template and pad token included)."""
    if is_saved_model(path):
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        tokenizer.padding_side = run.model.padding_side.value
        method.use_tokenizer(tokenizer)


def load_model(method: Method, run: RunConfig, path: Path) -> nn.Module:
    """A trained model as its run trained it (rotary tables in the autocast dtype, as in training)."""
    model = _load_model(method, run, path)
    rotary.attach(model)
    return model


def _load_model(method: Method, run: RunConfig, path: Path) -> nn.Module:
    if is_saved_model(path):
        try:
            return method.load_trained(path)
        except ModelMismatchError as exc:
            raise ConfigError("run_dir", str(exc)) from None
    weights = path / "model.safetensors"
    if (path / METHOD_STATE).is_file():  # e.g. BCO's delta; first, as it may shape the model (outputs)
        method.restore_checkpoint_state(load_file(str(path / METHOD_STATE)))
    set_seed(run.train.seed)
    model = method.build_model()
    state = {re.sub(r"^(module\.)+", "", k): v for k, v in load_file(str(weights)).items()}
    model.load_state_dict(state)
    return model
