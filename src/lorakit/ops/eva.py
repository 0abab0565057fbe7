"""EVA, explained variance adaptation (Paischer et al. 2024, arXiv 2410.07170): pure maths.

EVA starts each adapter's A (r, in) as the top-r right-singular vectors (principal components) of its layer's inputs
over sample data, and gives the ranks of all layers, r per layer on average, to the components that explain the most
variance (sec. 3.2: at most round(r * rho) per layer). The inputs come batch by batch, so the components are computed
incrementally (Ross et al. 2008, "Incremental learning for robust visual tracking", sec. 3.1, with the mean update),
and a layer is done when its components stop moving (cosine similarity to the previous batch's >= tau, sec. 3.3).

``svd_step`` is one such update; keeping all components (k = in) it is exactly the PCA of all inputs stacked, and so
it is when the inputs span at most k dimensions. ``rank_budget`` is the redistribution.
"""

from __future__ import annotations

from collections import Counter
from typing import NamedTuple

import torch
from torch import Tensor


class SvdState(NamedTuple):
    """Running PCA of a layer's inputs: ``components`` (k, in) orthonormal rows, ``singular_values`` (k,) of the
    centered inputs seen, ``mean`` (in,), ``n`` inputs seen, ``sum_sq`` (in,) sum of squared deviations per feature
    (the total variance, for the explained-variance ratios)."""

    components: Tensor
    singular_values: Tensor
    mean: Tensor
    n: int
    sum_sq: Tensor


def svd_step(state: SvdState | None, x: Tensor, k: int) -> SvdState:
    """The running PCA after inputs ``x`` (m, in) (fp32), keeping the top k components (k <= in). The new basis is the
    SVD of [diag(S) V; x - mean_x; sqrt(n m / (n + m)) (mean - mean_x)], which has the same scatter about the new
    mean as all inputs seen so far (exactly when nothing was cut)."""
    x = x.detach().float().reshape(-1, x.shape[-1])  # (m, in)
    m = x.shape[0]
    batch_mean = x.mean(dim=0)  # (in,)
    centered = x - batch_mean
    if state is None:
        stacked, mean, n, sum_sq = centered, batch_mean, m, (centered**2).sum(dim=0)
    else:
        total = state.n + m
        shift = batch_mean - state.mean  # (in,)
        mean = state.mean + shift * (m / total)
        sum_sq = state.sum_sq + (centered**2).sum(dim=0) + shift**2 * (state.n * m / total)  # Chan et al.'s update
        correction = (shift * (state.n * m / total) ** 0.5)[None, :]  # (1, in)
        stacked = torch.cat([state.singular_values[:, None] * state.components, centered, correction])
        n = total
    _, S, Vh = torch.linalg.svd(stacked, full_matrices=False)  # Vh (min(rows, in), in)
    return SvdState(Vh[:k].contiguous(), S[:k].contiguous(), mean, n, sum_sq)


def explained_variance_ratio(state: SvdState) -> Tensor:
    """(k,): each component's share of the inputs' total variance (S^2 / sum of per-feature squared deviations)."""
    return state.singular_values**2 / state.sum_sq.sum().clamp_min(torch.finfo(torch.float32).tiny)


def converged(previous: Tensor | None, current: Tensor, tau: float) -> Tensor:
    """(k,) bool: which components moved less than tau allows since the last step (|cos| >= tau; a sign flip of a
    singular vector is no movement). None before: nothing has converged."""
    if previous is None or previous.shape != current.shape:
        return torch.zeros(current.shape[0], dtype=torch.bool)
    return torch.nn.functional.cosine_similarity(previous, current, dim=1).abs() >= tau


def rank_budget(ratios: dict[str, Tensor], budget: int, max_ranks: dict[str, int]) -> dict[str, int]:
    """{layer: rank}: the ``budget`` components with the largest explained-variance ratio over all layers, each layer
    offering its first max_ranks[layer] (sec. 3.2); a layer may get 0. Ties keep layer order."""
    offers = [(name, float(v)) for name, r in ratios.items() for v in r[: max_ranks[name]]]
    order = sorted(range(len(offers)), key=lambda i: -offers[i][1])
    counts = Counter(offers[i][0] for i in order[:budget])
    return {name: counts.get(name, 0) for name in ratios}
