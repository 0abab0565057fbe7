"""DoRA (Liu et al. 2024): the pure maths, the wrappers against the dense reference
y = x @ (m * (W + s * B @ A) / ||W + s * B @ A||_row).T + b, merging, and interop with HF PEFT."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import peft
import pytest
import torch
from helpers import input_ids, perturb_, tiny_gpt2, tiny_llama
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit.adapters.inject import merged_linear
from lorakit.adapters.kinds import wrap
from lorakit.adapters.layer import LoraLayer
from lorakit.ops import dora
from lorakit.quant.linear import QuantLinear

SCALING = 8 / 4  # alpha / r of _adapted


# -- dense references ----------------------------------------------------------------------------------------------
def _dora_weight(W: torch.Tensor, delta: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """m * (W + delta) / ||W + delta||_row, all (out, in), written out without lorakit.ops.dora."""
    V = W + delta
    return m[:, None] * V / V.pow(2).sum(dim=1, keepdim=True).sqrt()


def _adapted(base: nn.Module, dropout: float = 0.0, init: bool | str = False, seed: int = 1) -> LoraLayer:
    """``base`` wrapped with a DoRA adapter (r=4, alpha=8); random A, B and magnitude unless ``init`` says otherwise."""
    torch.manual_seed(seed)
    layer = wrap(base)
    layer.update_layer("default", 4, 8, dropout, init_lora_weights=init, use_dora=True)
    layer.active_adapters = ["default"]
    if init is False:
        perturb_([layer.lora_magnitude_vector["default"].weight], seed=seed + 1, scale=0.5)
    return layer


def _linear(seed: int = 0, bias: bool = True) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(12, 10, bias=bias)


def _conv1d(seed: int = 0) -> Conv1D:
    torch.manual_seed(seed)
    base = Conv1D(nf=10, nx=12)  # weight (in=12, out=10)
    nn.init.normal_(base.weight)
    nn.init.normal_(base.bias)
    return base


def _embedding(seed: int = 0) -> nn.Embedding:
    torch.manual_seed(seed)
    return nn.Embedding(20, 6)


def _reference(layer: LoraLayer, x: torch.Tensor) -> torch.Tensor:
    """The dense DoRA forward of a Linear / Conv1D / Embedding wrapper."""
    A, B = layer.lora_weights("default")
    m = layer.lora_magnitude_vector["default"].weight
    if isinstance(layer.base_layer, nn.Embedding):
        W = layer.base_layer.weight.T  # (dim, vocab): "out" is the embedding dimension
        return nn.functional.embedding(x, _dora_weight(W, SCALING * B @ A, m).T)
    W = layer.weight_out_in()
    return x @ _dora_weight(W, SCALING * B @ A, m).T + layer.base_layer.bias


LAYERS = [pytest.param(_linear, id="linear"), pytest.param(_conv1d, id="conv1d")]
ALL_LAYERS = [*LAYERS, pytest.param(_embedding, id="embedding")]


def _input(factory: Callable[[], nn.Module]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    if factory is _embedding:
        return torch.randint(0, 20, (3, 5), generator=gen)
    return torch.randn(3, 5, 12, generator=gen)


# -- pure maths ----------------------------------------------------------------------------------------------------
def test_pure_functions_match_the_dense_formula():
    gen = torch.Generator().manual_seed(0)
    W, delta, x = (
        torch.randn(10, 12, generator=gen),
        torch.randn(10, 12, generator=gen),
        torch.randn(4, 12, generator=gen),
    )
    m = torch.rand(10, generator=gen) + 0.5
    norm = dora.weight_norm(W, delta)
    torch.testing.assert_close(norm, torch.stack([(W[i] + delta[i]).norm() for i in range(10)]))
    merged = dora.merge_weight(W, delta, m, norm)
    torch.testing.assert_close(merged, _dora_weight(W, delta, m))
    torch.testing.assert_close(dora.unmerge_weight(merged, delta, m, norm), W, atol=1e-5, rtol=1e-5)
    added = dora.linear_output(x @ W.T, x @ delta.T, m, norm)
    torch.testing.assert_close(x @ W.T + added, x @ merged.T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dora.embedding_output(x @ W.T, x @ delta.T, m, norm), x @ merged.T, atol=1e-5, rtol=1e-5)


# -- wrappers against the dense reference --------------------------------------------------------------------------
@pytest.mark.parametrize("factory", ALL_LAYERS)
def test_forward_equals_dense_reference(factory):
    layer = _adapted(factory())
    x = _input(factory)
    expected = _reference(layer, x)
    assert (expected - layer.base_layer(x)).abs().max() > 1e-2, "the adapter must change the output"
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("factory", ALL_LAYERS)
def test_default_init_is_an_identity_with_magnitude_the_row_norms(factory):
    layer = _adapted(factory(), init=True)
    W = layer.weight_out_in()
    torch.testing.assert_close(layer.lora_magnitude_vector["default"].weight.detach(), W.norm(dim=1))
    x = _input(factory)
    torch.testing.assert_close(layer(x), layer.base_layer(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("factory", ALL_LAYERS)
def test_merge_unmerge_round_trip_and_merged_forward(factory):
    layer = _adapted(factory())
    x = _input(factory)
    original = layer.base_weight().detach().clone()
    expected = _reference(layer, x).detach()  # from the unmerged weights
    layer.merge()
    assert layer.merged and (layer.base_weight() - original).abs().max() > 1e-3
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)  # merged forward: base layer only
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.base_weight().detach(), original, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_merge_after_a_merged_plain_adapter_uses_the_unmerged_norm():
    """A DoRA adapter merged after a plain LoRA adapter: its norm is taken from W, not from W + the plain delta."""
    layer = _adapted(_linear())
    layer.update_layer("plain", 2, 4, 0.0, init_lora_weights=False)
    original = layer.base_weight().detach().clone()
    m = layer.lora_magnitude_vector["default"].weight.detach()
    A, B = layer.lora_weights("default")
    A2, B2 = layer.lora_weights("plain")
    layer.merge(["plain", "default"])
    delta, plain = SCALING * B @ A, 2 * B2 @ A2
    expected = (m / (original + delta).norm(dim=1))[:, None] * (original + plain + delta)
    torch.testing.assert_close(layer.base_weight().detach(), expected.detach(), atol=1e-5, rtol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.base_weight().detach(), original, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("factory", ALL_LAYERS)
def test_gradients_reach_magnitude_and_factors(factory):
    layer = _adapted(factory())
    x = _input(factory)
    layer(x).pow(2).sum().backward()
    params = layer.adapter_parameters("default")
    assert len(params) == 3 and params[2] is layer.lora_magnitude_vector["default"].weight
    for p in params:
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_norm_is_detached_in_the_backward():
    """With the norm detached, the gradient of A and B is that of m / n_const * (W + s*B@A) (paper sec. 4.3)."""
    layer = _adapted(_linear(bias=False))
    x = _input(_linear)
    layer(x).sum().backward()
    A, B = layer.lora_weights("default")
    m = layer.lora_magnitude_vector["default"].weight.detach()
    A_ref, B_ref = A.detach().clone().requires_grad_(True), B.detach().clone().requires_grad_(True)
    W = layer.weight_out_in()
    n = (W + SCALING * B_ref @ A_ref).norm(dim=1).detach()
    (x @ ((m / n)[:, None] * (W + SCALING * B_ref @ A_ref)).T).sum().backward()
    torch.testing.assert_close(A.grad, A_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(B.grad, B_ref.grad, atol=1e-5, rtol=1e-5)


def test_dropout_computes_the_base_term_on_the_dropped_input():
    layer = _adapted(_linear(), dropout=0.5).train()
    x = _input(_linear)
    torch.manual_seed(7)
    out = layer(x)
    torch.manual_seed(7)
    h = layer.lora_dropout["default"](x)  # the same mask
    A, B = layer.lora_weights("default")
    W, b = layer.base_layer.weight, layer.base_layer.bias
    m = layer.lora_magnitude_vector["default"].weight
    scale = m / (W + SCALING * B @ A).norm(dim=1)
    expected = x @ W.T + b + (scale - 1) * (h @ W.T) + scale * (h @ (SCALING * B @ A).T)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_quantized_base_forward_and_merge_and_unload():
    base = QuantLinear.from_linear(_linear(), bits=8)
    layer = _adapted(base)
    x = _input(_linear)
    torch.testing.assert_close(layer(x), _reference(layer, x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged_linear(layer)(x), layer(x), atol=1e-5, rtol=1e-5)


def test_delete_adapter_drops_the_magnitude():
    layer = _adapted(_linear())
    layer.delete_adapter("default")
    assert "default" not in layer.lora_magnitude_vector


def test_model_trains_the_magnitude_and_config_accepts_dora():
    model = lorakit.get_peft_model(tiny_llama(0), lorakit.LoraConfig(target_modules=["q_proj"], use_dora=True))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith("q_proj.lora_magnitude_vector.default.weight") for n in trainable)
    base = tiny_llama(0)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids()).logits, base(input_ids()).logits, atol=1e-5, rtol=1e-5)


# -- interop with HF PEFT ------------------------------------------------------------------------------------------
INTEROP = [
    pytest.param(tiny_llama, dict(target_modules=["q_proj", "v_proj"]), id="llama_linear"),
    pytest.param(tiny_gpt2, dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True), id="gpt2_conv1d"),
    pytest.param(tiny_llama, dict(target_modules=["embed_tokens", "q_proj"]), id="llama_embedding"),
]


def _trained(model: nn.Module) -> nn.Module:
    """Perturb every trainable tensor (A, B and the magnitudes) so that each saved tensor matters."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert any(p.ndim == 1 for p in trainable), "the magnitudes must train"
    perturb_(trainable, seed=1)
    return model


def _peft(factory: Callable[..., nn.Module], kwargs: dict) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = peft.LoraConfig(**kwargs, use_dora=True, init_lora_weights=False)
        return _trained(peft.get_peft_model(factory(0), config))


def _lorakit(factory: Callable[..., nn.Module], kwargs: dict) -> nn.Module:
    config = lorakit.LoraConfig(**kwargs, use_dora=True, init_lora_weights=False)
    return _trained(lorakit.get_peft_model(factory(0), config))


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids()).logits


def _keys(folder: Path) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in load_file(folder / "adapter_model.safetensors").items()}


@pytest.mark.parametrize("factory, kwargs", INTEROP)
def test_peft_dora_file_loads_in_lorakit(factory, kwargs, tmp_path):
    model = _peft(factory, kwargs)
    expected = _logits(model)
    with model.disable_adapter():
        assert (_logits(model) - expected).abs().max() > 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path, save_embedding_layers=False)
    assert any(k.endswith(".lora_magnitude_vector") for k in _keys(tmp_path))
    loaded = lorakit.PeftModel.from_pretrained(factory(0), tmp_path)
    torch.testing.assert_close(_logits(loaded), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("factory, kwargs", INTEROP)
def test_lorakit_dora_file_loads_in_peft(factory, kwargs, tmp_path):
    model = _lorakit(factory, kwargs)
    expected = _logits(model)
    with model.disable_adapter():
        assert (_logits(model) - expected).abs().max() > 1e-3
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(factory(0), tmp_path)
    torch.testing.assert_close(_logits(loaded), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("factory, kwargs", INTEROP)
def test_dora_file_keys_match_peft(factory, kwargs, tmp_path):
    _lorakit(factory, kwargs).save_pretrained(tmp_path / "lorakit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _peft(factory, kwargs).save_pretrained(tmp_path / "peft", save_embedding_layers=False)
    assert _keys(tmp_path / "lorakit") == _keys(tmp_path / "peft")


@pytest.mark.parametrize("factory, kwargs", INTEROP)
def test_model_keys_and_magnitude_layout_match_peft(factory, kwargs):
    """The magnitude is a module holding ``weight``, as PEFT's: the model's state-dict keys and shapes are PEFT's."""
    ours, theirs = _lorakit(factory, kwargs), _peft(factory, kwargs)
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    magnitudes = [k for k in shapes if ".lora_magnitude_vector.default.weight" in k]
    assert magnitudes and all(k.endswith(".lora_magnitude_vector.default.weight") for k in magnitudes)
    layer = next(m for m in ours.modules() if isinstance(m, LoraLayer))
    assert isinstance(layer.lora_magnitude_vector["default"].weight, nn.Parameter)


def test_magnitude_file_key_for_any_adapter_name(tmp_path):
    """The file key drops the adapter name and '.weight', even for an adapter named 'weight'; the file reloads."""
    for name in ("default", "weight"):
        config = lorakit.LoraConfig(target_modules=["q_proj"], use_dora=True, init_lora_weights=False)
        model = _trained(lorakit.get_peft_model(tiny_llama(0), config, adapter_name=name))
        model.save_pretrained(tmp_path / name)
        folder = tmp_path / name if name == "default" else tmp_path / name / name  # PEFT's subfolder per adapter
        keys = [k for k in _keys(folder) if "magnitude" in k]
        assert keys and all(k.endswith(".q_proj.lora_magnitude_vector") for k in keys)
        loaded = lorakit.PeftModel.from_pretrained(tiny_llama(0), folder, adapter_name=name)
        torch.testing.assert_close(_logits(loaded), _logits(model), atol=1e-6, rtol=0)


def test_dropout_training_forward_matches_peft():
    """In train mode with dropout, PEFT computes DoRA's base term on the dropped input; the same RNG gives the same
    masks in both libraries, so the logits agree."""
    kwargs = dict(target_modules=["q_proj", "v_proj"], lora_dropout=0.3)
    theirs = _peft(tiny_llama, kwargs).train()
    ours = _lorakit(tiny_llama, kwargs)
    ours.load_state_dict(theirs.state_dict())  # same keys: '<layer>.lora_magnitude_vector.<name>.weight'
    ours.train()
    torch.manual_seed(5)
    a = theirs(input_ids=input_ids()).logits
    torch.manual_seed(5)
    b = ours(input_ids=input_ids()).logits
    torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "olora", "gaussian"])
def test_magnitude_is_taken_after_the_initializer(init):
    """Initializers that move the base weight (PiSSA, OLoRA: W_res = W - s*B0@A0) still start as an identity."""
    base = _linear()
    x = _input(_linear)
    expected = base(x).detach()
    layer = _adapted(base, init=init)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_merge_and_unload_matches_peft():
    kwargs = dict(target_modules=["q_proj", "v_proj", "embed_tokens"])
    theirs = _peft(tiny_llama, kwargs)
    ours = _lorakit(tiny_llama, kwargs)
    ours.load_state_dict(theirs.state_dict())  # same keys: '<layer>.lora_magnitude_vector.<name>.weight'
    torch.testing.assert_close(_logits(ours), _logits(theirs), atol=1e-5, rtol=0)
    expected = _logits(theirs.merge_and_unload())
    torch.testing.assert_close(_logits(ours.merge_and_unload()), expected, atol=1e-5, rtol=0)


def test_combining_or_converting_dora_adapters_is_refused():
    from lorakit.adapters.convert import converted_config

    model = _lorakit(tiny_llama, dict(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="DoRA"):
        model.add_weighted_adapter(["default"], [1.0], "sum", combination_type="linear")
    with pytest.raises(ValueError, match="DoRA"):
        converted_config(lorakit.LoraConfig(target_modules=["q_proj"], use_dora=True, init_lora_weights="pissa"))
