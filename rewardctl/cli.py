"""`rewardctl <command> [Hydra overrides]`: one Hydra app per command over the shared config tree.

Hydra owns argument parsing after the command word, so everything Hydra offers works through the
subcommand: ``-m`` sweeps, ``--cfg job``, ``--help``, ``--info``, ``+key=value``.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import hydra
from omegaconf import DictConfig

from rewardctl import __version__
from rewardctl.config.store import register
from rewardctl.errors import RewardctlError

log = logging.getLogger("rewardctl")
CONFIG_PATH = "pkg://rewardctl.conf"

USAGE = f"""rewardctl {__version__}: train reward models for RLHF from composed YAML configs.

usage: rewardctl <command> [hydra overrides...]

commands:
  train   train a reward model: rewardctl train method=pairwise model=tiny data=pairwise_sample
          (sweeps: rewardctl train -m train.lr=1e-5,3e-5; config: rewardctl train --cfg job)
  eval    evaluate a finished run on a dataset: rewardctl eval run_dir=<run directory> [data=<path>]
  export  write a run's model with its adapter merged, as a stock transformers directory:
          rewardctl export run_dir=<run directory> [checkpoint=step-N] [dtype=bfloat16] [output_dir=<dir>]

Each command takes Hydra overrides and Hydra's own flags; see `rewardctl <command> --help`.
"""


def _guarded(action: Callable[[], Any]) -> Any:
    """User errors (config, data, environment) end as one clear line and exit status 2."""
    try:
        return action()
    except RewardctlError as exc:
        print(f"rewardctl: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def train_app(cfg: DictConfig) -> Any:
    from rewardctl.training.session import train

    summary = _guarded(lambda: train(cfg))
    final = (summary or {}).get("final_eval") or {}
    return final.get((summary or {}).get("primary_metric", ""), None)  # the objective for sweepers


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval")
def eval_app(cfg: DictConfig) -> Any:
    from rewardctl.evaluate import evaluate_run

    return _guarded(lambda: evaluate_run(cfg))


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="export")
def export_app(cfg: DictConfig) -> Any:
    from rewardctl.export import export_run

    return _guarded(lambda: export_run(cfg))


COMMANDS: dict[str, Callable[[], Any]] = {"train": train_app, "eval": eval_app, "export": export_app}


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


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print(USAGE, file=sys.stderr)
        return 2
    if args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if args[0] in ("-V", "--version"):
        print(f"rewardctl {__version__}")
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"rewardctl: error: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    try:
        rest = worker_overrides(rest) if command == "train" else rest
    except RewardctlError as exc:
        print(f"rewardctl: error: {exc}", file=sys.stderr)
        return 2
    register()
    sys.argv = [f"rewardctl {command}", *rest]
    COMMANDS[command]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
