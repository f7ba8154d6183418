"""Environment variables rewardctl's own processes pass to each other (no heavy imports: the CLI reads them)."""

from __future__ import annotations

import os

# Set in the workers' environment when `rewardctl train hardware.num_processes=N` started them: they
# leave the one-line early-stop report (diverged, interrupted) to that process, whose command line is
# the one the user typed.
SELF_LAUNCHED_ENV = "REWARDCTL_SELF_LAUNCHED"


def self_launched_worker() -> bool:
    return os.environ.get(SELF_LAUNCHED_ENV) == "1"
