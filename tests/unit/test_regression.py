"""method=regression: the loss and metrics by hand, and the proof that it is one module + one YAML
(its runs and data errors are in tests/e2e/test_regression_runs.py)."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch

from rewardctl.methods.regression import (
    average_ranks,
    pearson,
    regression_loss,
    same_prompt_pair_accuracy,
    spearman,
)

from ..conftest import REPO


def test_the_loss_is_squared_or_huber_error_weighted_over_attributes():
    predictions = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
    targets = torch.tensor([[0.0, 0.0], [2.0, 1.0]])
    # errors: row 0 (1, 0), row 1 (-2, 3)
    torch.testing.assert_close(regression_loss(predictions, targets), torch.tensor([0.5, 6.5]))
    weighted = regression_loss(predictions, targets, weights=torch.tensor([3.0, 1.0]))
    torch.testing.assert_close(weighted, torch.tensor([3 * 1 / 4, (3 * 4 + 9) / 4]))
    # Huber, delta 1: e^2/2 inside, |e| - 1/2 beyond
    huber = regression_loss(predictions, targets, kind="huber", huber_delta=1.0)
    torch.testing.assert_close(huber, torch.tensor([(0.5 + 0) / 2, (1.5 + 2.5) / 2]))
    with pytest.raises(ValueError, match=r"\(N, A\)"):
        regression_loss(torch.zeros(3), torch.zeros(3))


def test_ranks_correlations_and_same_prompt_pairs_by_hand():
    assert average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist() == [2.5, 0.0, 2.5, 1.0]
    x, y = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, 3.0, 2.0, 4.0])
    assert pearson(x, y) == pytest.approx(0.8) and spearman(x, y) == pytest.approx(0.8)
    assert spearman(torch.tensor([1.0, 10.0, 100.0]), torch.tensor([1.0, 2.0, 3.0])) == pytest.approx(1.0)
    assert math.isnan(pearson(torch.ones(3), x[:3]))
    # prompt 7: targets 3 > 1 > 0, predictions order (a, b) right and (b, c) wrong, (a, c) right; a tie in
    # the targets forms no pair; prompt -1 (no prompt column) forms none; prompt 9 has one response.
    predictions = torch.tensor([0.9, 0.1, 0.5, 0.0, 0.3, 0.2, 0.4])
    targets = torch.tensor([3.0, 1.0, 0.0, 1.0, 2.0, 5.0, 4.0])
    groups = torch.tensor([7, 7, 7, 7, -1, -1, 9])
    accuracy, pairs = same_prompt_pair_accuracy(predictions, targets, groups)
    # pairs of prompt 7 with different targets: (a,b) (a,c) (a,d) (b,c) (c,d); right: ab ac ad (b,d tie excluded)
    assert pairs == 5 and accuracy == pytest.approx(3 / 5)


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_the_method_is_one_module_and_one_yaml_on_the_public_api():
    """Its module imports nothing of rewardctl but the public method API, and nothing else in the
    package names it: besides its module and YAML, only its sample data (the data preset, the
    generator's builder and the files) mentions it."""
    module = REPO / "rewardctl" / "methods" / "regression.py"
    ours = {m for m in _imported_modules(module) if m.startswith("rewardctl")}
    assert ours == {"rewardctl.methods.api"}
    markers = ("RegressionMethod", "methods.regression", "regression_sample", "sample:regression", "regression_rows")
    allowed = {
        "rewardctl/methods/regression.py",
        "conf/method/regression.yaml",
        "conf/data/regression_sample.yaml",
        "rewardctl/samples/generate.py",
    }
    mentions = set()
    for path in [*(REPO / "rewardctl").rglob("*"), *(REPO / "conf").rglob("*")]:
        if path.is_file() and path.suffix in (".py", ".yaml", ".json") and "samples/data" not in str(path):
            if any(marker in path.read_text(encoding="utf-8") for marker in markers):
                mentions.add(str(path.relative_to(REPO)))
    assert mentions == allowed
