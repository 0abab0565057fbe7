"""EVA's maths (lorakit.ops.eva) against dense references: the incremental PCA over batches equals the PCA of all
inputs stacked (all components kept, or inputs of low rank), and the rank budget takes the largest ratios overall."""

from __future__ import annotations

import pytest
import torch

from lorakit.ops import eva

IN = 8


def _pca(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense reference in fp64: (components (in, in), singular values) of all inputs, centered by their mean."""
    centered = x.double() - x.double().mean(dim=0)
    _, S, Vh = torch.linalg.svd(centered, full_matrices=False)
    return Vh, S


def _run(batches: list[torch.Tensor], k: int) -> eva.SvdState:
    state = None
    for b in batches:
        state = eva.svd_step(state, b, k)
    return state


def _same_rows_up_to_sign(a: torch.Tensor, b: torch.Tensor, atol: float) -> bool:
    return bool(((a.double() * b.double()).sum(dim=1).abs() - 1).abs().max() < atol)


def test_incremental_pca_keeping_all_components_is_the_pca_of_all_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(90, IN, generator=g) @ torch.randn(IN, IN, generator=g) + 3.0  # correlated, off-center
    state = _run([x[:20], x[20:25], x[25:60], x[60:]], k=IN)
    Vh, S = _pca(x)
    assert torch.allclose(state.singular_values.double(), S, rtol=1e-4, atol=1e-4)
    assert _same_rows_up_to_sign(state.components[:5], Vh[:5], 1e-4)
    assert torch.allclose(state.mean.double(), x.double().mean(dim=0), atol=1e-5) and state.n == 90
    total = ((x.double() - x.double().mean(dim=0)) ** 2).sum()
    assert torch.allclose(eva.explained_variance_ratio(state).double(), S**2 / total, atol=1e-5)
    assert torch.allclose(eva.explained_variance_ratio(state).sum(), torch.tensor(1.0), atol=1e-5)


def test_incremental_pca_of_low_rank_inputs_with_k_components_is_exact():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(120, 3, generator=g) @ torch.randn(3, IN, generator=g) + torch.randn(IN, generator=g)  # rank 3
    state = _run(list(x.split(16)), k=4)  # 4 >= 3: the cut loses nothing
    Vh, S = _pca(x)
    assert state.components.shape == (4, IN)
    assert torch.allclose(state.singular_values[:3].double(), S[:3], rtol=1e-4)
    assert _same_rows_up_to_sign(state.components[:3], Vh[:3], 1e-4)


def test_convergence_ignores_sign_flips_and_needs_a_previous_step():
    c = torch.eye(3)
    assert not eva.converged(None, c, 0.99).any()
    moved = torch.tensor([[1.0, 0, 0], [0, 0.6, 0.8], [0, 0, -1.0]])
    assert eva.converged(c, moved, 0.99).tolist() == [True, False, True]


def test_rank_budget_takes_the_largest_ratios_with_each_layer_capped():
    ratios = {"a": torch.tensor([0.5, 0.3, 0.1]), "b": torch.tensor([0.4, 0.35, 0.2]), "c": torch.tensor([0.05])}
    assert eva.rank_budget(ratios, 4, {"a": 3, "b": 3, "c": 1}) == {"a": 2, "b": 2, "c": 0}
    assert eva.rank_budget(ratios, 4, {"a": 1, "b": 3, "c": 1}) == {"a": 1, "b": 3, "c": 0}  # a capped at 1
    dense = sorted(((float(v), n) for n, r in ratios.items() for v in r), reverse=True)[:5]
    assert sum(eva.rank_budget(ratios, 5, {"a": 3, "b": 3, "c": 1}).values()) == len(dense) == 5


@pytest.mark.parametrize("k", [1, 3])
def test_components_are_orthonormal(k):
    x = torch.randn(50, IN)
    state = _run(list(x.split(10)), k)
    assert torch.allclose(state.components @ state.components.T, torch.eye(k), atol=1e-5)
