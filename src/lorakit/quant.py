"""Pure-PyTorch weight quantization of a frozen base model: 4-bit NormalFloat (NF4), int8, and ``QuantLinear``.

NF4 (Dettmers et al. 2023, "QLoRA", sec. 3 and appendix E): the weight is flattened (row-major) and cut into blocks
of 64 values; each block is divided by its absmax and every value is rounded to the nearest of 16 code values
(quantiles of N(0, 1) scaled to [-1, 1], with an exact 0). Two 4-bit codes are packed per byte. Storage per weight:
0.5 byte of codes + 4/64 byte of fp32 absmax, or with double quantization 1/64 byte of int8 absmax codes + 8/(64*256)
byte of fp32 step and offset per 256 absmax values (0.516 byte in all).

Double quantization (QLoRA sec. 3): the absmax values are quantized again in blocks of 256. The paper subtracts their
mean and uses 8-bit floats; here each block of 256 is centred on its midpoint (max + min) / 2 and stored as linear
int8 codes: the worst-case error is (max - min) / 508, smaller than an 8-bit float's for values that cluster as
absmax values do, and the format is idempotent (quantizing a dequantized weight gives the same codes), which the
LoftQ flow relies on (``lorakit.loftq``).

int8 (weight-only): one absmax scale per output row, codes round(W / scale) in [-127, 127]; |error| <= absmax / 254.

``quantize(model, bits)`` replaces the model's ``nn.Linear`` layers (and GPT-2's ``Conv1D``, whose weight is stored
(in, out): it is quantized as its transpose (out, in)) by ``QuantLinear`` in place. A QuantLinear keeps the codes in
buffers (no Parameters, no gradients) and dequantizes its weight in row chunks during the forward and again during the
backward, so no full-precision copy of the weight outlives a matmul. The input embedding and the output layer are
stored in 16 bits instead (``lorakit.quant_embeddings``, option ``embeddings``).

    model = lorakit.quantize(load_model(), bits=4)       # every Linear except lm_head -> NF4; embeddings -> bf16
    y = model.model.layers[0].mlp.up_proj(x)             # = x @ dequantize(W).T (+ bias)
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

# The 16 NF4 code values (QLoRA, appendix E): quantiles of N(0, 1) at 8 positive and 7 negative levels, plus 0,
# normalized by the largest. tests/test_quant.py rebuilds them from torch.special.ndtri.
NF4_CODES = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ]
)  # fmt: skip
_NF4_MIDPOINTS = (NF4_CODES[1:] + NF4_CODES[:-1]) / 2  # (15,) rounding thresholds between neighbouring codes
# Byte -> its two code values (high nibble first), as the 8 bytes of one int64: a single index_select of a 1-D table
# dequantizes two weights (measured ~5x faster than indexing a (256, 2) fp32 table).
_NF4_PAIRS = torch.stack([NF4_CODES.repeat_interleave(16), NF4_CODES.repeat(16)], dim=1).view(torch.int64)  # (256, 1)
NF4_BLOCK = 64  # weights per absmax (QLoRA)
DQ_BLOCK = 256  # absmax values per double-quantization block (QLoRA)
BITS = (4, 8)
_META = ("shape", "block_size")  # the non-tensor fields of NF4Tensor / Int8Tensor


class QuantizedBaseError(RuntimeError):
    """An operation that would write into a quantized (QuantLinear) base weight; the message names the alternative."""


# -- formats ---------------------------------------------------------------------------------------------------------
@dataclass
class NF4Tensor:
    """A weight in NF4: ``absmax`` is set for single quantization, the three ``absmax_*`` fields for double."""

    packed: Tensor  # (n_blocks * block_size / 2,) uint8: code of element 2i in the high nibble, 2i+1 in the low
    absmax: Tensor | None  # (n_blocks,) fp32
    absmax_codes: Tensor | None  # (n_blocks,) int8: absmax ~= offset + codes * step of its block of DQ_BLOCK
    absmax_step: Tensor | None  # (ceil(n_blocks / DQ_BLOCK),) fp32
    absmax_offset: Tensor | None  # (ceil(n_blocks / DQ_BLOCK),) fp32
    shape: tuple[int, ...]
    block_size: int = NF4_BLOCK


@dataclass
class Int8Tensor:
    """A 2-D weight as int8 codes with one scale per row: W ~= codes * scale[:, None]."""

    codes: Tensor  # (out, in) int8
    scale: Tensor  # (out,) fp32, absmax / 127 of each row
    shape: tuple[int, ...]


QuantizedWeight = NF4Tensor | Int8Tensor


def nbytes(q: QuantizedWeight) -> int:
    """Bytes of storage of ``q`` (codes and scales)."""
    return sum(t.numel() * t.element_size() for t in _tensors(q).values() if t is not None)


def resident_bytes(model: nn.Module) -> int:
    """Bytes held by the parameters and buffers of ``model``, each storage counted once (a tied weight, or a
    buffer that is a view of a larger tensor, counts its whole storage once)."""
    storages: dict[int, int] = {}  # data pointer -> bytes
    for t in [*model.parameters(), *model.buffers()]:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


# -- int8 ------------------------------------------------------------------------------------------------------------
def absmax_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric linear int8 codes of each row of ``x`` (n, k): codes (n, k) int8 in [-127, 127] and scale (n,) =
    absmax / 127, with x ~= codes * scale[:, None] and |error| <= scale / 2."""
    scale = x.abs().amax(dim=1) / 127  # (n,)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row gets codes 0
    codes = torch.round(x / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return codes, scale


def quantize_int8(weight: Tensor) -> Int8Tensor:
    """Weight-only int8 with one absmax scale per output row of ``weight`` (out, in)."""
    w = _float_weight(weight, 2)
    codes, scale = absmax_int8(w)
    return Int8Tensor(codes, scale, tuple(w.shape))


def dequantize_int8(q: Int8Tensor, start: int = 0, stop: int | None = None) -> Tensor:
    """Rows ``start:stop`` (default: all) of the weight, fp32 (stop - start, in)."""
    return q.codes[start:stop].float() * q.scale[start:stop, None]


# -- NF4 -------------------------------------------------------------------------------------------------------------
def nf4_index(x: Tensor) -> Tensor:
    """Index (uint8, 0..15) of the NF4 code nearest to each value of ``x`` (values outside [-1, 1] take the end
    codes)."""
    return torch.bucketize(x, _NF4_MIDPOINTS.to(x.device)).to(torch.uint8)


def quantize_scales(absmax: Tensor, block: int = DQ_BLOCK) -> tuple[Tensor, Tensor, Tensor]:
    """Double quantization of the absmax values (n,): int8 codes (n,), step (m,) and offset (m,) per block of
    ``block`` values, absmax ~= offset + codes * step, |error| <= step / 2 = (max - min) / 508 within a block."""
    rows = _blocks(absmax, block)  # (m, block)
    offset = (rows.amax(dim=1) + rows.amin(dim=1)) / 2  # (m,) midpoint of each block's range
    codes, step = absmax_int8(rows - offset[:, None])
    return codes.flatten()[: absmax.numel()].clone(), step, offset  # clone: no padding kept in memory


def dequantize_scales(codes: Tensor, step: Tensor, offset: Tensor, first: int = 0, block: int = DQ_BLOCK) -> Tensor:
    """Absmax values from their int8 ``codes`` (n,), which start at absmax index ``first``; fp32 (n,), >= 0."""
    group = torch.arange(first, first + codes.numel(), device=codes.device) // block  # (n,) block of each value
    return (offset[group] + codes.float() * step[group]).clamp_(min=0)


def quantize_nf4(weight: Tensor, block_size: int = NF4_BLOCK, double_quant: bool = True) -> NF4Tensor:
    """NF4 codes of ``weight`` (any shape; blocks run over the row-major flattening, the last block padded)."""
    if block_size <= 0 or block_size % 2:
        raise ValueError(f"NF4 block_size must be a positive even number, got {block_size}; use the default 64")
    w = _float_weight(weight)
    blocks = _blocks(w.flatten(), block_size)  # (n_blocks, block_size)
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    fields: dict[str, Tensor | None] = dict(absmax=absmax, absmax_codes=None, absmax_step=None, absmax_offset=None)
    scale = absmax
    if double_quant:
        codes8, step, offset = quantize_scales(absmax)
        fields = dict(absmax=None, absmax_codes=codes8, absmax_step=step, absmax_offset=offset)
        scale = dequantize_scales(codes8, step, offset)  # round the weights against the scale that is stored
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    index = nf4_index(blocks / safe[:, None]).flatten()  # (n_blocks * block_size,)
    packed = (index[0::2] << 4) | index[1::2]
    return NF4Tensor(packed, **fields, shape=tuple(w.shape), block_size=block_size)


def dequantize_nf4(q: NF4Tensor, start: int = 0, stop: int | None = None) -> Tensor:
    """The weight in fp32; for a 2-D weight, only rows ``start:stop`` (default: all), decoding just their blocks."""
    n = math.prod(q.shape)
    if start == 0 and stop is None:
        return _nf4_range(q, 0, n).view(q.shape)
    rows, cols = q.shape
    stop = rows if stop is None else min(stop, rows)
    return _nf4_range(q, start * cols, stop * cols).view(stop - start, cols)


def _nf4_range(q: NF4Tensor, lo: int, hi: int) -> Tensor:
    """Flat elements lo:hi of the weight, fp32."""
    bs = q.block_size
    b0, b1 = lo // bs, -(-hi // bs)  # blocks covering the range
    packed = q.packed[b0 * bs // 2 : b1 * bs // 2].int()  # (n/2,)
    pairs = _NF4_PAIRS.to(packed.device).flatten().index_select(0, packed).view(torch.float32)  # (n,) code values
    values = pairs.view(b1 - b0, bs) * _absmax(q, b0, b1)[:, None]  # (blocks, bs)
    return values.flatten()[lo - b0 * bs : hi - b0 * bs]


def _absmax(q: NF4Tensor, b0: int, b1: int) -> Tensor:
    if q.absmax is not None:
        return q.absmax[b0:b1]
    assert q.absmax_codes is not None and q.absmax_step is not None and q.absmax_offset is not None
    return dequantize_scales(q.absmax_codes[b0:b1], q.absmax_step, q.absmax_offset, first=b0)


# -- either format ---------------------------------------------------------------------------------------------------
QUANTIZERS: dict[int, Callable[..., QuantizedWeight]] = {
    4: quantize_nf4,
    8: lambda weight, double_quant=True: quantize_int8(weight),  # double_quant only concerns NF4
}


def quantize_weight(weight: Tensor, bits: int = 4, double_quant: bool = True) -> QuantizedWeight:
    """``weight`` in NF4 (bits=4, optionally double-quantized scales) or per-row int8 (bits=8)."""
    check_bits(bits)
    return QUANTIZERS[bits](weight, double_quant=double_quant)


def dequantize(q: QuantizedWeight, start: int = 0, stop: int | None = None) -> Tensor:
    """``q`` in fp32 (rows ``start:stop`` of a 2-D weight if given)."""
    if isinstance(q, NF4Tensor):
        return dequantize_nf4(q, start, stop)
    return dequantize_int8(q, start, stop)


def check_bits(bits: int) -> None:
    if bits not in BITS:
        raise ValueError(f"bits={bits!r} is not supported; use 4 (NF4) or 8 (int8)")


def _tensors(q: QuantizedWeight) -> dict[str, Tensor | None]:
    return {f.name: getattr(q, f.name) for f in dataclasses.fields(q) if f.name not in _META}


def _blocks(x: Tensor, block: int) -> Tensor:
    """1-D ``x`` as rows of ``block`` values (n_blocks, block); the last row is padded by repeating the final value,
    which leaves each row's min, max and absmax unchanged."""
    pad = -x.numel() % block
    if pad:
        x = torch.cat([x, x[-1:].expand(pad)])
    return x.view(-1, block)


def _float_weight(weight: Tensor, ndim: int | None = None) -> Tensor:
    if ndim is not None and weight.dim() != ndim:
        raise ValueError(f"expected a {ndim}-D weight (out, in), got shape {tuple(weight.shape)}")
    if weight.numel() == 0:
        raise ValueError("cannot quantize an empty weight")
    w = weight.detach().float()
    if not torch.isfinite(w).all():
        raise ValueError(f"weight of shape {tuple(w.shape)} holds NaN/inf; fix the model before quantizing it")
    return w


# -- the layer -------------------------------------------------------------------------------------------------------
class ChunkedWeight(Protocol):
    """A frozen layer that gives its weight (out, in) in full precision a few rows at a time."""

    def weight_chunks(self) -> Iterator[tuple[int, int, Tensor]]: ...


class _DequantLinear(torch.autograd.Function):
    """y = x @ W.T with W dequantized chunk by chunk; the backward dequantizes again instead of saving W, and
    returns no gradient for W (it is frozen)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, layer: ChunkedWeight) -> Tensor:  # x (..., in) -> (..., out)
        ctx.layer, ctx.x_dtype = layer, x.dtype
        parts = [nn.functional.linear(x, w.to(x.dtype)) for _, _, w in layer.weight_chunks()]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None]:  # grad (..., out)
        if not ctx.needs_input_grad[0]:
            return None, None
        grad_x = None
        for start, stop, w in ctx.layer.weight_chunks():
            part = grad[..., start:stop] @ w.to(grad.dtype)  # (..., in)
            grad_x = part if grad_x is None else grad_x + part
        return grad_x.to(ctx.x_dtype), None


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
    stays a Parameter. ``forward(x) = x @ dequantize().T + bias``. ``from_conv1d``: it replaced a GPT-2 Conv1D (weight
    stored (in, out)); the codes hold the transpose, so the forward is the same, and ``full_precision()`` gives back a
    Conv1D."""

    chunk_elements: int = 1 << 24  # weights dequantized at once (64 MB in fp32); larger layers go in row chunks

    def __init__(self, weight: QuantizedWeight, bias: Tensor | None = None, from_conv1d: bool = False) -> None:
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError(f"QuantLinear needs a 2-D (out, in) weight, got shape {weight.shape}")
        self.out_features, self.in_features = weight.shape
        self.from_conv1d = from_conv1d
        self._format = type(weight)
        self._meta = {f.name: getattr(weight, f.name) for f in dataclasses.fields(weight) if f.name in _META}
        for name, tensor in _tensors(weight).items():
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

    def weight_chunks(self) -> Iterator[tuple[int, int, Tensor]]:
        """(start, stop, rows start:stop of the weight in fp32), at most ``chunk_elements`` weights at a time."""
        q = self.quantized_weight()
        for start, stop in row_chunks(self.out_features, self.in_features, self.chunk_elements):
            yield start, stop, dequantize(q, start, stop)

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
        for name, tensor in _tensors(q).items():
            setattr(self, name, tensor)
        self._meta = {f.name: getattr(q, f.name) for f in dataclasses.fields(q) if f.name in _META}

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
        return [f.name for f in dataclasses.fields(self._format) if f.name not in _META]

    def _device(self) -> torch.device:
        return next(t for _, t in self.named_buffers()).device


# -- a whole model ---------------------------------------------------------------------------------------------------
def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a linear layer whose weight is stored (in, out); matched by class name."""
    return type(module).__name__ == "Conv1D"


def quantize(
    model: nn.Module,
    bits: int = 4,
    skip: Sequence[str] = ("lm_head",),
    double_quant: bool = True,
    embeddings: str = "bf16",
) -> nn.Module:
    """Quantize the frozen base ``model`` in place and return it: every ``nn.Linear`` and GPT-2 ``Conv1D`` becomes a
    ``QuantLinear`` (NF4 for bits=4, int8 for bits=8); the input embedding and the output layer are stored as
    ``embeddings`` says.

    Linear layers kept as they are: modules named in ``skip`` (exact name or dotted suffix), the output layer
    (``get_output_embeddings()``), and any Linear whose weight is shared with another module (tied). Inside LoRA
    wrappers only the base layer is quantized (lora_A / lora_B stay fp32); modules_to_save copies are left alone.

    ``embeddings``: the storage of the input embedding (``get_input_embeddings()``) and of the output layer (lm_head),
    which are never quantized to ``bits`` (bitsandbytes / Unsloth QLoRA keep them in 16 bits too); see
    lorakit.quant_embeddings.

    * ``"bf16"`` (default): their weights are kept in bfloat16, half the bytes of fp32 (SmolLM2-135M: the tied 49152 x
      576 embedding, 108 MiB in fp32, becomes 54 MiB), with an error of at most 2^-8 of each value. The model still
      computes in its own dtype (fp32): looked-up rows and the output layer's weight are cast on the fly. A tied
      embedding stays tied: one bf16 tensor serves both. LoRA on embed_tokens works as on any embedding, and
      ``merge_and_unload()`` gives it back as a full-precision nn.Embedding.
    * ``"fp16"``: the same in float16 (finer, 2^-11 of each value, but only from 6e-5 to 65504).
    * ``"keep"``: left as they are.

    Only plain ``nn.Embedding`` / ``nn.Linear`` modules in fp32 or fp64 are converted (a subclass, e.g. a scaled
    embedding, is kept with a warning; a model already in 16 bits has nothing to gain).

        model = lorakit.quantize(load_model(), bits=4)
        peft = lorakit.get_peft_model(model, LoraConfig(target_modules="all-linear"))   # QLoRA
    """
    from lorakit.layers import LoraLayer  # late imports: layers imports this module
    from lorakit.modules_to_save import ModulesToSaveWrapper
    from lorakit.quant_embeddings import check_embeddings, store_embeddings

    check_bits(bits)
    check_embeddings(embeddings)
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    get_out = getattr(model, "get_output_embeddings", None)
    output = get_out() if callable(get_out) else None

    def kept(name: str, module: nn.Module, linear: nn.Module) -> bool:
        named = any(name == s or name.endswith(f".{s}") for s in skip)
        return named or module is output or linear is output or uses[id(linear.weight)] > 1

    def linear_like(module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) or is_conv1d(module)

    def visit(prefix: str, parent: nn.Module) -> int:
        count = 0
        for child_name, child in parent.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            if isinstance(child, ModulesToSaveWrapper):
                continue
            if isinstance(child, LoraLayer):
                base = child.base_layer
                if linear_like(base) and not kept(name, child, base):
                    child.base_layer = QuantLinear.from_linear(base, bits, double_quant)
                    child.fan_in_fan_out = False  # a QuantLinear holds (out, in), whatever the layout it replaced
                    count += 1
            elif linear_like(child):
                if not kept(name, child, child):
                    setattr(parent, child_name, QuantLinear.from_linear(child, bits, double_quant))
                    count += 1
            else:
                count += visit(name, child)
        return count

    if visit("", model) == 0:
        warnings.warn(
            f"lorakit.quantize: no nn.Linear or Conv1D to quantize in {type(model).__name__} (skip={tuple(skip)!r}); "
            "it is already quantized, or its layers are of other types",
            stacklevel=2,
        )
    store_embeddings(model, embeddings)
    return model
