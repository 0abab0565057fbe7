"""lorakit.branch: the lean LoRA branch equals the textbook composition (outputs and gradients), dropout included."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorakit import branch


def _inputs(dtype=torch.float32, shape=(3, 5), n_in=6, n_out=7, r=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, n_in, generator=g, dtype=dtype, requires_grad=True)
    W = torch.randn(n_out, n_in, generator=g, dtype=dtype, requires_grad=True)  # stands for the base layer
    A = torch.randn(r, n_in, generator=g, dtype=dtype, requires_grad=True)
    B = torch.randn(n_out, r, generator=g, dtype=dtype, requires_grad=True)
    return x, W, A, B


def _grads(out, tensors, seed=1):
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, tensors, upstream)


@pytest.mark.parametrize("mask_dtype", [None, torch.uint8, torch.bool, torch.float32])
def test_branch_equals_autograd_composition_values_and_gradients(mask_dtype):
    x, W, A, B = _inputs()
    keep_mask = torch.rand(x.shape, generator=torch.Generator().manual_seed(2)) < 0.7
    mask, keep = (keep_mask.to(mask_dtype), 1 / 0.7) if mask_dtype else (None, 1.0)
    fast = branch.LoraBranch.apply(x @ W.T, x, A, B, 0.5, mask, keep)
    ref = branch.reference_with_mask(x @ W.T, x, A, B, 0.5, mask, keep)
    torch.testing.assert_close(fast, ref, rtol=1e-6, atol=1e-6)
    for got, want in zip(_grads(fast, (x, W, A, B)), _grads(ref, (x, W, A, B)), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask_dtype", [torch.uint8, torch.float32])
def test_backward_leaves_saved_tensors_untouched(mask_dtype):
    """A second backward through the same graph gives the same gradients, and x and the mask are unchanged."""
    x, W, A, B = _inputs()
    mask = (torch.rand(x.shape, generator=torch.Generator().manual_seed(2)) < 0.7).to(mask_dtype)
    x_before, mask_before = x.detach().clone(), mask.clone()
    out = branch.LoraBranch.apply(x @ W.T, x, A, B, 0.5, mask, 1 / 0.7)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    first = torch.autograd.grad(out, (x, A, B), upstream, retain_graph=True)
    second = torch.autograd.grad(out, (x, A, B), upstream)
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.equal(x.detach(), x_before) and torch.equal(mask, mask_before)


@pytest.mark.parametrize("with_mask", [False, True])
def test_branch_gradcheck_float64(with_mask):
    x, W, A, B = _inputs(torch.float64, shape=(2, 3), n_in=4, n_out=3, r=2)
    base = (x @ W.T).detach().requires_grad_()
    mask = torch.tensor([[1, 0, 1, 1]] * 6, dtype=torch.uint8).view(2, 3, 4) if with_mask else None
    assert torch.autograd.gradcheck(
        lambda b, x_, a, b_: branch.LoraBranch.apply(b, x_, a, b_, 0.75, mask, 2.0), (base, x, A, B)
    )


def test_lora_add_without_dropout_equals_reference_in_every_mode():
    x, W, A, B = _inputs()
    ident = nn.Identity()
    want = branch.reference(x @ W.T, x, A, B, 2.0, ident)
    torch.testing.assert_close(branch.lora_add(x @ W.T, x, A, B, 2.0, ident), want, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(branch.lora_add(x @ W.T, x, A, B, 2.0, ident), want, rtol=1e-6, atol=1e-6)
    dropout_eval = nn.Dropout(0.3).eval()  # dropout in eval mode is the identity
    torch.testing.assert_close(branch.lora_add(x @ W.T, x, A, B, 2.0, dropout_eval), want, rtol=1e-6, atol=1e-6)


def test_lora_add_with_dropout_uses_the_drawn_mask():
    """Same RNG state: lora_add equals the masked reference with the mask dropout_mask draws."""
    x, W, A, B = _inputs(shape=(4, 9))
    torch.manual_seed(5)
    fast = branch.lora_add(x @ W.T, x, A, B, 0.5, nn.Dropout(0.25).train())
    torch.manual_seed(5)
    mask, keep = branch.dropout_mask(x.shape, 0.25, x.device)
    ref = branch.reference_with_mask(x @ W.T, x, A, B, 0.5, mask, keep)
    torch.testing.assert_close(fast, ref, rtol=1e-6, atol=1e-6)
    for got, want in zip(_grads(fast, (x, W, A, B)), _grads(ref, (x, W, A, B)), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not mask.all() and mask.any()


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_dropout_mask_keeps_one_minus_p_and_is_unbiased(p):
    torch.manual_seed(0)
    mask, keep = branch.dropout_mask((1000, 1000), p, torch.device("cpu"))
    assert mask.dtype == torch.uint8 and mask.shape == (1000, 1000) and set(mask.unique().tolist()) == {0, 1}
    rate = mask.float().mean().item()
    assert abs(rate - (1 - p)) < 5 * (p * (1 - p) / 1e6) ** 0.5 + 2**-16  # 5 sigma
    assert abs(rate * keep - 1) < 5 * (p / (1 - p) / 1e6) ** 0.5 + 1e-4  # E[mask * scale] = 1
    # independent columns and rows: no visible correlation between neighbours
    m = mask.float() - mask.float().mean()
    assert abs((m[:, 1:] * m[:, :-1]).mean().item()) < 5 * p * (1 - p) / 1e3
    assert abs((m[1:] * m[:-1]).mean().item()) < 5 * p * (1 - p) / 1e3


def test_dropout_mask_rejects_p_that_drops_everything():
    with pytest.raises(ValueError, match="drops every element"):
        branch.dropout_mask((3,), 0.99999999, torch.device("cpu"))


def test_branch_under_bf16_autocast_is_close_to_fp32_and_grads_are_fp32():
    x, W, A, B = _inputs(shape=(8, 16), n_in=32, n_out=24, r=8)
    dropout = nn.Identity()
    ref = branch.reference(x @ W.T, x, A, B, 0.5, dropout)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        base = x @ W.T
        fast = branch.lora_add(base, x, A, B, 0.5, dropout)
    assert fast.dtype == torch.bfloat16
    torch.testing.assert_close(fast.float(), ref, rtol=3e-2, atol=3e-1)
    grads = _grads(fast.float(), (x, A, B))
    want = _grads(ref, (x, A, B))
    for got, exp in zip(grads, want, strict=True):
        assert got.dtype == torch.float32
        assert (got - exp).norm() / exp.norm() < 2e-2


def test_lora_layer_training_step_matches_reference_layer():
    """A LoraLinear in train mode with dropout 0 gives the same output and gradients as the composition."""
    from lorakit.layers import LoraLinear

    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(6, 5))
    layer.update_layer("a", 3, 6.0, 0.0, "gaussian")
    layer.active_adapters = ["a"]
    nn.init.normal_(layer.lora_B["a"].weight)
    layer.train()
    x = torch.randn(2, 4, 6, requires_grad=True)
    out = layer(x)
    A, B = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    ref = branch.reference(layer.base_layer(x), x, A, B, layer.scaling["a"], nn.Identity())
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    for got, want in zip(_grads(out, (x, A, B)), _grads(ref, (x, A, B)), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
