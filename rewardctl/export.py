"""`rewardctl export`: a run's model as one stock transformers directory, adapter merged.

Training with LoRA writes ``model/`` as a PEFT adapter (and ``model-merged/`` unless the run was
sharded or ``peft.save_merged=false``). Export does the merge afterwards, on one machine, from the
final model or any checkpoint, optionally casting to bf16 / fp16 for serving. The run's own config
rebuilds the model exactly as ``rewardctl eval`` does, and the saved directory goes through the
method's own ``save_model``, so the export scores exactly as the run did and carries the same
rewardctl metadata (BCO's delta, PRM's separator, the pooling rule). A ``README.md`` model card
(``rewardctl.model_card``) goes beside the weights: method, data, budget, metrics, and a stock
transformers snippet that scores as training did.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from rewardctl.config.schema import ExportConfig
from rewardctl.config.validate import to_export_config
from rewardctl.errors import ConfigError
from rewardctl.methods.registry import build_method, load_run_config
from rewardctl.model_card import CardFacts, looks_like_hub_id, render_model_card
from rewardctl.modeling.adapters import contains_adapter, merge_adapters
from rewardctl.modeling.common import DTYPES, count_parameters
from rewardctl.training.checkpoint import STEP_DIR
from rewardctl.training.run_directory import stamp_run_config
from rewardctl.training.trained_run import load_model, resolve_checkpoint, use_saved_tokenizer
from rewardctl.utils.fs import write_text_atomic

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
    # The run's config beside the weights: rewardctl score / serve model_dir=<export> score as the run.
    stamp_run_config(output, run_dir)
    card = write_model_card(output, run, run_dir, ex, source)
    log.info("model card: %s", card)
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
        "model_card": str(card),
    }


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def eval_records(run_dir: Path, summary: dict[str, Any] | None, source: Path) -> tuple[dict | None, dict | None]:
    """(the eval of the exported weights, the run's first eval): ``summary.json``'s for the final
    model; for a checkpoint ``step-N``, the eval logged at step N in ``metrics.jsonl`` (None if the
    run did not evaluate there: the card then says so rather than show another step's numbers)."""
    match = STEP_DIR.match(source.name)
    if match is None and summary and summary.get("final_eval"):
        return summary["final_eval"], summary.get("first_eval")
    try:
        lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError:
        return None, None
    evals = [r for r in (json.loads(line) for line in lines if line.strip()) if r.get("split") == "eval"]
    step = int(match.group(1)) if match else max((r.get("step", -1) for r in evals), default=-1)
    at_step = [r for r in evals if r.get("step") == step]
    return (at_step[-1] if at_step else None), (evals[0] if evals else None)


def write_model_card(output: Path, run: Any, run_dir: Path, ex: ExportConfig, source: Path) -> Path:
    """``output/README.md``, from the run's records and the exported config.json."""
    summary = _read_json(run_dir / "summary.json")
    metrics, first = eval_records(run_dir, summary, source)
    names = (run.model.name_or_path, run.data.train, run.data.eval, getattr(run.method, "ref_model", None))
    hub_ids = frozenset(n for n in names if looks_like_hub_id(n) and not Path(n).expanduser().exists())
    facts = CardFacts(
        run=run,
        saved_config=_read_json(output / "config.json") or {},
        metrics=metrics,
        first_metrics=first,
        summary=summary,
        checkpoint=ex.checkpoint,
        dtype=ex.dtype.value if ex.dtype is not None else None,
        hub_ids=hub_ids,
        model_dir_name=output.name,
    )
    path = output / "README.md"
    write_text_atomic(path, render_model_card(facts))
    return path
