"""VeLoRA, memory-efficient training with rank-1 sub-token projections (Miles et al. 2024, arXiv 2405.17991): pure
tensor functions.

A LoRA adapter's A projection needs its input x (T, in) in the backward pass, for dL/dA = g.T @ x with g (T, r) the
gradient at A's output. VeLoRA keeps a compressed x instead. Each token is cut into G sub-tokens of D = ceil(in / G)
features (the last one zero-padded, sec. 3.1) and each sub-token is projected onto one fixed unit vector v (D,)::

    c[t, g]   = <x[t, g*D : (g+1)*D], v>                    # (T, G): compress, eq. (1)
    x_hat[t]  = scale * concat_g(c[t, g] * v)[:in]          # (T, in): reconstruct, eq. (2)
    dL/dA     = g.T @ x_hat                                 # (r, in): instead of g.T @ x

The forward output, and the gradient with respect to x, are those of the plain projection x @ A.T. v is the
normalized mean of a batch's sub-tokens (``init_type`` "batch_average", "batch_average_once") or a random unit
vector ("random"). Function names follow the paper's steps; ``linear`` is the projection with VeLoRA's backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

INIT_TYPES = ("batch_average_once", "batch_average", "random")


def group_dim(in_features: int, num_groups: int) -> int:
    """D = ceil(in / G): the features of one sub-token."""
    return -(-in_features // num_groups)


def sub_tokens(x: Tensor, num_groups: int) -> Tensor:
    """(..., in) -> (T, G, D): every token cut into G sub-tokens of D features, zero-padded to G * D features."""
    d = group_dim(x.shape[-1], num_groups)
    if x.shape[-1] != num_groups * d:
        x = F.pad(x, (0, num_groups * d - x.shape[-1]))
    return x.reshape(-1, num_groups, d)


def normalized(v: Tensor) -> Tensor:
    """v / ||v|| in fp32; an all-zero v becomes the normalized ones vector (there is no direction to keep)."""
    v = v.float()
    norm = torch.linalg.vector_norm(v)
    if norm == 0:
        v = torch.ones_like(v)
        norm = torch.linalg.vector_norm(v)
    return v / norm


def batch_projection(x: Tensor, num_groups: int) -> Tensor:
    """The projection of init_type "batch_average": the normalized mean of all sub-tokens of x (..., in) -> (D,)."""
    return normalized(sub_tokens(x, num_groups).reshape(-1, group_dim(x.shape[-1], num_groups)).mean(dim=0))


def compress(x: Tensor, v: Tensor, num_groups: int) -> Tensor:
    """Eq. (1): (..., in) -> (T, G), each sub-token's coefficient along v (D,)."""
    return torch.einsum("tgd,d->tg", sub_tokens(x, num_groups), v)


def reconstruct(c: Tensor, v: Tensor, in_features: int, scale: float) -> Tensor:
    """Eq. (2): (T, G) -> (T, in), each sub-token rebuilt as c * v, the padding cut off, times ``scale``."""
    rebuilt = (c.unsqueeze(-1) * v).reshape(c.shape[0], -1)  # (T, G, 1) * (D,) -> (T, G * D)
    return rebuilt[:, :in_features] * scale


class _Linear(torch.autograd.Function):
    """x @ W.T whose backward gives W the gradient from the reconstructed input (saves c (T, G), not x (T, in))."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, v: Tensor, num_groups: int, scale: float) -> Tensor:  # type: ignore[override]
        ctx.x_shape, ctx.x_dtype, ctx.num_groups, ctx.scale = x.shape, x.dtype, num_groups, scale
        ctx.save_for_backward(compress(x, v.to(x.dtype), num_groups), weight, v)
        return F.linear(x, weight)  # (..., r)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        c, weight, v = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])  # (T, r)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ weight.to(g.dtype)).reshape(ctx.x_shape).to(ctx.x_dtype)  # exact: (T, r) @ (r, in)
        if ctx.needs_input_grad[1]:
            x_hat = reconstruct(c.to(g.dtype), v.to(g.dtype), ctx.x_shape[-1], ctx.scale)  # (T, in)
            grad_w = (g.T @ x_hat).to(weight.dtype)  # (r, T) @ (T, in) -> (r, in)
        return grad_x, grad_w, None, None, None


def linear(x: Tensor, weight: Tensor, v: Tensor, num_groups: int, scale: float) -> Tensor:
    """x (..., in) @ weight.T (weight (r, in)): the plain projection forward, VeLoRA's gradient for ``weight``."""
    return _Linear.apply(x, weight, v, num_groups, scale)
