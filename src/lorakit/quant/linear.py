"""``QuantLinear``: a frozen linear layer computing with an NF4 / int8 weight (``lorakit.quant.formats``).

A QuantLinear keeps the codes in buffers (no Parameters, no gradients) and dequantizes its weight in row chunks during
the forward and again during the backward (``chunked_linear``), so no full-precision copy of the weight outlives a
matmul. ``lorakit.adapters.quantize`` puts QuantLinear layers into a model in place of its ``nn.Linear`` / GPT-2
``Conv1D`` layers (a Conv1D's weight, stored (in, out), is quantized as its transpose (out, in)).

    layer = QuantLinear.from_linear(nn.Linear(576, 1536), bits=4)
    y = layer(x)                                         # = x @ dequantize(W).T (+ bias)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from lorakit.quant import nf4_compiled
from lorakit.quant.formats import META_FIELDS, NF4Tensor, QuantizedWeight, dequantize, quantize_weight, tensor_fields


class QuantizedBaseError(RuntimeError):
    """An operation that would write into a quantized (QuantLinear) base weight; the message names the alternative."""


class ChunkedWeight(Protocol):
    """A frozen layer that gives its weight (out, in) in full precision a few rows at a time."""

    def weight_chunks(self, dtype: torch.dtype) -> Iterator[tuple[int, int, Tensor]]: ...


class _DequantLinear(torch.autograd.Function):
    """y = x @ W.T with W dequantized chunk by chunk; the backward dequantizes again instead of saving W, and
    returns no gradient for W (it is frozen)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, layer: ChunkedWeight) -> Tensor:  # x (..., in) -> (..., out)
        ctx.layer, ctx.x_dtype = layer, x.dtype
        parts = [nn.functional.linear(x, w) for _, _, w in layer.weight_chunks(_matmul_dtype(x))]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None]:  # grad (..., out)
        if not ctx.needs_input_grad[0]:
            return None, None
        grad_x = None
        for start, stop, w in ctx.layer.weight_chunks(grad.dtype):
            part = grad[..., start:stop] @ w  # (..., in)
            grad_x = part if grad_x is None else grad_x + part
        return grad_x.to(ctx.x_dtype), None


def _matmul_dtype(x: Tensor) -> torch.dtype:
    """The dtype ``F.linear(x, w)`` computes in: autocast's for an fp32 (or already cast) x under autocast of x's
    device, x's own otherwise. A weight made in it is what the matmul would cast an fp32 weight to."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind) and x.dtype in (torch.float32, torch.get_autocast_dtype(kind)):
        return torch.get_autocast_dtype(kind)
    return x.dtype


def row_chunks(rows: int, row_size: int, chunk_elements: int) -> Iterator[tuple[int, int]]:
    """(start, stop) ranges covering ``rows`` rows of ``row_size`` elements, at most ``chunk_elements`` elements each
    (at least one row)."""
    step = max(1, chunk_elements // row_size)
    for start in range(0, rows, step):
        yield start, min(start + step, rows)


def chunked_linear(x: Tensor, layer: ChunkedWeight) -> Tensor:
    """x @ W.T (..., in) -> (..., out) for a frozen ``layer``, its weight W made a few rows at a time in the forward
    and again in the backward (never saved); no gradient for W."""
    return _DequantLinear.apply(x, layer)


def frozen_linear(weight: Tensor, bias: nn.Parameter | None, training: bool, conv1d: bool = False) -> nn.Module:
    """A plain ``nn.Linear`` holding ``weight`` (out, in), frozen, and a copy of ``bias`` (trainable if it was); a
    GPT-2 ``Conv1D`` (weight stored (in, out)) if ``conv1d``. What a reduced-precision layer gives back in full
    precision."""
    out_features, in_features = weight.shape
    with torch.device("meta"):  # no initial weights: they are replaced below
        if conv1d:
            from transformers.pytorch_utils import Conv1D

            module: nn.Module = Conv1D(out_features, in_features)
        else:
            module = nn.Linear(in_features, out_features, bias=bias is not None)
    module.weight = nn.Parameter(weight.T.contiguous() if conv1d else weight, requires_grad=False)
    if bias is not None:
        module.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
    return module.train(training)


class QuantLinear(nn.Module):
    """A frozen linear layer whose weight (out, in) is stored as NF4 or int8 codes in buffers; the bias (if any)
    stays a Parameter. ``forward(x) = x @ dequantize().T + bias``; ``.weight`` reads the dequantized weight.
    ``from_conv1d``: it replaced a GPT-2 Conv1D (weight stored (in, out)); the codes hold the transpose, so the forward
    is the same, and ``full_precision()`` gives back a Conv1D."""

    chunk_elements: int = 1 << 24  # weights dequantized at once (64 MB in fp32); larger layers go in row chunks

    def __init__(self, weight: QuantizedWeight, bias: Tensor | None = None, from_conv1d: bool = False) -> None:
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError(f"QuantLinear needs a 2-D (out, in) weight, got shape {weight.shape}")
        self.out_features, self.in_features = weight.shape
        self.from_conv1d = from_conv1d
        self._format = type(weight)
        self._meta = {f.name: getattr(weight, f.name) for f in dataclasses.fields(weight) if f.name in META_FIELDS}
        for name, tensor in tensor_fields(weight).items():
            self.register_buffer(name, tensor)
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(bias.detach(), requires_grad=bias.requires_grad)

    @classmethod
    def from_linear(cls, linear: nn.Module, bits: int = 4, double_quant: bool = True) -> QuantLinear:
        """From an ``nn.Linear`` (weight (out, in)) or a GPT-2 ``Conv1D`` (weight (in, out), quantized as W.T)."""
        conv1d = is_conv1d(linear)
        weight = linear.weight.T if conv1d else linear.weight  # (out, in)
        return cls(quantize_weight(weight, bits, double_quant), linear.bias, from_conv1d=conv1d)

    @property
    def bits(self) -> int:
        return 4 if self._format is NF4Tensor else 8

    @property
    def double_quant(self) -> bool:
        return self._format is NF4Tensor and self.absmax is None

    def quantized_weight(self) -> QuantizedWeight:
        """The codes as an NF4Tensor / Int8Tensor (views of the buffers)."""
        return self._format(**{name: getattr(self, name) for name in self._buffer_names()}, **self._meta)

    def dequantize(self) -> Tensor:
        """The weight, fp32 (out, in)."""
        return dequantize(self.quantized_weight())

    @property
    def weight(self) -> Tensor:
        """The dequantized weight, fp32 (out, in; (in, out) if ``from_conv1d``, as the Conv1D stored it): a new tensor
        at each read, for modeling code that reads a layer's ``.weight`` instead of calling it (Jamba's
        ``dt_proj.weight @ x``, HunYuan-MoE's ``wg.weight.dtype``). Read-only: it is not a Parameter nor in the state
        dict, and writing into it changes nothing here (``requantize_`` stores a new weight). A module's forward
        computes with the codes, chunk by chunk, without it."""
        w = self.dequantize()
        return w.T if self.from_conv1d else w

    @weight.setter
    def weight(self, value: object) -> None:
        raise QuantizedBaseError(
            f"the weight of a QuantLinear ({self.extra_repr()}) is its NF4 / int8 codes, not a tensor to assign: "
            "store a new (out, in) weight with requantize_(weight), or take full_precision() for a plain layer"
        )

    def weight_chunks(self, dtype: torch.dtype = torch.float32) -> Iterator[tuple[int, int, Tensor]]:
        """(start, stop, rows start:stop of the weight in ``dtype``: the fp32 weight's ``.to(dtype)``, decoded
        straight into it), at most ``chunk_elements`` weights at a time."""
        q = self.quantized_weight()
        for start, stop in row_chunks(self.out_features, self.in_features, self.chunk_elements):
            decode = nf4_compiled.decoder((stop - start) * self.in_features, self._device())  # None: eager
            yield start, stop, dequantize(q, start, stop, dtype, decode)

    def full_precision(self, weight: Tensor | None = None) -> nn.Module:
        """The full-precision module this layer stands for, holding ``weight`` (out, in; default: the dequantized
        weight) and this layer's bias: an ``nn.Linear``, or a GPT-2 ``Conv1D`` (weight stored (in, out)) if
        ``from_conv1d``. The weight does not require grad (frozen, as here)."""
        weight = self.dequantize() if weight is None else weight.detach()
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight of shape {tuple(weight.shape)} does not fit {self}")
        return frozen_linear(weight, self.bias, self.training, conv1d=self.from_conv1d)

    def requantize_(self, weight: Tensor) -> None:
        """Store ``weight`` (out, in) in this layer's format (lossless if ``weight`` is a dequantized one)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight of shape {tuple(weight.shape)} does not fit {self}")
        q = quantize_weight(weight.to(self._device()), self.bits, self.double_quant)
        for name, tensor in tensor_fields(q).items():
            setattr(self, name, tensor)
        self._meta = {f.name: getattr(q, f.name) for f in dataclasses.fields(q) if f.name in META_FIELDS}

    def forward(self, x: Tensor) -> Tensor:
        y = chunked_linear(x, self)  # (..., out)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        kind = f"nf4{' double-quant' if self.double_quant else ''}" if self.bits == 4 else "int8"
        origin = ", from Conv1D" if self.from_conv1d else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"{kind}{origin}"
        )

    def _buffer_names(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self._format) if f.name not in META_FIELDS]

    def _device(self) -> torch.device:
        return next(t for _, t in self.named_buffers()).device


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a linear layer whose weight is stored (in, out); matched by class name."""
    return type(module).__name__ == "Conv1D"
