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
  multiply. ``LoraBranch`` saves x itself (the base layer's input, which q/k/v share), the flat positions of the
  dropped elements and the r-wide activation ``u = (s / q) * drop(x) @ A.T`` (q = 1 - p: keep probability; the 1 / q
  of dropout is applied on the r-wide side), and in backward computes, for the upstream gradient g,

      dB = g.T @ u,   g_u = (s / q) * (g @ B),   dA = g_u.T @ drop(x),   dx = drop(g_u @ A),   dbase = g

  where drop(t) is t with the dropped positions set to 0. ``drop(x)`` is recomputed in backward (a copy and a
  scatter of zeros) instead of being kept.

``linear_with_lora`` is what ``LoraLinear.forward`` calls for its one plain adapter: the base layer and the branch by
the leanest of these paths that applies (``_fusable`` says when the base layer may run inside the branch's node).

``linear_lora_add`` (``LinearBranch``; ``QuantBranch`` for a QLoRA base, its weight decoded from the codes in the
forward and again in the backward) is the same with-gradients maths with the base layer inside: for a frozen
``nn.Linear`` LoraLinear calls it instead of the layer plus ``lora_add``, so that the branch is added into the base
output by the matmul and x's two gradient terms, ``g @ W`` and ``drop(g_u @ A)``, are summed by the matmul too.

Dropout draws the dropped positions directly (``dropped_positions``), not a mask: in a sequence of independent
Bernoulli(p) drops the gaps between successive drops are independent Geometric(p) variables, drawn as
``floor(log(U) / log(1 - p)) + 1`` from float64 uniforms of torch's global generator (so seeding and checkpointed RNG
state cover them). That is exactly dropout's distribution, with p n draws instead of n (p = 0.05: 20x fewer, the
draw ~3x faster than a 16-bit mask's), and the positions (int32, 4 p bytes per element) are what backward keeps:
0.2 bytes per element at p = 0.05, against PEFT's dropped fp32 copy (4 bytes). tests/test_branch.py checks the
statistics and the equality with the textbook composition; benchmarks/train_step.py times the step.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module_hooks

from lorakit.fast.devices import FAST_DEVICES, AutocastState, has_float64, runs_fast
from lorakit.fast.shared_cast import shared_cast
from lorakit.quant.linear import QuantLinear

_INT32_POSITIONS = 2**31 - 1  # tensors with more elements keep int64 positions
_MARGIN_SD = 6.0  # a round of draws covers this many standard deviations of the drop count past its mean


def dropped_positions(n: int, p: float, device: torch.device) -> Tensor:
    """The sorted flat positions (int32, int64 for n >= 2**31) dropout with probability ``p`` in (0, 1) drops among
    ``n`` elements, each independently: the running sum of Geometric(p) gaps ``floor(log(U) / log(1 - p)) + 1``,
    U uniform in (0, 1], cut at n."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"dropout probability {p} is not in (0, 1); use 0 for no dropout and a value below 1")
    log_keep = math.log1p(-p)
    rounds, last = [], -1.0  # last: the position of the last drop drawn so far
    while last < n:  # one round in all but ~1e-9 of the calls
        mean = (n - 1 - last) * p
        count = max(int(mean + _MARGIN_SD * math.sqrt(mean * (1.0 - p)) + 16.0), 1)
        uniform = torch.rand(count, dtype=torch.float64, device=device)  # in [0, 1), so 1 - uniform is in (0, 1]
        gaps = torch.log1p(uniform.neg_()).div_(log_keep).floor_().add_(1.0)  # Geometric(p) on {1, 2, ...}
        rounds.append(gaps.cumsum_(0).add_(last))  # float64: exact integers up to 2**53
        last = float(rounds[-1][-1])
    positions = rounds[0] if len(rounds) == 1 else torch.cat(rounds)
    positions = positions[: int(torch.searchsorted(positions, float(n)))]
    dtype = torch.int32 if n <= _INT32_POSITIONS else torch.int64
    return positions.to(dtype)


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
    """``base + s * (drop(x) * keep_scale) @ A.T @ B.T``, drop(x): x with the flat positions ``dropped`` set to 0
    (None: no dropout); gradients as in the module doc."""

    @staticmethod
    def forward(ctx, base: Tensor, x: Tensor, A: Tensor, B: Tensor, scaling: float, dropped: Tensor | None,
                keep_scale: float) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        s = scaling * keep_scale  # dropout's 1 / q applied on the r-wide side: (drop(x) / q) @ A.T = drop(x) @ A.T / q
        u = (_drop(x2, dropped) @ A.T) * s  # (N, r)
        out = base.new_empty(base.shape)  # (..., out), returned as it is: see _rows
        torch.addmm(base.reshape(-1, base.shape[-1]), u.to(base.dtype), B.T.to(base.dtype), out=_rows(out))
        ctx.save_for_backward(x, A, B, u, dropped)
        ctx.s = s
        ctx.autocast = AutocastState.of(x)  # backward runs under it, as torch.amp.custom_bwd would, on x's device
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        with ctx.autocast.replay():
            return LoraBranch._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, A, B, u, dropped = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])  # (N, out)
        g_u, dropped, grad_A, grad_B = _low_rank_backward(g, x, A, B, u, dropped, ctx.s, *ctx.needs_input_grad[2:4])
        grad_x = None
        if ctx.needs_input_grad[1]:
            grad_x = _drop(g_u @ A.to(g_u.dtype), dropped, in_place=True).view(x.shape).to(x.dtype)  # (N, in)
        grad_base = grad if ctx.needs_input_grad[0] else None
        return grad_base, grad_x, grad_A, grad_B, None, None, None


class LinearBranch(torch.autograd.Function):
    """A frozen ``nn.Linear`` and its LoRA branch as one node: ``x @ W.T + bias + s * (drop(x) * keep_scale) @ A.T @
    B.T``, gradients for x, A and B (W and bias must not need one). Against ``LoraBranch`` on the base layer's output
    it saves two passes over a full-width tensor per layer: the branch is added into the base output in place by the
    matmul (addmm_, no copy of the output), and x's gradient is one buffer, ``drop(g_u @ A)`` with ``g @ W`` summed
    into it by the matmul, instead of two tensors that autograd then adds."""

    @staticmethod
    def forward(ctx, x: Tensor, W: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scaling: float,
                dropped: Tensor | None, keep_scale: float) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        out = x.new_empty(*x.shape[:-1], W.shape[0])  # (..., out), returned as it is: see _rows
        rows = _rows(out)  # (N, out)
        if bias is None:  # the base layer
            torch.mm(x2, W.T, out=rows)
        else:
            torch.addmm(bias, x2, W.T, out=rows)
        s = scaling * keep_scale
        u = _add_branch(rows, x2, A, B, s, dropped)
        ctx.save_for_backward(x, W, A, B, u, dropped)
        ctx.s = s
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, W, A, B, u, dropped = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])  # (N, out)
        g_u, dropped, grad_A, grad_B = _low_rank_backward(g, x, A, B, u, dropped, ctx.s, *ctx.needs_input_grad[3:5])
        grad_x = _input_grad(g, g_u, A, W, dropped, x.shape) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, grad_A, grad_B, None, None, None


class QuantBranch(torch.autograd.Function):
    """``LinearBranch`` for a frozen ``QuantLinear`` whose weight is one chunk (lorakit.quant.linear): W decoded from
    the codes in the forward and again in the backward, never saved, as the layer's own node does; the bias added
    after the matmul, as the layer's forward adds it. Same output as the layer then ``LoraBranch``, bit for bit."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: QuantLinear, A: Tensor, B: Tensor, scaling: float, dropped: Tensor | None,
                keep_scale: float) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        out = x.new_empty(*x.shape[:-1], layer.out_features)  # (..., out), returned as it is: see _rows
        rows = _rows(out)
        torch.mm(x2, _one_chunk(layer, x.dtype).T, out=rows)
        if layer.bias is not None:
            rows.add_(layer.bias.to(rows.dtype))
        s = scaling * keep_scale
        u = _add_branch(rows, x2, A, B, s, dropped)
        ctx.save_for_backward(x, A, B, u, dropped)
        ctx.s, ctx.layer = s, layer
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, A, B, u, dropped = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])  # (N, out)
        g_u, dropped, grad_A, grad_B = _low_rank_backward(g, x, A, B, u, dropped, ctx.s, *ctx.needs_input_grad[2:4])
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = _input_grad(g, g_u, A, _one_chunk(ctx.layer, g.dtype), dropped, x.shape)
        return grad_x, None, grad_A, grad_B, None, None, None


def _add_branch(rows: Tensor, x2: Tensor, A: Tensor, B: Tensor, s: float, dropped: Tensor | None) -> Tensor:
    """Add ``u @ B.T`` into the base output ``rows`` (N, out) in place, u = s * drop(x2) @ A.T; returns u (N, r)."""
    u = (_drop(x2, dropped) @ A.T) * s  # (N, r)
    rows.addmm_(u, B.T)
    return u


def _input_grad(g: Tensor, g_u: Tensor, A: Tensor, W: Tensor, dropped: Tensor | None, shape: torch.Size) -> Tensor:
    """x's gradient in one buffer: ``drop(g_u @ A)`` with the base's ``g @ W`` summed into it by the matmul."""
    return _drop(g_u @ A, dropped, in_place=True).addmm_(g, W).view(shape)  # (N, in)


def _one_chunk(layer: QuantLinear, dtype: torch.dtype) -> Tensor:
    """The layer's whole weight (out, in) in ``dtype``, decoded in one piece (``quant_fusable`` checked it is one)."""
    ((_, _, W),) = layer.weight_chunks(dtype)
    return W


def _rows(out: Tensor) -> Tensor:
    """The contiguous ``out`` (..., n) as the (N, n) rows the matmuls write into. The node returns ``out`` itself,
    not this view: the output of an autograd Function that is a view of a tensor made inside it may not be modified
    in place, and models do modify a layer's output in place (Falcon: ``mlp_output += attention_output``)."""
    return out.view(-1, out.shape[-1])


def _low_rank_backward(g: Tensor, x: Tensor, A: Tensor, B: Tensor, u: Tensor, dropped: Tensor | None, s: float,
                       need_A: bool, need_B: bool) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """The backward terms LoraBranch and LinearBranch share, for the upstream gradient g (N, out):
    (g_u = s * g @ B, the positions as int64 for the callers' dx, dA = g_u.T @ drop(x), dB = g.T @ u), dA / dB None
    unless needed. Under autocast the saved tensors may differ in dtype: products run in g's and return in A's / B's."""
    g_u = (g @ B.to(g.dtype)) * s  # (N, r): d loss / d (drop(x) @ A.T)
    grad_A = grad_B = None
    if need_B:
        grad_B = (g.T @ u.to(g.dtype)).to(B.dtype)  # (out, r)
    if dropped is not None:
        dropped = dropped.long()  # index_fill_ takes int64 positions; converted once for dA and the caller's dx
    if need_A:
        h = _drop(x.reshape(-1, x.shape[-1]), dropped)  # (N, in), recomputed: cheaper than saving a copy
        grad_A = (g_u.T @ h.to(g_u.dtype)).to(A.dtype)  # (r, in)
    return g_u, dropped, grad_A, grad_B


def linear_lora_add(linear: nn.Linear, x: Tensor, A: Tensor, B: Tensor, scaling: float, dropout: nn.Module) -> Tensor:
    """``linear(x) + s * B(A(dropout(x)))`` as one ``LinearBranch`` node, for a frozen ``nn.Linear`` (weight and bias
    not requiring grad). Outside autocast x, the weight, A and B share one dtype. Under autocast (x's device's) the
    node runs in autocast's dtype, as ``linear`` and ``lora_add`` would: the weight, bias, A, B (and x, unless
    LoraLinear passed its shared cast) are cast to it, A's and B's casts in the graph so that their gradients return
    in their dtype."""
    if linear.weight.requires_grad or (linear.bias is not None and linear.bias.requires_grad):
        raise ValueError("linear_lora_add takes a frozen base layer: its weight and bias get no gradient here; "
                         "call the layer and lora_add instead")
    dropped, keep_scale = _draw(x, _dropout_p(dropout))
    W, bias = linear.weight, linear.bias
    if not torch.is_autocast_enabled(x.device.type):
        return LinearBranch.apply(x, W, bias, A, B, scaling, dropped, keep_scale)
    dtype = torch.get_autocast_dtype(x.device.type)
    x, W, A, B = x.to(dtype), W.to(dtype), A.to(dtype), B.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    with torch.autocast(x.device.type, enabled=False):
        return LinearBranch.apply(x, W, bias, A, B, scaling, dropped, keep_scale)


def _drop(t: Tensor, dropped: Tensor | None, in_place: bool = False) -> Tensor:
    """``t`` with the elements at the flat positions ``dropped`` (of t's row-major layout) set to 0: a contiguous
    copy unless ``in_place`` (then ``t``, contiguous, is overwritten); ``t`` itself if ``dropped`` is None."""
    if dropped is None:
        return t
    out = t if in_place else t.clone(memory_format=torch.contiguous_format)
    positions = dropped.long()  # .long() returns int64 positions as they are
    if positions.numel() <= _FEW_POSITIONS:  # put_ of a zero: the same writes, about 2x faster than index_fill_ here
        out.view(-1).put_(positions, out.new_zeros(()).expand(positions.numel()))
    else:
        out.view(-1).index_fill_(0, positions, 0.0)
    return out


# Dropped positions up to which put_ beats index_fill_ (on the CPU, 2 threads: 29.5k positions of a 1024 x 576 input
# 107 -> 48 us after the copy in bf16, 267 -> 106 us in fp32; from ~32k on, torch splits index_fill_ over its threads
# and put_ no longer wins: 78.6k positions of a 1024 x 1536 input, 236 vs 248 us)
_FEW_POSITIONS = 1 << 15


def lora_add(base: Tensor, x: Tensor, A: Tensor, B: Tensor, scaling: float, dropout: nn.Module) -> Tensor:
    """``base + s * B(A(dropout(x)))`` for one adapter; ``dropout`` is the adapter's nn.Dropout or nn.Identity. On a
    device the fast paths do not run on (``_steps_aside``) the reference computes it."""
    p = _dropout_p(dropout)
    if _steps_aside(x, p):
        return reference(base, x, A, B, scaling, dropout)
    same_dtype = x.dtype == A.dtype == B.dtype == base.dtype
    if not same_dtype and not torch.is_autocast_enabled(x.device.type):
        return reference(base, x, A, B, scaling, dropout)  # mixed storage dtypes: let the casts be explicit
    if p == 0.0 and not torch.is_grad_enabled():  # inference: two small matmuls, the scale and the add fused in
        if same_dtype:
            return lora_add_no_grad(base, x, A, B, scaling)
        u = x.reshape(-1, x.shape[-1]) @ A.T  # (N, r)
        u, B = u.to(base.dtype), B.to(base.dtype)  # autocast: the matmul ran in its dtype; meet the base output's
        return torch.addmm(base.reshape(-1, base.shape[-1]), u, B.T, alpha=scaling).view(base.shape)
    return LoraBranch.apply(base, x, A, B, scaling, *_draw(x, p))


def _steps_aside(x: Tensor, p: float) -> bool:
    """Whether the reference runs instead of the fast paths (the rule of lorakit.fast.devices): x on a device they do
    not run on, or a dropout draw (float64 uniforms) on a device without float64 (MPS)."""
    return not runs_fast(x) or (p > 0.0 and not has_float64(x))


def _dropout_p(dropout: nn.Module) -> float:
    """The drop probability of an adapter's dropout module in its current mode: 0 for nn.Identity or in eval."""
    return dropout.p if dropout.training and isinstance(dropout, nn.Dropout) else 0.0


def _draw(x: Tensor, p: float) -> tuple[Tensor | None, float]:
    """(dropped positions of x, or None for p = 0; the kept values' scale 1 / (1 - p)) for one dropout of x."""
    return (dropped_positions(x.numel(), p, x.device) if p > 0.0 else None), 1.0 / (1.0 - p)


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


def linear_with_lora(base_layer: nn.Module, x: Tensor, A: Tensor, B: Tensor, scaling: float,
                     dropout: nn.Module) -> Tensor:
    """``base_layer(x) + s * B(A(dropout(x)))`` for one plain adapter, by the leanest path that applies: with
    gradients and a plain frozen ``nn.Linear``, one ``LinearBranch`` node (``linear_lora_add``), and for a frozen
    ``QuantLinear`` of one weight chunk one ``QuantBranch`` node (``quant_lora_add``); with gradients,
    dropout or mixed dtypes, the base layer then ``lora_add``; else ``lora_add_no_grad``. Under autocast an
    ``nn.Linear``'s or a QuantLinear's input is cast once for it, its branch and the layers beside it reading the
    same input (q, k, v: lorakit.fast.shared_cast), instead of once per layer and branch. Where the fast paths step
    aside (``_steps_aside``: another device) the layer runs, then the reference branch."""
    if not torch.is_grad_enabled():  # decoding first: its few rows make every check's cost count
        out = _no_grad_linear(base_layer, x, A, B, scaling, dropout)
        if out is not None:
            return out
    if _steps_aside(x, _dropout_p(dropout)):
        return reference(base_layer(x), x, A, B, scaling, dropout)
    if torch.is_grad_enabled() and quant_fusable(base_layer, x, A, B):
        return quant_lora_add(base_layer, x, A, B, scaling, dropout)
    if torch.is_autocast_enabled(x.device.type):
        if isinstance(base_layer, QuantLinear):  # one cast of x for the layer and its branch, one graph node each:
            # their gradients for x are summed in x's dtype, as with their own casts (bit for bit, tested)
            return lora_add(base_layer(shared_cast(x)), shared_cast(x), A, B, scaling, dropout)
        if isinstance(base_layer, nn.Linear):
            x = shared_cast(x)
    if torch.is_grad_enabled() and _fusable(base_layer, x, A, B):
        return linear_lora_add(base_layer, x, A, B, scaling, dropout)
    result = base_output(base_layer, x)  # (..., out)
    if torch.is_grad_enabled() or dropout.training or not x.dtype == A.dtype == B.dtype == result.dtype:
        return lora_add(result, x, A, B, scaling, dropout)
    return lora_add_no_grad(result, x, A, B, scaling)


def quant_fusable(base_layer: nn.Module, x: Tensor, A: Tensor, B: Tensor) -> bool:
    """Whether a ``QuantLinear`` base and the branch may run as one ``QuantBranch`` node: the class itself with no
    forward of its own on the instance and no hooks (the node never calls it), a frozen bias, its weight in one
    chunk, and x, A, B fp32 (under autocast: fp32 parameters, x fp32 or already cast) or all of one dtype."""
    if type(base_layer) is not QuantLinear or "forward" in base_layer.__dict__ or _hooked(base_layer):
        return False
    if base_layer.bias is not None and base_layer.bias.requires_grad:
        return False
    if base_layer.out_features * base_layer.in_features > base_layer.chunk_elements:
        return False
    return _fusable_dtypes(x, A, B)  # (its weight is decoded into the node's dtype)


def quant_lora_add(layer: QuantLinear, x: Tensor, A: Tensor, B: Tensor, scaling: float, dropout: nn.Module) -> Tensor:
    """``layer(x) + s * B(A(dropout(x)))`` as one ``QuantBranch`` node (``quant_fusable`` said it applies). Under
    autocast the node runs in autocast's dtype: x by its shared cast, A and B cast in the graph (their gradients
    return in fp32), the weight decoded straight into it."""
    dropped, keep_scale = _draw(x, _dropout_p(dropout))
    if not torch.is_autocast_enabled(x.device.type):
        return QuantBranch.apply(x, layer, A, B, scaling, dropped, keep_scale)
    dtype = torch.get_autocast_dtype(x.device.type)
    x, A, B = shared_cast(x), A.to(dtype), B.to(dtype)
    with torch.autocast(x.device.type, enabled=False):
        return QuantBranch.apply(x, layer, A, B, scaling, dropped, keep_scale)


def _no_grad_linear(base_layer: nn.Module, x: Tensor, A: Tensor, B: Tensor, scaling: float,
                    dropout: nn.Module) -> Tensor | None:
    """``F.linear(x, W, bias)`` then ``lora_add_no_grad``, without autograd: the path of inference and decoding, with
    the fewest checks before it; None where it does not apply (dropout active, a base layer that does not run as
    ``F.linear``, dtypes that differ, autocast, a device the fast paths do not run on), for ``linear_with_lora``'s
    other paths to take the call."""
    if dropout.training and isinstance(dropout, nn.Dropout) or not runs_as_linear(base_layer):
        return None
    params = base_layer._parameters  # the module's own table: no nn.Module attribute lookup per call
    W, bias = params["weight"], params.get("bias")
    if not x.dtype == W.dtype == A.dtype == B.dtype or (bias is not None and bias.dtype != x.dtype):
        return None
    kind = x.device.type
    if kind not in FAST_DEVICES or torch.is_autocast_enabled(kind):
        return None
    return lora_add_no_grad(nn.functional.linear(x, W, bias), x, A, B, scaling)


def base_output(base_layer: nn.Module, x: Tensor, *args: object, **kwargs: object) -> Tensor:
    """``base_layer(x, *args, **kwargs)``: computed as ``F.linear`` on the layer's own parameter table where the call
    is exactly that (``runs_as_linear``, no extra arguments), without a module call's overhead (decoding)."""
    if not args and not kwargs and runs_as_linear(base_layer):
        params = base_layer._parameters  # (the table nn.Module's attribute lookup reads, read directly)
        return nn.functional.linear(x, params["weight"], params.get("bias"))
    return base_layer(x, *args, **kwargs)


def runs_as_linear(base_layer: nn.Module) -> bool:
    """Whether calling ``base_layer`` computes exactly ``F.linear(x, weight, bias)``: an ``nn.Linear`` (not a
    subclass), no forward of its own set on the instance (accelerate's offloading hooks replace ``forward`` there)
    and no hooks that expect it to be called. torch has no public query for hooks, hence the look at its hook tables
    (module and global); any hook at all sends the call down the layer's own path."""
    if type(base_layer) is not nn.Linear or "forward" in base_layer.__dict__ or "weight" not in base_layer._parameters:
        return False  # (a weight deleted and set again as a plain tensor attribute is not in the table F.linear reads)
    return not _hooked(base_layer)


def _hooked(module: nn.Module) -> bool:
    """Whether a call of ``module`` would run hooks, its own or global ones (torch has no public query for them)."""
    hooks = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks,
             _module_hooks._global_forward_hooks, _module_hooks._global_forward_pre_hooks,
             _module_hooks._global_backward_hooks, _module_hooks._global_backward_pre_hooks)
    return any(hooks)


def _fusable(base_layer: nn.Module, x: Tensor, A: Tensor, B: Tensor) -> bool:
    """Whether the base layer and the LoRA branch may run as one autograd node (``linear_lora_add``): a frozen layer
    that runs as ``F.linear`` (``runs_as_linear``: the node never calls the layer, so its hooks or an instance's own
    forward would not run), and x, W, A and B of one dtype, or under autocast fp32 parameters and x fp32 or already
    cast (lorakit.fast.shared_cast)."""
    if not runs_as_linear(base_layer):
        return False
    weight, bias = base_layer.weight, base_layer.bias
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return False
    return _fusable_dtypes(x, A, B, weight)


def _fusable_dtypes(x: Tensor, *parameters: Tensor) -> bool:
    """The dtypes a fused node takes (``_fusable``, ``quant_fusable``): x and ``parameters`` of one dtype, or under
    autocast of x's device fp32 parameters and x fp32 or already cast (lorakit.fast.shared_cast)."""
    if torch.is_autocast_enabled(x.device.type):
        return (all(p.dtype == torch.float32 for p in parameters)
                and x.dtype in (torch.float32, torch.get_autocast_dtype(x.device.type)))
    return all(p.dtype == x.dtype for p in parameters)
