"""LoRA-GA's maths (lorakit.ops.lora_ga, the 'lora_ga' initializer in lorakit.ops.init) against a dense reference:
A and B are the chosen singular vectors of torch.linalg.svd(G) (up to sign), B carrying its singular values and the
scale, and residual + s * B @ A is the weight; every direction and scale, the randomized SVD, 16-bit weights."""

from __future__ import annotations

import math

import pytest
import torch

from lorakit.ops import lora_ga as ops
from lorakit.ops.init import INITIALIZERS, embedding_default, get_initializer, mutates_base

OUT, IN, R, S = 12, 10, 3, 2.0  # 2r = 6 <= 10; q = min(4r, 10) = 10: the randomized SVD is exact here

# (A's rows, B's columns) among the top 2r = 6 singular triplets, written out
INDICES = {"ArB2r": ([0, 1, 2], [3, 4, 5]), "A2rBr": ([3, 4, 5], [0, 1, 2]), "ArBr": ([1, 3, 5], [0, 2, 4])}


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(OUT, IN, generator=g), torch.randn(OUT, IN, generator=g)  # weight W, gradient G


def _same_up_to_sign(x: torch.Tensor, ref: torch.Tensor, dim: int) -> bool:
    """x equals ref with each row (dim=1: a row is a vector) or column (dim=0) possibly negated."""
    sign = torch.sign((x * ref).sum(dim=dim, keepdim=True))
    return torch.allclose(x, ref * sign, atol=1e-5)


def _reference(G: torch.Tensor, W: torch.Tensor, rows: list[int], cols: list[int], scale: str, gamma: float = 16):
    """A, B from the dense SVD of G, scaled as the paper / PEFT say."""
    U, Sv, Vh = torch.linalg.svd(G, full_matrices=False)
    A, B = Vh[rows], U[:, cols] * Sv[cols]
    if scale == "stable":
        B = B * OUT**0.25 / math.sqrt(gamma)
    elif scale == "weight_svd":
        B = B * torch.linalg.matrix_norm(W, ord=2) / Sv[cols[0]]
    elif scale == "gd_scale":
        A, B = A / S, B / S
    return A, B


@pytest.mark.parametrize("scale", ops.SCALES)
@pytest.mark.parametrize("direction", ops.DIRECTIONS)
def test_factors_are_the_chosen_singular_vectors_of_the_gradient_and_the_residual_completes_the_weight(
    direction, scale
):
    W, G = _data()
    torch.manual_seed(7)
    A, B, residual = ops.lora_ga_init(G, W, R, S, direction, scale, niter=None)
    if direction == "random":  # r of the 2r indices, drawn from the global RNG (the only draw with niter=None)
        torch.manual_seed(7)
        chosen = torch.randperm(2 * R)[:R].tolist()
        rows, cols = chosen, chosen
    else:
        rows, cols = INDICES[direction]
    A_ref, B_ref = _reference(G, W, rows, cols, scale)
    assert A.shape == (R, IN) and B.shape == (OUT, R)
    assert _same_up_to_sign(A, A_ref, dim=1)
    assert _same_up_to_sign(B, B_ref, dim=0)
    assert residual.dtype == W.dtype
    assert torch.allclose(residual + S * B @ A, W, atol=1e-5)
    assert not torch.allclose(residual, W, atol=1e-3)  # part of W moved into the adapter


def test_randomized_svd_gives_the_exact_factors_and_signs_fixed_whatever_the_draw():
    W, G = _data(1)
    exact = ops.lora_ga_init(G, W, R, S, niter=None)
    for seed in (0, 1, 2):  # q = min(4r, min(out, in)) = min(out, in): the randomized SVD is exact, its signs random
        torch.manual_seed(seed)
        drawn = ops.lora_ga_init(G, W, R, S)
        for a, b in zip(drawn, exact):
            assert torch.allclose(a, b, atol=1e-5)
    big_W = torch.randn(64, 48)
    U, _ = torch.linalg.qr(torch.randn(64, 48))
    V, _ = torch.linalg.qr(torch.randn(48, 48))
    big_G = U @ torch.diag(0.5 ** torch.arange(48.0)) @ V.T  # a decaying spectrum, q = 4r = 8 < 48
    approx, dense = ops.lora_ga_init(big_G, big_W, 2, S), ops.lora_ga_init(big_G, big_W, 2, S, niter=None)
    for a, b in zip(approx, dense):
        assert torch.allclose(a, b, atol=1e-4)


def test_top_svd_fixes_each_pairs_sign_and_keeps_the_product():
    _, G = _data(2)
    U, Sv, Vh = ops.top_svd(G, 4, niter=None)
    largest = U.abs().argmax(dim=0)
    assert torch.all(U[largest, torch.arange(4)] > 0)
    U0, S0, Vh0 = torch.linalg.svd(G, full_matrices=False)
    assert torch.allclose(U * Sv @ Vh, U0[:, :4] * S0[:4] @ Vh0[:4], atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_16_bit_weight_gets_factors_it_can_hold_and_a_residual_from_them(dtype):
    W, G = _data(3)
    W16 = W.to(dtype)
    A, B, residual = ops.lora_ga_init(G.to(dtype), W16, R, S)
    assert A.dtype == B.dtype == torch.float32 and residual.dtype == dtype
    assert torch.equal(A.to(dtype).float(), A) and torch.equal(B.to(dtype).float(), B)  # values of the weight's dtype
    exact = W16.float() - S * (B @ A)  # the residual before its one rounding
    assert torch.equal(residual, exact.to(dtype))
    assert torch.allclose(residual.float() + S * (B @ A), W16.float(), atol=5e-2)  # one 16-bit rounding


def test_a_zero_gradient_gives_a_zero_b_and_leaves_the_weight():
    W, _ = _data()
    A, B, residual = ops.lora_ga_init(torch.zeros(OUT, IN), W, R, S, scale="weight_svd")
    assert torch.all(B == 0) and torch.isfinite(A).all()
    assert torch.equal(residual, W)


def test_bad_inputs_say_what_to_do():
    W, G = _data()
    with pytest.raises(ValueError, match=r"2r <= min\(out, in\) = 10"):
        ops.lora_ga_init(G, W, 6, S)
    with pytest.raises(ValueError, match="does not fit a weight"):
        ops.lora_ga_init(G.T, W, R, S)
    with pytest.raises(ValueError, match="inf / NaN"):
        ops.lora_ga_init(torch.full_like(G, float("nan")), W, R, S)
    with pytest.raises(ValueError, match="direction='sideways' is unknown"):
        ops.lora_ga_init(G, W, R, S, direction="sideways")
    with pytest.raises(ValueError, match="scale='huge' is unknown"):
        ops.lora_ga_init(G, W, R, S, scale="huge")
    with pytest.raises(TypeError, match="floating-point"):
        ops.lora_ga_init(G, W.to(torch.int8), R, S)


def test_the_initializer_table_entry():
    W, G = _data()
    init = INITIALIZERS["lora_ga"]
    assert get_initializer("lora_ga") is init and get_initializer("LoRA_GA") is init
    assert get_initializer("lora_ga", embedding=True) is embedding_default  # an embedding target: PEFT's default
    assert mutates_base("lora_ga")
    torch.manual_seed(0)
    A, B, residual = init(W, R, S, grad=G, direction="A2rBr", scale="unit")
    torch.manual_seed(0)
    assert all(torch.equal(x, y) for x, y in zip((A, B, residual), ops.lora_ga_init(G, W, R, S, "A2rBr", "unit")))
    A, B, residual = init(W, R, S)  # no gradient (a saved adapter being loaded): 'kaiming', the base unchanged
    assert residual is None and torch.all(B == 0) and A.abs().sum() > 0
