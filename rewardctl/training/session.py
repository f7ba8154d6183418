"""One `rewardctl train` run from a composed config to a finished run directory.

Order matters and is deliberate: validate the config, decide the run directory (once, on rank 0,
shared with every process), read and validate all data, and only then build the model. A typo or a
broken row therefore fails in seconds, and nothing in an existing run directory is overwritten.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import broadcast_object_list, set_seed
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from rewardctl.config.schema import RunConfig
from rewardctl.data.batching import EpochBatchSampler
from rewardctl.data.prepare import by_length
from rewardctl.data.splits import describe, prepare_data
from rewardctl.errors import ConfigError
from rewardctl.methods.base import Method
from rewardctl.methods.registry import build_method, to_run_config
from rewardctl.modeling.common import check_max_length, count_parameters
from rewardctl.training.checkpoint import (
    STEP_DIR,
    latest_checkpoint,
    newest_intact_checkpoint,
    read_trainer_state,
    register_scheduler,
    validate_checkpoint,
)
from rewardctl.training.disk import check_disk_room, run_footprint
from rewardctl.training.guards import StoppedBeforeTraining
from rewardctl.training.launch import launch_workers, wants_launch
from rewardctl.training.loop import LoopResult, TrainingLoop
from rewardctl.training.metrics import MetricsLog
from rewardctl.training.optim import build_optimizer, build_scheduler
from rewardctl.training.plot import plot_curves
from rewardctl.training.runtime import (
    AccelerateRuntime,
    build_accelerator,
    compile_for_training,
    hydra_output_dir,
    quiet_other_processes,
    shared_run_dir,
)
from rewardctl.utils.fs import write_json_atomic, write_text_atomic
from rewardctl.utils.runlock import acquire_run_lock

log = logging.getLogger(__name__)


def resolved_config_yaml(cfg: DictConfig, run_dir: Path) -> str:
    container = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    container["output_dir"] = str(run_dir)
    return OmegaConf.to_yaml(OmegaConf.create(container))


def flat_config(cfg: DictConfig) -> dict[str, int | float | str | bool]:
    """Dotted keys with scalar values: what trackers accept as run hyperparameters."""
    flat: dict[str, int | float | str | bool] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        elif isinstance(node, (int, float, str, bool)):
            flat[prefix[:-1]] = node
        else:
            flat[prefix[:-1]] = str(node)

    walk(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), "")
    return flat


def decide_resume(run: RunConfig, run_dir: Path) -> Path | None:
    """The checkpoint to continue from, or None; refuses to clobber an existing run."""
    if run.train.resume == "off":
        if latest_checkpoint(run_dir / "checkpoints") or (run_dir / "model").exists():
            raise ConfigError("train.resume", f"{run_dir} already holds a run (checkpoints/ or model/); "
                              "continue it with train.resume=auto or choose another output_dir")
        return None
    if run.train.resume == "auto":
        return newest_intact_resume(run_dir / "checkpoints")
    return checked_resume(Path(run.train.resume))


def newest_intact_resume(root: Path) -> Path | None:
    """train.resume=auto: the newest checkpoint that validates, warning about each damaged one passed over."""
    damaged: list[str] = []

    def passed_over(path: Path, reason: str) -> None:
        log.warning("checkpoint %s is damaged (%s); trying the one before it", path, reason)
        damaged.append(f"{path.name}: {reason}")

    found = newest_intact_checkpoint(root, on_damaged=passed_over)
    if found is None and damaged:  # starting over would silently discard the run: a person should look
        raise ConfigError("train.resume", f"no checkpoint in {root} is intact ({'; '.join(damaged)}); "
                          "move checkpoints/ aside to start the run over")
    return found


def checked_resume(path: Path) -> Path:
    """train.resume=<dir>: refused, naming the fallback, when the checkpoint is damaged."""
    reason = validate_checkpoint(path)
    if reason is None:
        return path
    match = STEP_DIR.match(path.name)
    previous = newest_intact_checkpoint(path.parent, below=int(match.group(1))) if match else None
    fallback = f"the previous intact checkpoint is {previous}" if previous else "no earlier checkpoint is intact"
    raise ConfigError("train.resume", f"{path} is damaged: {reason}; {fallback}")


def check_same_method(path: Path, method: str) -> None:
    """Another method's checkpoint is refused by name before any data loads (its heads and state differ)."""
    written_by = read_trainer_state(path).get("method")
    if written_by is not None and written_by != method:
        raise ConfigError("train.resume", f"{path} was written by method={written_by}, this run is method={method}; "
                          f"resume it with method={written_by} or choose another output_dir")


def check_room_on_every_process(accelerator: Any, run_dir: Path, footprint: Any) -> None:
    """The main process decides (the run directory is its); every process raises alike, so none waits
    in a collective for one that stopped."""
    problem = None
    if accelerator.is_main_process:
        try:
            check_disk_room(run_dir, footprint)
        except ConfigError as exc:
            problem = exc.reason
    if accelerator.num_processes > 1:
        problem = broadcast_object_list([problem], from_process=0)[0]
    if problem is not None:
        raise ConfigError("output_dir", problem)


def plan_steps(run: RunConfig, micro_batches_per_epoch: int) -> int:
    if run.train.max_steps > 0:
        return run.train.max_steps
    return max(1, math.ceil(run.train.epochs * micro_batches_per_epoch / run.train.grad_accum))


def finished_run(run_dir: Path) -> dict[str, Any] | None:
    """The summary of a completed run in ``run_dir``, if there is one."""
    summary_path = run_dir / "summary.json"
    if not summary_path.exists() or not (run_dir / "model").exists():
        return None
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    return summary if summary.get("status") == "completed" else None


def check_resume(path: Path, guard: dict[str, Any], max_steps: int) -> None:
    """Refuse, before the model loads, a checkpoint whose data order differs from this run's."""
    state = read_trainer_state(path)
    for key, now in guard.items():
        if key in state and state[key] != now:
            raise ConfigError("train.resume", f"{path} was written with {key}={state[key]}, this run has {now}; "
                              "resuming would replay a different data order (start a new output_dir instead)")
    if state["step"] > max_steps:
        raise ConfigError("train.resume", f"{path} is at step {state['step']}, beyond this run's {max_steps} steps")


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job from a composed config; returns the summary written to summary.json."""
    run = to_run_config(cfg)
    if wants_launch(run.hardware):
        return launch(run)
    accelerator = build_accelerator(run.hardware, run.train.report_to)
    deepspeed = getattr(accelerator.state, "deepspeed_plugin", None)
    if deepspeed is not None:  # the loop feeds its own batches: DeepSpeed cannot infer these from a loader
        deepspeed.deepspeed_config["train_micro_batch_size_per_gpu"] = run.train.per_device_batch_size
        deepspeed.deepspeed_config["gradient_accumulation_steps"] = run.train.grad_accum
        deepspeed.deepspeed_config["gradient_clipping"] = max(run.train.max_grad_norm, 0.0)
        accelerator.gradient_accumulation_steps = run.train.grad_accum  # the engine's count, known to the loop
    quiet_other_processes(accelerator)
    if accelerator.device.type == "cuda":  # sweep jobs share a process: each reports its own peak
        torch.cuda.reset_peak_memory_stats(accelerator.device)
    run_dir = shared_run_dir(accelerator, run.output_dir)
    # One run per run directory: a second run into it is refused here, before anything loads.
    with acquire_run_lock(run_dir) if accelerator.is_main_process else nullcontext():
        return _train_in(cfg, run, accelerator, run_dir)


def _train_in(cfg: DictConfig, run: RunConfig, accelerator: Any, run_dir: Path) -> dict[str, Any]:  # noqa: C901 - to split (issue 13)
    """The run itself, once its directory is this job's (locked by the main process)."""
    main = accelerator.is_main_process
    log.info("run directory: %s (%d process%s, device %s)", run_dir, accelerator.num_processes,
             "es" if accelerator.num_processes > 1 else "", accelerator.device)
    method = build_method(run)
    resume_from = decide_resume(run, run_dir)
    if resume_from is not None:
        check_same_method(resume_from, run.method.name)
    check_max_length(run.model)  # a config read: cheap, and before any data work

    with accelerator.main_process_first():
        train_split, eval_split = prepare_data(method, run)
    reports = {"train": train_split.report, **({"eval": eval_split.report} if eval_split else {})}
    for split, report in reports.items():
        log.info(describe(split, report, method, run))
    if eval_split is None:
        log.warning("no eval set (set data.eval or data.holdout_fraction): only training metrics will be reported")

    sampler = EpochBatchSampler(
        len(train_split.dataset), run.train.per_device_batch_size, seed=run.train.seed,
        lengths=method.lengths(train_split.dataset) if run.data.group_by_length else None,
        group_batches=run.data.length_group_batches, num_replicas=accelerator.num_processes,
        rank=accelerator.process_index,
    )
    max_steps = plan_steps(run, len(sampler))
    finished = finished_run(run_dir)
    if finished is not None and finished["step"] >= max_steps:
        hint = "raise train.max_steps to continue" if resume_from else "no checkpoint was kept (train.save_every=0)"
        log.info("%s already completed %d steps; nothing to do (%s)", run_dir, finished["step"], hint)
        return finished
    if finished is not None and resume_from is None:
        raise ConfigError("train.resume", f"{run_dir} holds a finished {finished['step']}-step run and no checkpoint to "
                          "continue from (it ran with train.save_every=0); use a new output_dir")
    guard = {"method": run.method.name, "world_size": accelerator.num_processes, "per_device_batch_size": run.train.per_device_batch_size,
             "grad_accum": run.train.grad_accum, "seed": run.train.seed, "train_rows": len(train_split.dataset),
             "group_by_length": run.data.group_by_length, "length_group_batches": run.data.length_group_batches}
    if resume_from is not None:
        check_resume(resume_from, guard, max_steps)
    if main:  # only now: a refused or already-finished run leaves the directory's files as they were
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "config.yaml", resolved_config_yaml(cfg, run_dir))
        write_json_atomic(run_dir / "data_report.json", reports)

    set_seed(run.train.seed)  # before the head is created, so runs reproduce
    model = method.build_model()
    parameters = count_parameters(model)
    log.info("model: %.2fM parameters, %.2fM trainable", parameters["total"] / 1e6, parameters["trainable"] / 1e6)
    check_room_on_every_process(accelerator, run_dir, run_footprint(model, run.train.save_every,
                                                                    run.train.keep_checkpoints))
    sharded = accelerator.distributed_type.value in ("FSDP", "DEEPSPEED")
    optimizer = build_optimizer(model, run.train, fused=not sharded)
    scheduler = build_scheduler(optimizer, run.train, max_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    register_scheduler(accelerator, scheduler)  # saved as JSON by our checkpoints, never pickled
    train_loader = DataLoader(train_split.dataset, batch_sampler=sampler, collate_fn=method.collate,
                              num_workers=run.train.num_workers, generator=torch.Generator().manual_seed(run.train.seed))
    eval_loader = None
    if eval_split is not None:
        eval_batch = run.train.per_device_eval_batch_size or run.train.per_device_batch_size
        eval_rows = by_length(eval_split.dataset, method.lengths(eval_split.dataset))
        eval_loader = accelerator.prepare(DataLoader(eval_rows, batch_size=eval_batch, shuffle=False,
                                                     collate_fn=method.collate, num_workers=run.train.num_workers))
    method.on_train_start(model, AccelerateRuntime(accelerator), resuming=resume_from is not None)
    # Only the loop runs the compiled wrapper. ``model`` stays the prepared module that accelerate's
    # checkpoints hold and that is saved below, so no state-dict key gains ``_orig_mod.``; the method's
    # start hook saw it too (BCO deep-copies it into its reference).
    trained = model
    if run.train.compile:
        log.info("train.compile: torch.compile (inductor, dynamic shapes); the first train and eval "
                 "batches include compilation time")
        trained = compile_for_training(model)

    metrics_log = MetricsLog(run_dir / "metrics.jsonl", enabled=main)
    plot_metrics = ("loss", method.primary_metric)
    title = f"rewardctl {run.method.name} - {Path(run.model.name_or_path).name}"

    def replot() -> None:
        plot_curves(metrics_log.records(), plot_metrics, run_dir / "curves.png", title)

    loop = TrainingLoop(accelerator=accelerator, method=method, model=trained, optimizer=optimizer, scheduler=scheduler,
                        train_loader=train_loader, batch_sampler=sampler, eval_loader=eval_loader, cfg=run.train,
                        max_steps=max_steps, run_dir=run_dir, metrics_log=metrics_log, on_eval=replot,
                        resume_guard=guard)
    if resume_from is not None:
        loop.restore(resume_from)
    elif main and metrics_log.path.exists():
        backup = metrics_log.path.with_name(f"metrics.{int(time.time())}.jsonl.bak")
        metrics_log.path.rename(backup)
        log.warning("no checkpoint to resume in %s; the previous metrics.jsonl was kept as %s", run_dir, backup.name)
    if run.train.report_to:
        accelerator.project_configuration.project_dir = str(run_dir)
        accelerator.project_configuration.logging_dir = str(run_dir / "trackers")
        accelerator.init_trackers("rewardctl", config=flat_config(cfg))
    log.info("training %d steps (%d micro-batches of %d per process per epoch, grad_accum=%d, %d process%s)",
             max_steps, len(sampler), run.train.per_device_batch_size, run.train.grad_accum,
             accelerator.num_processes, "es" if accelerator.num_processes > 1 else "")

    result = loop.run()
    peak_memory = peak_gpu_memory_gib(accelerator)  # training's peak, before gathering weights to save
    if result.status == "completed":  # never for diverged (possibly non-finite) or interrupted runs
        state_dict = None
        if sharded:
            state_dict = accelerator.get_state_dict(model)
        if main:
            method.save_model(accelerator.unwrap_model(model), run_dir / "model", state_dict=state_dict)
    accelerator.wait_for_everyone()
    summary = summarize(result, run, method, run_dir, max_steps, accelerator.num_processes,
                        peak_memory=peak_memory, parameters=parameters)
    if main:
        write_json_atomic(run_dir / "summary.json", summary)
        if metrics_log.records():
            replot()
        for line in summary_lines(summary, method):
            log.info(line)
    accelerator.end_training()
    return summary


def launch(run: RunConfig) -> dict[str, Any]:
    """This process only starts the workers (same overrides, one run directory) and waits for them."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:
        raise ConfigError("hardware.num_processes", "starting several processes needs the command line "
                          "(rewardctl train ...); from Python, run under accelerate launch or torchrun") from None
    run_dir = hydra_output_dir(run.output_dir).resolve()
    started = time.time()
    status, signum = launch_workers(run.hardware, overrides, run_dir)
    if status != 0:
        stopped = early_stop_summary(run_dir, since=started)
        if stopped is not None:  # the workers stopped as designed (diverged / interrupted): not a failure
            return stopped
        if signum is not None:  # stopped before the loop (loading, tokenising): nothing to checkpoint yet
            raise StoppedBeforeTraining(signum)
        raise ConfigError("hardware", f"the worker processes failed (exit status {status}); see their output above")
    if run.hardware.machine_rank != 0:  # the run directory and its summary belong to machine 0
        return {"status": "completed", "machine_rank": run.hardware.machine_rank}
    return json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))


def early_stop_summary(run_dir: Path, since: float) -> dict[str, Any] | None:
    """The workers' summary when they wrote one during this launch with a ``diverged`` or
    ``interrupted`` status: the launcher's own exit status then says so, not "failed"."""
    path = run_dir / "summary.json"
    if not path.exists() or path.stat().st_mtime < since:
        return None
    summary = json.loads(path.read_text(encoding="utf-8"))
    return summary if summary.get("status") in ("diverged", "interrupted") else None


def summarize(result: LoopResult, run: RunConfig, method: Method, run_dir: Path, max_steps: int, processes: int,
              peak_memory: float | None = None, parameters: dict[str, int] | None = None) -> dict[str, Any]:
    items = result.totals.get(method.item_name)
    return {
        "status": result.status,
        "method": run.method.name,
        "step": result.step,
        "max_steps": max_steps,
        "processes": processes,
        # What actually ran (hardware.mixed_precision=auto is resolved by now): benchmarks read these.
        "mixed_precision": run.hardware.mixed_precision.value,
        "compile": run.train.compile,
        "train_seconds": round(result.train_seconds, 3),
        f"{method.item_name}_per_sec": (items / result.train_seconds) if items and result.train_seconds else None,
        "peak_gpu_memory_gib": peak_memory,
        "parameters": parameters,
        "totals": result.totals,
        "last_train": result.train,
        "first_eval": result.evals[0] if result.evals else None,
        "final_eval": result.evals[-1] if result.evals else None,
        "primary_metric": method.primary_metric,
        "run_dir": str(run_dir),
        "model_dir": str(run_dir / "model") if result.status == "completed" else None,
        # Updates skipped as non-finite (and fp16 loss-scaler overflows); why a diverged run stopped;
        # which signal interrupted it; the checkpoint a rerun of the same command continues from.
        "skipped_steps": result.skipped_steps,
        "message": result.message,
        "signal": result.signal,
        "checkpoint": str(latest) if (latest := latest_checkpoint(run_dir / "checkpoints")) else None,
    }


def peak_gpu_memory_gib(accelerator: Any) -> float | None:
    """The largest per-process peak of allocated GPU memory (None on CPU): what a user sizes GPUs by."""
    if accelerator.device.type != "cuda":
        return None
    peak = torch.tensor(float(torch.cuda.max_memory_allocated(accelerator.device)), device=accelerator.device)
    if accelerator.num_processes > 1:
        peak = accelerator.gather(peak[None]).max()
    return round(peak.item() / 2**30, 3)


def summary_lines(summary: dict[str, Any], method: Method) -> list[str]:
    rate = summary.get(f"{method.item_name}_per_sec")
    lines = [f"{summary['status']}: {summary['method']} run, {summary['step']}/{summary['max_steps']} steps in "
             f"{summary['train_seconds']:.1f} s of training" + (f" ({rate:.1f} {method.item_name}/s)" if rate else "")]
    first, final = summary.get("first_eval"), summary.get("final_eval")
    if final:
        for key in (method.primary_metric, "loss"):
            if key in final:
                before = f"{first[key]:.4f} (step {first['step']}) -> " if first and first is not final else ""
                lines.append(f"  eval {key}: {before}{final[key]:.4f} (step {final['step']})")
    if summary.get("peak_gpu_memory_gib") is not None:
        lines.append(f"  peak GPU memory: {summary['peak_gpu_memory_gib']:.2f} GiB per process")
    train = summary.get("last_train") or {}
    if "loss" in train:
        lines.append(f"  last train loss: {train['loss']:.4f}")
    if summary.get("skipped_steps"):
        lines.append(f"  skipped updates (non-finite): {summary['skipped_steps']}")
    if summary.get("model_dir"):
        lines.append(f"  model: {summary['model_dir']}")
    elif summary["status"] in ("diverged", "interrupted", "stopped"):
        kept = summary.get("checkpoint")
        lines.append(f"  no model saved; newest checkpoint: {kept}" if kept else "  no model and no checkpoint saved")
    lines.append(f"  metrics: {summary['run_dir']}/metrics.jsonl, curves: {summary['run_dir']}/curves.png")
    return lines
