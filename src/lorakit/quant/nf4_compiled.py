"""NF4 decoding in one fused loop, by torch.compile (inductor), with lorakit.quant.formats' eager decode as its
reference.

A QLoRA step decodes every frozen NF4 weight twice, for the forward matmul and for the backward's input gradient.
Eagerly that is a chain of passes over the weight (the codes widened to int32 indices, the lookup of each byte's two
code values, the block scales decoded from their int8 codes, the product rounded into the matmul's dtype); compiled,
inductor fuses them into one loop over the packed bytes. The arithmetic is the eager decode's (each weight one fp32
product of its code value and its block's scale, rounded once into the dtype), so the result is bit for bit the
eager one: ``decode_blocks`` proves it at the first call of each kind of input (shapes, dtype, device, scale format)
by running both and comparing, and takes the eager result, for good, where they differ. Measured on a 1536 x 576
weight into bf16: 0.27 ms compiled against 0.76 ms eager (its matmul with 1024 tokens: 0.94 ms).

It runs where it is known to help and can be checked: weights of at least ``MIN_ELEMENTS`` (tiny models, as in the
tests, stay eager: a compile costs seconds), on the CPU or CUDA, outside another torch.compile trace (that one
compiles the eager decode itself), unless ``LORAKIT_COMPILE=0``. If torch.compile fails here (inductor's CPU code
needs a C++ compiler), one warning says so and every decode stays eager.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch
from torch import Tensor

from lorakit.quant import formats

MIN_ELEMENTS = 1 << 16  # weights (elements decoded in one call) from which the compiled decode is worth its compile
DEVICES = frozenset({"cpu", "cuda"})  # device types inductor compiles for

_compiled = None  # torch.compile(fused_blocks), made at the first call
_failed = False  # torch.compile did not work in this process: eager from then on
_checked: dict[tuple, bool] = {}  # kind of input -> whether the compiled result equalled the eager one


def enabled() -> bool:
    """Whether ``LORAKIT_COMPILE`` allows compiled decoding (anything but 0 / false / off / no)."""
    return os.environ.get("LORAKIT_COMPILE", "1").strip().lower() not in ("0", "false", "off", "no")


def decoder(elements: int, device: torch.device) -> formats.BlockDecoder | None:
    """``decode_blocks`` if a decode of ``elements`` weights on ``device`` takes the compiled path (see the module
    doc), else None (formats.nf4_blocks, eager)."""
    if (elements >= MIN_ELEMENTS and device.type in DEVICES and not _failed and enabled()
            and not torch.compiler.is_compiling()):
        return decode_blocks
    return None


def fused_blocks(packed: Tensor, absmax: Tensor | None, absmax_codes: Tensor | None, absmax_step: Tensor | None,
                 absmax_offset: Tensor | None, *, first: int, block_size: int, dtype: torch.dtype) -> Tensor:
    """formats.nf4_blocks written elementwise for the compiler: each byte's two codes looked up by nibble (the eager
    decode's one lookup of a 256-entry table of pairs, viewed as int64, is its fastest eager form but does not fuse),
    times the block's scale in fp32, rounded once into ``dtype``."""
    if absmax is None:
        absmax = formats.dequantize_scales(absmax_codes, absmax_step, absmax_offset, first=first)
    codes = formats.NF4_CODES.to(packed.device)
    pairs = torch.stack([codes[(packed >> 4).long()], codes[(packed & 15).long()]], dim=1)  # (n/2, 2) fp32
    return (pairs.view(-1, block_size) * absmax[:, None]).to(dtype)


def decode_blocks(packed: Tensor, absmax: Tensor | None, absmax_codes: Tensor | None, absmax_step: Tensor | None,
                  absmax_offset: Tensor | None, *, first: int, block_size: int, dtype: torch.dtype) -> Tensor:
    """formats.nf4_blocks(...) computed by the compiled ``fused_blocks``; at the first call of each kind of input
    both run and must be equal bit for bit, else that kind stays eager. If torch.compile fails, one warning, and
    eager from then on."""
    global _compiled, _failed
    tensors = (packed, absmax, absmax_codes, absmax_step, absmax_offset)
    options = dict(first=first, block_size=block_size, dtype=dtype)
    key = (dtype, block_size, first, *(None if t is None else (tuple(t.shape), t.dtype, t.device) for t in tensors))
    if _checked.get(key) is False:
        return formats.nf4_blocks(*tensors, **options)
    new_kind = key not in _checked  # a first call of this kind compiles: torch's own warnings then are not the user's
    try:
        with warnings.catch_warnings() if new_kind else contextlib.nullcontext():
            if new_kind:
                warnings.simplefilter("ignore")
            if _compiled is None:
                _compiled = torch.compile(fused_blocks)
            out = _compiled(*tensors, **options)
    except Exception as error:  # a compiler missing or failing: inductor raises many kinds
        _failed = True
        warnings.warn(f"lorakit: NF4 weights are decoded eagerly (torch.compile failed here: {type(error).__name__}: "
                      f"{str(error)[:300]}); set LORAKIT_COMPILE=0 to skip trying", stacklevel=2)
        return formats.nf4_blocks(*tensors, **options)
    if new_kind:
        reference = formats.nf4_blocks(*tensors, **options)
        _checked[key] = bool(torch.equal(out, reference))
        if not _checked[key]:
            return reference
    return out
