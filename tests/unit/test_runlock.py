"""One run per run directory, within this process: the lock records who runs and goes away with the
run, a live holder is refused by name, a reused pid or a torn lock counts as dead, and release never
removes another's lock (holders in other processes are in tests/e2e/test_runlock_processes.py)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from rewardctl.errors import ConfigError
from rewardctl.utils.runlock import LOCK_NAME, acquire_run_lock, holder_is_alive, lock_run_dir


def write_lock(run_dir: Path, **fields) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": "2026-01-01T00:00:00+00:00", **fields}
    path = run_dir / LOCK_NAME
    path.write_text(json.dumps(record))
    return path


def test_the_lock_holds_who_runs_and_is_removed_on_exit(tmp_path: Path):
    run_dir = tmp_path / "run"
    with acquire_run_lock(run_dir) as held:
        record = json.loads((run_dir / LOCK_NAME).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname() and record["started"]
        assert held.path == run_dir / LOCK_NAME
    assert not (run_dir / LOCK_NAME).exists()
    assert not run_dir.exists()  # created for the run and left empty: removed, as if never made
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "config.yaml").write_text("x")
    with acquire_run_lock(tmp_path / "kept"):
        pass
    assert (tmp_path / "kept" / "config.yaml").exists() and not (tmp_path / "kept" / LOCK_NAME).exists()


def test_a_live_holder_is_refused_naming_pid_host_and_start(tmp_path: Path):
    run_dir = tmp_path / "run"
    with acquire_run_lock(run_dir), pytest.raises(ConfigError) as info:  # this very process holds it
        lock_run_dir(run_dir)
    message = str(info.value)
    assert message.startswith(
        f"output_dir: {run_dir} is in use by pid {os.getpid()} on host {socket.gethostname()} since "
    )
    assert message.endswith("; wait for it or choose another output_dir")


def test_a_reused_pid_and_a_torn_lock_count_as_dead(tmp_path: Path):
    record = {"pid": os.getpid(), "host": socket.gethostname(), "process_start": "1"}  # our pid, not our start time
    assert not holder_is_alive(record) or not Path("/proc/self/stat").exists()
    assert holder_is_alive({**record, "host": "elsewhere.example"})  # unverifiable: respected
    (tmp_path / LOCK_NAME).write_text('{"pid": 12')  # a run died while writing it
    os.utime(tmp_path / LOCK_NAME, (0, 0))
    with acquire_run_lock(tmp_path):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_release_never_removes_someone_elses_lock(tmp_path: Path):
    held = lock_run_dir(tmp_path)
    write_lock(tmp_path, pid=12345, token="theirs")  # replaced behind our back
    held.release()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == "theirs"
