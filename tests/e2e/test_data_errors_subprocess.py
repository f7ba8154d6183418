"""Bad input read in a child process: a JSON line that is not one object is named, never a crash of the
process (pyarrow's own failure mode). The other data errors are in tests/unit/test_data_errors.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

PAIR = {"prompt": "Q: sky? A:", "chosen": " blue", "rejected": " green"}


def lines(path: Path, *texts: str) -> Path:
    path.write_text("".join(text + "\n" for text in texts), encoding="utf-8")
    return path


@pytest.mark.parametrize("text", ["null", "[1, 2]", '{"a": 1}{"b": 2}'])
def test_a_line_that_is_not_one_object_is_named_without_crashing(tmp_path: Path, text: str):
    """pyarrow crashes the process on a first ``null`` line (SIGSEGV), reads a later one as a row of
    nulls, and splits ``{..}{..}`` into two rows, shifting every later row number."""
    path = lines(tmp_path / "rows.jsonl", text, json.dumps(PAIR))
    code = (
        "import sys; from rewardctl.data.loading import load_rows; from rewardctl.errors import DataError\n"
        f"try: load_rows({str(path)!r}, split='train')\nexcept DataError as e: print(e)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(f"{path}, row 1: line 1 ")
