"""get_base_model_state_dict / set_base_model_state_dict (lorakit.adapters.base_state): the base model's tensors
keyed as before get_peft_model, through every kind of wrapper, and back."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from helpers import tiny_llama, tiny_llama_cls
from torch import nn

import lorakit

CASES = {
    "linear_and_embedding": (tiny_llama, dict(target_modules=["q_proj", "v_proj", "embed_tokens"])),
    "modules_to_save": (tiny_llama_cls, dict(task_type="SEQ_CLS", target_modules=["q_proj"])),
    "trainable_tokens": (tiny_llama, dict(target_modules=["q_proj"], trainable_token_indices=[1, 2])),
    "dora_rslora": (tiny_llama, dict(target_modules="all-linear", use_dora=True, use_rslora=True)),
}


class Attend(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2)
        self.conv = nn.Conv1d(8, 8, 3)


def _pair(case: str) -> tuple[nn.Module, dict]:
    build, config = CASES[case]
    return build(), config


@pytest.mark.parametrize("case", list(CASES))
def test_keys_and_values_are_the_base_models_and_equal_peft(case: str) -> None:
    base, config = _pair(case)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    ours = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(init_lora_weights=False, **config))
    extracted = lorakit.get_base_model_state_dict(ours)
    assert extracted.keys() == before.keys()
    for key, value in before.items():
        torch.testing.assert_close(extracted[key], value, atol=0, rtol=0)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **config))
    assert peft.get_base_model_state_dict(theirs).keys() == extracted.keys()


@pytest.mark.parametrize("case", list(CASES))
def test_set_loads_the_base_and_leaves_the_adapter(case: str) -> None:
    base, config = _pair(case)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = lorakit.get_peft_model(base, lorakit.LoraConfig(init_lora_weights=False, **config))
    adapter = {k: v.clone() for k, v in lorakit.get_peft_model_state_dict(model).items()}
    with torch.no_grad():
        for p in model.get_base_model().parameters():
            p.add_(1.0)
    result = lorakit.set_base_model_state_dict(model, original)
    assert result.missing_keys == [] and result.unexpected_keys == []
    for key, value in lorakit.get_base_model_state_dict(model).items():
        torch.testing.assert_close(value, original[key], atol=0, rtol=0)
    for key, value in lorakit.get_peft_model_state_dict(model).items():  # the adapter kept its trained values + 1
        torch.testing.assert_close(value, adapter[key] + 1.0, atol=0, rtol=0)


def test_nested_wrappers_multihead_attention_and_conv() -> None:
    base = Attend()
    keys = set(base.state_dict())
    model = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(target_modules=["mha", "conv"]))
    assert any(".base_layer.out_proj.base_layer." in k for k in model.state_dict())
    assert set(lorakit.get_base_model_state_dict(model)) == keys


def test_strict_refuses_missing_and_surplus_keys_before_loading() -> None:
    model = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(target_modules=["q_proj"]))
    state = lorakit.get_base_model_state_dict(model)
    changed = {k: v + 1 for k, v in state.items()}
    changed.pop("lm_head.weight")
    changed["nope.weight"] = torch.zeros(1)
    before = {k: v.clone() for k, v in state.items()}
    with pytest.raises(RuntimeError, match=r"missing keys \['lm_head.weight'\], unexpected keys \['nope.weight'\]"):
        lorakit.set_base_model_state_dict(model, changed)
    for key, value in lorakit.get_base_model_state_dict(model).items():
        torch.testing.assert_close(value, before[key], atol=0, rtol=0)
    result = lorakit.set_base_model_state_dict(model, changed, strict=False)
    assert result.missing_keys == ["lm_head.weight"] and result.unexpected_keys == ["nope.weight"]
