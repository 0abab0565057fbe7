"""MonteCLoRA, Monte Carlo low-rank adaptation (Sengupta et al. 2024, arXiv 2411.04358), as PEFT 0.21.2 computes
it: pure tensor functions.

In a training forward, the adapter's A (r, in) is replaced by a mixture of K noisy copies of itself::

    v      = max(exp(sigma) ** 2 * diag(Z_w), 1e-3)            # (r,): variances, Z_w a Wishart(r, I_r) draw
    N_k    = c * z_k * sqrt(v)                                 # (K, in, r): noise, z_k ~ N(0, 1), c sample_scaler
    w      = softmax(sqrt(t + 1e-6) * z_d + mu)                # (K,): mixture weights, a Gaussian stand-in for a
                                                               #   Dirichlet(exp(pi)) draw (Laplace approximation)
    A_eff  = (sum_k w_k * (A.T + N_k)).T                       # (r, in)

with sigma (r,) and pi (K,) learned, mu = log a - mean(log a), a = exp(pi), and t (K,) the approximation's variances
``(1 / a) * (1 - 2 / K) + sum(1 / a) / K ** 2``. Evaluation and merging use A itself. The variational loss is
``kl_loss_weight * (KL_dirichlet + KL_wishart + KL_gauss)`` plus, with ``use_entropy``, sum(w ** 2).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions import Chi2

EPS_VARIANCE = 1e-3  # floor of the noise variances v (and NaN stand-in of the noise), as PEFT
EPS = 1e-6


def wishart_diagonal(r: int, device: torch.device | str | None = None) -> Tensor:
    """diag(Z_w) (r,) of one draw Z_w ~ Wishart(df=r, I_r), float32, by Bartlett's decomposition Z_w = L @ L.T: L lower
    triangular, L_ii = sqrt(chi2(r - i)), L_ij ~ N(0, 1) below the diagonal, drawn in torch's Wishart order (PEFT's
    draws, for a seed)."""
    chi2 = Chi2(torch.arange(r, 0, -1, dtype=torch.float32, device=device)).sample()  # (r,): df r, r - 1, ..., 1
    L = torch.diag(torch.clamp(chi2.sqrt(), min=torch.finfo(torch.float32).eps))  # (r, r)
    i, j = torch.tril_indices(r, r, offset=-1)
    L[i, j] = torch.randn(r * (r - 1) // 2, device=device)
    return (L**2).sum(dim=1)  # (L @ L.T)_ii


def variances(sigma: Tensor, wishart_diagonal: Tensor) -> Tensor:
    """v = max(exp(sigma) ** 2 * diag(Z_w), 1e-3) (r,): the diagonal of S @ Z_w @ S with S = diag(exp(sigma))."""
    return torch.clamp(torch.exp(sigma) ** 2 * wishart_diagonal, min=EPS_VARIANCE)


def noise(z: Tensor, v: Tensor, scaler: float) -> Tensor:
    """N = scaler * z * sqrt(v): z (K, in, r) standard normal, v (r,) -> (K, in, r) (z @ cholesky(diag(v)))."""
    return scaler * torch.nan_to_num(z * torch.sqrt(v), nan=EPS_VARIANCE)


def mixture_logits(pi: Tensor, z: Tensor) -> Tensor:
    """sqrt(t + 1e-6) * z + mu (K,) for a = exp(pi) (K,) and z (K,) standard normal (see the module docstring)."""
    a = torch.clamp(torch.exp(pi), min=EPS)
    k = a.shape[0]
    mu = torch.log(a) - torch.log(a).mean()
    t = torch.clamp((1 / a) * (1 - 2 / k) + (1 / a).sum() / k**2, min=EPS)
    return torch.sqrt(t + EPS) * z + mu


def mixed_A(A: Tensor, N: Tensor, w: Tensor) -> Tensor:
    """A_eff = (sum_k w_k * (A.T + N_k)).T: A (r, in), N (K, in, r), w (K,) -> (r, in)."""
    return torch.einsum("k,kir->ri", w, A.T + N)


def dirichlet_kl(a: Tensor, prior: float) -> Tensor:
    """PEFT's Dirichlet term for a (K,) against the prior concentration ``prior``::

        lgamma(sum a) - lgamma(K * prior) + sum(lgamma(a) - lgamma(prior)) + sum((a - prior) * (psi(a) - psi(sum a)))

    kept as PEFT has it, so that both give the same loss: the textbook KL(Dir(a) || Dir(prior)) subtracts the middle
    sum. (PEFT takes log(exp(lgamma(.))), which overflows in float32 once sum(a) passes ~35; lgamma does not.)"""
    b = torch.full_like(a, prior)
    return (
        torch.lgamma(a.sum())
        - torch.lgamma(b.sum())
        + (torch.lgamma(a) - torch.lgamma(b)).sum()
        + ((a - b) * (torch.digamma(a) - torch.digamma(a.sum()))).sum()
    )


def wishart_kl(sigma: Tensor) -> Tensor:
    """0.5 * (r * sum(u - log u) - r ** 2) for u = exp(sigma) ** 2 (r,), as PEFT."""
    r = sigma.shape[0]
    u = torch.exp(sigma) ** 2
    return 0.5 * (r * (u - torch.log(u)).sum() - r**2)


def gaussian_kl(v: Tensor, num_samples: int) -> Tensor:
    """K * 0.5 * sum(v - log v - 1) for the last forward's variances v (r,) (floored at 1e-6), as PEFT."""
    v = torch.clamp(v, min=EPS)
    return num_samples * 0.5 * (v.sum() - torch.log(v).sum() - v.shape[0])
