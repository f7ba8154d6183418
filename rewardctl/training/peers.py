"""A collective that failed because another process died or stopped answering, said in one line.

Under several processes every step meets the others in collectives: the gradient all-reduce, the
step's health gather, the checkpoint barriers. When one process dies (out of memory, killed) or hangs,
the others wait in their next collective until the backend gives up, after the process group's
timeout (``hardware.collective_timeout_s``) or as soon as the dead peer's connection closes, and
raise an error from deep inside torch (gloo: a ``RuntimeError`` naming a C++ file; NCCL: a
``DistBackendError``). ``peer_failures_reported`` turns that into ``PeerFailure``, one line that says
which process gave up, where in rewardctl it was waiting, and which checkpoint the same command will
resume from. No checkpoint can be written at that point: saving is itself a collective.
"""

from __future__ import annotations

import re
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch.distributed as dist

from rewardctl.errors import RewardctlError

#: Text of the collective failures torch raises as a plain RuntimeError (gloo's transport errors).
PEER_FAILURE_MARKERS = ("/gloo/", "Timed out waiting", "Connection closed by peer", "Connection reset by peer")
PACKAGE_ROOT = Path(__file__).resolve().parents[1]


class PeerFailure(RewardctlError):
    """A collective with the other processes failed: one of them died or stopped answering."""


def is_peer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a distributed backend's failure to reach the other processes."""
    if isinstance(exc, dist.DistError):
        return True
    return isinstance(exc, RuntimeError) and any(marker in str(exc) for marker in PEER_FAILURE_MARKERS)


def waiting_point(exc: BaseException) -> str | None:
    """The innermost rewardctl frame of ``exc``'s stack, as ``path:line function`` (relative to the
    package's parent), or None when the stack never passed through rewardctl."""
    frames = [
        frame
        for frame in traceback.extract_tb(exc.__traceback__)
        if Path(frame.filename).resolve().is_relative_to(PACKAGE_ROOT)
    ]
    if not frames:
        return None
    frame = frames[-1]
    return f"{Path(frame.filename).resolve().relative_to(PACKAGE_ROOT.parent)}:{frame.lineno} {frame.name}"


def describe_peer_failure(
    exc: BaseException, *, rank: int, processes: int, timeout_s: int, checkpoint: Path | None
) -> str:
    """The one line of a failed collective: who, where, the backend's own first line, what to do."""
    where = waiting_point(exc)
    text = str(exc).strip()
    detail = re.sub(r"^\[[^\]]*\]\s*", "", text.splitlines()[0]) if text else type(exc).__name__  # gloo's [file:line]
    resume = (
        f"rerun the same command to resume from {checkpoint}"
        if checkpoint is not None
        else "no checkpoint was written yet: rerun the same command to start again"
    )
    return (
        f"process {rank} of {processes}: a collective with the other processes failed"
        + (f" (waiting in {where})" if where else "")
        + f": {detail}. Another process died or stopped answering (see its output; a hang is cut after "
        f"hardware.collective_timeout_s={timeout_s}); {resume}"
    )


@contextmanager
def peer_failures_reported(
    *, rank: int, processes: int, timeout_s: int, resume_point: Callable[[], Path | None]
) -> Iterator[None]:
    """Within ``with``: a collective failure (``is_peer_failure``) of a multi-process run becomes a
    ``PeerFailure``; ``resume_point()`` names the checkpoint to resume from. Anything else, and
    every error of a one-process run, propagates unchanged."""
    try:
        yield
    except RuntimeError as exc:
        if processes < 2 or not is_peer_failure(exc):
            raise
        line = describe_peer_failure(
            exc, rank=rank, processes=processes, timeout_s=timeout_s, checkpoint=resume_point()
        )
        raise PeerFailure(line) from exc
