"""Writing GGUF files with the ``gguf`` package: tensor types, copied metadata, and a file written whole or not at all.

``GGUFWriter`` writes to its path as it goes, so a crash or a full disk would leave a truncated file that llama.cpp
rejects only when it reaches the missing bytes. Here the writer writes a temporary sibling, which is synced and then
renamed onto the final name (``lorakit.io.writes.replace_durably``).

Example::

    tensors = [GgufTensor("blk.0.attn_q.weight.lora_a", *encode(A.numpy(), "f32"))]
    write_gguf("adapter.gguf", "llama", [("general.type", "adapter", gguf.GGUFValueType.STRING)], tensors)
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from lorakit.io.writes import public_mode, replace_durably, write_error

# --outtype -> GGML type. q8_0 stores blocks of 32 values along a row (the input dimension).
OUTTYPES: dict[str, gguf.GGMLQuantizationType] = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "bf16": gguf.GGMLQuantizationType.BF16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
}

# A metadata entry: (key, value, value type[, element type of an array]).
Field = tuple[Any, ...]


@dataclass(frozen=True)
class GgufTensor:
    """A tensor as the writer takes it: ``data`` encoded in ``qtype`` (raw bytes for block types)."""

    name: str
    data: np.ndarray
    qtype: gguf.GGMLQuantizationType


def check_outtype(outtype: str) -> gguf.GGMLQuantizationType:
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    return OUTTYPES[outtype]


def encode(values: np.ndarray, outtype: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """``values`` (float32, numpy shape (out, in)) in ``outtype``; a block type whose block does not divide the row
    falls back to f16, as llama.cpp's converters do."""
    qtype = check_outtype(outtype)
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if values.ndim == 1 or values.shape[-1] % block:
        qtype = gguf.GGMLQuantizationType.F16 if block > 1 else qtype
    return gguf.quants.quantize(np.ascontiguousarray(values, dtype=np.float32), qtype), qtype


def decode(tensor: gguf.ReaderTensor) -> np.ndarray:
    """A tensor read by ``GGUFReader`` as float32, numpy shape (out, in) (ggml's shape reversed)."""
    shape = tuple(int(n) for n in reversed(tensor.shape))
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32).reshape(shape)


def raw(tensor: gguf.ReaderTensor) -> GgufTensor:
    """A read tensor, to be written again unchanged (same type, same bytes)."""
    return GgufTensor(tensor.name, tensor.data, tensor.tensor_type)


def copied_fields(reader: gguf.GGUFReader, skip: Iterable[str] = ()) -> Iterator[Field]:
    """The metadata of a read file as writer entries, without the file-structure keys (``GGUF.*``), the architecture
    (the writer adds it) and ``skip``."""
    skipped = {"general.architecture", *skip}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in skipped:
            continue
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            yield key, field.contents(), kind, field.types[-1]
        else:
            yield key, field.contents(), kind


def write_gguf(path: str | os.PathLike, arch: str, fields: Iterable[Field], tensors: Sequence[GgufTensor]) -> Path:
    """Write a GGUF file for llama.cpp architecture ``arch`` at ``path``, whole or not at all (see the module doc).
    A full or read-only disk raises OutputWriteError naming the path; a file already at ``path`` is then unchanged."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    needed = sum(t.data.nbytes for t in tensors)
    try:
        writer = gguf.GGUFWriter(None, arch)
        for key, value, *types in fields:
            writer.add_key_value(key, value, *types)
        for t in tensors:
            writer.add_tensor(t.name, t.data, raw_dtype=t.qtype)
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        tmp.chmod(public_mode())  # mkstemp makes it private; a model file is normally readable
        replace_durably(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise write_error(path, needed, e) from None
        raise
    return path
