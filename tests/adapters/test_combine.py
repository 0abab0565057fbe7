"""add_weighted_adapter maths against dense references, and lorakit.ops.merge_math (TIES / DARE / magnitude pruning)
against hand-computed values, hypothesis invariants and DARE statistics."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lorakit
from lorakit.adapters import combine
from lorakit.config import LoraConfig
from lorakit.ops import merge_math


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


# -- plan: the pruning types ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("combination_type", combine.PRUNING + tuple(f"{m}_svd" for m in combine.PRUNING))
def test_plan_requires_a_density_in_0_1(combination_type):
    c4 = LoraConfig(r=4)
    with pytest.raises(ValueError, match=f"combination_type='{combination_type}' needs density="):
        combine.plan(combination_type, [c4, c4], None)
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match=rf"density={bad} must be in \(0, 1\]"):
            combine.plan(combination_type, [c4, c4], None, density=bad)
    assert combine.plan(combination_type, [c4, c4], None, density=1.0) == (combination_type, 4)


def test_plan_pruning_types_ranks_and_sign_method():
    c4, c2 = LoraConfig(r=4), LoraConfig(r=2)
    with pytest.raises(ValueError, match="equal rank.*use 'cat' or 'ties_svd'"):
        combine.plan("ties", [c4, c2], None, density=0.5)
    assert combine.plan("dare_ties_svd", [c4, c2], None, density=0.5) == ("dare_ties_svd", 4)
    assert combine.plan("magnitude_prune_svd", [c4, c2], 3, density=0.5) == ("magnitude_prune_svd", 3)
    assert combine.plan("ties", [c4], None, density=0.5) == ("linear", 4)  # one adapter: linear, as PEFT
    with pytest.raises(ValueError, match="majority_sign_method='mean' is unknown; use one of: total, frequency"):
        combine.plan("ties", [c4, c4], None, density=0.5, majority_sign_method="mean")
    with pytest.raises(ValueError, match="majority_sign_method='Total'"):
        combine.plan("svd", [c4, c4], None, majority_sign_method="Total")


# -- factor-wise and dense merges -----------------------------------------------------------------------------------
def test_factorwise_merges_A_with_signed_and_B_with_plain_square_roots():
    (A1, B1), (A2, B2) = _factors(0), _factors(1)
    seen = []

    def spy(tensors, weights):
        seen.append(list(weights))
        return merge_math.task_arithmetic(tensors, weights)

    A, B = combine.factorwise(spy, [A1, A2], [B1, B2], [4.0, -9.0])
    assert seen == [[2.0, -3.0], [2.0, 3.0]]
    torch.testing.assert_close(A, 2 * A1 - 3 * A2)
    torch.testing.assert_close(B, 2 * B1 + 3 * B2)


def test_factorwise_ties_applies_ties_to_each_factor():
    (A1, B1), (A2, B2) = _factors(0), _factors(1)
    merge = combine.task_merge("ties", density=0.5, majority_sign_method="frequency")
    A, B = combine.factorwise(merge, [A1, A2], [B1, B2], [0.25, -4.0])
    torch.testing.assert_close(A, merge_math.ties([A1, A2], [0.5, -2.0], 0.5, "frequency"))
    torch.testing.assert_close(B, merge_math.ties([B1, B2], [0.5, 2.0], 0.5, "frequency"))


def test_task_merge_svd_types_use_the_merge_of_their_prefix():
    deltas = [B @ A for A, B in (_factors(0), _factors(1))]
    for combination_type, expected in [
        ("svd", merge_math.task_arithmetic(deltas, [0.5, 2.0])),
        ("ties_svd", merge_math.ties(deltas, [0.5, 2.0], 0.3, "total")),
        ("magnitude_prune_svd", merge_math.magnitude_prune(deltas, [0.5, 2.0], 0.3)),
    ]:
        got = combine.task_merge(combination_type, density=0.3)(deltas, [0.5, 2.0])
        torch.testing.assert_close(got, expected)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    got = combine.task_merge("dare_ties_svd", 0.3, "frequency", generator=g1)(deltas, [0.5, 2.0])
    torch.testing.assert_close(got, merge_math.dare_ties(deltas, [0.5, 2.0], 0.3, "frequency", g2))
    with pytest.raises(ValueError, match="needs density="):
        combine.task_merge("dare_linear")


class _Layer:
    """The two attributes of a LoRA layer that combine_layer reads."""

    def __init__(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], scaling: dict[str, float]) -> None:
        self.factors, self.scaling = factors, scaling

    def lora_weights(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.factors[name]


def test_combine_layer_ties_svd_factorizes_the_ties_merge_of_scaled_deltas():
    layer = _Layer({"a": _factors(0), "b": _factors(1)}, {"a": 2.0, "b": 0.5})
    A, B = combine.combine_layer(layer, [("a", 0.7), ("b", -1.2)], "ties_svd", rank=5, svd_clamp=None, density=0.4)
    deltas = [2.0 * _factors(0)[1] @ _factors(0)[0], 0.5 * _factors(1)[1] @ _factors(1)[0]]
    torch.testing.assert_close(B @ A, merge_math.ties(deltas, [0.7, -1.2], 0.4), atol=1e-5, rtol=1e-5)  # rank 5 = full


def test_combine_layer_dare_is_reproducible_with_a_generator():
    layer = _Layer({"a": _factors(0), "b": _factors(1)}, {"a": 2.0, "b": 0.5})

    def run(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return combine.combine_layer(layer, [("a", 0.7), ("b", 0.3)], "dare_ties", 3, None, density=0.5, generator=g)

    (A0, B0), (A1, B1), (A2, _) = run(0), run(0), run(1)
    assert torch.equal(A0, A1) and torch.equal(B0, B1) and not torch.equal(A0, A2)
    full = combine.combine_layer(layer, [("a", 0.7), ("b", 0.3)], "dare_ties", 3, None, density=1.0)
    torch.testing.assert_close(
        full, combine.combine_layer(layer, [("a", 0.7), ("b", 0.3)], "ties", 3, None, density=1.0)
    )


# -- merge_math: hand-computed references ---------------------------------------------------------------------------
def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_prune_keeps_the_top_k_magnitudes():
    torch.testing.assert_close(merge_math.prune(_t(0.5, -3, 1, 2, -0.1, 4), 0.5), _t(0, -3, 0, 2, 0, 4))
    torch.testing.assert_close(merge_math.prune(_t(0.5, -3, 1, 2, -0.1, 4), 0.34), _t(0, -3, 0, 0, 0, 4))  # k = 2
    torch.testing.assert_close(
        merge_math.prune(torch.tensor([[1.0, -5], [3, 0.5]]), 0.5), torch.tensor([[0.0, -5], [3, 0]])
    )
    assert merge_math.magnitude_prune_mask(_t(1, -2, 3), 0.2).sum() == 0  # int(0.6) = 0: all pruned, as PEFT
    for bad in (0.0, 1.01):
        with pytest.raises(ValueError, match=rf"density={bad} must be in \(0, 1\]"):
            merge_math.prune(_t(1, 2), bad)
        with pytest.raises(ValueError, match=rf"density={bad} must be in \(0, 1\]"):
            merge_math.random_prune(_t(1, 2), bad)


def test_elect_sign_total_and_frequency_differ():
    tensors = torch.tensor([[1.0, -2, 3], [-4, 1, -1], [1, 1, -1]])
    # total: column sums -2, 0, 1; frequency: sign sums 1, 1, -1; a tie (0) elects +1
    torch.testing.assert_close(merge_math.elect_sign(tensors, "total"), _t(-1, 1, 1))
    torch.testing.assert_close(merge_math.elect_sign(tensors, "frequency"), _t(1, 1, -1))
    with pytest.raises(ValueError, match="majority_sign_method='sum'"):
        merge_math.elect_sign(tensors, "sum")


def test_disjoint_merge_is_the_mean_over_kept_values():
    tensors = torch.tensor([[1.0, -2, 3, 5], [-4, 1, -1, 7], [1, 1, -1, 0]])
    keep = tensors.sign() == _t(-1, 1, 1, -1)
    torch.testing.assert_close(merge_math.disjoint_merge(tensors, keep), _t(-4, 1, 3, 0))  # none kept -> 0
    keep = tensors.sign() == _t(1, 1, -1, 1)
    torch.testing.assert_close(merge_math.disjoint_merge(tensors, keep), _t(1, 1, -1, 6))


# t1 pruned at density 0.5 -> (2, 0, 0, -3); t2 -> (-5, 0, 4, 0); weights (1, 0.5)
T1, T2, W = _t(2, -1, 0.5, -3), _t(-5, -2, 4, 1), [1.0, 0.5]


def test_magnitude_prune_is_the_weighted_sum_of_pruned_tensors():
    torch.testing.assert_close(merge_math.magnitude_prune([T1, T2], W, 0.5), _t(2 - 2.5, 0, 2, -3))


def test_ties_with_both_sign_methods():
    # total: sums of the unweighted pruned tensors (-3, 0, 4, -3) elect (-, +, +, -): column 0 keeps only -2.5
    torch.testing.assert_close(merge_math.ties([T1, T2], W, 0.5, "total"), _t(-2.5, 0, 2, -3))
    # frequency: signs (+1 - 1, 0, +1, -1) elect (+, +, +, -): column 0 keeps only 2
    torch.testing.assert_close(merge_math.ties([T1, T2], W, 0.5, "frequency"), _t(2, 0, 2, -3))
    # nothing pruned: sums (-3, -3, 4.5, -2) elect (-, -, +, -); weighted T2 is (-2.5, -1, 2, 0.5); columns 1 and 2
    # average both tasks: (-1 - 1) / 2 and (0.5 + 2) / 2
    torch.testing.assert_close(merge_math.ties([T1, T2], W, 1.0, "total"), _t(-2.5, -1, 1.25, -3))


def test_task_arithmetic_and_weight_count_check():
    torch.testing.assert_close(merge_math.task_arithmetic([T1, T2], [2.0, -1.0]), 2 * T1 - T2)
    with pytest.raises(ValueError, match="got 2 task tensors but weights of shape \\(3,\\)"):
        merge_math.task_arithmetic([T1, T2], [1.0, 1.0, 1.0])


# -- merge_math: DARE ------------------------------------------------------------------------------------------------
def test_random_prune_keeps_a_density_fraction_rescaled():
    t = torch.ones(200, 200)
    out = merge_math.random_prune(t, 0.3, torch.Generator().manual_seed(0))
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.012  # 5 sigma for 40,000 Bernoulli(0.3)
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / 0.3))
    assert abs(out.mean().item() - 1.0) < 0.04  # expected value preserved


def test_random_prune_expected_value_per_entry():
    t = _t(1.5, -2, 0.25, 3)
    draws = merge_math.random_prune(t.expand(20000, 4).clone(), 0.4, torch.Generator().manual_seed(1))
    torch.testing.assert_close(draws.mean(dim=0), t, atol=0.05 * 3, rtol=0.05)  # std of the mean ~ 0.009 |t|
    assert torch.equal(merge_math.random_prune(t, 1.0), t)


def test_dare_is_deterministic_with_a_seeded_generator():
    ts = [torch.randn(8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]

    def run(fn, seed):
        return fn(ts, [0.5, 1.0, -0.3], 0.5, generator=torch.Generator().manual_seed(seed))

    for fn in (merge_math.dare_linear, merge_math.dare_ties):
        assert torch.equal(run(fn, 3), run(fn, 3)) and not torch.equal(run(fn, 3), run(fn, 4))
    # dare_ties = TIES' sign election and disjoint mean over the same random draws dare_linear makes
    g = torch.Generator().manual_seed(3)
    pruned = [merge_math.random_prune(t, 0.5, g) for t in ts]
    torch.testing.assert_close(run(merge_math.dare_ties, 3), merge_math.ties(pruned, [0.5, 1.0, -0.3], 1.0))
    torch.testing.assert_close(run(merge_math.dare_linear, 3), merge_math.task_arithmetic(pruned, [0.5, 1.0, -0.3]))


def test_dare_linear_expected_value_is_task_arithmetic():
    ts = [torch.randn(4, 5, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    g = torch.Generator().manual_seed(0)
    mean = torch.stack([merge_math.dare_linear(ts, [0.6, -1.1], 0.5, g) for _ in range(4000)]).mean(dim=0)
    expected = merge_math.task_arithmetic(ts, [0.6, -1.1])
    assert (mean - expected).abs().max() < 0.15  # std of one mean <= ~0.03 for these magnitudes


# -- merge_math: invariants ------------------------------------------------------------------------------------------
_values = st.lists(st.floats(-100, 100, allow_nan=False, width=32), min_size=1, max_size=24)
_density = st.floats(0.01, 1.0)


@settings(max_examples=60, deadline=None)
@given(_values, _density)
def test_prune_keeps_exactly_k_largest(values, density):
    t = torch.tensor(values)
    mask = merge_math.magnitude_prune_mask(t, density)
    assert int(mask.sum()) == int(density * t.numel())
    if mask.any() and not mask.all():
        assert t.abs()[mask].min() >= t.abs()[~mask].max()
    assert torch.equal(merge_math.prune(t, 1.0), t)


@settings(max_examples=60, deadline=None)
@given(_values, st.floats(-10, 10, allow_nan=False), st.sampled_from(merge_math.MAJORITY_SIGN_METHODS))
def test_ties_of_one_task_with_density_1_is_weight_times_task(values, weight, method):
    t = torch.tensor(values)
    torch.testing.assert_close(merge_math.ties([t], [weight], 1.0, method), weight * t)
    torch.testing.assert_close(merge_math.magnitude_prune([t], [weight], 1.0), weight * t)
    torch.testing.assert_close(merge_math.dare_linear([t], [weight], 1.0), weight * t)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 4),
    st.integers(1, 6),
    _density,
    st.sampled_from(merge_math.MAJORITY_SIGN_METHODS),
    st.integers(0, 2**16),
)
def test_ties_output_follows_the_elected_sign_and_stays_in_range(n, size, density, method, seed):
    g = torch.Generator().manual_seed(seed)
    ts = [torch.randn(size, generator=g) for _ in range(n)]
    weights = (torch.rand(n, generator=g) + 0.1).tolist()  # positive weights keep the elected sign
    out = merge_math.ties(ts, weights, density, method)
    stacked = torch.stack([merge_math.prune(t, density) for t in ts])
    elected = merge_math.elect_sign(stacked, method)
    nonzero = out != 0
    assert torch.equal(out.sign()[nonzero], elected[nonzero])
    weighted = stacked * torch.tensor(weights)[:, None]
    assert (out.abs() <= weighted.abs().max(dim=0).values + 1e-6).all()  # a mean of kept values


def test_a_combination_keeps_its_one_sources_trained_modules_to_save_copy_and_refuses_two() -> None:
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    model = lorakit.get_peft_model(base, lorakit.LoraConfig(target_modules=["0"]), "plain")
    model.add_adapter("saves", lorakit.LoraConfig(target_modules=["0"], modules_to_save=["1"]))
    head = model.base_model.model[1]
    with torch.no_grad():
        head.modules_to_save["saves"].weight.add_(1.0)  # "trained"
    model.add_weighted_adapter(["plain", "saves"], [1.0, 1.0], "merged", combination_type="cat")
    torch.testing.assert_close(head.modules_to_save["merged"].weight, head.modules_to_save["saves"].weight)
    assert model.peft_config["merged"].modules_to_save == ["1"]
    model.add_adapter("saves_too", lorakit.LoraConfig(target_modules=["0"], modules_to_save=["1"]))
    with pytest.raises(ValueError, match="target the same module with modules_to_save"):
        model.add_weighted_adapter(["saves", "saves_too"], [1.0, 1.0], "both")
    assert "both" not in model.peft_config
