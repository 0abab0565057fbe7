"""Block-diagonal LoRA factors (BD-LoRA: one of A or B block-diagonal, so that a tensor-parallel engine applies each
shard's block locally, without gathering activations between GPUs): pure tensor functions.

A block-diagonal matrix M (out, in) with n blocks is stored packed, as PEFT stores it: P (out, in / n), block k in
rows k * out / n ... (k + 1) * out / n, i.e. the blocks stacked along the rows::

    M = block_diag(P[0 : out/n], P[out/n : 2 out/n], ...)       # (out, in)
    x @ M.T   per token: block k maps x[k * in/n : (k+1) * in/n] to y[k * out/n : (k+1) * out/n]
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_divisible(in_features: int, out_features: int, nblocks: int) -> None:
    """ValueError unless both sides of the matrix split into ``nblocks`` equal blocks."""
    if in_features % nblocks or out_features % nblocks:
        raise ValueError(
            f"in_features={in_features} or out_features={out_features} not divisible by nblocks={nblocks}: "
            "a block-diagonal factor needs both sides in equal blocks; choose nblocks dividing the layer's sizes and "
            "r, or leave this module out of target_modules_bd_a / target_modules_bd_b"
        )


def dense(packed: Tensor, nblocks: int) -> Tensor:
    """P (out, in / n) -> M (out, in), zeros off the blocks (differentiable in P)."""
    return torch.block_diag(*packed.chunk(nblocks, dim=0))


def packed(matrix: Tensor, nblocks: int) -> Tensor:
    """M (out, in) -> its diagonal blocks P (out, in / n): the inverse of ``dense`` on block-diagonal matrices
    (entries off the blocks are dropped)."""
    out, in_features = matrix.shape
    rows, cols = out // nblocks, in_features // nblocks
    return torch.cat([matrix[k * rows : (k + 1) * rows, k * cols : (k + 1) * cols] for k in range(nblocks)])


def apply(x: Tensor, packed_weight: Tensor, nblocks: int) -> Tensor:
    """x (..., in) @ dense(P).T without building M: each block multiplies its slice of x -> (..., out)."""
    out, cols = packed_weight.shape
    xs = x.reshape(*x.shape[:-1], nblocks, cols)  # (..., n, in / n)
    blocks = packed_weight.view(nblocks, out // nblocks, cols)  # (n, out / n, in / n)
    return torch.einsum("...nc,noc->...no", xs, blocks).reshape(*x.shape[:-1], out)
