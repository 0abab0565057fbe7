"""Weight formats for a frozen base: 4-bit NormalFloat (NF4) and int8, as pure tensor functions.

NF4 (Dettmers et al. 2023, "QLoRA", sec. 3 and appendix E): the weight is flattened (row-major) and cut into blocks
of 64 values; each block is divided by its absmax and every value is rounded to the nearest of 16 code values
(quantiles of N(0, 1) scaled to [-1, 1], with an exact 0). Two 4-bit codes are packed per byte. Storage per weight:
0.5 byte of codes + 4/64 byte of fp32 absmax, or with double quantization 1/64 byte of int8 absmax codes + 8/(64*256)
byte of fp32 step and offset per 256 absmax values (0.516 byte in all).

Double quantization (QLoRA sec. 3): the absmax values are quantized again in blocks of 256. The paper subtracts their
mean and uses 8-bit floats; here each block of 256 is centred on its midpoint (max + min) / 2 and stored as linear
int8 codes: the worst-case error is (max - min) / 508, smaller than an 8-bit float's for values that cluster as
absmax values do, and the format is idempotent (quantizing a dequantized weight gives the same codes), which the
LoftQ flow relies on (``lorakit.ops.loftq``).

int8 (weight-only): one absmax scale per output row, codes round(W / scale) in [-127, 127]; |error| <= absmax / 254.

The layer that computes with such a weight is ``lorakit.quant.linear.QuantLinear``; rewiring a model onto it is
``lorakit.adapters.quantize``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

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
META_FIELDS = ("shape", "block_size")  # the non-tensor fields of NF4Tensor / Int8Tensor


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
    return sum(t.numel() * t.element_size() for t in tensor_fields(q).values() if t is not None)


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


def dequantize_int8(
    q: Int8Tensor, start: int = 0, stop: int | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Rows ``start:stop`` (default: all) of the weight (stop - start, in): codes * scale computed in fp32, stored in
    ``dtype`` (rounded once, as ``.to(dtype)`` of the fp32 product would be, without that product in memory)."""
    codes, scale = q.codes[start:stop], q.scale[start:stop, None]
    return torch.mul(codes, scale, out=torch.empty(codes.shape, dtype=dtype, device=codes.device))


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


def dequantize_nf4(q: NF4Tensor, start: int = 0, stop: int | None = None, dtype: torch.dtype = torch.float32,
                   decode: BlockDecoder | None = None) -> Tensor:
    """The weight (code * absmax computed in fp32, stored in ``dtype``: rounded once, as ``.to(dtype)`` of the fp32
    weight would be); for a 2-D weight, only rows ``start:stop`` (default: all), decoding just their blocks.
    ``decode``: a function equal to ``nf4_blocks`` to decode the blocks with (lorakit.quant.nf4_compiled's
    compiled one)."""
    n = math.prod(q.shape)
    if start == 0 and stop is None:
        return _nf4_range(q, 0, n, dtype, decode).view(q.shape)
    rows, cols = q.shape
    stop = rows if stop is None else min(stop, rows)
    return _nf4_range(q, start * cols, stop * cols, dtype, decode).view(stop - start, cols)


def _nf4_range(q: NF4Tensor, lo: int, hi: int, dtype: torch.dtype, decode: BlockDecoder | None) -> Tensor:
    """Flat elements lo:hi of the weight, in ``dtype``."""
    bs = q.block_size
    b0, b1 = lo // bs, -(-hi // bs)  # blocks covering the range
    packed = q.packed[b0 * bs // 2 : b1 * bs // 2]  # (n/2,)
    if q.absmax is not None:
        scales = (q.absmax[b0:b1], None, None, None)
    else:
        scales = (None, q.absmax_codes[b0:b1], q.absmax_step, q.absmax_offset)
    values = (decode or nf4_blocks)(packed, *scales, first=b0, block_size=bs, dtype=dtype)  # (blocks, bs)
    return values.flatten()[lo - b0 * bs : hi - b0 * bs]


def nf4_blocks(packed: Tensor, absmax: Tensor | None, absmax_codes: Tensor | None, absmax_step: Tensor | None,
               absmax_offset: Tensor | None, *, first: int, block_size: int, dtype: torch.dtype) -> Tensor:
    """NF4 blocks decoded, (blocks, block_size) in ``dtype``: the bytes ``packed`` (blocks * block_size / 2,) of
    consecutive blocks, and their scales, ``absmax`` (blocks,) or, double-quantized, their int8 codes (which start
    at absmax index ``first``) with the step and offset of every block of DQ_BLOCK."""
    if absmax is None:
        assert absmax_codes is not None and absmax_step is not None and absmax_offset is not None
        absmax = dequantize_scales(absmax_codes, absmax_step, absmax_offset, first=first)
    pairs = _NF4_PAIRS.to(packed.device).flatten().index_select(0, packed.int()).view(torch.float32)  # code values
    values = torch.empty(absmax.numel(), block_size, dtype=dtype, device=packed.device)  # (blocks, bs)
    torch.mul(pairs.view(-1, block_size), absmax[:, None], out=values)  # fp32 products, rounded on store
    return values


BlockDecoder = Callable[..., Tensor]  # a function of nf4_blocks' arguments, equal to it


# -- either format ---------------------------------------------------------------------------------------------------
QUANTIZERS: dict[int, Callable[..., QuantizedWeight]] = {
    4: quantize_nf4,
    8: lambda weight, double_quant=True: quantize_int8(weight),  # double_quant only concerns NF4
}


def quantize_weight(weight: Tensor, bits: int = 4, double_quant: bool = True) -> QuantizedWeight:
    """``weight`` in NF4 (bits=4, optionally double-quantized scales) or per-row int8 (bits=8)."""
    check_bits(bits)
    return QUANTIZERS[bits](weight, double_quant=double_quant)


def dequantize(
    q: QuantizedWeight, start: int = 0, stop: int | None = None, dtype: torch.dtype = torch.float32,
    decode: BlockDecoder | None = None,
) -> Tensor:
    """``q`` (rows ``start:stop`` of a 2-D weight if given) in fp32, or stored in ``dtype``: bit for bit the fp32
    weight's ``.to(dtype)``, made in one pass (the matmuls of a bf16 step take it so, lorakit.quant.linear).
    ``decode``: NF4's block decoder, if not ``nf4_blocks`` (see ``dequantize_nf4``)."""
    if isinstance(q, NF4Tensor):
        return dequantize_nf4(q, start, stop, dtype, decode)
    return dequantize_int8(q, start, stop, dtype)


def check_bits(bits: int) -> None:
    if bits not in BITS:
        raise ValueError(f"bits={bits!r} is not supported; use 4 (NF4) or 8 (int8)")


def tensor_fields(q: QuantizedWeight) -> dict[str, Tensor | None]:
    return {f.name: getattr(q, f.name) for f in dataclasses.fields(q) if f.name not in META_FIELDS}


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
