"""adapters.kinds and adapters.variants: which wrapper a module gets, which variant an adapter gets, and the state
changes that the forward's fast path must follow (made by methods, read at the next call)."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import input_ids, tiny_llama
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit.adapters.embedding import LoraEmbedding
from lorakit.adapters.kinds import MODULE_KINDS, is_linear, is_wrappable, kind_names, wrap
from lorakit.adapters.linear import LoraLinear
from lorakit.adapters.variants import VARIANTS, Dora, Lora
from lorakit.quant.half import HalfEmbedding, HalfLinear
from lorakit.quant.linear import QuantLinear


@pytest.mark.parametrize(
    ("module", "wrapper", "linear"),
    [
        (nn.Linear(4, 3), LoraLinear, True),
        (Conv1D(3, 4), LoraLinear, True),
        (QuantLinear.from_linear(nn.Linear(64, 8), bits=4), LoraLinear, True),
        (nn.Embedding(10, 4), LoraEmbedding, False),
        (HalfEmbedding(nn.Embedding(10, 4), nn.Parameter(torch.zeros(10, 4, dtype=torch.bfloat16)), torch.float32),
         LoraEmbedding, False),
        (HalfLinear(nn.Linear(4, 10), nn.Parameter(torch.zeros(10, 4, dtype=torch.bfloat16)), torch.float32),
         LoraLinear, True),
    ],
)
def test_each_kind_gets_its_wrapper(module, wrapper, linear):
    assert is_wrappable(module) and is_linear(module) is linear
    wrapped = wrap(module)
    assert type(wrapped) is wrapper and wrapped.base_layer is module


def test_an_unwrappable_module_is_refused_naming_every_kind():
    assert not is_wrappable(nn.LayerNorm(4))
    with pytest.raises(TypeError, match="LayerNorm") as error:
        wrap(nn.LayerNorm(4))
    for kind in MODULE_KINDS:
        assert kind.name in str(error.value) and kind.name in kind_names()


def test_target_error_names_the_kinds():
    with pytest.raises(lorakit.TargetError, match="lorakit wraps nn.Embedding, nn.Linear"):
        lorakit.get_peft_model(tiny_llama(0), lorakit.LoraConfig(target_modules=["input_layernorm"]))


def test_each_adapter_gets_its_own_variant_object():
    layer = wrap(nn.Linear(6, 5))
    layer.update_layer("plain", 2, 4, 0.0, init_lora_weights=False)
    layer.update_layer("d1", 2, 4, 0.0, init_lora_weights=False, use_dora=True)
    layer.update_layer("d2", 2, 4, 0.0, init_lora_weights=False, use_dora=True)
    assert type(layer.variants["plain"]) is Lora and VARIANTS["lora"] is Lora
    assert type(layer.variants["d1"]) is Dora and layer.variants["d1"] is not layer.variants["d2"]
    assert layer.adapter_parameters("d1")[2] is layer.lora_magnitude_vector["d1"].weight
    layer.delete_adapter("d1")
    assert "d1" not in layer.variants and "d1" not in layer.lora_magnitude_vector


def test_the_fast_path_follows_each_state_change():
    torch.manual_seed(0)
    layer = wrap(nn.Linear(6, 5))
    layer.update_layer("a", 2, 4, 0.0, init_lora_weights=False)
    layer.update_layer("b", 2, 4, 0.0, init_lora_weights=False)
    assert layer._fast is None  # nothing active yet
    layer.set_adapter("a")
    assert layer._fast[0] == "a"
    layer.active_adapters.append("b")  # a copy: no change of state, so the plan stays right
    assert layer.active_adapters == ["a"] and layer._fast[0] == "a"
    layer.active_adapters = ["a", "b"]  # the setter is set_adapter: two adapters, the general loop
    assert layer._fast is None
    layer.active_adapters = ["b"]
    assert layer._fast[0] == "b"
    layer.disable_adapters = True
    assert layer._fast is None and layer.disable_adapters
    layer.enable_adapters(True)
    assert layer._fast[0] == "b"
    layer.merge()
    assert layer._fast is None and layer.merged
    layer.unmerge()
    assert layer._fast[0] == "b"
    layer.delete_adapter("b")
    assert layer._fast is None and layer.active_adapters == []
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), layer.base_layer(x))


def test_fast_mlp_is_announced_counted_and_undone_by_unload(caplog):
    with caplog.at_level(logging.INFO, logger="lorakit.adapters.model"):
        model = lorakit.get_peft_model(tiny_llama(0), lorakit.LoraConfig(target_modules=["q_proj"]))
    mlps = [m for m in model.modules() if type(m).__name__ == "LlamaMLP"]
    assert model.base_model.fast_mlps == len(mlps) > 0
    assert f"{len(mlps)} gated MLPs of LlamaForCausalLM" in caplog.text
    assert all("forward" in m.__dict__ for m in mlps)
    plain = model.unload()
    assert all("forward" not in m.__dict__ for m in mlps)
    assert not any(isinstance(m, LoraLinear) for m in plain.modules())


def test_inject_adapter_in_model_leaves_the_mlps_alone():
    model = lorakit.inject_adapter_in_model(lorakit.LoraConfig(target_modules=["q_proj"]), tiny_llama(0))
    assert all("forward" not in m.__dict__ for m in model.modules() if type(m).__name__ == "LlamaMLP")
    assert model(input_ids()).logits.shape[-1] == model.config.vocab_size


def test_peft_constructor_form_adds_the_adapter_with_the_dense_lora_output() -> None:
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(6, 5), "default", lorakit.LoraConfig(r=8, init_lora_weights=False), r=2, lora_alpha=4)
    assert layer.r == {"default": 2} and layer.active_adapters == ["default"] and layer.scaling["default"] == 2.0
    x = torch.randn(3, 6)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # (2, 6), (5, 2)
    base = layer.base_layer
    torch.testing.assert_close(layer(x), x @ (base.weight + 2.0 * B @ A).T + base.bias)
    with pytest.raises(TypeError, match="needs the adapter's LoraConfig"):
        LoraLinear(nn.Linear(6, 5), "default")


@pytest.mark.parametrize(
    "options", [{}, {"use_dora": True}, {"init_lora_weights": "mica"}, {"kasa_config": {}},
                {"velora_config": {"num_groups": 2}}, {"alora_invocation_tokens": [3]}]
)
def test_a_layer_resolves_the_variant_injection_picks(options: dict) -> None:
    from lorakit.adapters.variants import for_config

    config = lorakit.LoraConfig(**options)
    layer = LoraLinear(nn.Linear(6, 5))
    assert type(layer.resolve_lora_variant(config=config)) is type(for_config(config, "x"))


def test_variant_resolution_errors_name_the_table_problem() -> None:
    embedding = LoraEmbedding(nn.Embedding(10, 4))
    with pytest.raises(ValueError, match=r"Invalid or unsupported variant combination: \('kasa_config',\)"):
        embedding.resolve_lora_variant(config=lorakit.LoraConfig(kasa_config={}))

    class Unsorted(LoraLinear):
        lora_variants = {("use_dora", "use_bdlora"): Dora}  # type: ignore[assignment]

    with pytest.raises(ValueError, match="must be sorted tuples"):
        Unsorted(nn.Linear(2, 2)).resolve_lora_variant(config=lorakit.LoraConfig())

    class Untagged(LoraLinear):
        lora_variants = {(): Lora, ("no_such_field",): Dora}  # type: ignore[assignment]

    with pytest.raises(ValueError, match=r"\['no_such_field'\] found in lora_variants"):
        Untagged(nn.Linear(2, 2)).resolve_lora_variant(config=lorakit.LoraConfig())
