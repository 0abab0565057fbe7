"""Rows of a base model's weights read straight from its safetensors files, without reading (or mapping) the rest.

A process that keeps only some rows of every weight (``lorakit train --fsdp``: 1/N of each along dim 0) reads those
rows with plain file reads into memory it owns; the other rows are never paged in. ``from_pretrained`` maps the
whole file instead, and every page a process touches stays resident until the last weight of the file is freed.

Example::

    weights = BaseWeights.open("models/smollm2")     # None: the folder has no safetensors weights
    out = torch.empty(288, 576)
    weights.read_rows("model.layers.0.self_attn.q_proj.weight", 288, 576, out)   # rows 288..575
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.io.untrusted import check_safetensors_header

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"  # a sharded checkpoint: {"weight_map": {key: file name}}
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass(frozen=True)
class Entry:
    """Where one tensor lies: its file, its dtype and shape, and the byte offset of its data in the file."""

    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int


class BaseWeights:
    """The floating-point tensors of a model folder's safetensors files, by key (``model.layers.0.mlp.up_proj.weight``),
    each readable a range of rows at a time."""

    def __init__(self, entries: dict[str, Entry]) -> None:
        self.entries = entries

    @classmethod
    def open(cls, folder: str | Path) -> BaseWeights | None:
        """The weights of ``folder`` (``model.safetensors``, or the files its ``model.safetensors.index.json``
        names), headers checked; None when it has neither."""
        folder = Path(folder)
        if (folder / INDEX).is_file():
            names = sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))
        elif (folder / SINGLE).is_file():
            names = [SINGLE]
        else:
            return None
        entries: dict[str, Entry] = {}
        for name in names:
            path = folder / name
            header = check_safetensors_header(path)
            with open(path, "rb") as f:
                start = 8 + int.from_bytes(f.read(8), "little")  # data follow the 8-byte length and the header
            for key, info in header.items():
                if key != "__metadata__" and info["dtype"] in DTYPES:
                    entries[key] = Entry(path, DTYPES[info["dtype"]], tuple(info["shape"]),
                                         start + info["data_offsets"][0])  # fmt: skip
        return cls(entries)

    def read_rows(self, key: str, start: int, stop: int, out: torch.Tensor) -> None:
        """Rows ``start:stop`` (dim 0) of tensor ``key`` into ``out`` (contiguous, of shape (stop - start, *rest),
        any floating dtype: the file's values are cast to it)."""
        entry = self.entries[key]
        rest = entry.shape[1:]
        if tuple(out.shape) != (stop - start, *rest) or not out.is_contiguous():
            raise ValueError(f"{key}: rows {start}:{stop} of {entry.shape} do not fit a tensor of {tuple(out.shape)}")
        row_bytes = math.prod(rest) * entry.dtype.itemsize
        buffer = out if out.dtype == entry.dtype else torch.empty(out.shape, dtype=entry.dtype)
        with open(entry.path, "rb") as f:
            f.seek(entry.offset + start * row_bytes)
            view = memoryview(buffer.view(torch.uint8).numpy()).cast("B") if buffer.numel() else bytearray()
            if f.readinto(view) != len(view):
                raise OSError(f"{entry.path}: tensor {key!r} ends before its rows {start}:{stop}; re-save the model")
        if buffer is not out:
            out.copy_(buffer)
