"""One run per run directory, with other processes: a holder in another live process is refused, a
dead one's lock is taken over, the lock goes when the interpreter exits, and a second training into a
held directory is refused before anything loads (the lock by itself is tests/unit/test_runlock.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from rewardctl.errors import ConfigError
from rewardctl.utils.runlock import LOCK_NAME, acquire_run_lock, lock_run_dir


def write_lock(run_dir: Path, **fields) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": "2026-01-01T00:00:00+00:00", **fields}
    path = run_dir / LOCK_NAME
    path.write_text(json.dumps(record))
    return path


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_holder_in_another_process_is_refused(tmp_path: Path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(tmp_path, pid=sleeper.pid)
        with pytest.raises(ConfigError, match=f"in use by pid {sleeper.pid}"):
            lock_run_dir(tmp_path)
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == sleeper.pid  # untouched
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_dead_holders_lock_is_taken_over_with_a_warning(tmp_path: Path, caplog):
    pid = dead_pid()
    write_lock(tmp_path, pid=pid)
    with caplog.at_level("WARNING", logger="rewardctl.utils.runlock"), acquire_run_lock(tmp_path):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert f"pid {pid}" in caplog.text and "taking it over" in caplog.text
    assert not (tmp_path / LOCK_NAME).exists()


def test_another_hosts_lock_is_respected_with_a_way_out(tmp_path: Path):
    write_lock(tmp_path, pid=dead_pid(), host="elsewhere.example")
    with pytest.raises(ConfigError) as info:
        lock_run_dir(tmp_path)
    assert "on host elsewhere.example" in str(info.value) and f"delete {tmp_path / LOCK_NAME}" in str(info.value)


def test_the_lock_is_released_when_the_interpreter_exits(tmp_path: Path):
    code = (
        f"from rewardctl.utils.runlock import lock_run_dir; lock_run_dir({str(tmp_path)!r}); "
        f"import os; assert os.path.exists({str(tmp_path / LOCK_NAME)!r})"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_second_training_into_a_locked_run_directory_is_refused_before_anything_loads(tmp_path: Path, monkeypatch):
    """The training session takes the lock: a run into a directory another live run holds stops with
    one ConfigError naming output_dir, before any data is read; the directory is left as it was."""
    import rewardctl.data.splits as splits
    from rewardctl.errors import ConfigError
    from rewardctl.utils.runlock import lock_run_dir

    from ..conftest import reset_accelerate, run_training

    held = lock_run_dir(tmp_path / "run")  # this live process holds it, as a concurrent run would
    monkeypatch.setattr(splits, "load_raw_splits", lambda *a, **k: pytest.fail("data loaded under a held lock"))
    try:
        with pytest.raises(ConfigError, match="output_dir"):
            run_training(tmp_path, ["experiment=smoke"])
    finally:
        reset_accelerate()
        held.release()
    assert not (tmp_path / "run").exists()  # the holder created it and removed it; the refused run added nothing
    monkeypatch.undo()
    summary, run_dir = run_training(tmp_path, ["experiment=smoke"])  # free again: runs, and leaves no lock behind
    assert summary["status"] == "completed" and not (run_dir / ".lock").exists()
