"""lora_bias=True: adapter ``name``'s B has a bias b (out,) and the update is s * (B @ A @ x + b) (PEFT's LoraConfig
field). Dense references for nn.Linear and GPT-2 Conv1D, merge / unmerge of the bias, the refusals PEFT makes
(embedding, DoRA, initializers, a base without a bias at merge time), mixed batches, and interop with HF PEFT both
ways (files, config, logits)."""

from __future__ import annotations

import re
import warnings

import peft
import pytest
import torch
from helpers import assert_same_adapter_config, check_against_dense, input_ids, perturb_, tiny_bert_cls, tiny_gpt2
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit.adapters.linear import LoraLinear

ATOL = 1e-5


def _layer(base: nn.Module, r: int = 3, alpha: float = 12.0, seed: int = 0) -> LoraLinear:
    """A LoraLinear with one lora_bias adapter whose A, B and b are all non-zero."""
    layer = LoraLinear(base)
    layer.update_layer("default", r, alpha, 0.0, init_lora_weights=False, lora_bias=True)
    layer.set_adapter("default")
    perturb_(layer.adapter_parameters("default"), seed=seed, scale=0.5)
    return layer


def _dense(layer: LoraLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """(W + s * B @ A (out, in), bias + s * b (out,)): the merged layer, computed by hand."""
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    s = layer.scaling["default"]
    weight = layer.base_layer.weight.T if layer.fan_in_fan_out else layer.base_layer.weight
    return (weight + s * B @ A).detach(), (layer.base_layer.bias + s * layer.lora_B["default"].bias).detach()


@pytest.mark.parametrize("base", [lambda: nn.Linear(6, 5), lambda: Conv1D(5, 6)], ids=["linear", "conv1d"])
def test_forward_equals_the_dense_reference(base):
    torch.manual_seed(0)
    layer = _layer(base())
    assert torch.count_nonzero(layer.lora_B["default"].bias) == 5
    weight, bias = _dense(layer)
    check_against_dense(layer, weight, bias)
    assert layer.lora_B["default"].bias.grad is not None  # b trains


@pytest.mark.parametrize("safe_merge", [False, True])
def test_merge_adds_the_bias_and_unmerge_removes_it(safe_merge):
    torch.manual_seed(0)
    layer = _layer(nn.Linear(6, 5))
    W0, b0 = layer.base_layer.weight.detach().clone(), layer.base_layer.bias.detach().clone()
    weight, bias = _dense(layer)
    x = torch.randn(4, 6)
    expected = layer(x).detach()
    layer.merge(safe_merge=safe_merge)
    torch.testing.assert_close(layer.base_layer.weight, weight, atol=ATOL, rtol=0)
    torch.testing.assert_close(layer.base_layer.bias, bias, atol=ATOL, rtol=0)
    torch.testing.assert_close(layer(x), expected, atol=ATOL, rtol=0)  # computed by the base alone now
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, W0, atol=ATOL, rtol=0)
    torch.testing.assert_close(layer.base_layer.bias, b0, atol=ATOL, rtol=0)
    torch.testing.assert_close(layer(x), expected, atol=ATOL, rtol=0)


def test_starts_as_the_identity():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = LoraLinear(base)
    layer.update_layer("default", 2, 4.0, 0.0, init_lora_weights=True, lora_bias=True)
    layer.set_adapter("default")
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), base(x))


class _MLP(nn.Module):
    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.lin0, self.lin1 = nn.Linear(10, 20, bias=bias), nn.Linear(20, 2, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


@pytest.mark.parametrize("safe_merge", [False, True])
def test_base_without_bias_warns_then_refuses_to_merge_changing_nothing(safe_merge):
    torch.manual_seed(0)
    config = lorakit.LoraConfig(target_modules=["lin0", "lin1"], lora_bias=True, init_lora_weights=False)
    with pytest.warns(lorakit.PeftWarning, match="targeted layer of type Linear has no bias"):
        model = lorakit.get_peft_model(_MLP(bias=False), config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="Impossible to merge LoRA with `lora_bias=True`.*Keep it unmerged"):
        model.merge_adapter(safe_merge=safe_merge)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.base_model.model.lin0.merged_adapters == []


def test_safe_merge_refuses_a_non_finite_bias_changing_nothing():
    torch.manual_seed(0)
    layer = _layer(nn.Linear(6, 5))
    W0, b0 = layer.base_layer.weight.detach().clone(), layer.base_layer.bias.detach().clone()
    layer.lora_B["default"].bias.data[0] = float("inf")
    with pytest.raises(ValueError, match="NaN/inf"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, W0) and torch.equal(layer.base_layer.bias, b0)
    assert layer.merged_adapters == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(use_dora=True), "lora_bias=True is only supported .* without DoRA"),
        (dict(init_lora_weights="pissa"), "lora_bias=True is only supported with init_lora_weights=True or False"),
        (dict(init_lora_weights="gaussian"), "init_lora_weights='gaussian'"),
    ],
)
def test_config_refuses_what_peft_refuses(kwargs, message):
    with pytest.raises(lorakit.ConfigError, match=message):
        lorakit.LoraConfig(target_modules=["lin0"], lora_bias=True, **kwargs)
    with pytest.raises(ValueError, match="The argument lora_bias=True is"):  # PEFT's message, too
        peft.LoraConfig(target_modules=["lin0"], lora_bias=True, **kwargs)


@pytest.mark.parametrize(
    "kwargs, kind",
    [
        (dict(target_modules=["c_attn", "wte"]), "Embedding layers (transformer.wte)"),
        (dict(target_modules=["c_attn"], target_parameters=["attn.c_proj.weight"]), "nn.Parameter"),
    ],
    ids=["embedding", "target_parameters"],
)
def test_kinds_without_a_bias_slot_are_refused_before_anything_is_wrapped(kwargs, kind):
    model = tiny_gpt2(0)
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(lorakit.ConfigError, match=rf"lora_bias=True is not supported for {re.escape(kind)}"):
        lorakit.get_peft_model(model, lorakit.LoraConfig(**kwargs, lora_bias=True))
    assert {n: type(m) for n, m in model.named_modules()} == before  # as PEFT refuses both; nothing changed


def test_mixed_batch_adds_each_rows_bias():
    torch.manual_seed(0)
    config = lorakit.LoraConfig(target_modules=["lin0", "lin1"], lora_bias=True, lora_alpha=32, init_lora_weights=False)
    model = lorakit.get_peft_model(_MLP(), config)
    model.add_adapter("other", lorakit.LoraConfig(target_modules=["lin0"], init_lora_weights=False))
    perturb_([p for n, p in model.named_parameters() if "lora_" in n], seed=1)
    model.eval()
    x = torch.randn(5, 10)
    names = ["default", "other", "__base__", "default", "default"]  # 'default' gets a padded segment
    rows = []
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                rows.append(model(x[i : i + 1]))
        else:
            model.set_adapter(name)
            rows.append(model(x[i : i + 1]))
    torch.testing.assert_close(model(x, adapter_names=names), torch.cat(rows), atol=ATOL, rtol=0)


# -- interop with HF PEFT ------------------------------------------------------------------------------------------
CASES = [
    pytest.param(tiny_gpt2, dict(target_modules=["c_attn", "c_proj"]), id="gpt2_conv1d"),
    pytest.param(tiny_bert_cls, dict(target_modules=["query", "value"], task_type="SEQ_CLS"), id="bert_linear"),
]


def _made(lib, factory, kwargs: dict, seed: int = 1) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's note that it set fan_in_fan_out for Conv1D
        config = lib.LoraConfig(**kwargs, lora_bias=True, lora_alpha=32, init_lora_weights=False)
        model = lib.get_peft_model(factory(0), config)
    perturb_([p for p in model.parameters() if p.requires_grad], seed=seed)
    return model


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids()).logits


@pytest.mark.parametrize("factory, kwargs", CASES)
def test_same_trainable_parameters_as_peft(factory, kwargs):
    ours, theirs = _made(lorakit, factory, kwargs), _made(peft, factory, kwargs)
    trainable = lambda m: {n: tuple(p.shape) for n, p in m.named_parameters() if p.requires_grad}  # noqa: E731
    assert trainable(ours) == trainable(theirs)
    assert any(n.endswith("lora_B.default.bias") for n in trainable(ours))


@pytest.mark.parametrize("factory, kwargs", CASES)
def test_lorakit_file_loads_in_peft(factory, kwargs, tmp_path):
    model = _made(lorakit, factory, kwargs).eval()
    expected = _logits(model)
    for module in model.modules():  # the biases matter: without them the logits change
        if isinstance(module, LoraLinear):
            module.lora_B["default"].bias.data.zero_()
    assert (_logits(model) - expected).abs().max() > 1e-3
    model = _made(lorakit, factory, kwargs).eval()
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(factory(0), tmp_path)
    assert (_logits(loaded) - expected).abs().max() < ATOL
    loaded.merge_adapter()  # and PEFT merges lorakit's bias as lorakit does
    model.merge_adapter()
    assert (_logits(loaded) - _logits(model)).abs().max() < ATOL


@pytest.mark.parametrize("factory, kwargs", CASES)
def test_peft_file_loads_in_lorakit(factory, kwargs, tmp_path):
    model = _made(peft, factory, kwargs).eval()
    expected = _logits(model)
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = lorakit.PeftModel.from_pretrained(factory(0), tmp_path)
    assert [str(w.message) for w in caught if issubclass(w.category, UserWarning)] == []
    assert (_logits(loaded) - expected).abs().max() < ATOL
    merged = loaded.merge_and_unload()
    assert (_logits(merged) - expected).abs().max() < ATOL


@pytest.mark.parametrize("factory, kwargs", CASES)
def test_same_file_keys_and_config(factory, kwargs, tmp_path):
    _made(lorakit, factory, kwargs).save_pretrained(tmp_path / "lorakit")
    _made(peft, factory, kwargs).save_pretrained(tmp_path / "peft")
    ours = {k: tuple(v.shape) for k, v in load_file(tmp_path / "lorakit" / "adapter_model.safetensors").items()}
    theirs = {k: tuple(v.shape) for k, v in load_file(tmp_path / "peft" / "adapter_model.safetensors").items()}
    assert ours == theirs
    assert any(k.endswith("lora_B.bias") for k in ours)
    assert_same_adapter_config(tmp_path / "lorakit", tmp_path / "peft")


def test_exports_refuse_what_they_would_drop():
    from lorakit.export.gguf_adapter import gguf_adapter_problems
    from lorakit.export.vllm import vllm_problems

    config = lorakit.LoraConfig(target_modules=["q_proj"], lora_bias=True)
    assert any("lora_bias" in p.rule for p in vllm_problems(config))
    assert any("lora_bias" in p.rule for p in gguf_adapter_problems(config, {}, "unknown"))
    plain = lorakit.LoraConfig(target_modules=["q_proj"])
    assert not any("lora_bias" in p.rule for p in vllm_problems(plain))
