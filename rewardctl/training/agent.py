"""The launcher process of a self-launched run: ``accelerate launch`` without its traceback on a signal.

torch elastic's agent turns SIGINT/SIGTERM into a ``SignalException``, passes the signal to every
worker, waits for them, then re-raises: accelerate prints that as a 20-frame traceback after the
workers' own clean report. Here it ends as an exit status (128 + signal) instead, which the process
that started us reads together with the workers' summary.

Run as ``python -m rewardctl.training.agent <accelerate launch arguments>``.
"""

from __future__ import annotations

import sys


def main() -> int:
    from accelerate.commands.launch import main as accelerate_launch
    from torch.distributed.elastic.multiprocessing.api import SignalException

    try:
        accelerate_launch()
    except SignalException as exc:
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
