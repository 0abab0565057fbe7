"""LoraConfig: PEFT's defaults, validation messages, and dict round trips."""

import pytest

from lorakit import ConfigError, LoraConfig, TaskType


def test_defaults_match_peft():
    c = LoraConfig()
    assert (c.r, c.lora_alpha, c.lora_dropout, c.bias, c.init_lora_weights) == (8, 8, 0.0, "none", True)
    assert c.peft_type == "LORA" and c.rank_pattern == {} and c.target_modules is None


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"r": 0}, ["r=0", "positive integer"]),
        ({"r": -3}, ["r=-3"]),
        ({"r": 2.5}, ["r=2.5"]),
        ({"lora_alpha": 0}, ["lora_alpha=0", "positive"]),
        ({"lora_dropout": 1.0}, ["lora_dropout=1.0", "[0, 1)"]),
        ({"lora_dropout": -0.1}, ["lora_dropout=-0.1"]),
        ({"bias": "some"}, ["bias='some'", "none, all, lora_only"]),
        ({"init_lora_weights": "xavier"}, ["init_lora_weights='xavier'", "gaussian"]),
        ({"task_type": "TRANSLATE"}, ["task_type='TRANSLATE'", "CAUSAL_LM"]),
        ({"rank_pattern": {"q_proj": 0}}, ["rank_pattern['q_proj']=0"]),
        ({"target_modules": []}, ["target_modules=[]"]),
        ({"layers_pattern": "layers"}, ["layers_to_transform"]),
    ],
)
def test_invalid_values_name_field_and_fix(kwargs, words):
    with pytest.raises(ConfigError) as err:
        LoraConfig(**kwargs)
    for word in words:
        assert word in str(err.value)


def test_task_type_from_string_and_sets_become_lists():
    c = LoraConfig(task_type="causal_lm", target_modules={"v_proj", "q_proj"})
    assert c.task_type is TaskType.CAUSAL_LM and c.target_modules == ["q_proj", "v_proj"]


def test_dict_round_trip():
    c = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj"], rank_pattern={"v_proj": 2}, task_type="SEQ_CLS")
    d = c.to_dict()
    assert d["peft_type"] == "LORA" and d["task_type"] == "SEQ_CLS"
    assert LoraConfig.from_dict(d) == c


def test_unknown_keys_warn_and_are_ignored():
    with pytest.warns(UserWarning, match="some_future_option"):
        c = LoraConfig.from_dict({"r": 4, "some_future_option": 1, "peft_version": "9.9"})
    assert c.r == 4


def test_peft_feature_in_use_is_an_error_but_neutral_value_is_fine():
    LoraConfig.from_dict({"r": 4, "lora_bias": False, "layer_replication": None})
    with pytest.raises(ConfigError, match="layer_replication"):
        LoraConfig.from_dict({"r": 4, "layer_replication": [[0, 2]]})
    with pytest.raises(ConfigError, match="peft_type"):
        LoraConfig.from_dict({"peft_type": "IA3"})


def test_rank_and_alpha_patterns_match_dotted_suffix():
    c = LoraConfig(r=8, lora_alpha=16, rank_pattern={"q_proj": 2}, alpha_pattern={r"layers\.1\.\w+\.v_proj": 3})
    assert c.rank_for("model.layers.0.self_attn.q_proj") == 2
    assert c.rank_for("model.layers.0.self_attn.k_proj") == 8
    assert c.alpha_for("model.layers.1.self_attn.v_proj") == 3
    assert c.alpha_for("model.layers.0.self_attn.v_proj") == 16
    assert c.rank_for("model.layers.0.self_attn.xq_proj") == 8  # dot boundary, not a substring
