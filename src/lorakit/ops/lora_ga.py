"""LoRA-GA, low-rank adaptation with gradient approximation (Wang et al. 2024, arXiv 2407.05000): pure maths.

LoRA-GA starts the adapter from the singular vectors of the full fine-tuning gradient, so that its first steps follow
that gradient (the paper's aim). With G (out, in) the mean gradient of the loss with respect to a base weight W over a
few batches (collected by lorakit.adapters.lora_ga) and the top 2r triplets of its SVD, G ~ U diag(S) V^T (U (out,
2r), S descending, V^T (2r, in)), A takes r right- and B r left-singular vectors of them (the directions are PEFT's,
and as in PEFT, B carries their singular values):

    direction   A (r, in)        B (out, r)
    'ArB2r'     V^T[:r]          U[:, r:2r] diag(S[r:2r])       (the default)
    'A2rBr'     V^T[r:2r]        U[:, :r] diag(S[:r])
    'ArBr'      V^T[1::2]        U[:, 0::2] diag(S[0::2])       (odd and even indices, alternating)
    'random'    V^T[I]           U[:, I] diag(S[I])             (I: r of the 2r indices at random, the same for both)

then scales the pair (``scale``):

    'stable'      B *= out^(1/4) / sqrt(stable_gamma)    (the paper's stable scale)
    'weight_svd'  B *= sigma_1(W) / S_B[0]               (B's first S brought to W's largest singular value)
    'gd_scale'    A /= s, B /= s                         (s the adapter's scaling)
    'unit'        as it is

and moves the pair out of the base: A and B are rounded to W's dtype first, then residual = W - s * B @ A (in fp32,
cast back), so that residual + s * B @ A is W and the model starts unchanged. The SVD is PEFT's randomized one
(``torch.svd_lowrank`` with q = min(4r, min(out, in)), 4 subspace iterations: exact when q reaches min(out, in); it
draws from torch's global RNG, as 'random' does), or the exact ``torch.linalg.svd`` with ``niter=None``. Each
singular pair's sign is then fixed (U's entry of largest magnitude positive), so that the same gradient gives the
same adapter and residual whatever the random draw.
"""

from __future__ import annotations

import torch
from torch import Tensor

DIRECTIONS = ("ArBr", "A2rBr", "ArB2r", "random")
SCALES = ("stable", "weight_svd", "gd_scale", "unit")
NITER = 4  # PEFT's subspace iterations for torch.svd_lowrank


def top_svd(matrix: Tensor, k: int, niter: int | None = NITER) -> tuple[Tensor, Tensor, Tensor]:
    """The top ``k`` singular triplets of ``matrix`` (out, in) in fp32: U (out, k), S (k,) descending, Vh (k, in),
    each pair's sign fixed (the largest-magnitude entry of U's column positive). By torch.svd_lowrank with q =
    min(2k, min(out, in)) and ``niter`` subspace iterations (PEFT's q = 4r for k = 2r), or exactly if ``niter`` is
    None."""
    m = matrix.detach().float()
    if niter is None:
        U, S, Vh = torch.linalg.svd(m, full_matrices=False)  # (out, n), (n,), (n, in); n = min(out, in)
    else:
        U, S, V = torch.svd_lowrank(m, q=min(2 * k, min(m.shape)), niter=niter)  # (out, q), (q,), (in, q)
        Vh = V.T
    U, S, Vh = U[:, :k], S[:k], Vh[:k]
    rows = torch.arange(U.shape[1], device=U.device)
    sign = torch.sign(U[U.abs().argmax(dim=0), rows])  # (k,)
    sign[sign == 0] = 1
    return U * sign, S, Vh * sign[:, None]


def pick(r: int, direction: str) -> tuple[Tensor, Tensor]:
    """(indices of A's rows, of B's columns) among the top 2r singular triplets, for ``direction``."""
    if direction == "ArB2r":
        return torch.arange(r), torch.arange(r, 2 * r)
    if direction == "A2rBr":
        return torch.arange(r, 2 * r), torch.arange(r)
    if direction == "ArBr":
        return torch.arange(1, 2 * r, 2), torch.arange(0, 2 * r, 2)
    if direction == "random":
        chosen = torch.randperm(2 * r)[:r]  # the global RNG, as PEFT draws it
        return chosen, chosen
    raise ValueError(f"LoRA-GA direction={direction!r} is unknown; use one of {', '.join(DIRECTIONS)}")


def lora_ga_init(
    grad: Tensor,
    weight: Tensor,
    r: int,
    scaling: float,
    direction: str = "ArB2r",
    scale: str = "stable",
    stable_gamma: float = 16,
    niter: int | None = NITER,
) -> tuple[Tensor, Tensor, Tensor]:
    """(A (r, in), B (out, r), residual (out, in)) of LoRA-GA for a base weight ``weight`` (out, in) and its mean
    gradient ``grad`` (out, in), the adapter's rank ``r`` and scaling ``s`` (see the module docstring). A and B are
    fp32 tensors holding values of the weight's dtype; the residual W - s * B @ A is in the weight's dtype."""
    if not weight.is_floating_point():
        raise TypeError(
            f"init_lora_weights='lora_ga' needs a floating-point base weight, not {weight.dtype}; initialize on the "
            "fp32/fp16/bf16 model, then quantize the residual base"
        )
    if tuple(grad.shape) != tuple(weight.shape):
        raise ValueError(
            f"LoRA-GA gradient of shape {tuple(grad.shape)} does not fit a weight of shape {tuple(weight.shape)} "
            "(out, in); run preprocess_loraga on this model (and delete a cache_file made for another model)"
        )
    if 2 * r > min(weight.shape):
        raise ValueError(
            f"LoRA-GA needs 2r <= min(out, in) = {min(weight.shape)} for a weight of shape {tuple(weight.shape)} "
            f"(A and B take 2r distinct singular vectors of its gradient), got r={r}; lower r (or set rank_pattern "
            "for this module)"
        )
    if scale not in SCALES:
        raise ValueError(f"LoRA-GA scale={scale!r} is unknown; use one of {', '.join(SCALES)}")
    G = grad.detach().to(device=weight.device, dtype=torch.float32)
    if not torch.isfinite(G).all():
        raise ValueError(
            "LoRA-GA gradient holds inf / NaN; check the loss train_step computes (and delete a cache_file made of it)"
        )
    U, S, Vh = top_svd(G, 2 * r, niter)  # (out, 2r), (2r,), (2r, in)
    rows_A, cols_B = pick(r, direction)
    A = Vh[rows_A.to(Vh.device)]  # (r, in)
    S_B = S[cols_B.to(S.device)]  # (r,)
    B = U[:, cols_B.to(U.device)] * S_B[None, :]  # (out, r)
    if scale == "stable":
        B = B * (weight.shape[0] ** 0.25 / stable_gamma**0.5)
    elif scale == "weight_svd" and S_B[0] > 0:  # a zero gradient leaves B zero: nothing to scale
        _, S_W, _ = top_svd(weight, min(r, min(weight.shape)), niter)
        B = B * (S_W[0] / S_B[0])
    elif scale == "gd_scale":
        A, B = A / scaling, B / scaling
    A = A.to(weight.dtype).float()  # the values the adapter holds, also in a 16-bit adapter
    B = B.to(weight.dtype).float()
    residual = weight.detach().float() - scaling * (B @ A)  # (out, in)
    return A.contiguous(), B.contiguous(), residual.to(weight.dtype)
