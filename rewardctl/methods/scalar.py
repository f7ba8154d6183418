"""What pairwise and ranklist share: a single-output sequence classifier as the reward model.

Both score a sequence with the same model, tokenizer and saved layout, so a model trained by either
method is scored identically (stock ``AutoModelForSequenceClassification`` or ``pipeline``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from rewardctl.methods.base import Method
from rewardctl.modeling.adapters import quantization_config, wants_merged_copy, wrap_with_adapter
from rewardctl.modeling.sequence import (
    SequenceRewardModel,
    build_sequence_classifier,
    head_name,
    load_saved_classifier,
    save_sequence_classifier,
)
from rewardctl.modeling.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


class ScalarRewardMethod(Method):
    """A method whose trainable module maps a sequence to one reward."""

    supports_adapters = True

    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        return load_tokenizer(self.run.model)

    def _wrap(self, classifier: nn.Module) -> SequenceRewardModel:
        model = SequenceRewardModel(classifier)
        if model.pooling == "native" and self.tokenizer.padding_side != "right":
            log.warning("%s pools its first token ([CLS]); padding on the right", type(classifier).__name__)
            self.tokenizer.padding_side = "right"
        return model

    def build_model(self) -> nn.Module:
        classifier = build_sequence_classifier(self.run.model, self.tokenizer, self.run.train,
                                               quantization_config(self.run.peft))
        # With LoRA the head trains in full and is saved with the adapter (modules_to_save).
        classifier = wrap_with_adapter(classifier, self.run.peft, head=[head_name(classifier)], task_type="SEQ_CLS")
        return self._wrap(classifier)

    def load_trained(self, path: Path) -> nn.Module:
        return self._wrap(load_saved_classifier(path, self.run.model))

    def save_model(self, model: nn.Module, path: Path, state_dict: dict[str, Tensor] | None = None) -> None:
        save_sequence_classifier(model, self.tokenizer, path, self.run.model, method=self.cfg.name, state_dict=state_dict,
                                 save_merged=wants_merged_copy(self.run.peft))
