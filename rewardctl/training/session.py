"""One `rewardctl train` run from a composed config to a finished run directory: a short recipe.

Order matters and is deliberate: validate the config, decide the run directory (once, on rank 0,
shared with every process) and whether it resumes, read and validate all data, and only then build
the model. A typo or a broken row therefore fails in seconds, and nothing in an existing run
directory is overwritten. Each step's owner: the config (``methods.registry``), the accelerator
(``runtime``), the run directory and its files (``run_directory``), the data (``data.splits``), the
loop (``loop``), the summary (``summary``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from rewardctl.config.schema import RunConfig
from rewardctl.data.batching import EpochBatchSampler
from rewardctl.data.prepare import by_length
from rewardctl.data.splits import describe, prepare_data
from rewardctl.errors import ConfigError
from rewardctl.methods.base import Method
from rewardctl.methods.registry import build_method, to_run_config
from rewardctl.modeling import embedding_grad, rotary
from rewardctl.modeling.common import check_max_length, count_parameters
from rewardctl.training.checkpoint import register_scheduler
from rewardctl.training.disk import check_room_on_every_process, run_footprint
from rewardctl.training.figures import write_figures
from rewardctl.training.guards import StoppedBeforeTraining
from rewardctl.training.launch import launch_workers, wants_launch
from rewardctl.training.loop import LoopResult, TrainingLoop
from rewardctl.training.metrics import MetricsLog
from rewardctl.training.optim import build_optimizer, build_scheduler
from rewardctl.training.peers import peer_failures_reported
from rewardctl.training.plot import CurveRedraws, plot_curves
from rewardctl.training.reward_stats import stats_from_train_sample
from rewardctl.training.run_directory import RunDirectory, check_resume
from rewardctl.training.runtime import (
    AccelerateRuntime,
    build_accelerator,
    compile_for_training,
    hydra_output_dir,
    quiet_other_processes,
    shared_run_dir,
)
from rewardctl.training.summary import peak_gpu_memory_gib, summarize, summary_lines
from rewardctl.utils.runlock import acquire_run_lock

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job from a composed config; returns the summary written to summary.json."""
    run = to_run_config(cfg)
    if wants_launch(run.hardware):
        return launch(run)
    accelerator = build_accelerator(run.hardware, run.train.report_to, run.train)
    quiet_other_processes(accelerator)
    if accelerator.device.type == "cuda":  # sweep jobs share a process: each reports its own peak
        torch.cuda.reset_peak_memory_stats(accelerator.device)
    run_dir = RunDirectory(shared_run_dir(accelerator, run.output_dir), main=accelerator.is_main_process)
    # One run per run directory: a second run into it is refused here, before anything loads.
    peers = peer_failures_reported(
        rank=accelerator.process_index,
        processes=accelerator.num_processes,
        timeout_s=run.hardware.collective_timeout_s,
        resume_point=run_dir.latest_checkpoint,
    )
    with peers, acquire_run_lock(run_dir.path) if run_dir.main else nullcontext():
        return _train_in(cfg, run, accelerator, run_dir)


def _train_in(cfg: DictConfig, run: RunConfig, accelerator: Any, run_dir: RunDirectory) -> dict[str, Any]:
    """The recipe, once the directory is this job's: decide, read the data, build, train, finish."""
    log.info(
        "run directory: %s (%d process%s, device %s)",
        run_dir.path,
        accelerator.num_processes,
        "es" if accelerator.num_processes > 1 else "",
        accelerator.device,
    )
    method = build_method(run)
    resume_from = run_dir.resume_point(run)
    check_max_length(run.model)  # a config read: cheap, and before any data work
    data = read_data(method, run, accelerator)
    sampler = train_sampler(method, run, data, accelerator)
    max_steps = plan_steps(run, len(sampler))
    done = run_dir.already_done(max_steps, resume_from)
    if done is not None:
        return done
    guard = resume_guard(run, accelerator.num_processes, len(data.train.dataset))
    if resume_from is not None:
        check_resume(resume_from, guard, max_steps)
    run_dir.record_start(cfg, data.reports, resuming=resume_from is not None)

    set_seed(run.train.seed)  # before the head is created, so runs reproduce
    parts = build_parts(method, run, accelerator, run_dir, data, sampler, max_steps)
    method.on_train_start(parts.model, AccelerateRuntime(accelerator), resuming=resume_from is not None)
    metrics_log = MetricsLog(run_dir.metrics_path, enabled=run_dir.main)
    loop = TrainingLoop(
        accelerator=accelerator,
        method=method,
        model=parts.trained,
        optimizer=parts.optimizer,
        scheduler=parts.scheduler,
        train_loader=parts.train_loader,
        batch_sampler=sampler,
        eval_loader=parts.eval_loader,
        cfg=run.train,
        max_steps=max_steps,
        run_dir=run_dir.path,
        metrics_log=metrics_log,
        on_eval=CurveRedraws(lambda: draw_curves(metrics_log, method, run, run_dir), run.train.curves_every_s),
        resume_guard=guard,
    )
    if resume_from is not None:
        loop.restore(resume_from)
    start_trackers(accelerator, run.train.report_to, run_dir, cfg)
    log.info(
        "training %d steps (%d micro-batches of %d per process per epoch, grad_accum=%d, %d process%s)",
        max_steps,
        len(sampler),
        run.train.per_device_batch_size,
        run.train.grad_accum,
        accelerator.num_processes,
        "es" if accelerator.num_processes > 1 else "",
    )
    try:
        result = loop.run()
        return finish(result, method, run, accelerator, run_dir, parts, max_steps, metrics_log, data)
    except Exception:  # a crash keeps its curves up to the last log (evals redraw at most once a minute)
        if run_dir.main and metrics_log.records():
            try:
                draw_curves(metrics_log, method, run, run_dir)
            except Exception as exc:  # noqa: BLE001 - never mask the error that ended the run
                log.warning("curves.png not drawn: %s", exc)
        raise


@dataclass
class RunData:
    train: Any  # a PreparedSplit: .dataset and .report
    eval: Any | None
    reports: dict[str, Any]


@dataclass
class TrainingParts:
    """What ``build_parts`` makes: ``model`` is the prepared module that checkpoints hold and that is
    saved; ``trained`` is what the loop runs (the same, or its torch.compile wrapper)."""

    model: Any
    trained: Any
    optimizer: Any
    scheduler: Any
    train_loader: DataLoader
    eval_loader: Any | None
    parameters: dict[str, int]
    sharded: bool


def read_data(method: Method, run: RunConfig, accelerator: Any) -> RunData:
    """Every row read, validated and tokenised (the main process first: it fills the cache)."""
    with accelerator.main_process_first():
        train_split, eval_split = prepare_data(method, run)
    reports = {"train": train_split.report, **({"eval": eval_split.report} if eval_split else {})}
    for split, report in reports.items():
        log.info(describe(split, report, method, run))
    if eval_split is None:
        log.warning("no eval set (set data.eval or data.holdout_fraction): only training metrics will be reported")
    return RunData(train_split, eval_split, reports)


def train_sampler(method: Method, run: RunConfig, data: RunData, accelerator: Any) -> EpochBatchSampler:
    return EpochBatchSampler(
        len(data.train.dataset),
        run.train.per_device_batch_size,
        seed=run.train.seed,
        lengths=method.lengths(data.train.dataset) if run.data.group_by_length else None,
        group_batches=run.data.length_group_batches,
        num_replicas=accelerator.num_processes,
        rank=accelerator.process_index,
    )


def resume_guard(run: RunConfig, processes: int, train_rows: int) -> dict[str, Any]:
    """What a checkpoint must share with this run to resume it: the data order depends on all of it."""
    return {
        "method": run.method.name,
        "world_size": processes,
        "per_device_batch_size": run.train.per_device_batch_size,
        "grad_accum": run.train.grad_accum,
        "seed": run.train.seed,
        "train_rows": train_rows,
        "group_by_length": run.data.group_by_length,
        "length_group_batches": run.data.length_group_batches,
    }


def build_parts(
    method: Method,
    run: RunConfig,
    accelerator: Any,
    run_dir: RunDirectory,
    data: RunData,
    sampler: EpochBatchSampler,
    max_steps: int,
) -> TrainingParts:
    """The model (checked for room on disk), optimizer, schedule and loaders, prepared by accelerate."""
    model = method.build_model()
    rotary.attach(model)
    parameters = count_parameters(model)
    log.info("model: %.2fM parameters, %.2fM trainable", parameters["total"] / 1e6, parameters["trainable"] / 1e6)
    check_room_on_every_process(
        accelerator, run_dir.path, run_footprint(model, run.train.save_every, run.train.keep_checkpoints)
    )
    sharded = accelerator.distributed_type.value in ("FSDP", "DEEPSPEED")
    optimizer = build_optimizer(model, run.train, fused=not sharded)
    one_plain_cpu_process = accelerator.device.type == "cpu" and accelerator.num_processes == 1 and not sharded
    if run.hardware.cpu_warm_embedding_grad and one_plain_cpu_process and not run.train.compile:
        embedding_grad.attach(model, optimizer)
    scheduler = build_scheduler(optimizer, run.train, max_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    register_scheduler(accelerator, scheduler)  # saved as JSON by our checkpoints, never pickled
    train_loader = DataLoader(
        data.train.dataset,
        batch_sampler=sampler,
        collate_fn=method.collate,
        num_workers=run.train.num_workers,
        generator=torch.Generator().manual_seed(run.train.seed),
    )
    eval_loader = None
    if data.eval is not None:
        eval_batch = run.train.per_device_eval_batch_size or run.train.per_device_batch_size
        eval_rows = by_length(data.eval.dataset, method.lengths(data.eval.dataset))
        eval_loader = accelerator.prepare(
            DataLoader(
                eval_rows,
                batch_size=eval_batch,
                shuffle=False,
                collate_fn=method.collate,
                num_workers=run.train.num_workers,
            )
        )
    # Only the loop runs the compiled wrapper; ``model`` stays the prepared module that accelerate's
    # checkpoints hold and that is saved, so no state-dict key gains ``_orig_mod.``; the method's
    # start hook sees it too (BCO deep-copies it into its reference).
    trained = model
    if run.train.compile:
        log.info(
            "train.compile: torch.compile (inductor, dynamic shapes); the first train and eval "
            "batches include compilation time"
        )
        trained = compile_for_training(model)
    return TrainingParts(model, trained, optimizer, scheduler, train_loader, eval_loader, parameters, sharded)


def draw_curves(metrics_log: MetricsLog, method: Method, run: RunConfig, run_dir: RunDirectory) -> None:
    """curves.png: the loss and the method's primary metric, train and eval, against the step."""
    plot_curves(
        metrics_log.records(),
        ("loss", method.primary_metric),
        run_dir.curves_path,
        f"rewardctl {run.method.name} - {Path(run.model.name_or_path).name}",
    )


def start_trackers(accelerator: Any, report_to: list[str], run_dir: RunDirectory, cfg: DictConfig) -> None:
    """accelerate's trackers (train.report_to), writing under the run directory."""
    if not report_to:
        return
    accelerator.project_configuration.project_dir = str(run_dir.path)
    accelerator.project_configuration.logging_dir = str(run_dir.path / "trackers")
    accelerator.init_trackers("rewardctl", config=flat_config(cfg))


def finish(
    result: LoopResult,
    method: Method,
    run: RunConfig,
    accelerator: Any,
    run_dir: RunDirectory,
    parts: TrainingParts,
    max_steps: int,
    metrics_log: MetricsLog,
    data: RunData,
) -> dict[str, Any]:
    """Save the model of a completed run, then summary.json, the final curves and the console report."""
    peak_memory = peak_gpu_memory_gib(accelerator)  # training's peak, before gathering weights to save
    if result.status == "completed":  # never for diverged (possibly non-finite) or interrupted runs
        if parts.eval_loader is None:  # the reward statistics saved with the model
            stats_from_train_sample(method, run, accelerator, parts.model, data.train.dataset)
        state_dict = accelerator.get_state_dict(parts.model) if parts.sharded else None
        if run_dir.main:
            method.save_model(accelerator.unwrap_model(parts.model), run_dir.model_dir, state_dict=state_dict)
            run_dir.stamp_saved_models()
    accelerator.wait_for_everyone()
    summary = summarize(
        result,
        run,
        method,
        run_dir.path,
        max_steps,
        accelerator.num_processes,
        peak_memory=peak_memory,
        parameters=parts.parameters,
    )
    if run_dir.main:
        if result.eval_outputs:  # the last eval's reward histogram, calibration, per-step accuracy
            summary["figures"] = [p.name for p in write_figures(run_dir.path, method, result.eval_outputs)]
        run_dir.write_summary(summary)
        if metrics_log.records():
            draw_curves(metrics_log, method, run, run_dir)
        for line in summary_lines(summary, method):
            log.info(line)
    accelerator.end_training()
    return summary


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


def plan_steps(run: RunConfig, micro_batches_per_epoch: int) -> int:
    """Optimizer steps of the whole run: ``train.max_steps``, else the epochs' micro-batches / grad_accum."""
    if run.train.max_steps > 0:
        return run.train.max_steps
    return max(1, math.ceil(run.train.epochs * micro_batches_per_epoch / run.train.grad_accum))


def launch(run: RunConfig) -> dict[str, Any]:
    """This process only starts the workers (same overrides, one run directory) and waits for them."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:
        raise ConfigError(
            "hardware.num_processes",
            "starting several processes needs the command line "
            "(rewardctl train ...); from Python, run under accelerate launch or torchrun",
        ) from None
    run_dir = RunDirectory(hydra_output_dir(run.output_dir).resolve())
    started = time.time()
    status, signum = launch_workers(run.hardware, overrides, run_dir.path)
    if status != 0:
        stopped = run_dir.early_stop_summary(since=started)
        if stopped is not None:  # the workers stopped as designed (diverged / interrupted): not a failure
            return stopped
        if signum is not None:  # stopped before the loop (loading, tokenising): nothing to checkpoint yet
            raise StoppedBeforeTraining(signum)
        raise ConfigError("hardware", f"the worker processes failed (exit status {status}); see their output above")
    if run.hardware.machine_rank != 0:  # the run directory and its summary belong to machine 0
        return {"status": "completed", "machine_rank": run.hardware.machine_rank}
    return json.loads(run_dir.summary_path.read_text(encoding="utf-8"))
