"""LoftQ (lorakit.ops.loftq): the low-rank fit against the dense SVD, the error it removes, and the documented flow
get_peft_model(init_lora_weights="loftq") -> lorakit.quantize(base) -> save -> load onto a freshly quantized base."""

import pytest
import torch
from helpers import input_ids, tiny_llama
from torch import nn

from lorakit import LoraConfig, PeftModel, get_peft_model, quantize
from lorakit.adapters.layer import _accepted
from lorakit.adapters.linear import LoraLinear
from lorakit.ops.init import INITIALIZERS, gaussian, loftq, loftq_error, low_rank_fit
from lorakit.quant.formats import dequantize, quantize_weight
from lorakit.quant.linear import QuantLinear


def _weight(shape: tuple[int, int] = (256, 192), seed: int = 0) -> torch.Tensor:
    """Heavy-tailed like LLM weights."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen) / torch.rand(shape, generator=gen).clamp(0.05).sqrt() * 0.02


def test_low_rank_fit_is_the_truncated_svd():
    R = _weight((30, 20))
    A, B = low_rank_fit(R, 5, scaling=2.0)
    assert A.shape == (5, 20) and B.shape == (30, 5)
    U, S, Vh = torch.linalg.svd(R.double(), full_matrices=False)
    best = (U[:, :5] * S[:5]) @ Vh[:5]
    torch.testing.assert_close((2.0 * B @ A).double(), best, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(A.norm(dim=1), B.norm(dim=0), atol=1e-5, rtol=1e-4)  # sqrt(S / s) on each side
    A, B = low_rank_fit(R, 25, scaling=1.0)  # r > min(out, in) = 20: the extra directions are zero
    assert A.shape == (25, 20) and not A[20:].any() and not B[:, 20:].any()


@pytest.mark.parametrize("bits", [4, 8])
def test_loftq_lowers_the_error_of_the_quantized_base_and_more_iterations_do_not_hurt(bits):
    W, r, s = _weight(), 16, 2.0
    plain = torch.linalg.matrix_norm(W - dequantize(quantize_weight(W, bits))).item()
    errors = [loftq_error(W, loftq(W, r, s, loftq_bits=bits, loftq_iter=t), s) for t in (1, 2, 3, 5)]
    ratios = [round(e / plain, 4) for e in errors]
    print(f"\n{bits}-bit: ||W - Q||_F = {plain:.4f}; ||W - (Q + sBA)||_F / ||W - Q||_F, 1/2/3/5 iterations: {ratios}")
    assert errors[0] < 0.9 * plain
    assert all(later <= earlier * (1 + 1e-6) for earlier, later in zip(errors, errors[1:]))
    assert errors[-1] < errors[0]


def test_one_iteration_keeps_quantize_w_as_the_base():
    W = _weight((64, 48))
    init = loftq(W, 4, 1.0, loftq_bits=4, loftq_iter=1)
    assert torch.equal(init.residual, dequantize(quantize_weight(W, 4)))
    assert init.A.shape == (4, 48) and init.B.shape == (64, 4) and init.B.any()


def test_loftq_is_registered_and_takes_its_options_from_loftq_config():
    assert INITIALIZERS["loftq"] is loftq
    assert _accepted(loftq, {"loftq_bits": 8, "loftq_iter": 2, "other": 1}) == {"loftq_bits": 8, "loftq_iter": 2}
    assert _accepted(gaussian, {"loftq_bits": 8}) == {}  # the (weight, r, scaling) initializers get nothing
    W = tiny_llama(0).model.layers[0].self_attn.q_proj.weight.detach().clone()
    config = LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="loftq", loftq_config={"loftq_bits": 8})
    peft = get_peft_model(tiny_llama(0), config)
    base = peft.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    assert torch.equal(base, dequantize(quantize_weight(W, 8)))  # int8, as loftq_config asked
    with pytest.raises(ValueError, match="loftq_bits=3"):
        get_peft_model(tiny_llama(0), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="loftq",
                                                 loftq_config={"loftq_bits": 3}))  # fmt: skip


def test_loftq_then_quantize_is_lossless_and_closer_to_the_full_precision_model(tmp_path):
    original = tiny_llama(0)
    weights = {n: m.weight.detach().clone() for n, m in original.named_modules() if isinstance(m, nn.Linear)}
    torch.manual_seed(1)
    config = LoraConfig(
        r=8, lora_alpha=8, target_modules="all-linear", init_lora_weights="loftq", loftq_config={"loftq_bits": 4}
    )
    peft = get_peft_model(tiny_llama(0), config)
    with torch.no_grad():
        before = peft(input_ids()).logits
    quantize(peft.get_base_model(), embeddings="keep")  # the Linear layers only, as LoftQ fitted
    layers = {n: m for n, m in peft.get_base_model().named_modules() if isinstance(m, LoraLinear)}
    assert len(layers) == 14 and all(isinstance(m.base_layer, QuantLinear) for m in layers.values())
    for name, layer in layers.items():  # loftq_iter=1: the base is exactly quantize(W)
        assert torch.equal(layer.base_layer.packed, quantize_weight(weights[name]).packed)
    with torch.no_grad():
        after = peft(input_ids()).logits
        full = original(input_ids()).logits
        plain = quantize(tiny_llama(0), embeddings="keep")(input_ids()).logits
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-6)  # quantizing LoftQ's base lost nothing
    gain = (plain - full).norm() / (after - full).norm()
    print(f"\nlogit error vs fp32: plain NF4 {(plain - full).norm():.4f}, NF4 + LoftQ {(after - full).norm():.4f}")
    assert gain > 1.1  # measured 1.41

    peft.save_pretrained(tmp_path)  # loftq_iter=1: the adapter loads onto a freshly quantized base
    loaded = PeftModel.from_pretrained(quantize(tiny_llama(0), embeddings="keep"), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids()).logits, after, atol=1e-6, rtol=1e-6)


def test_loftq_on_an_already_quantized_base_warns_and_starts_as_the_default():
    config = LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="loftq")
    with pytest.warns(UserWarning, match="already quantized"):
        peft = get_peft_model(quantize(tiny_llama(0)), config)
    layer = peft.get_base_model().model.layers[0].self_attn.q_proj
    A, B = layer.lora_weights("default")
    assert A.any() and not B.any()  # a live adapter (A != 0), identity at start (B = 0)
