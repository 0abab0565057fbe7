"""target_modules=None: lorakit's table of default targets against PEFT 0.21.2's, model type by model type; and how
resolved targets are recorded in the config (as PEFT records them)."""

from __future__ import annotations

import pytest
from peft.tuners.tuners_utils import _find_minimal_target_modules
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS
from transformers import T5Config, T5ForConditionalGeneration

import lorakit
from lorakit.adapters.targets import DEFAULT_TARGETS, condensed, name_matches

# model types lorakit has a default for and PEFT has not (PEFT raises "Please specify target_modules"), with why. The
# saved config names the resolved targets, so PEFT loads these adapters all the same (tests/api/test_matrix.py)
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



def _tiny_t5() -> T5ForConditionalGeneration:
    config = T5Config(vocab_size=100, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu", decoder_start_token_id=0)
    return T5ForConditionalGeneration(config)


def test_long_target_lists_are_recorded_condensed_as_peft_records_them():
    """20 names or more are recorded as the shortest suffixes that pick the same modules (PEFT's rule): a tiny T5's
    all-linear (36 layers) as its 7 layer names; a list of some of them as suffixes that select exactly those."""
    model = lorakit.get_peft_model(_tiny_t5(), lorakit.LoraConfig(target_modules="all-linear"))
    assert model.peft_config["default"].target_modules == ["k", "o", "q", "v", "wi_0", "wi_1", "wo"]

    names = [n for n, _ in _tiny_t5().named_modules()]
    targets = [n for n in names if n.startswith("decoder.") and n.endswith((".q", ".wo"))]
    short = condensed(targets, names)
    assert len(short) < len(targets)
    assert {n for n in names if any(name_matches(n, s) for s in short)} == set(targets)
    assert short == sorted(_find_minimal_target_modules(targets, [n for n in names if n not in targets]))
