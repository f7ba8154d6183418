"""A method from outside the package: a module on PYTHONPATH and a YAML in a folder Hydra searches,
trained by the real command with no edit to rewardctl (what the README's "Your own method" shows)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from ..conftest import cli

PLUGIN = '''
"""Hinge pairwise loss, max(0, margin - (r_c - r_r)): a user's own method."""
from dataclasses import dataclass

import torch

from rewardctl.methods.api import MethodConfig, StepOutput, Metric
from rewardctl.methods.pairwise import PairwiseMethod


@dataclass
class HingeConfig(MethodConfig):
    _target_: str = "hinge_plugin.HingeMethod"
    name: str = "hinge"
    margin: float = 1.0
    use_margin: bool = False
    center_rewards_coefficient: float | None = None


class HingeMethod(PairwiseMethod):
    config_class = HingeConfig

    def train_step(self, model, batch):
        chosen, rejected = self.rewards(model, batch).chunk(2)
        losses = torch.clamp(self.cfg.margin - (chosen - rejected), min=0)
        return StepOutput(loss_sum=losses.sum(), metrics={"loss": Metric.mean_of(losses),
                                                          "accuracy": Metric.mean_of((chosen > rejected).float()),
                                                          "pairs": Metric.total(chosen.shape[0])})
'''


def test_a_method_from_outside_the_package_trains_through_hydra_searchpath(tmp_path: Path):
    (tmp_path / "hinge_plugin.py").write_text(textwrap.dedent(PLUGIN), encoding="utf-8")
    method_dir = tmp_path / "my_conf" / "method"
    method_dir.mkdir(parents=True)
    (method_dir / "hinge.yaml").write_text("_target_: hinge_plugin.HingeMethod\nname: hinge\nmargin: 2.0\n")
    out = tmp_path / "run"
    search = f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]"
    env = {"PYTHONPATH": str(tmp_path)}
    # The method ships no `hinge_sample` data preset: the command asks for data in one line, before any work.
    missing = cli(
        "train", search, "method=hinge", "experiment=smoke", f"output_dir={tmp_path / 'nodata'}", cwd=tmp_path, env=env
    )
    assert missing.returncode == 2 and "data.train" in missing.stderr, missing.stderr[-2000:]
    assert len(missing.stderr.strip().splitlines()) == 1 and not (tmp_path / "nodata").exists()
    pairs = Path(__file__).resolve().parents[2] / "rewardctl" / "samples" / "data" / "pairwise"
    result = cli(
        "train",
        search,
        "method=hinge",
        f"data.train={pairs / 'train.jsonl'}",
        f"data.eval={pairs / 'eval.jsonl'}",
        "experiment=smoke",
        "train.max_steps=10",
        f"output_dir={out}",
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["method"] == "hinge" and summary["step"] == 10
    config = (out / "config.yaml").read_text()
    assert "_target_: hinge_plugin.HingeMethod" in config and "margin: 2.0" in config
    train = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # the hinge loss with margin 2 starts near 2 (rewards near 0), where Bradley-Terry would start at ln 2
    first = next(r for r in train if r["split"] == "train")
    assert first["loss"] > 1.5
    bad = cli(
        "train",
        search,
        "method=hinge",
        "data=pairwise_sample",
        "method.margn=1",
        f"output_dir={tmp_path / 'bad'}",
        cwd=tmp_path,
        env=env,
    )
    assert bad.returncode != 0 and "method.margn" in bad.stderr  # a typo in its keys is caught before any work
