"""`rewardctl export`: a run's model as one stock transformers directory, adapter merged.

Training with LoRA writes ``model/`` as a PEFT adapter (and ``model-merged/`` unless the run was
sharded or ``peft.save_merged=false``). Export does the merge afterwards, on one machine, from the
final model or any checkpoint, optionally casting to bf16 / fp16 for serving. The run's own config
rebuilds the model exactly as ``rewardctl eval`` does, and the saved directory goes through the
method's own ``save_model``, so the export scores exactly as the run did and carries the same
rewardctl metadata (BCO's delta, PRM's separator, the pooling rule).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from rewardctl.config.schema import ExportConfig
from rewardctl.config.validate import to_export_config
from rewardctl.errors import ConfigError
from rewardctl.methods.registry import build_method, load_run_config
from rewardctl.modeling.adapters import contains_adapter, merge_adapters
from rewardctl.modeling.common import DTYPES, count_parameters
from rewardctl.training.trained_run import load_model, resolve_checkpoint, use_saved_tokenizer

log = logging.getLogger(__name__)


def default_output(run_dir: Path, checkpoint: str | None) -> Path:
    suffix = "" if checkpoint is None else f"-{Path(checkpoint).name}"
    return run_dir / f"model-merged{suffix}"


def check_output(output: Path, source: Path, run_dir: Path, overwrite: bool) -> None:
    """Replacing ``output`` must never delete what the export reads or the run itself."""
    if output == source or source.is_relative_to(output) or output.is_relative_to(source):
        raise ConfigError(
            "output_dir", f"{output} overlaps the model being exported ({source}); choose another directory"
        )
    if run_dir.is_relative_to(output) or output.is_relative_to(run_dir / "checkpoints"):
        raise ConfigError("output_dir", f"{output} would replace the run or its checkpoints; choose another directory")
    if output.exists() and not overwrite:
        raise ConfigError("output_dir", f"{output} already exists; pass overwrite=true to replace it")


def export_run(cfg: DictConfig | ExportConfig) -> dict[str, Any]:
    """Write the merged (and optionally cast) model; returns what was written."""
    ex = cfg if isinstance(cfg, ExportConfig) else to_export_config(cfg)
    run_dir = Path(ex.run_dir).resolve()
    run = load_run_config(run_dir / "config.yaml")
    source = resolve_checkpoint(run_dir, ex.checkpoint)
    output = Path(ex.output_dir).resolve() if ex.output_dir else default_output(run_dir, ex.checkpoint)
    check_output(output, source.resolve(), run_dir, ex.overwrite)
    if run.peft.name.value == "qlora" and ex.checkpoint is not None:
        raise ConfigError(
            "checkpoint",
            "a QLoRA checkpoint holds 4-bit base weights; export the run's final model/ "
            "(its adapter is merged into the full-precision base)",
        )

    method = build_method(run)
    use_saved_tokenizer(method, run, source)
    model = load_model(method, run, source)
    had_adapter = contains_adapter(model)
    model = merge_adapters(model).eval()
    if ex.dtype is not None:
        model.to(DTYPES[ex.dtype])
    # The method's own writer: same layout and metadata as a run's model/, now without an adapter.
    method.save_model(model, output)
    parameters = count_parameters(model)["total"]
    log.info(
        "exported %s%s to %s (%.1fM parameters%s)",
        source,
        " (adapter merged)" if had_adapter else "",
        output,
        parameters / 1e6,
        f", {ex.dtype.value}" if ex.dtype is not None else "",
    )
    return {
        "source": str(source),
        "output_dir": str(output),
        "merged_adapter": had_adapter,
        "dtype": ex.dtype.value if ex.dtype is not None else None,
        "parameters": parameters,
    }
