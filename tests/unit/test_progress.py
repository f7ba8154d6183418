"""A terminal gets a progress bar; a pipe or a file a plain line per logged step (rewardctl.training.progress)."""

from __future__ import annotations

import logging

import pytest

from rewardctl.training.progress import Progress, format_eta, progress_line


def test_the_plain_line_says_step_loss_lr_speed_and_time_left():
    record = {"step": 40, "loss": 0.67123, "lr": 1e-3, "pairs_per_sec": 812.34}
    assert (
        progress_line(record, 500, "pairs", 31.4)
        == "step 40/500 (8%) loss 0.6712 lr 1.00e-03 812.3 pairs/s ETA 0:00:31"
    )
    assert (
        progress_line({"step": 1, "lr": 0.0, "pairs_per_sec": None}, 3, "pairs", None) == "step 1/3 (33%) lr 0.00e+00"
    )
    assert format_eta(3725.4) == "1:02:05" and format_eta(-2) == "0:00:00"


@pytest.mark.parametrize(
    ("terminal", "wanted", "main", "bar", "lines"),
    [
        (True, True, True, True, False),  # a terminal, bar wanted: the bar only
        (False, True, True, False, True),  # piped: lines instead of carriage returns
        (True, False, True, False, True),  # bar turned off: still a line per logged step
        (False, True, False, False, False),  # other processes show nothing
    ],
)
def test_bar_or_lines(terminal, wanted, main, bar, lines, caplog):
    progress = Progress(main=main, wanted=wanted, max_steps=10, start=0, item_name="pairs", desc="t", terminal=terminal)
    assert (not progress.bar.disable, progress.lines) == (bar, lines)
    with caplog.at_level(logging.INFO, logger="rewardctl.training.loop"):
        for _ in range(5):
            progress.step()
        progress.logged({"step": 5, "loss": 0.5, "lr": 1e-4, "pairs_per_sec": 10.0})
    progress.close()
    shown = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step 5/10")]
    assert len(shown) == (1 if lines else 0)
    if lines:
        assert shown[0].startswith("step 5/10 (50%) loss 0.5000 lr 1.00e-04 10.0 pairs/s ETA 0:00:0")
