"""LoRA on a convolution (nn.Conv1d / 2d / 3d), as matrices: pure tensor functions.

A LoRA convolution is two convolutions in a row (PEFT's layout): A, a conv from ``in`` to ``r`` channels with the
base's kernel, stride and padding (weight (r, in, *k)), then B, a 1x1 conv from ``r`` to ``out`` channels (weight
(out, r / g, 1, ...), grouped like the base, g = groups). A 1x1 conv after a conv is one conv, whose weight is the
product of the two read as matrices::

    delta W[o, i, *k] = s * sum_j B[o, j] * A[j, i, *k]    i.e.  delta W = s * B @ A.reshape(r, in * prod(k))

With g > 1 groups, B's output channel o (of group o // (out / g)) reads only the r / g channels of its group: as an
(out, r) matrix B is block-diagonal (``grouped_to_dense``). The grouped base conv is the same: a dense conv whose
(out, in, *k) weight is zero outside each group's block (``grouped_weight_dense``). Its LoRA update though is dense,
A reading every input channel: a grouped base weight (out, in / g, *k) cannot hold it, so such a layer is not merged.
"""

from __future__ import annotations

import torch
from torch import Tensor


def as_matrix(weight: Tensor) -> Tensor:
    """A conv weight (out, in, *k) as the (out, in * prod(k)) matrix of its im2col product (a view if contiguous)."""
    return weight.reshape(weight.shape[0], -1)


def grouped_to_dense(B: Tensor, groups: int) -> Tensor:
    """A grouped 1x1 conv weight as a matrix (out, r / g) -> the block-diagonal (out, r) matrix it multiplies by:
    row o has its r / g entries in the columns of its group, zeros elsewhere."""
    out, per_group = B.shape
    if groups == 1:
        return B
    dense = B.new_zeros(out, per_group * groups)
    rows = out // groups
    for g in range(groups):
        dense[g * rows : (g + 1) * rows, g * per_group : (g + 1) * per_group] = B[g * rows : (g + 1) * rows]
    return dense


def dense_to_grouped(B: Tensor, groups: int) -> Tensor:
    """The diagonal blocks of an (out, r) matrix as a grouped 1x1 conv weight matrix (out, r / g): the inverse of
    ``grouped_to_dense`` on block-diagonal matrices (entries outside the blocks are dropped)."""
    if groups == 1:
        return B
    out, r = B.shape
    rows, per_group = out // groups, r // groups
    return torch.cat([B[g * rows : (g + 1) * rows, g * per_group : (g + 1) * per_group] for g in range(groups)])


def grouped_weight_dense(weight: Tensor, groups: int) -> Tensor:
    """A grouped conv weight (out, in / g, *k) -> the dense (out, in, *k) weight of the same conv (zero outside the
    blocks): conv(x, W, groups=g) == conv(x, grouped_weight_dense(W, g))."""
    if groups == 1:
        return weight
    out, per_group = weight.shape[:2]
    dense = weight.new_zeros(out, per_group * groups, *weight.shape[2:])
    rows = out // groups
    for g in range(groups):
        dense[g * rows : (g + 1) * rows, g * per_group : (g + 1) * per_group] = weight[g * rows : (g + 1) * rows]
    return dense


def peft_dora_delta(A: Tensor, B: Tensor, scaling: float, weight_shape: torch.Size) -> Tensor:
    """What PEFT 0.21.2's DoRA adds to a conv's weight W (``weight_shape``) before taking its row norms:
    ``s * (B.reshape(-1, r) @ A.reshape(r, -1)).reshape(weight_shape)`` (peft/tuners/lora/dora.py,
    ``_DoraConvNdLayer.get_lora_weight``). For groups=1 that is ``delta_weight``. For g > 1 groups it is not the
    layer's update: B (out, r / g) is read as out / g rows of r entries, and the (out / g, in * prod(k)) product is
    cut into W's (out, in / g, *k). lorakit takes DoRA's norms from it on grouped convs only so that a magnitude
    trained by either library means the same in the other (a grouped conv is never merged, so no weight is made
    from it)."""
    r = A.shape[0]
    return ((B.reshape(-1, r) @ A.reshape(r, -1)) * scaling).reshape(weight_shape)


def delta_weight(A: Tensor, B: Tensor, scaling: float, groups: int = 1) -> Tensor:
    """The dense conv weight (out, in, *k) of ``s * B(A(x))``, A and B conv weights (r, in, *k), (out, r / g, 1...)."""
    r, kernel = A.shape[0], A.shape[1:]
    B_dense = grouped_to_dense(B.reshape(B.shape[0], -1), groups)  # (out, r)
    return ((B_dense @ A.reshape(r, -1)) * scaling).reshape(B.shape[0], *kernel)  # (out, r) @ (r, in*k)
