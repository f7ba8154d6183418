"""`rewardctl train --help` lists every key with its default and one-line doc, from the schemas."""

from __future__ import annotations

import dataclasses

from rewardctl.config.describe import describe_keys, describe_method_keys, field_docs
from rewardctl.config.schema import DataConfig, HardwareConfig, ModelConfig, TrainConfig


def test_every_schema_key_is_listed_with_its_default_and_the_first_sentence_of_its_comment():
    text = describe_keys("train", TrainConfig)
    assert [line.split("=")[0].strip() for line in text.splitlines()] == [
        f"train.{f.name}" for f in dataclasses.fields(TrainConfig)
    ]
    lr = next(line for line in text.splitlines() if line.lstrip().startswith("train.lr="))
    assert lr.split() == ["train.lr=1e-05", "Peak", "learning", "rate", "of", "AdamW"]
    assert "model.attn_implementation=null" in describe_keys("model", ModelConfig)
    assert field_docs(DataConfig)["columns"].startswith("Canonical column name -> column name in the data, e.g.")
    assert all(
        len(line) <= 100
        for s in (ModelConfig, DataConfig, TrainConfig, HardwareConfig)
        for line in describe_keys("x", s).splitlines()
    )


def test_a_methods_keys_come_from_its_module_source_without_importing_it():
    import subprocess
    import sys

    probe = (
        "import sys; from rewardctl.config.describe import describe_method_keys as d; "
        "d('rewardctl.methods.bco.BcoMethod'); print('rewardctl.methods.bco' in sys.modules, 'torch' in sys.modules)"
    )
    read = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert read.stdout.split() == ["False", "False"]  # read, not imported (it imports torch)
    text = describe_method_keys("rewardctl.methods.bco.BcoMethod")
    keys = [line.split("=")[0].strip() for line in text.splitlines()]
    assert keys[:2] == ["method.beta", "method.max_length"] and "method.udm.l2" in keys
    assert "method.udm.l2=1.0" in text and "method.truncation_mode=keep_end" in text
    assert describe_method_keys("somewhere.else.Method") == ""
