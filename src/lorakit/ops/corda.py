"""CorDA, context-oriented decomposition adaptation (Yang et al. 2024, arXiv 2406.05223): pure maths.

CorDA decomposes a base weight W (out, in) in the metric of its layer's input covariance C (in, in), collected from
sample data (lorakit.adapters.corda collects it):

    W C' = U diag(S) V_h          (thin SVD; C' = C + damping, sec. 3.1)
    W    = U diag(S) V_h C'^-1    (exactly, summing over all k = min(out, in) triplets)

and gives the adapter r of the k triplets: the r largest (IPM, "instruction-previewed mode": the directions the task's
inputs excite most) or the r smallest (KPM, "knowledge-preserved mode": feed it the knowledge to keep, so that the
adapter trains the directions that knowledge uses least). With V = (V_h C'^-1)^T (in, k) and the r kept triplets:

    s * B @ A = U_r diag(S_r) V_r^T = U_r U_r^T W    (the projection of W on U's r columns)
    A = diag(sqrt(S_r / s)) V_r^T (r, in),  B = U_r diag(sqrt(S_r / s)) (out, r),  residual = W - s * B @ A

so the model's output is unchanged at step 0. The eigens' field names and the covariance scaling are PEFT's (its cache
files hold ``<module>.eigens.S_WC`` ...), so a cache or covariance file written here is read by PEFT and back.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

METHODS = ("ipm", "kpm")  # which end of the spectrum the adapter takes: largest (IPM) or smallest (KPM) S

_DAMP = 0.01  # first damping, as a fraction of C's mean diagonal (the CorDA reference code's value)
_INV_TOLERANCE = 0.05  # accepted ||C' C'^-1 - I||_F; the damping doubles until the inverse is this accurate
_MAX_DOUBLINGS = 40


class CordaEigens(NamedTuple):
    """One layer's decomposition (PEFT's field names): ``S_WC`` (k,), ``U_WC`` (out, k), ``V_WC`` (in, k), with
    W = U_WC diag(S_WC) V_WC^T; k = min(out, in) before ``crop``, the adapter's rank r after it."""

    S_WC: Tensor
    U_WC: Tensor
    V_WC: Tensor


def covariance_step(x: Tensor, use_float16: bool = False) -> Tensor:
    """One forward's contribution x^T x (in, in) to a layer's input covariance, for its inputs ``x`` (..., in)
    flattened to (N, in). Each call's inputs are first divided by |max(x)| (PEFT's scaling, so that files and
    adapters agree with PEFT's). Computed in fp32, or in the input's own dtype with ``use_float16`` (half the
    memory for a half-precision model; less accurate). ValueError if x or the result holds inf / NaN."""
    x = x.detach().reshape(-1, x.shape[-1])  # (N, in)
    if not use_float16:
        x = x.float()
    x = x / x.max().abs()
    if not torch.isfinite(x).all():
        raise ValueError(
            "CorDA: a layer input holds inf / NaN (or is all zeros): check the data run_model feeds the model, e.g. "
            "that it has no padding-only samples"
        )
    cov = x.T @ x  # (in, N) @ (N, in) -> (in, in)
    if not torch.isfinite(cov).all():
        raise ValueError(
            "CorDA: the input covariance overflowed (inf / NaN); set use_float16_for_covariance=False in "
            "CordaConfig to accumulate it in fp32"
        )
    return cov


def damped_inverse(cov: Tensor) -> tuple[Tensor, Tensor]:
    """(C', C'^-1) for a covariance C (in, in): C' = C + d * mean(diag(C)) * I with d = 0.01, doubled until
    ||C' C'^-1 - I||_F < 0.05 (an inverse that C's near-zero directions would make inaccurate). In fp32."""
    cov = cov.float()
    scale = torch.diagonal(cov).mean()
    if not torch.isfinite(scale) or scale <= 0:
        raise ValueError(
            f"CorDA: an input covariance has mean diagonal {float(scale)} (it must be > 0): the layer saw no "
            "nonzero input; run the model on real samples in run_model"
        )
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    damp = _DAMP
    for _ in range(_MAX_DOUBLINGS):
        fixed = cov + eye * (scale * damp)
        inverse = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inverse, eye).item() < _INV_TOLERANCE:
            return fixed, inverse
        damp *= 2
    raise ValueError(f"CorDA: could not invert an input covariance (damping up to {damp:g} x its mean diagonal)")


def decompose(weight: Tensor, cov: Tensor) -> CordaEigens:
    """All k = min(out, in) triplets of ``weight`` (out, in) in the metric of ``cov`` (in, in), S descending:
    SVD of W C' = U diag(S) V_h, V = (V_h C'^-1)^T, so that W = U diag(S) V^T (up to C''s inverse accuracy)."""
    if cov.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(
            f"CorDA: covariance of shape {tuple(cov.shape)} does not fit a weight of shape {tuple(weight.shape)} "
            f"(it needs ({weight.shape[1]}, {weight.shape[1]})); rebuild the covariance file for this model"
        )
    fixed, inverse = damped_inverse(cov)  # (in, in) each
    U, S, Vh = torch.linalg.svd(weight.detach().float() @ fixed, full_matrices=False)  # (out, k), (k,), (k, in)
    return CordaEigens(S, U, (Vh @ inverse).T)  # V (in, k)


def crop(eigens: CordaEigens, r: int, method: str) -> CordaEigens:
    """The r triplets the adapter takes: the first r (IPM, largest S) or the last r (KPM, smallest S); copies."""
    k = eigens.S_WC.numel()
    if method not in METHODS:
        raise ValueError(f"corda_method={method!r} is unknown; use 'ipm' or 'kpm'")
    if r > k:
        raise ValueError(
            f"CorDA needs r <= min(out, in) = {k} for this layer, got r={r}; lower r (or set rank_pattern for it)"
        )
    keep = slice(0, r) if method == "ipm" else slice(k - r, k)
    return CordaEigens(*(t[..., keep].clone() for t in eigens))


def factors(eigens: CordaEigens, scaling: float) -> tuple[Tensor, Tensor]:
    """A (r, in) and B (out, r) with s * B @ A = U diag(S) V^T: sqrt(S / s) on each side."""
    root = torch.sqrt(eigens.S_WC.float() / scaling)  # (r,)
    A = root[:, None] * eigens.V_WC.float().T  # (r, in)
    B = eigens.U_WC.float() * root[None, :]  # (out, r)
    return A.contiguous(), B.contiguous()

