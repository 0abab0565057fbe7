"""add_weighted_adapter maths against dense references."""

import pytest
import torch

from lorakit import combine
from lorakit.config import LoraConfig


def _factors(seed: int, r: int = 3, out: int = 6, inp: int = 5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, inp, generator=g), torch.randn(out, r, generator=g)


def test_cat_is_exact_weighted_sum_of_deltas():
    (A1, B1), (A2, B2) = _factors(0), _factors(1, r=2)
    A, B = combine.cat([A1, A2], [B1, B2], [0.5, -2.0])
    assert A.shape == (5, 5) and B.shape == (6, 5)
    torch.testing.assert_close(B @ A, 0.5 * B1 @ A1 - 2.0 * B2 @ A2)


def test_linear_combines_factors_with_signed_square_roots():
    (A1, B1), (A2, B2) = _factors(0), _factors(1)
    A, B = combine.linear([A1, A2], [B1, B2], [4.0, -1.0])
    torch.testing.assert_close(A, 2 * A1 - A2)
    torch.testing.assert_close(B, 2 * B1 + B2)


def test_linear_of_one_adapter_reproduces_its_delta():
    A1, B1 = _factors(0)
    A, B = combine.linear([A1], [B1], [0.7])
    torch.testing.assert_close(B @ A, 0.7 * B1 @ A1)


def test_svd_full_rank_is_exact_and_truncation_is_optimal():
    (A1, B1), (A2, B2) = _factors(0), _factors(1)
    target = 0.5 * B1 @ A1 + 1.5 * B2 @ A2  # rank <= 6 = min(out, in)... (6, 5): rank <= 5
    A, B = combine.svd([B1 @ A1, B2 @ A2], [0.5, 1.5], rank=5)
    torch.testing.assert_close(B @ A, target, atol=1e-5, rtol=1e-5)
    A2r, B2r = combine.svd([B1 @ A1, B2 @ A2], [0.5, 1.5], rank=2)
    S = torch.linalg.svdvals(target)
    err = torch.linalg.norm(target - B2r @ A2r)
    torch.testing.assert_close(err, torch.sqrt((S[2:] ** 2).sum()), atol=1e-4, rtol=1e-4)  # Eckart-Young


def test_svd_clamp_bounds_factors_by_quantile():
    (A1, B1) = _factors(0)
    A, B = combine.svd([B1 @ A1], [1.0], rank=3, clamp=0.9)
    A0, B0 = combine.svd([B1 @ A1], [1.0], rank=3)
    hi = torch.quantile(torch.cat([B0.flatten(), A0.flatten()]), 0.9)
    assert A.abs().max() <= hi + 1e-6 and B.abs().max() <= hi + 1e-6


def test_plan_ranks_and_errors():
    c4, c2 = LoraConfig(r=4), LoraConfig(r=2)
    assert combine.plan("cat", [c4, c2], None) == ("cat", 6)
    assert combine.plan("svd", [c4, c2], None) == ("svd", 4)
    assert combine.plan("svd", [c4, c2], 3) == ("svd", 3)
    assert combine.plan("cat", [c4], None) == ("linear", 4)
    with pytest.raises(ValueError, match="equal rank"):
        combine.plan("linear", [c4, c2], None)
    with pytest.raises(ValueError, match="combination_type='mean'"):
        combine.plan("mean", [c4], None)


def test_combined_config_has_scaling_one_and_union_of_targets():
    a = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj"], rank_pattern={"q_proj": 4})
    b = LoraConfig(r=4, target_modules=["v_proj"])
    c = combine.combined_config([a, b], 8, ["x.q_proj", "x.v_proj"])
    assert c.target_modules == ["q_proj", "v_proj"] and c.lora_alpha / c.r == 1 and c.rank_pattern == {}
    rs = combine.combined_config([LoraConfig(r=4, use_rslora=True, target_modules="all-linear")], 9, ["m.a"])
    assert rs.lora_alpha / 9**0.5 == pytest.approx(1.0) and rs.target_modules == ["m.a"]
