"""The launcher process of a self-launched run: ``accelerate launch`` without its traceback on a signal.

torch elastic's agent turns SIGINT/SIGTERM into a ``SignalException``, passes the signal to every
worker, waits for them, then re-raises: accelerate prints that as a 20-frame traceback after the
workers' own clean report. Here it ends as an exit status (128 + signal) instead, which the process
that started us reads together with the workers' summary.

Run as ``python -m rewardctl.training.agent <accelerate launch arguments>``.
"""

from __future__ import annotations

import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def main() -> int:
    from accelerate.commands.launch import main as accelerate_launch
    from torch.distributed.elastic.multiprocessing.api import SignalException

    _stop_with_parent()
    try:
        accelerate_launch()
    except SignalException as exc:
        return 128 + int(exc.sigval)
    except KeyboardInterrupt:  # a signal while accelerate was still importing or parsing
        return 128 + signal.SIGINT
    return 0


def _stop_with_parent() -> None:
    """Linux: if the rewardctl process that started us dies (SIGKILL, OOM killer), we get SIGTERM and
    the workers checkpoint and stop, instead of running on detached, holding the GPUs and the run lock."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


if __name__ == "__main__":
    sys.exit(main())
