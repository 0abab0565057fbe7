"""The nested settings of variants and initializers (lorakit.sub_configs): each survives save_pretrained /
from_pretrained as its own class, fields set after creation included, and refuses values it cannot use."""

import dataclasses
import json

import pytest

from lorakit import LoraConfig
from lorakit.config import ConfigError
from lorakit.sub_configs import (
    SUB_CONFIG_FIELDS,
    SUB_CONFIGS,
    ArrowConfig,
    BdLoraConfig,
    CordaConfig,
    EvaConfig,
    KasaConfig,
    LoraGAConfig,
    MontecloraConfig,
    VeloraConfig,
    as_sub_config,
)

# (LoraConfig field, class, a field of it, a value other than its default)
NESTED = [
    ("velora_config", VeloraConfig, "num_groups", 32),
    ("use_bdlora", BdLoraConfig, "nblocks", 4),
    ("kasa_config", KasaConfig, "beta", 2e-4),
    ("monteclora_config", MontecloraConfig, "num_samples", 3),
    ("corda_config", CordaConfig, "corda_method", "kpm"),
    ("eva_config", EvaConfig, "rho", 7.5),
    ("lora_ga_config", LoraGAConfig, "direction", "ArBr"),
    ("arrow_config", ArrowConfig, "top_k", 4),
]


def test_every_sub_config_is_covered():
    assert {cls for _, cls, _, _ in NESTED} == set(SUB_CONFIGS)
    assert {name: cls for name, cls, _, _ in NESTED} == SUB_CONFIG_FIELDS  # the fields LoraConfig turns dicts back in


@pytest.mark.parametrize("name, cls, key, value", NESTED, ids=[n for n, *_ in NESTED])
def test_sub_config_survives_a_save_and_load(tmp_path, name, cls, key, value):
    config = LoraConfig(r=4, target_modules=["lin0"])
    setattr(config, name, cls(**{key: value}))
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved[name][key] == value  # written as a dict
    loaded = getattr(LoraConfig.from_pretrained(tmp_path), name)
    assert isinstance(loaded, cls) and loaded == getattr(config, name)


def test_fields_set_after_creation_are_kept_through_a_dict():
    arrow = ArrowConfig(top_k=2, rng_seed=3)
    arrow.task_adapter_names, arrow.gks_adapter_names = ["task_0", "task_1"], ["gks_0"]
    back = as_sub_config("arrow_config", dataclasses.asdict(arrow), ArrowConfig)
    assert back == arrow and back.task_adapter_names == ["task_0", "task_1"] and back.gks_adapter_names == ["gks_0"]
    assert as_sub_config("arrow_config", {"top_k": 2, "from_a_newer_peft": 1}, ArrowConfig) == ArrowConfig(top_k=2)


def test_a_value_of_the_wrong_type_names_the_fix():
    with pytest.raises(TypeError, match=r"lora_ga_config must be a `LoraGAConfig`, a dict, or None"):
        LoraConfig(lora_ga_config="ArB2r")


@pytest.mark.parametrize("kwargs, message", [
    ({"direction": "AB"}, r"direction='AB' is unknown; use one of ArBr, A2rBr, ArB2r, random"),
    ({"scale": "big"}, r"scale='big' is unknown; use one of stable, weight_svd, gd_scale, unit"),
    ({"stable_gamma": 0}, r"stable_gamma=0 must be a positive number"),
])
def test_lora_ga_config_refuses_unknown_settings(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LoraGAConfig(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"top_k": 0}, r"top_k cannot be negative. top_k=0 must be a positive integer"),
    ({"top_k": 1.5}, r"top_k=1.5 must be a positive integer"),
    ({"router_temperature": 0.0}, r"router_temperature must be greater than 0"),
])
def test_arrow_config_refuses_unusable_settings(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ArrowConfig(**kwargs)
