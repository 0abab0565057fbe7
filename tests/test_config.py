"""LoraConfig: PEFT's defaults, validation messages, and dict round trips."""

import json

import pytest

from lorakit import ConfigError, LoraConfig, PeftType, TaskType, config
from lorakit.io.untrusted import AdapterFileError


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
    with pytest.warns(UserWarning, match=r"Unexpected keyword arguments \['some_future_option'\] for class LoraConfig"):
        c = LoraConfig.from_dict({"peft_type": "LORA", "r": 4, "some_future_option": 1, "peft_version": "9.9"})
    assert c.r == 4 and c.peft_version == "9.9"  # a loaded file keeps the version it was written in
    assert LoraConfig.from_dict({"r": 4}).r == 4  # no peft_type and nothing unknown: a (PEFT-less) LoRA dict


def test_json_without_peft_type_and_with_unknown_keys_is_no_config(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"foo": "bar", "baz": 123}))
    with pytest.raises(TypeError, match="missing required keys: {'peft_type'}") as info:
        LoraConfig.from_pretrained(tmp_path)
    assert isinstance(info.value, AdapterFileError) and str(tmp_path) in str(info.value)


def test_from_json_file_is_the_saved_dict_without_runtime_config(tmp_path):
    c = LoraConfig(r=4, target_modules=["q"], task_type="CAUSAL_LM")
    c.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    data = LoraConfig.from_json_file(path)
    assert data == c.to_dict() and data["peft_type"] == "LORA" and data["peft_version"] == config.__version__
    path.write_text(json.dumps({**data, "runtime_config": {"ephemeral_gpu_offload": True}}))
    with pytest.warns(UserWarning, match="runtime_config"):
        assert LoraConfig.from_json_file(path) == data
    path.write_text("[1, 2]")
    with pytest.raises(AdapterFileError, match="JSON object"):
        LoraConfig.from_json_file(path)


def test_peft_type_keyword_and_from_peft_type():
    with pytest.warns(UserWarning, match="always peft_type 'LORA'"):
        c = LoraConfig(peft_type="test", r=4)
    assert c.peft_type is PeftType.LORA and c.to_dict()["peft_type"] == "LORA"
    assert LoraConfig(peft_type=PeftType.LORA) == LoraConfig()
    assert LoraConfig.from_peft_type(peft_type=PeftType.LORA, r=2).r == 2
    with pytest.raises(ConfigError, match="peft_type='IA3'"):
        LoraConfig.from_peft_type(peft_type="IA3")


def test_peft_version_is_the_format_version_and_dev_versions_get_a_commit(monkeypatch, tmp_path):
    assert config.__version__ == config.PEFT_FORMAT_VERSION and LoraConfig().peft_version == "0.21.2"
    monkeypatch.setattr(config, "__version__", "0.30.0")
    c = LoraConfig()
    assert c.peft_version == "0.30.0"
    c.save_pretrained(tmp_path)
    monkeypatch.setattr(config, "__version__", "0.31.0")
    assert LoraConfig.from_pretrained(tmp_path).peft_version == "0.30.0"  # the file's, not the current one
    monkeypatch.setattr(config, "__version__", "0.31.0.dev2")
    monkeypatch.setattr(config, "_get_commit_hash", lambda package: "abc123")
    assert LoraConfig().peft_version == "0.31.0.dev2@abc123"
    monkeypatch.setattr(config, "_get_commit_hash", lambda package: None)
    assert LoraConfig().peft_version == "0.31.0.dev2@UNKNOWN"

    def broken(package: str) -> str:
        raise OSError("unreadable metadata")

    monkeypatch.setattr(config, "_get_commit_hash", broken)
    with pytest.warns(UserWarning, match="commit hash"):
        assert LoraConfig().peft_version == "0.31.0.dev2@UNKNOWN"


def test_str_target_modules_refuses_layer_selection_naming_the_field():
    with pytest.raises(ConfigError, match="`layers_to_transform` cannot be used when `target_modules` is a str"):
        LoraConfig(target_modules=".*foo", layers_to_transform=[0])
    with pytest.raises(ConfigError, match="`layers_pattern` cannot be used when `target_modules` is a str"):
        LoraConfig(target_modules=".*foo", layers_pattern=["bar"])


def test_peft_feature_in_use_is_an_error_but_neutral_value_is_fine():
    LoraConfig.from_dict({"r": 4, "lora_bias": False, "use_qalora": False})
    with pytest.raises(ConfigError, match="use_qalora"):
        LoraConfig.from_dict({"r": 4, "use_qalora": True})
    with pytest.raises(ConfigError, match="peft_type"):
        LoraConfig.from_dict({"peft_type": "IA3"})


def test_rank_and_alpha_patterns_match_dotted_suffix():
    c = LoraConfig(r=8, lora_alpha=16, rank_pattern={"q_proj": 2}, alpha_pattern={r"layers\.1\.\w+\.v_proj": 3})
    assert c.rank_for("model.layers.0.self_attn.q_proj") == 2
    assert c.rank_for("model.layers.0.self_attn.k_proj") == 8
    assert c.alpha_for("model.layers.1.self_attn.v_proj") == 3
    assert c.alpha_for("model.layers.0.self_attn.v_proj") == 16
    assert c.rank_for("model.layers.0.self_attn.xq_proj") == 8  # dot boundary, not a substring
