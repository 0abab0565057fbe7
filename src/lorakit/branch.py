"""The LoRA branch of a Linear layer, ``y = base + s * dropout(x) @ A.T @ B.T``, computed lean.

``lora_add`` is what ``LoraLinear.forward`` calls for a plain (non-DoRA) adapter. It has three paths with the same
maths:

- ``reference``: the textbook composition (dropout module, A and B as layers, scale, add), kept as the definition the
  other two are tested against;
- without gradients (inference, evaluation): ``lora_add_no_grad``, ``addmm(base, x @ A.T, B.T, alpha=s)``: the scale
  applied inside the second matmul together with the addition, so no (..., out) temporaries beyond the result; for
  a few rows (decoding, where each op's fixed cost dominates) ``base + s * linear(linear(x, A), B)`` in three ops
  instead of the views around one addmm. ``LoraLinear.forward`` calls it directly in its common case;
- with gradients: ``LoraBranch``, an autograd function. Autograd's composition would save a dropped copy of x for
  A's gradient (a full (..., in) tensor per adapted layer, on top of x itself) and run dropout as a float mask
  multiply. ``LoraBranch`` saves x itself (the base layer's input, which q/k/v share), a one-byte keep mask m and
  the r-wide activation ``u = (s / q) * (x * m) @ A.T`` (q: keep probability; the 1 / q of dropout is applied on the
  r-wide side), and in backward computes, for the upstream gradient g,

      dB = g.T @ u,   g_u = (s / q) * (g @ B),   dA = g_u.T @ (x * m),   dx = (g_u @ A) * m,   dbase = g

  ``x * m`` is recomputed in backward (one pass) instead of being kept.

Dropout masks come from torch's global generator (so seeding and checkpointed RNG state cover them), 16 random bits
per element: an element is kept with probability ``k / 65536``, ``k = round((1 - p) * 65536)``, and kept values are
scaled by ``65536 / k`` (an unbiased dropout whose p is rounded to a multiple of 2**-16). Drawing 16 bits per element
as int64 words is ~4x faster on the CPU than ``bernoulli_``. The mask is uint8 0 / 1, applied as ``m.to(x.dtype) * x``:
on the CPU, torch's kernels that read or write bool tensors (``where``, ``<`` into bool, bool -> float) run ~5-10x
slower than the same work on uint8 (tests/test_branch.py has the equality tests; benchmarks/train_step.py the step).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

_LEVELS = 1 << 16


def keep_threshold(p: float) -> int:
    """The number k of 16-bit values (out of 65536) that keep an element: keep probability k / 65536."""
    return round((1.0 - p) * _LEVELS)


def dropout_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device) -> tuple[Tensor, float]:
    """(keep mask of ``shape`` (uint8, 1 = keep), 1 / keep probability) for dropout probability ``p`` in (0, 1)."""
    k = keep_threshold(p)
    if k <= 0:
        raise ValueError(f"dropout probability {p} drops every element; use a value below 1")
    n = math.prod(shape)
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=device)
    bits = words.view(torch.int16)[:n].view(shape)  # uniform over [-32768, 32767]
    mask = torch.lt(bits, k - _LEVELS // 2, out=torch.empty(shape, dtype=torch.uint8, device=device))
    return mask, _LEVELS / k


def reference(base: Tensor, x: Tensor, A: Tensor, B: Tensor, scaling: float, dropout: nn.Module) -> Tensor:
    """The definition: ``base + B(A(dropout(x))) * s`` with autograd's own composition."""
    h = dropout(x.to(A.dtype))
    lora = nn.functional.linear(nn.functional.linear(h, A), B) * scaling
    return base + lora.to(base.dtype)


def reference_with_mask(base: Tensor, x: Tensor, A: Tensor, B: Tensor, scaling: float, mask: Tensor | None,
                        keep_scale: float) -> Tensor:
    """``reference`` with a given dropout mask (for tests of ``LoraBranch`` against autograd's composition)."""
    h = x if mask is None else x * mask * keep_scale
    return base + (h @ A.T @ B.T) * scaling


class LoraBranch(torch.autograd.Function):
    """``base + s * ((x * mask * keep_scale) @ A.T) @ B.T`` (mask None: no dropout); gradients as in the module doc."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, base: Tensor, x: Tensor, A: Tensor, B: Tensor, scaling: float, mask: Tensor | None,
                keep_scale: float) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        s = scaling * keep_scale  # dropout's 1 / keep applied on the r-wide side: (x * m / q) @ A.T = (x * m) @ A.T / q
        u = (_masked(x2, mask) @ A.T) * s  # (N, r)
        out = torch.addmm(base.reshape(-1, base.shape[-1]), u.to(base.dtype), B.T.to(base.dtype))  # (N, out)
        ctx.save_for_backward(x, A, B, u, mask)
        ctx.s = s
        return out.view(base.shape)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, A, B, u, mask = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])  # (N, out)
        grad_A = grad_B = grad_x = None
        g_u = (g @ B.to(g.dtype)) * ctx.s  # (N, r): d loss / d ((x * m) @ A.T)
        if ctx.needs_input_grad[3]:
            grad_B = (g.T @ u.to(g.dtype)).to(B.dtype)  # (out, r)
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        if mask is not None:
            mask = mask.view(x2.shape).to(x.dtype)  # 0. / 1., converted once for both uses below
        if ctx.needs_input_grad[2]:
            h = _masked(x2, mask)  # (N, in), recomputed: cheaper than saving a copy
            grad_A = (g_u.T @ h.to(g_u.dtype)).to(A.dtype)  # (r, in)
        if ctx.needs_input_grad[1]:
            grad_x = _masked(g_u @ A.to(g_u.dtype), mask, in_place=True).view(x.shape).to(x.dtype)  # (N, in)
        grad_base = grad if ctx.needs_input_grad[0] else None
        return grad_base, grad_x, grad_A, grad_B, None, None, None


def _masked(t: Tensor, mask: Tensor | None, in_place: bool = False) -> Tensor:
    """``t`` with the elements where ``mask`` (0 / 1, any dtype) is 0 set to 0: ``t * mask``, in a new tensor unless
    ``in_place`` (then ``t`` is overwritten). The uint8 -> float conversion is fast; a multiply by uint8 is not."""
    if mask is None:
        return t
    view = mask.view(t.shape)
    m = view.to(t.dtype)
    if in_place:
        return t.mul_(m)
    return m.mul_(t) if m is not view else m * t  # m a fresh conversion of the mask: reuse its buffer


def lora_add(base: Tensor, x: Tensor, A: Tensor, B: Tensor, scaling: float, dropout: nn.Module) -> Tensor:
    """``base + s * B(A(dropout(x)))`` for one adapter; ``dropout`` is the adapter's nn.Dropout or nn.Identity."""
    p = dropout.p if dropout.training and isinstance(dropout, nn.Dropout) else 0.0
    same_dtype = x.dtype == A.dtype == B.dtype == base.dtype
    if not same_dtype and not torch.is_autocast_enabled("cpu"):
        return reference(base, x, A, B, scaling, dropout)  # mixed storage dtypes: let the casts be explicit
    if p == 0.0 and not torch.is_grad_enabled():  # inference: two small matmuls, the scale and the add fused in
        if same_dtype:
            return lora_add_no_grad(base, x, A, B, scaling)
        u = x.reshape(-1, x.shape[-1]) @ A.T  # (N, r)
        u, B = u.to(base.dtype), B.to(base.dtype)  # autocast: the matmul ran in its dtype; meet the base output's
        return torch.addmm(base.reshape(-1, base.shape[-1]), u, B.T, alpha=scaling).view(base.shape)
    mask, keep_scale = dropout_mask(x.shape, p, x.device) if p > 0.0 else (None, 1.0)
    return LoraBranch.apply(base, x, A, B, scaling, mask, keep_scale)


_FEW = 1 << 15  # output elements (a few rows: decoding) up to which three ops beat the views around one addmm


def lora_add_no_grad(base: Tensor, x: Tensor, A: Tensor, B: Tensor, scaling: float) -> Tensor:
    """``base + s * (x @ A.T) @ B.T`` without autograd or dropout, the four tensors of one dtype. For a few rows
    (decoding, where the per-op cost dominates) the fewest ops: two linears and an add that applies the scale; for
    more rows the scale and the add fused into the second matmul (addmm): no (..., out) temporary beyond the result."""
    u = nn.functional.linear(x, A)  # (..., r)
    if base.numel() <= _FEW:
        return torch.add(base, nn.functional.linear(u, B), alpha=scaling)  # (..., out)
    out = torch.addmm(base.reshape(-1, base.shape[-1]), u.reshape(-1, u.shape[-1]), B.T, alpha=scaling)  # (N, out)
    return out.view(base.shape)
