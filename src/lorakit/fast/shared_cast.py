"""One autocast copy of a layer input, shared by the LoRA layers that read it.

Under autocast every ``nn.Linear`` casts its fp32 input to the autocast dtype (bf16 on CPU; fp16 or bf16 on CUDA)
itself. In a transformer q, k and v read the same normalized hidden state (gate and up another), and each of them
casts it again, and so does each LoRA branch: up to six passes over one tensor per attention block.
``shared_cast(x)`` makes the cast once: it remembers the last (input, cast) pair and reuses the cast while the input
is the same tensor and both are unchanged (same ``_version``), under the same autocast dtype. The values are
autocast's (it casts inputs the same way), and the LoRA branch keeps the bf16 copy for backward, as autocast's own
matmul would. Autocast is read for x's device (lorakit.fast.devices.autocast_dtype); on a device the fast paths do
not run on, x is returned as it is.

Gradients stay as autocast makes them: each reader gets its own graph node (``_Cast``) whose backward turns the
reader's bf16 gradient into x's dtype, so the readers' gradients are summed in fp32 at x, not in bf16 at a shared
cast. The cache holds the input weakly and the cast (made without a graph) strongly, until the next call with
another input: at most one tensor, never a graph.
"""

from __future__ import annotations

import threading
import weakref

import torch
from torch import Tensor

from lorakit.fast.devices import autocast_dtype

_state = threading.local()  # .last: (input weakref, input _version, dtype, cast, cast _version)
__all__ = ["autocast_dtype", "shared_cast"]


class _Cast(torch.autograd.Function):
    """``cast`` (x's autocast copy, made once, outside the graph) as a node of its own for one reader; backward
    returns the gradient in x's dtype."""

    @staticmethod
    def forward(ctx, x: Tensor, cast: Tensor) -> Tensor:
        ctx.dtype = x.dtype
        return cast.view_as(cast)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad.to(ctx.dtype), None


def shared_cast(x: Tensor) -> Tensor:
    """``x`` as autocast would cast it for a matmul, the cast made once for repeated calls on an unchanged ``x``;
    ``x`` itself when autocast would not cast it."""
    dtype = autocast_dtype(x)
    if dtype is None or x.is_inference():  # inference tensors have no _version to tell a change by: autocast casts
        return x
    last = getattr(_state, "last", None)
    if last is not None and last[0]() is x and (last[1], last[2], last[4]) == (x._version, dtype, last[3]._version):
        cast = last[3]
    else:
        with torch.no_grad():
            cast = x.to(dtype)
        _state.last = (weakref.ref(x), x._version, dtype, cast, cast._version)
    if torch.is_grad_enabled() and x.requires_grad:
        return _Cast.apply(x, cast)
    return cast
