"""get_layer_status / get_model_status against PEFT's on the same model and the same sequence of state changes."""

from __future__ import annotations

import dataclasses

import peft
import pytest
import torch
from helpers import tiny_llama

import lorakit

CONFIG = dict(target_modules=["q_proj", "v_proj"], r=4, modules_to_save=["lm_head"])


def steps(model, library) -> list:
    """The statuses after each of: creation, a second adapter, activating both, merging, disabling."""
    out = [model.get_model_status(), model.get_layer_status()]
    model.add_adapter("other", library.LoraConfig(target_modules=["q_proj"], r=2))
    out += [model.get_model_status()]
    model.base_model.set_adapter(["default", "other"])
    out += [model.get_model_status(), model.get_layer_status()]
    model.merge_adapter()
    out += [model.get_model_status()]
    model.unmerge_adapter()
    with model.disable_adapter():
        out += [model.get_model_status()]
    return out


def as_plain(value):
    if isinstance(value, list):
        return [as_plain(v) for v in value]
    return dataclasses.asdict(value)


def test_statuses_equal_peft_s_through_state_changes() -> None:
    ours = steps(lorakit.get_peft_model(tiny_llama(0), lorakit.LoraConfig(**CONFIG)), lorakit)
    theirs = steps(peft.get_peft_model(tiny_llama(0), peft.LoraConfig(**CONFIG)), peft)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert as_plain(a) == as_plain(b)
    assert ours[0].active_adapters == ["default"] and ours[0].trainable_params > 0
    assert ours[3].active_adapters == "irregular"  # as in PEFT: lm_head's copy has one active adapter, q_proj two
    assert ours[-1].trainable_params == 0 and ours[-1].enabled is False  # disable_adapter() freezes, as PEFT


def test_module_functions_and_a_model_without_adapters() -> None:
    model = lorakit.get_peft_model(tiny_llama(0), lorakit.LoraConfig(target_modules=["q_proj"]))
    assert lorakit.get_model_status(model) == model.get_model_status()
    assert [s.name for s in lorakit.get_layer_status(model)][:1] == ["model.model.layers.0.self_attn.q_proj"]
    with pytest.raises(ValueError, match="No adapter layers"):
        lorakit.get_layer_status(tiny_llama(0))


def test_base_model_type_is_the_class_name_of_a_custom_model_as_peft_names_it() -> None:
    class SmallModel(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin0 = torch.nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin0(x)

    ours = lorakit.get_peft_model(SmallModel(), lorakit.LoraConfig(target_modules=["lin0"]))
    theirs = peft.get_peft_model(SmallModel(), peft.LoraConfig(target_modules=["lin0"]))
    assert ours.get_model_status().base_model_type == theirs.get_model_status().base_model_type == "SmallModel"


def _poke_one_layer(model, library) -> None:
    """Code written for PEFT switching one layer through PEFT's private ``_active_adapter`` (and a modules_to_save
    copy through its own), as PEFT's own tests do."""
    model.add_adapter("other", library.LoraConfig(**CONFIG))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    layer._active_adapter = "other"
    assert layer.active_adapters == ["other"] and layer._active_adapter == "other"


def test_private_active_adapter_attribute_acts_as_in_peft() -> None:
    """Both libraries then report the model's active adapters as 'irregular'; the poked layer computes with 'other'."""
    statuses = []
    for library in (lorakit, peft):
        model = library.get_peft_model(tiny_llama(0), library.LoraConfig(**CONFIG))
        _poke_one_layer(model, library)
        statuses.append(model.get_model_status().active_adapters)
    assert statuses == ["irregular", "irregular"]
    model = lorakit.get_peft_model(tiny_llama(0), lorakit.LoraConfig(**CONFIG))
    _poke_one_layer(model, lorakit)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    torch.nn.init.normal_(layer.lora_B["other"].weight)
    x = torch.randn(2, layer.in_features)
    A, B = layer.lora_weights("other")
    expected = layer.base_layer(x) + layer.scaling["other"] * x @ A.T @ B.T
    torch.testing.assert_close(layer(x), expected)


def test_modules_to_save_copy_of_a_missing_adapter_is_an_attribute_error() -> None:
    model = lorakit.get_peft_model(tiny_llama(0), lorakit.LoraConfig(**CONFIG))
    head = model.base_model.model.lm_head
    assert head.weight is head.modules_to_save["default"].weight
    head._active_adapter = "does-not-exist"
    with pytest.raises(AttributeError, match="has no attribute 'weight': its active adapter 'does-not-exist' has no"):
        _ = head.weight
    head._active_adapter = "default"
    assert head.active_adapter == "default" and head.weight is head.modules_to_save["default"].weight
