"""Eval pictures: each method's ``figure_data`` on hand-made outputs (exact series), and
``write_figures`` writing real PNGs, atomically, for every method."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from rewardctl.methods.base import Method
from rewardctl.methods.calibration import calibration_table, expected_calibration_error
from rewardctl.methods.registry import build_method, to_run_config
from rewardctl.training.figures import write_figures

from ..conftest import compose_train

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_method(name: str):
    return build_method(to_run_config(compose_train([f"method={name}"])))


def pairwise_outputs() -> dict[str, torch.Tensor]:
    chosen = torch.tensor([1.0, 0.5, -1.0, 2.0])
    rejected = torch.tensor([0.0, 1.0, -2.0, -0.5])
    return {"chosen_reward": chosen, "rejected_reward": rejected, "loss": torch.zeros(4)}


def ranklist_outputs() -> dict[str, torch.Tensor]:
    """Two lists: 7 responses (ranks 0..6) and 3 responses with a tie at the top (ranks 0, 0, 1)."""
    ranks = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [0, 0, 1, -1, -1, -1, -1]])
    rewards = torch.tensor([[7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0], [0.5, 0.25, 1.0, 0.0, 0.0, 0.0, 0.0]])
    present = (ranks != -1).long()
    return {
        "rewards": rewards,
        "present": present,
        "ranks": ranks.clamp(min=0),  # gathered padding is zeros; present marks it
        "order": torch.arange(7).expand(2, 7),
        "loss_sum": torch.zeros(2),
        "loss_weight": torch.ones(2),
    }


def bco_outputs() -> dict[str, torch.Tensor]:
    reward = torch.tensor([0.9, 0.1, 0.7, -0.2, 0.6])
    return {
        "reward": reward,
        "logps": reward,
        "ref_logps": torch.zeros(5),
        "label": torch.tensor([1, 1, 0, 0, 1]),
        "loss": torch.zeros(5),
    }


def prm_outputs() -> dict[str, torch.Tensor]:
    """Three rows of 3, 2 and 1 labelled steps (packed left)."""
    present = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]])
    label = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    prob = torch.tensor([[0.9, 0.2, 0.1], [0.8, 0.3, 0.0], [0.7, 0.0, 0.0]])
    return {
        "step_prob": prob,
        "step_label": label,
        "step_target": label.float(),
        "present": present,
        "loss_sum": torch.zeros(3),
    }


def regression_outputs() -> dict[str, torch.Tensor]:
    prediction = torch.tensor([[1.0, 3.0], [2.0, 1.0], [3.5, 2.0]])
    target = torch.tensor([[1.0, 2.0], [2.0, 2.0], [3.0, 1.0]])
    return {"prediction": prediction, "target": target, "group": torch.tensor([0, 0, 1]), "loss": torch.zeros(3)}


def regression_method():
    method = make_method("regression")
    method.attributes = ("helpfulness", "verbosity")
    return method


def bco_method():
    method = make_method("bco")
    method.delta.total = torch.tensor(1.5, dtype=torch.float64)
    method.delta.count = torch.tensor(3.0, dtype=torch.float64)  # delta = 0.5
    return method


# ---- figure_data: the exact series ------------------------------------------------------------------
def test_pairwise_figure_data_is_chosen_against_rejected_and_the_calibration_table():
    outputs = pairwise_outputs()
    data = make_method("pairwise").figure_data(outputs)
    assert set(data) == {"reward_histogram", "calibration"}
    histogram = data["reward_histogram"]
    assert histogram["panels"] == [
        {"xlabel": "reward", "series": {"chosen": [1.0, 0.5, -1.0, 2.0], "rejected": [0.0, 1.0, -2.0, -0.5]}}
    ]
    assert "4 pairs" in histogram["title"] and "75.0%" in histogram["title"]
    chosen, rejected = outputs["chosen_reward"], outputs["rejected_reward"]
    assert data["calibration"] == {
        "bins": calibration_table(chosen.double(), rejected.double()),
        "ece": expected_calibration_error(chosen.double(), rejected.double()),
        "pairs": 4,
    }
    assert make_method("pairwise").figure_data({k: v[:0] for k, v in outputs.items()}) == {}


def test_ranklist_figure_data_is_rewards_per_gold_rank_with_low_ranks_merged():
    data = make_method("ranklist").figure_data(ranklist_outputs())
    (panel,) = data["reward_histogram"]["panels"]
    assert panel["series"] == {
        "rank 1 (best)": [7.0, 0.5, 0.25],  # the tie shares rank 1
        "rank 2": [6.0, 1.0],
        "rank 3": [5.0],
        "rank 4": [4.0],
        "ranks 5-7": [3.0, 2.0, 1.0],  # figure_ranks = 5: the rest share the last series
    }
    # pairs ordered right: list 1 all 21; list 2 has 2 pairs (each top response over rank 1), both wrong
    assert "2 lists" in data["reward_histogram"]["title"] and "91.3%" in data["reward_histogram"]["title"]


def test_ranklist_figure_data_with_short_lists_names_every_rank():
    outputs = ranklist_outputs()
    outputs = {k: v[1:] for k, v in outputs.items()}
    (panel,) = make_method("ranklist").figure_data(outputs)["reward_histogram"]["panels"]
    assert panel["series"] == {"rank 1 (best)": [0.5, 0.25], "rank 2": [1.0]}


def test_bco_figure_data_splits_by_label_and_marks_delta():
    data = bco_method().figure_data(bco_outputs())
    (panel,) = data["reward_histogram"]["panels"]
    assert panel["series"] == {
        "desirable": pytest.approx([0.9, 0.1, 0.6]),  # float32 rewards, as eval_step returns them
        "undesirable": pytest.approx([0.7, -0.2]),
    }
    assert panel["markers"] == {"δ = 0.5": 0.5}
    # right side of delta: 0.9, 0.6 (desirable), -0.2 (undesirable): 3 of 5
    assert "5 rows" in data["reward_histogram"]["title"] and "60.0%" in data["reward_histogram"]["title"]


def test_prm_figure_data_is_accuracy_per_step_index_over_rows_having_it(monkeypatch):
    method = make_method("prm")
    data = method.figure_data(prm_outputs())["step_accuracy"]
    # step 1: rows' labels 1, 1, 0, predictions right, right, wrong (0.7 > 0.5 called correct)
    # step 2: labels 1, 0; predictions 0.2 (wrong), 0.3 (right); step 3: label 0, 0.1 (right)
    assert data["steps"] == ["1", "2", "3"]
    assert data["accuracy"] == pytest.approx([2 / 3, 1 / 2, 1.0])
    assert data["count"] == [3, 2, 1]
    assert data["majority"] == pytest.approx([2 / 3, 1 / 2, 1.0])
    assert "3 rows / 6 steps" in data["title"] and "66.7% overall" in data["title"]
    assert "majority baseline 50.0%" in data["title"]  # 3 of 6 steps are wrong

    monkeypatch.setattr(type(method), "figure_steps", 2)
    capped = method.figure_data(prm_outputs())["step_accuracy"]
    assert capped["steps"] == ["1", "2+"]
    assert capped["accuracy"] == pytest.approx([2 / 3, 2 / 3])  # steps 2 and 3 together: 2 of 3 right
    assert capped["count"] == [3, 2]  # rows with a 2nd step (or more)
    assert method.figure_data({**prm_outputs(), "present": torch.zeros(3, 3, dtype=torch.long)}) == {}


def test_regression_figure_data_is_predicted_against_target_per_attribute():
    data = regression_method().figure_data(regression_outputs())
    histograms = data["reward_histogram"]["panels"]
    assert [p["title"] for p in histograms] == ["helpfulness", "verbosity"]
    assert histograms[0]["series"] == {"target": [1.0, 2.0, 3.0], "prediction": [1.0, 2.0, 3.5]}
    assert histograms[1]["series"] == {"target": [2.0, 2.0, 1.0], "prediction": [3.0, 1.0, 2.0]}
    scatter = data["prediction_scatter"]["panels"]
    assert scatter[0]["target"] == [1.0, 2.0, 3.0] and scatter[0]["prediction"] == [1.0, 2.0, 3.5]
    assert scatter[0]["title"] == "helpfulness: Spearman 1.000, MAE 0.167"
    assert "3 responses" in data["prediction_scatter"]["title"]


def test_the_base_hook_draws_nothing():
    assert Method.figure_data(make_method("pairwise"), pairwise_outputs()) == {}


# ---- write_figures: real PNGs ---------------------------------------------------------------------------
CASES = {
    "pairwise": (lambda: make_method("pairwise"), pairwise_outputs, ["reward_histogram", "calibration"]),
    "ranklist": (lambda: make_method("ranklist"), ranklist_outputs, ["reward_histogram"]),
    "bco": (bco_method, bco_outputs, ["reward_histogram"]),
    "prm": (lambda: make_method("prm"), prm_outputs, ["step_accuracy"]),
    "regression": (regression_method, regression_outputs, ["reward_histogram", "prediction_scatter"]),
}


def assert_png(path: Path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return image.size


@pytest.mark.parametrize("name", list(CASES))
def test_write_figures_writes_valid_pngs_atomically(name: str, tmp_path: Path):
    build, outputs, pictures = CASES[name]
    out = tmp_path / "eval"  # created on demand
    written = write_figures(out, build(), outputs())
    assert written == [out / f"{picture}.png" for picture in pictures]
    for path in written:
        width, height = assert_png(path)
        assert width >= 500 and height >= 350
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{p}.png" for p in pictures)  # no temporary left


def test_write_figures_survives_a_bad_picture_and_a_failing_method(tmp_path: Path, caplog):
    good = make_method("prm").figure_data(prm_outputs())
    method = SimpleNamespace(
        figure_data=lambda outputs: {"reward_histogram": {"panels": "not a list"}, "unknown": {"x": 1}, **good}
    )
    with caplog.at_level(logging.WARNING):
        written = write_figures(tmp_path, method, prm_outputs())
    assert written == [tmp_path / "step_accuracy.png"]
    assert "could not draw" in caplog.text and sorted(p.name for p in tmp_path.iterdir()) == ["step_accuracy.png"]

    def broken(outputs):
        raise KeyError("chosen_reward")

    assert write_figures(tmp_path / "b", SimpleNamespace(figure_data=broken), prm_outputs()) == []
    assert write_figures(tmp_path / "c", make_method("pairwise"), {}) == []  # no eval ran
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_matplotlib_is_imported_only_when_a_picture_is_drawn():
    # It would otherwise hold its 25 MiB through the whole of training, peak memory included.
    import subprocess
    import sys

    probe = (
        "import sys; import rewardctl.cli, rewardctl.training.session, rewardctl.evaluate, rewardctl.sweep; "
        "print('matplotlib' in sys.modules); "
        "from pathlib import Path; import tempfile; from rewardctl.training.plot import plot_curves; "
        "records = [{'split': 'train', 'step': 1, 'loss': 0.7}, {'split': 'eval', 'step': 1, 'loss': 0.6}]; "
        "path = Path(tempfile.mkdtemp()) / 'curves.png'; plot_curves(records, ('loss',), path, 't'); "
        "import matplotlib; print(path.read_bytes()[:8] == "
        + repr(PNG_SIGNATURE)
        + ", matplotlib.get_backend().lower())"
    )
    read = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert read.stdout.split() == ["False", "True", "agg"]


def test_curves_are_redrawn_after_an_eval_only_once_the_interval_has_passed():
    from rewardctl.training.plot import CurveRedraws

    now = [100.0]  # a fake clock: training starts at t = 100 s
    drawn: list[float] = []
    redraw = CurveRedraws(lambda: drawn.append(now[0]), interval_s=60.0, clock=lambda: now[0])
    for t in (100.0, 130.0, 159.9, 160.0, 200.0, 219.0, 220.5, 400.0):  # eval times
        now[0] = t
        redraw()
    # the eval at start and the early ones draw nothing; each drawing restarts the interval
    assert drawn == [160.0, 220.5, 400.0]

    every: list[float] = []
    each_eval = CurveRedraws(lambda: every.append(now[0]), interval_s=0.0, clock=lambda: now[0])
    for t in (400.0, 400.0, 401.0):
        now[0] = t
        each_eval()
    assert every == [400.0, 400.0, 401.0]  # 0: after every eval, as before
