"""Output layer + cross-entropy in row chunks, never holding the (N, V) logits.

For N labelled positions and a V-word vocabulary, ``F.cross_entropy(hidden @ W.T, target)`` keeps the (N, V)
logits, their fp32 copy and the saved log-softmax alive until backward, and backward builds an (N, V) gradient again;
for V = 49,152 and N = 1,024 each is ~200 MB. Because the loss is a scalar, its gradient is known as soon as the
forward has seen a chunk of rows:

    loss          = sum_i  lse_i - z_i[t_i]                  z_i = W h_i + b,  lse_i = log sum_v exp z_iv
    dloss / dz_i  = softmax(z_i) - onehot(t_i)               (C, V) for a chunk of C rows
    dloss / dh_i  = (softmax(z_i) - onehot(t_i)) @ W          (C, H)
    dloss / dW   += (softmax(z) - onehot(t)).T @ h             (V, H), summed over chunks
    dloss / db   += sum_i softmax(z_i) - onehot(t_i)            (V,)

so the forward computes those per chunk and keeps only dloss/dh (N, H) (and dloss/dW, dloss/db when the weight is
trained); backward scales them by the incoming scalar gradient. Peak extra memory is one fp32 (C, V) block of logits
(overwritten in place by the softmax and its gradient), plus under bf16 autocast a bf16 copy of W and a bf16 (C, V)
block. A weight stored narrower than the matmuls (a bf16 output layer, ``lorakit.quant.half.HalfLinear``, in an fp32
model) is cast a few rows at a time (``CAST_ELEMENTS``), anew for the logits and for dloss/dh of each chunk, so no
full-size upcast copy of it is alive.

Precision: the matmuls run in ``compute_dtype`` -- the autocast dtype when autocast is on for the device (bf16 on
CPU), else the input and weight dtypes promoted (``F.linear``), or the input's dtype (``half_linear``: HalfLinear's
``x @ W16.to(x.dtype).T + bias``, its bias added to the rounded product) -- exactly as the layer would; the logits are
then upcast and logsumexp / softmax are fp32, as the reference ``F.cross_entropy(logits.float())`` does. The
softmax-minus-onehot is rounded to ``compute_dtype`` before its matmuls, as autocast's backward of the linear would.
Gradients are returned in the dtypes of ``hidden`` and ``weight``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from lorakit.fast.devices import runs_fast
from lorakit.quant.linear import row_chunks

# Rows per chunk. SmolLM2-135M (V = 49,152), N = 1,020, fp32, CPU: chunk 128 / 256 / 512 / 1024 took 3.1 / 2.4 / 2.2 /
# 2.1 s of CPU for loss + backward (unfused: 2.6 s) at 25 / 50 / 98 / 196 MB peak (unfused: 574 MB). Small chunks
# re-read W once per chunk; 512 is near the fastest at a sixth of the memory.
DEFAULT_CHUNK = 512
# Weight elements upcast at once (64 MB in fp32), as lorakit.quant.linear's QuantLinear / HalfLinear cast theirs.
CAST_ELEMENTS = 1 << 24


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i cross_entropy(hidden_i @ weight.T + bias, target_i); gradients computed in forward, scaled in backward."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        hidden: Tensor,  # (N, H)
        weight: Tensor,  # (V, H)
        bias: Tensor | None,  # (V,)
        target: Tensor,  # (N,) int64, every entry a valid class
        chunk: int,
        compute_dtype: torch.dtype,
        needs: tuple[bool, bool, bool],  # gradient wanted for (hidden, weight, bias)
        bias_after: bool,
    ) -> Tensor:
        with torch.autocast(hidden.device.type, enabled=False):  # dtypes below are explicit
            loss, grads = linear_cross_entropy_chunks(
                hidden, weight, bias, target, chunk, compute_dtype, needs, bias_after
            )
        ctx.grads = grads
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
        scaled = tuple(None if g is None else g * grad_loss.to(g.dtype) for g in ctx.grads)
        return (*scaled, None, None, None, None, None)


WeightBlocks = Callable[[], Iterator[tuple[slice, Tensor]]]


def _weight_blocks(weight: Tensor, dtype: torch.dtype) -> WeightBlocks:
    """A function giving (span, weight[span] in ``dtype``) pairs covering the weight (V, H): one pair, cast once, when
    the cast does not widen it (no copy, or a narrower one, e.g. bf16 under autocast); else row blocks of
    ``CAST_ELEMENTS``, cast anew on each call, so no full-size upcast copy is alive."""
    if weight.dtype.itemsize >= dtype.itemsize:
        whole = [(slice(None), weight.to(dtype))]
        return lambda: iter(whole)
    spans = [slice(start, stop) for start, stop in row_chunks(*weight.shape, CAST_ELEMENTS)]
    return lambda: ((span, weight[span].to(dtype)) for span in spans)


def _chunk_loss(
    h: Tensor, t: Tensor, blocks: WeightBlocks, b: Tensor | None, block: Tensor, grad: bool, bias_after: bool
) -> tuple[Tensor, Tensor | None]:
    """(sum over the C rows of lse - z[t], and dloss/dz = softmax(z) - onehot(t) (C, V) if ``grad``), both in the
    dtype of ``block`` (>= C rows, V columns), which is overwritten: the logits are written into it, then shifted,
    exponentiated and normalized in place. So the only large allocation is the caller's block, made once for all
    chunks (plus the matmul output when ``h`` is in a narrower dtype); the returned dz is a view of it.
    ``bias_after``: ``b`` is added to the product rounded to h's dtype (HalfLinear's ``y + bias``), not inside it."""
    z = block[: len(h)]  # (C, V)
    for span, w in blocks():  # w (V', H): the weight's rows ``span``, the logits' columns
        zr, br = z[:, span], None if b is None else b[span]  # (C, V'), (V',)
        if br is not None and bias_after:
            zr.copy_(h @ w.T + br)
        elif h.dtype == z.dtype:
            torch.mm(h, w.T, out=zr) if br is None else torch.addmm(br, h, w.T, out=zr)
        else:  # bf16 matmul, fp32 softmax: upcast into the block
            zr.copy_(h @ w.T if br is None else torch.addmm(br, h, w.T))
    rows = torch.arange(len(t), device=t.device)
    z_target = z[rows, t]  # (C,)
    z_max = z.amax(dim=-1)  # (C,) for a stable exp
    e = z.sub_(z_max[:, None]).exp_()  # (C, V) exp(z - max)
    total = e.sum(dim=-1)  # (C,)
    loss = (z_max + total.log() - z_target).sum()  # lse = max + log sum exp(z - max)
    if not grad:
        return loss, None
    dz = e.div_(total[:, None])  # softmax
    dz[rows, t] -= 1.0  # softmax - onehot
    return loss, dz


def linear_cross_entropy_chunks(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    chunk: int,
    compute_dtype: torch.dtype,
    needs: tuple[bool, bool, bool] = (False, False, False),
    bias_after: bool = False,
) -> tuple[Tensor, tuple[Tensor | None, Tensor | None, Tensor | None]]:
    """(loss sum, (dloss/dhidden, dloss/dweight, dloss/dbias)) over row chunks; a gradient is None unless the matching
    entry of ``needs`` is set; ``bias_after`` as ``_chunk_loss``. Pure function, no autograd: the body of the fused
    forward."""
    need_h, need_w, need_b = needs[0], needs[1], needs[2] and bias is not None
    acc = torch.promote_types(compute_dtype, torch.float32)  # softmax / accumulation dtype: fp32, or fp64 for fp64
    blocks = _weight_blocks(weight, compute_dtype)  # (V, H) in compute_dtype; no copy when already in it
    b = None if bias is None else bias.to(compute_dtype)
    loss = torch.zeros((), dtype=acc, device=hidden.device)
    grad_h = torch.empty_like(hidden) if need_h else None  # (N, H)
    grad_w = torch.zeros_like(weight, dtype=acc) if need_w else None  # (V, H) accumulator
    grad_b = torch.zeros_like(bias, dtype=acc) if need_b else None  # (V,)
    block = hidden.new_empty(min(chunk, hidden.shape[0]), weight.shape[0], dtype=acc)  # (C, V), reused per chunk
    for start in range(0, hidden.shape[0], chunk):
        h = hidden[start : start + chunk].to(compute_dtype)  # (C, H)
        grad = need_h or need_w or need_b
        chunk_loss, dz = _chunk_loss(h, target[start : start + chunk], blocks, b, block, grad, bias_after)
        loss += chunk_loss
        if dz is None:
            continue
        if need_b:
            grad_b += dz.sum(0)
        dz = dz.to(compute_dtype)
        if need_h:  # (C, V') @ (V', H) -> (C, H), summed over the weight's row blocks
            grad_h[start : start + chunk] = sum(dz[:, span] @ w for span, w in blocks())
        if need_w:
            grad_w += dz.T @ h  # (V, C) @ (C, H) -> (V, H), rounded per chunk, summed in acc
        del dz  # a view of the block, which the next chunk overwrites
    grads = (
        grad_h,
        None if grad_w is None else grad_w.to(weight.dtype),
        None if grad_b is None else grad_b.to(bias.dtype),
    )
    return loss, grads


def reference(hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None) -> Tensor:
    """The definition: ``F.cross_entropy`` of the full (N, V) logits, upcast to fp32 (at least), summed."""
    logits = torch.nn.functional.linear(hidden, weight, bias)  # (N, V)
    return torch.nn.functional.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), target,
                                             reduction="sum")


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None, chunk: int = DEFAULT_CHUNK,
    half_linear: bool = False,
) -> Tensor:
    """Sum over rows of ``F.cross_entropy(hidden @ weight.T + bias, target, reduction="sum")`` in fp32, without the
    (N, V) logits; differentiable in ``hidden``, ``weight`` and ``bias``.

    ``hidden`` (N, H), ``weight`` (V, H), ``bias`` (V,) or None, ``target`` (N,) class indices -- positions to ignore
    must already be removed. Under ``torch.autocast`` the matmuls run in the autocast dtype, else in the promoted
    dtype of ``hidden`` and ``weight``. ``half_linear``: as lorakit.quant.half.HalfLinear's forward computes, the
    matmuls in ``hidden``'s dtype (or autocast's) and the bias added to their rounded result (see the module
    docstring).
    On a device the fast paths do not run on (lorakit.fast.devices) ``reference`` computes it, with the logits.

    >>> h, w, t = torch.randn(5, 4), torch.randn(7, 4), torch.tensor([0, 6, 2, 2, 1])
    >>> ref = torch.nn.functional.cross_entropy(h @ w.T, t, reduction="sum")
    >>> torch.allclose(linear_cross_entropy(h, w, t, chunk=2), ref)
    True
    """
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be a positive number of rows")
    if target.shape != hidden.shape[:1]:
        raise ValueError(f"target shape {tuple(target.shape)} must be (N,) for hidden {tuple(hidden.shape)}")
    if not runs_fast(hidden):  # the device rule (lorakit.fast.devices)
        return reference(hidden, weight.to(hidden.dtype) if half_linear else weight, target, bias)
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        compute_dtype = torch.get_autocast_dtype(device)
    elif half_linear:
        compute_dtype = hidden.dtype
    else:
        compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    grad_on = torch.is_grad_enabled()
    needs = (
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    return _LinearCrossEntropy.apply(hidden, weight, bias, target, chunk, compute_dtype, needs, half_linear)
