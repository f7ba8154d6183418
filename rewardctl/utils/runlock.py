"""One run per run directory: a lock file that a second run refuses by name and a crashed run's
successor takes over.

Two trainings writing one ``output_dir`` interleave checkpoints, metrics and the final model, and
neither notices. ``<run_dir>/.lock`` is created with ``O_CREAT | O_EXCL`` (atomic on every local and
NFSv3+ file system) and holds who owns it: ``{"pid", "host", "started", "token"}``. A lock whose
holder is gone (same host, pid not alive, or alive but a different process that reused the pid) is
taken over with a warning, so a run killed by SIGKILL or a power cut never blocks its resume. A lock
held from another host cannot be checked and is respected.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from rewardctl.errors import ConfigError

log = logging.getLogger(__name__)
LOCK_NAME = ".lock"
_ATTEMPTS = 5  # racing take-overs: each attempt either wins, finds a live holder, or retries
_TORN_GRACE_S = 2.0  # a lock younger than this may still be being written by its (live) creator


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux), which tells a reused pid from the holder."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22, counted after the parenthesised name


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except OSError:
        return False
    return True


def _owner_record() -> dict[str, Any]:
    pid = os.getpid()
    return {
        "pid": pid,
        "host": socket.gethostname(),
        "started": datetime.now().astimezone().isoformat(timespec="seconds"),
        "process_start": _process_start(pid),
        "token": uuid.uuid4().hex,
    }


def _read(path: Path) -> tuple[bytes, dict[str, Any] | None]:
    """Raw bytes (to compare before a take-over) and the parsed record (None when torn or foreign)."""
    raw = path.read_bytes()
    try:
        record = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return raw, None
    ok = isinstance(record, dict) and isinstance(record.get("pid"), int) and isinstance(record.get("host"), str)
    return raw, record if ok else None


def _read_settled(path: Path) -> tuple[bytes, dict[str, Any] | None]:
    """``_read``, waiting out a lock its creator has made but not yet written."""
    while True:
        raw, record = _read(path)
        if record is not None or time.time() - path.stat().st_mtime > _TORN_GRACE_S:
            return raw, record
        time.sleep(0.05)


def holder_is_alive(record: dict[str, Any]) -> bool:
    """Whether the process that wrote ``record`` still runs; a lock from another host counts as live."""
    if record["host"] != socket.gethostname():
        return True
    if not _pid_alive(record["pid"]):
        return False
    recorded = record.get("process_start")
    return recorded is None or _process_start(record["pid"]) in (None, recorded)


def _refusal(run_dir: Path, record: dict[str, Any]) -> ConfigError:
    message = (
        f"{run_dir} is in use by pid {record['pid']} on host {record['host']} since "
        f"{record.get('started', '?')}; wait for it or choose another output_dir"
    )
    if record["host"] != socket.gethostname():
        message += f" (if no run is left on {record['host']}, delete {run_dir / LOCK_NAME})"
    return ConfigError("output_dir", message)


def _create(lock: Path, record: dict[str, Any]) -> bool:
    """Create the lock file exclusively; False when it already exists."""
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    except OSError as exc:
        raise ConfigError(
            "output_dir", f"cannot create {lock} ({exc.strerror}); choose a writable output_dir"
        ) from None
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
    return True


def _take_over(lock: Path, seen: bytes) -> None:
    """Remove a dead holder's lock, unless another process replaced it since we read ``seen``.

    The rename is atomic, so of two runs taking over at once only one moves the stale file; one that
    moved a fresh lock instead (read, then replaced by a faster racer) puts it back.
    """
    aside = lock.with_name(f"{LOCK_NAME}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return
    if aside.read_bytes() != seen:
        try:
            os.link(aside, lock)  # no-clobber restore of the live lock we moved
        except FileExistsError:
            pass
    aside.unlink(missing_ok=True)


class RunLock:
    """A held lock; ``release`` is idempotent and only ever removes this process's own lock file."""

    def __init__(self, run_dir: Path, record: dict[str, Any], created_dir: bool) -> None:
        self.run_dir = run_dir
        self.path = run_dir / LOCK_NAME
        self.record = record
        self.created_dir = created_dir
        self.released = False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        atexit.unregister(self.release)
        try:
            _, record = _read(self.path)
        except OSError:
            return
        if record is not None and record.get("token") == self.record["token"]:
            self.path.unlink(missing_ok=True)
        if self.created_dir:  # a refused or failed run leaves no empty directory behind
            try:
                self.run_dir.rmdir()
            except OSError:
                pass


def lock_run_dir(run_dir: Path | str) -> RunLock:
    """Take ``<run_dir>/.lock`` (creating ``run_dir``) or raise ``ConfigError('output_dir', ...)``.

    The caller releases it; it is also released at interpreter exit. Prefer ``acquire_run_lock``.
    """
    run_dir = Path(run_dir)
    created_dir = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            "output_dir", f"cannot create {run_dir} ({exc.strerror}); choose a writable output_dir"
        ) from None
    lock = run_dir / LOCK_NAME
    record = _owner_record()
    for _ in range(_ATTEMPTS):
        if _create(lock, record):
            held = RunLock(run_dir, record, created_dir)
            atexit.register(held.release)
            return held
        try:
            seen, holder = _read_settled(lock)
        except FileNotFoundError:
            continue  # released between our create and read: try again
        if holder is not None and holder_is_alive(holder):
            raise _refusal(run_dir, holder)
        what = (
            f"pid {holder['pid']} on {holder['host']} (started {holder.get('started', '?')}) is gone"
            if holder is not None
            else "its content is unreadable (a run died while writing it)"
        )
        log.warning("%s was left by a run that no longer runs (%s); taking it over", lock, what)
        _take_over(lock, seen)
    raise ConfigError(
        "output_dir",
        f"{run_dir}: could not take {lock} after {_ATTEMPTS} attempts "
        "(other runs keep racing for it); wait for them or choose another output_dir",
    )


@contextmanager
def acquire_run_lock(run_dir: Path | str) -> Iterator[RunLock]:
    """Hold ``<run_dir>/.lock`` for the ``with`` block; a live holder raises ``ConfigError``."""
    held = lock_run_dir(run_dir)
    try:
        yield held
    finally:
        held.release()
