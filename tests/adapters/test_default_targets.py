"""target_modules=None: lorakit's table of default targets against PEFT 0.21.2's, model type by model type."""

from __future__ import annotations

import pytest
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

from lorakit.adapters.inject import DEFAULT_TARGETS

# model types lorakit has a default for and PEFT has not (PEFT raises "Please specify target_modules"), with why
LORAKIT_ONLY = {
    "phi3": "Phi-3 fuses q, k and v into qkv_proj: the attention's one input projection",
    "distilbert": "DistilBERT's query and value layers are q_lin and v_lin, as BERT's query and value",
}


@pytest.mark.parametrize("model_type", sorted(PEFT_DEFAULTS))
def test_same_default_targets_as_peft(model_type):
    ours, theirs = DEFAULT_TARGETS.get(model_type), PEFT_DEFAULTS[model_type]
    assert ours is not None, f"no default for {model_type!r}; PEFT's is {theirs!r}"
    if isinstance(theirs, str):  # a regex over the full name
        assert ours == theirs
    else:  # PEFT makes a set of the list: the order does not matter
        assert isinstance(ours, list) and sorted(ours) == sorted(theirs)


def test_no_other_model_types_than_the_listed_differences():
    assert DEFAULT_TARGETS.keys() - PEFT_DEFAULTS.keys() == LORAKIT_ONLY.keys()
