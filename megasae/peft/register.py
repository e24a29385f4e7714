"""Make peft know "TOPK_SAE".

peft's `register_peft_method` accepts only names already in its own `PeftType` enum, so a method
from outside peft goes straight into the three tables peft looks up when it builds, saves and
loads adapters. tests/test_peft_format.py pins this, so a peft release that changes it fails CI.
"""

from peft import mapping

from megasae.peft.config import PEFT_TYPE, TopKSaeConfig
from megasae.peft.tuner import TopKSaeModel


def register() -> None:
    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = TopKSaeConfig
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = TopKSaeModel
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] = TopKSaeModel.prefix
