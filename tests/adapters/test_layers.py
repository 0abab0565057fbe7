"""LoRA wrappers against the dense reference: y = x @ (W + s * B @ A).T + b."""

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit.adapters.embedding import LoraEmbedding
from lorakit.adapters.kinds import wrap
from lorakit.adapters.linear import LoraLinear


def _linear(seed: int = 0, bias: bool = True) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(12, 10, bias=bias)


def _adapted(base: nn.Module, r: int = 4, alpha: float = 8, rslora: bool = False, dropout: float = 0.0):
    layer = wrap(base)
    layer.update_layer("default", r, alpha, dropout, init_lora_weights=False, use_rslora=rslora)
    layer.active_adapters = ["default"]
    return layer


def test_linear_forward_equals_dense_reference():
    layer = _adapted(_linear())
    A, B = layer.lora_weights("default")
    x = torch.randn(3, 5, 12)
    W = layer.base_layer.weight + (8 / 4) * B @ A
    ref = x @ W.T + layer.base_layer.bias
    torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-5)


def test_conv1d_forward_equals_dense_reference():
    torch.manual_seed(0)
    base = Conv1D(nf=10, nx=12)  # weight (in=12, out=10)
    nn.init.normal_(base.weight)
    layer = _adapted(base)
    assert layer.fan_in_fan_out and (layer.in_features, layer.out_features) == (12, 10)
    A, B = layer.lora_weights("default")
    x = torch.randn(2, 12)
    ref = x @ (base.weight + 2.0 * (B @ A).T) + base.bias
    torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-5)


def test_embedding_forward_equals_dense_reference():
    torch.manual_seed(0)
    base = nn.Embedding(20, 6)
    layer = _adapted(base, r=3, alpha=6)
    A, B = layer.lora_weights("default")  # A (r, 20), B (6, r)
    ids = torch.randint(0, 20, (2, 5))
    ref = nn.functional.embedding(ids, base.weight + 2.0 * (B @ A).T)
    torch.testing.assert_close(layer(ids), ref, atol=1e-5, rtol=1e-5)


def test_default_init_is_identity_and_embedding_init_too():
    base = _linear()
    layer = wrap(base)
    layer.update_layer("default", 4, 8, 0.0, init_lora_weights=True)
    layer.active_adapters = ["default"]
    x = torch.randn(2, 12)
    torch.testing.assert_close(layer(x), base(x))
    assert layer.lora_weights("default")[0].abs().sum() > 0  # A random, B zero
    emb = wrap(nn.Embedding(20, 6))
    emb.update_layer("default", 4, 8, 0.0, init_lora_weights="gaussian")
    emb.active_adapters = ["default"]
    ids = torch.arange(20)
    torch.testing.assert_close(emb(ids), emb.base_layer(ids))


def test_gaussian_init_std_is_one_over_r():
    torch.manual_seed(0)
    layer = wrap(nn.Linear(4096, 8))
    layer.update_layer("default", 16, 16, 0.0, init_lora_weights="gaussian")
    A, B = layer.lora_weights("default")
    assert abs(A.std().item() - 1 / 16) < 0.002 and B.abs().sum() == 0


@pytest.mark.parametrize("rslora, expected", [(False, 16 / 4), (True, 16 / math.sqrt(4))])
def test_scaling_plain_and_rslora(rslora, expected):
    layer = _adapted(_linear(), r=4, alpha=16, rslora=rslora)
    assert layer.scaling["default"] == pytest.approx(expected)


def test_merge_then_unmerge_round_trips_and_matches_unmerged_forward():
    layer = _adapted(_linear())
    W0 = layer.base_layer.weight.detach().clone()
    x = torch.randn(4, 12)
    unmerged = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.base_layer.weight, W0, atol=1e-6, rtol=0)


def test_safe_merge_refuses_nan_and_keeps_weights():
    layer = _adapted(_linear())
    W0 = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.lora_weights("default")[1][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, W0) and not layer.merged


def test_two_active_adapters_add_up():
    layer = _adapted(_linear())
    layer.update_layer("other", 2, 2, 0.0, init_lora_weights=False)
    layer.active_adapters = ["default", "other"]
    x = torch.randn(3, 12)
    delta = sum(layer.delta_weight(n) for n in ("default", "other"))
    ref = x @ (layer.base_layer.weight + delta).T + layer.base_layer.bias
    torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-5)


def test_disabled_layer_is_base():
    layer = _adapted(_linear())
    layer.disable_adapters = True
    x = torch.randn(3, 12)
    torch.testing.assert_close(layer(x), layer.base_layer(x))


def test_dropout_applies_to_adapter_input_only_in_training():
    torch.manual_seed(0)
    layer = _adapted(_linear(bias=False), dropout=0.5)
    x = torch.ones(1000, 12)
    A, B = layer.lora_weights("default")
    layer.eval()
    torch.testing.assert_close(layer(x), x @ (layer.base_layer.weight + 2.0 * B @ A).T, atol=1e-5, rtol=1e-5)
    layer.train()
    y = layer(x) - layer.base_layer(x)  # = 2 * B A dropout(x): rows differ, mean matches (inverted dropout)
    assert not torch.allclose(y[0], y[1])
    torch.testing.assert_close(y.mean(0), (2.0 * x @ (B @ A).T).mean(0), atol=0.3, rtol=0.1)


def test_delete_adapter_refuses_merged_and_removes_params():
    layer = _adapted(_linear())
    layer.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.delete_adapter("default")
    layer.unmerge()
    layer.delete_adapter("default")
    assert "default" not in layer.lora_A and layer.active_adapters == []


def test_wrap_rejects_unsupported_modules():
    with pytest.raises(TypeError, match="LayerNorm"):
        wrap(nn.LayerNorm(4))


def test_bf16_base_keeps_fp32_adapter_and_bf16_output():
    base = _linear().to(torch.bfloat16)
    layer = _adapted(base)
    assert layer.lora_weights("default")[0].dtype == torch.float32
    y = layer(torch.randn(2, 12, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


def test_isinstance_of_wrappers():
    assert isinstance(wrap(nn.Linear(2, 2)), LoraLinear) and isinstance(wrap(nn.Embedding(3, 2)), LoraEmbedding)


@pytest.mark.parametrize("kind", ["linear", "linear_no_bias", "conv1d", "embedding"])
def test_wrappers_answer_the_base_layers_attributes_without_registering_them(kind):
    """Modeling code reads a wrapped layer's weight and bias (T5: ``self.wo.weight.dtype``): the wrapper answers with
    the base layer's own tensors, and its state dict keeps only ``base_layer.*`` for them (PEFT's keys)."""
    base = {
        "linear": lambda: _linear(),
        "linear_no_bias": lambda: _linear(bias=False),
        "conv1d": lambda: Conv1D(nf=10, nx=12),
        "embedding": lambda: nn.Embedding(20, 6, padding_idx=3),
    }[kind]()
    layer = _adapted(base)
    assert layer.weight is base.weight
    if kind == "embedding":  # nn.Embedding has no bias: neither has its wrapper
        assert not hasattr(layer, "bias")
    else:
        assert layer.bias is base.bias
    keys = set(layer.state_dict())
    assert {k for k in keys if not k.startswith(("lora_", "base_layer."))} == set()
    assert keys >= {f"base_layer.{k}" for k in base.state_dict()}
    assert not hasattr(layer, "nx")  # only the attributes named in the wrapper: the rest is not forwarded
    if kind == "embedding":
        assert (layer.num_embeddings, layer.embedding_dim, layer.padding_idx) == (20, 6, 3)


def test_quantized_base_answers_its_dequantized_weight():
    """Since b30db57 a QuantLinear's ``weight`` is its dequantized weight (a new tensor, not a Parameter), so the
    wrapper answers modeling code that reads ``layer.weight`` with it; assigning one is refused."""
    from lorakit.quant.linear import QuantizedBaseError, QuantLinear

    layer = _adapted(QuantLinear.from_linear(_linear(), 8))
    weight = layer.weight
    assert not isinstance(weight, torch.nn.Parameter)
    torch.testing.assert_close(weight, layer.base_layer.dequantize(), rtol=0, atol=0)
    with pytest.raises(QuantizedBaseError, match="requantize_"):
        layer.base_layer.weight = torch.zeros_like(weight)
    assert layer.bias is layer.base_layer.bias
