"""`rewardctl <command> [Hydra overrides]`: one Hydra app per command over the shared config tree.

Hydra owns argument parsing after the command word, so everything Hydra offers works through the
subcommand: ``-m`` sweeps, ``--cfg job``, ``--help``, ``--info``, ``+key=value``.

``--debug`` anywhere on the line (or ``HYDRA_FULL_ERROR=1``) shows the full stack of any error.

Exit status: 0 completed (or stopped by ``train.stop_after_steps``); 2 a config, data or environment
error; 3 a diverged run (``EXIT_DIVERGED``); 128 + the signal for an interrupted run (130 SIGINT,
143 SIGTERM), whether it stopped after a checkpoint or, on a second signal, at once.
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import shlex
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from rewardctl import __version__
from rewardctl.config.store import register
from rewardctl.errors import RewardctlError
from rewardctl.sweep import sweep_outcome
from rewardctl.utils.environment import self_launched_worker

log = logging.getLogger("rewardctl")
CONFIG_PATH = "pkg://rewardctl.conf"
EXIT_DIVERGED = 3

# The command's arguments as the user gave them (before worker_overrides), for the resume command,
# and the worst exit status of the jobs run so far (a sweep continues past a diverged job).
_invocation: dict[str, Any] = {"args": [], "status": 0}

USAGE = f"""rewardctl {__version__}: train reward models for RLHF from composed YAML configs.

usage: rewardctl <command> [hydra overrides...]

commands:
  train   train a reward model: rewardctl train method=pairwise model=tiny data=pairwise_sample
          (sweeps: rewardctl train -m train.lr=1e-5,3e-5; config: rewardctl train --cfg job)
  eval    evaluate a finished run on a dataset: rewardctl eval run_dir=<run directory> [data=<path>]
  score   score rows with a trained model, every input column kept:
          rewardctl score run_dir=<run directory> data=<file|folder|hub id|-> [output=<.jsonl|.parquet|->] [normalize=true]
  serve   an HTTP scoring server (POST /score, OpenRLHF's /get_reward): rewardctl serve run_dir=<run directory> [port=8000]
  export  write a run's model with its adapter merged, as a stock transformers directory:
          rewardctl export run_dir=<run directory> [checkpoint=step-N] [dtype=bfloat16] [output_dir=<dir>]
  kernels build or check the fused CPU kernels (once per machine): rewardctl kernels build|status

Each command takes Hydra overrides and Hydra's own flags; see `rewardctl <command> --help`.
--debug (anywhere) shows the full stack of an error instead of its one-line summary.
"""


# Write failures that are the machine's state, not a bug: said in one line like a config error.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG})


def full_stack_wanted() -> bool:
    """``HYDRA_FULL_ERROR=1``, Hydra's own switch, which ``--debug`` sets: show every error's stack."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def _guarded(action: Callable[[], Any], *, sweep_job: bool = False) -> Any:
    """User errors (config, data, environment) and full or read-only disks end as one clear line and
    exit status 2; with ``full_stack_wanted()`` they propagate with their stack instead. In a job of a
    sweep (``sweep_job``) any other error is one line too: the job becomes a failed row of the sweep
    report and the next job runs (``train_app``)."""
    try:
        return action()
    except Exception as exc:  # noqa: BLE001 - sorted by _error_line: one line, or re-raised with its stack
        if isinstance(exc, RewardctlError):
            _invocation["error"] = exc
        line = _error_line(exc, sweep_job=sweep_job)
        if line is None:
            raise
        print(f"rewardctl: error: {line}", file=sys.stderr)
        _invocation["error_line"] = line
        raise SystemExit(2) from None


def _error_line(exc: Exception, *, sweep_job: bool) -> str | None:
    """The one line an error ends a command with, or None: it propagates with its stack (a bug, or
    ``full_stack_wanted()``). A bug in a job of a sweep is one line too, its stack logged (the job's
    train.log and the console), so that it does not end the sweep."""
    if full_stack_wanted():
        return None
    if isinstance(exc, RewardctlError):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
        line = f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            line += (
                "; every file written before (checkpoints included) is intact: free space and rerun the same "
                "command to resume"
            )
        return line
    if not sweep_job:
        return None
    from rewardctl.sweep import first_line

    log.error("the job failed", exc_info=exc)
    return first_line(exc)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def train_app(cfg: DictConfig) -> Any:
    from rewardctl.training.session import train

    sweep_job = _in_sweep()
    _invocation.update(error=None, error_line=None)  # not an earlier job's of the same sweep
    try:
        summary = _guarded(lambda: train(cfg), sweep_job=sweep_job) or {}
    except SystemExit:
        discard_unused_run_dir()
        if not (sweep_job and _invocation["error_line"]):
            raise
        return failed_sweep_job(_invocation["error_line"])
    report_early_stop(summary)
    if summary.get("status") == "diverged":  # not its last (possibly baseline) eval: sweepers fail the trial
        return None
    final = summary.get("final_eval") or {}
    return final.get(summary.get("primary_metric", ""), None)  # the objective for sweepers


def failed_sweep_job(error: str) -> None:
    """A job of a sweep that failed: a row of the sweep report with its ``error``, exit status 2 once
    the sweep is done, and no objective (None) for the sweeper, so that the next job runs.

    Hydra's own handling of a failed job would end the sweep: ``SystemExit`` passes through
    ``run_job`` (which catches ``Exception`` only), so no later job runs and no callback sees it; an
    exception is kept in the job's ``JobReturn`` (status FAILED), but the basic sweeper re-raises the
    first one after its batch, before ``on_multirun_end``, and the Optuna sweeper as soon as failures
    exceed ``max_failure_rate`` (0 by default). A job without objective is a failed trial to Optuna
    (a NaN makes its sweeper crash: diverged jobs return None too) and nothing to the basic sweeper."""
    from rewardctl.sweep import note_job_failure

    _invocation["status"] = max(_invocation["status"], 2)
    note_job_failure(error)


# What Hydra puts in a run directory before rewardctl writes anything (a .lock present means a run
# may be starting there: the directory is left alone).
BOOKKEEPING_ONLY = frozenset({".hydra", "train.log"})


def discard_unused_run_dir() -> None:
    """A run refused before it wrote anything (a config or data error) leaves no directory behind:
    the one Hydra made for it is removed while it holds only Hydra's bookkeeping. A directory with
    anything else (an earlier run's checkpoints, config.yaml) is left exactly as it is."""
    import shutil

    from hydra.core.hydra_config import HydraConfig

    if os.environ.get("RANK", "0") != "0" or getattr(_invocation.get("error"), "key", None) == "hardware":
        return  # workers that ran and failed: what they logged stays
    try:
        run_dir = Path(HydraConfig.get().runtime.output_dir).resolve()
    except (ValueError, AttributeError):
        return
    if run_dir in _invocation.get("existing_dirs", ()):
        return  # the directory was there before this command (e.g. output_dir=.)
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= BOOKKEEPING_ONLY:
        logging.shutdown()  # Hydra's file handler holds train.log open
        shutil.rmtree(run_dir, ignore_errors=True)


def existing_output_dirs(args: list[str]) -> set[Path]:
    """The directories an ``output_dir=`` argument names that exist before the command runs: never
    removed by ``discard_unused_run_dir`` (in a sweep, the jobs' subdirectories are new)."""
    named = [Path(a.partition("=")[2]).resolve() for a in args if a.startswith("output_dir=") and "${" not in a]
    return {path for path in named if path.exists()}


def report_early_stop(summary: dict[str, Any]) -> None:
    """A diverged run: one error line, exit status 3 at the end (a sweep goes on to its next job).
    An interrupted run: the resume command, and exit 128 + signal now (a sweep stops too)."""
    status = summary.get("status")
    # One line per run, not one per process; a self-launched worker leaves it to the process that started it.
    speaks = os.environ.get("RANK", "0") == "0" and not self_launched_worker()
    if status == "diverged":
        _invocation["status"] = max(_invocation["status"], EXIT_DIVERGED)
        if speaks:
            print(f"rewardctl: error: {summary.get('message')}", file=sys.stderr)
    elif status == "interrupted":
        name = summary.get("signal") or "SIGTERM"
        if speaks:
            command = resume_command(_invocation["args"], summary["run_dir"], sweep=_in_sweep())
            launcher = "the same launcher with " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
            log.info("resume with: %s%s", launcher, command)
            print(
                f"rewardctl: {name}: stopped at step {summary.get('step')} (checkpoint {summary.get('checkpoint')}); "
                f"resume with: {launcher}{command}",
                file=sys.stderr,
            )
            if _in_sweep():
                report_stopped_sweep()
        raise SystemExit(128 + signal.Signals[name].value)


def report_stopped_sweep() -> None:
    """A signal ends the whole sweep (no later job, no Hydra callback after this point): the sweep
    report of the jobs run so far, this one included, is written and printed now."""
    from hydra.core.hydra_config import HydraConfig

    from rewardctl import sweep

    hydra_cfg = HydraConfig.get()
    if sweep.enabled(hydra_cfg):
        sweep_dir = Path(hydra_cfg.sweep.dir)
        sweep.append_record(sweep_dir, sweep.job_record(hydra_cfg))
        sweep.report(sweep_dir)


def resume_command(args: list[str], run_dir: str, *, sweep: bool) -> str:
    """The same command line with the run directory fixed (``output_dir`` added when it was not
    given, or given as an interpolation like ``${now:...}``) and ``train.resume`` back to auto."""
    target = str(Path(run_dir).parent if sweep else Path(run_dir))
    kept = [a for a in args if not (a.startswith("output_dir=") and "${" in a)]
    resumed = [a for a in kept if not a.startswith("train.resume=")]
    if len(resumed) != len(kept):
        resumed.append("train.resume=auto")
    if not any(a.startswith("output_dir=") for a in resumed):
        resumed.append(f"output_dir={target}")
    return shlex.join(["rewardctl", "train", *resumed])


def _in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval")
def eval_app(cfg: DictConfig) -> Any:
    from rewardctl.evaluate import evaluate_run

    return _guarded(lambda: evaluate_run(cfg))


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="export")
def export_app(cfg: DictConfig) -> Any:
    from rewardctl.export import export_run

    return _guarded(lambda: export_run(cfg))


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="score")
def score_app(cfg: DictConfig) -> Any:
    from rewardctl.score import score_rows

    return _guarded(lambda: score_rows(cfg))


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="serve")
def serve_app(cfg: DictConfig) -> Any:
    from rewardctl.serve import serve

    return _guarded(lambda: serve(cfg))


COMMANDS: dict[str, Callable[[], Any]] = {
    "train": train_app,
    "eval": eval_app,
    "score": score_app,
    "serve": serve_app,
    "export": export_app,
}


def worker_overrides(args: list[str]) -> list[str]:
    """Under torchrun / accelerate launch only rank 0 lets Hydra create the run directory.

    Every rank composes the config, but ``${now:}`` resolves per process (facebookresearch/hydra#2070):
    other ranks are kept from creating directories of their own and adopt rank 0's run directory
    once the process group exists.
    """
    if os.environ.get("RANK", "0") == "0" or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return args
    if any(a in ("-m", "--multirun") for a in args):
        raise RewardctlError("run sweeps (-m) from one process; start a multi-process run per job instead")
    return [*args, "hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout"]


SWEEP_FLAGS = ("-m", "--multirun")


def preflight(command: str, args: list[str]) -> None:
    """The overrides composed once before Hydra runs the command, so a mistake is one line naming
    the key (``rewardctl.config.overrides``). Left to Hydra: its own flags (``--cfg``, ``--help``, ...,
    some of which take values), ``--debug`` (the full report), and workers (their parent checked)."""
    if full_stack_wanted() or os.environ.get("RANK") is not None or self_launched_worker():
        return
    if any(a.startswith("-") and a not in SWEEP_FLAGS for a in args):
        return
    from rewardctl.config.overrides import check_overrides

    overrides = [a for a in args if a not in SWEEP_FLAGS]
    check_overrides(command, overrides, sweep=len(overrides) != len(args))


COMPLETION_FLAGS = ("-sc", "--shell-completion")


def shell_completion(args: list[str]) -> int:
    """Hydra's shell completion through the subcommand. ``rewardctl [train] -sc install=bash`` prints
    a script registered for ``rewardctl``, which calls ``rewardctl -sc query=bash`` with the line
    typed so far in $COMP_LINE; the command word decides which app answers (the line passed on
    without it), and while the command word itself is typed the commands are the answers."""
    line = os.environ.get("COMP_LINE", "")
    words = line.split()
    query = any(a.startswith("query=") for a in args)
    if query and (len(words) < 2 or (len(words) == 2 and not line.endswith(" "))):
        typed = words[1] if len(words) == 2 else ""
        print(" ".join(c for c in COMMANDS if c.startswith(typed)))
        return 0
    command = words[1] if query else next((a for a in args if a in COMMANDS), "train")
    if command not in COMMANDS:
        return 0
    if query:
        os.environ["COMP_LINE"] = " ".join([words[0], *words[2:]]) + (" " if line.endswith(" ") else "")
    register()
    sys.argv = ["rewardctl", *[a for a in args if a not in COMMANDS]]  # the script completes `rewardctl`
    COMMANDS[command]()
    return 0


def key_docs(method_target: str) -> str:
    """``rewardctl train --help``'s key list: every schema key with its default and one-line doc,
    the chosen method's from its own schema, read without importing it (the ``rewardctl.key_docs``
    resolver of conf/train.yaml's help template)."""
    from rewardctl.config.describe import describe_keys, describe_method_keys
    from rewardctl.config.schema import DataConfig, HardwareConfig, ModelConfig, TrainConfig

    sections = [("model", ModelConfig), ("data", DataConfig), ("train", TrainConfig), ("hardware", HardwareConfig)]
    return "\n".join(
        [*(describe_keys(prefix, schema) for prefix, schema in sections), describe_method_keys(method_target)]
    )


def register_help() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("rewardctl.key_docs"):
        OmegaConf.register_new_resolver("rewardctl.key_docs", key_docs)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in args:  # every error with its full stack, ours and Hydra's (workers inherit it)
        args = [a for a in args if a != "--debug"]
        os.environ["HYDRA_FULL_ERROR"] = "1"
    if not args:
        print(USAGE, file=sys.stderr)
        return 2
    if args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if args[0] in ("-V", "--version"):
        print(f"rewardctl {__version__}")
        return 0
    if any(a in COMPLETION_FLAGS for a in args[:2]):
        return shell_completion(args)
    command, rest = args[0], args[1:]
    if command == "kernels":  # not a Hydra app: no config to compose
        from rewardctl.kernels.cli import main as kernels_main

        return kernels_main(rest)
    if command not in COMMANDS:
        print(f"rewardctl: error: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    if command in ("eval", "score"):  # `data` is also a config group: Hydra would read data=<path> as choosing one
        rest = [f"dataset={a[len('data=') :]}" if a.startswith("data=") else a for a in rest]
    try:
        rest = worker_overrides(rest) if command == "train" else rest
    except RewardctlError as exc:
        print(f"rewardctl: error: {exc}", file=sys.stderr)
        return 2
    register()
    register_help()
    try:
        preflight(command, rest)
    except RewardctlError as exc:
        print(f"rewardctl: error: {exc}", file=sys.stderr)
        return 2
    _invocation.update(args=list(args[1:]), status=0, error=None, existing_dirs=existing_output_dirs(rest))
    sweep_outcome["status"] = 0  # main() may run several commands in one process (the tests)
    sys.argv = [f"rewardctl {command}", *rest]
    try:
        COMMANDS[command]()
    except KeyboardInterrupt as exc:  # one line, not a traceback through Hydra and torch
        signum = getattr(exc, "signum", signal.SIGINT)
        how = getattr(exc, "how", "stopped")
        print(f"rewardctl: {signal.Signals(signum).name}: {how}", file=sys.stderr)
        return 128 + signum
    return max(_invocation["status"], sweep_outcome["status"])


def entry() -> None:
    """The ``rewardctl`` console script and ``python -m rewardctl`` (a launched run's workers too):
    ``main()``, then the exit without the interpreter's final garbage collections. After torch,
    transformers, datasets, accelerate, peft, Hydra and matplotlib are imported, tearing the
    interpreter down took 1.2-1.3 s on this project's 2-core CPU, about 6% of the embedded default
    run, because those collections walk every object the libraries made; with the collector frozen
    it takes 0.15 s. Everything a command writes is closed before ``main()`` returns, and atexit
    handlers (logging's flush, process-group teardown) and reference-count cleanup still run; only
    objects in reference cycles are left to the operating system. ``main()`` itself (the tests, a
    caller's own process) exits as usual."""
    code = main()
    gc.freeze()  # every live object into the permanent generation: the exit's collections skip them
    sys.exit(code)


if __name__ == "__main__":
    entry()
