"""KaSA, knowledge-aware singular-value adaptation (Wang et al. 2024, arXiv 2412.06071): pure tensor functions.

KaSA changes LoRA twice (sec. 3):

    W'  = U[:, :k-r] @ diag(S[:k-r]) @ Vh[:k-r]          # (out, in): W = U S Vh less its r smallest components
    dW  = s * B @ diag(d) @ A                             # (out, in): d (r,) learned singular values, eq. (6)
    y   = x @ W'.T + s * ((dropout(x) @ A.T) * d) @ B.T   # (..., out)

with k = min(out, in), A (r, in), B (out, r). Training adds (eq. 9-11)

    beta * sum(d ** 2) + gamma * (||B.T @ B - I_r||_F + ||A @ A.T - I_r||_F)

to the task loss, which keeps B and A close to the singular vectors their SVD reading assumes.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_rank(r: int, in_features: int, out_features: int) -> None:
    """ValueError if r >= k = min(in, out): the truncation would leave nothing of W."""
    k = min(in_features, out_features)
    if r >= k:
        raise ValueError(  # PEFT's wording (its tests match it), then the fix
            f"KaSA requires `r` ({r}) to be smaller than min(in_features, out_features) ({k}) so that at least one "
            f"singular component of the base weight is preserved after truncation: pass r < {k} (rank_pattern for "
            "this layer), or leave this layer out of target_modules"
        )


def truncate(weight: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """(W', W - W'): ``weight`` (out, in) without its r smallest singular components, and those components, both in
    ``weight``'s dtype (the SVD itself in float32). ValueError if r >= min(out, in) (check_rank)."""
    check_rank(r, weight.shape[1], weight.shape[0])
    k = min(weight.shape)
    U, S, Vh = torch.linalg.svd(weight.float(), full_matrices=False)  # (out, k), (k,), (k, in); S descending
    kept = (U[:, : k - r] * S[: k - r]) @ Vh[: k - r]  # (out, in)
    dropped = (U[:, k - r :] * S[k - r :]) @ Vh[k - r :]  # (out, in): rank r
    return kept.to(weight.dtype), dropped.to(weight.dtype)


def delta(A: Tensor, B: Tensor, d: Tensor, scaling: float) -> Tensor:
    """dW = s * B @ diag(d) @ A: (out, r) * (r,) @ (r, in) -> (out, in)."""
    return (B * d) @ A * scaling


def lora_output(h: Tensor, A: Tensor, B: Tensor, d: Tensor, scaling: float) -> Tensor:
    """s * ((h @ A.T) * d) @ B.T for the dropped-out input h (..., in) -> (..., out): dW applied, never formed."""
    return ((h @ A.T) * d) @ B.T * scaling


def regularization(A: Tensor, B: Tensor, d: Tensor, beta: float, gamma: float) -> Tensor:
    """beta * sum(d ** 2) + gamma * (||B.T @ B - I||_F + ||A @ A.T - I||_F), in float32 (eq. 9-11)."""
    A, B, d = A.float(), B.float(), d.float()
    eye = torch.eye(d.shape[0], device=d.device)  # (r, r)
    l2 = (d**2).sum()
    orthogonal = torch.linalg.norm(B.T @ B - eye) + torch.linalg.norm(A @ A.T - eye)
    return beta * l2 + gamma * orthogonal
