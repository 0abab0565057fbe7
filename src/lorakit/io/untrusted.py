"""Reading files from strangers: bounded reads, nothing outside the adapter folder, a safetensors header checked
before the file is read. Every refusal is an ``AdapterFileError`` naming the file and what to do.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

MAX_CONFIG_BYTES = 16 * 2**20  # an adapter_config.json is a few KB (a rank_pattern for every module: some 100 KB)
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit on a header
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}  # fmt: skip


class AdapterFileError(ValueError):
    """An adapter folder or file that is missing, corrupt, or does not fit the model; the message names it."""


def inside_folder(folder: Path, path: Path) -> Path:
    """``path``, unless it is a symlink leading outside ``folder`` (AdapterFileError: lorakit reads nothing outside
    an adapter folder). A Hugging Face cache snapshot (``snapshots/<rev>/`` whose files link to ``../../blobs/``)
    is allowed its blobs."""
    if not path.is_symlink():
        return path
    target, root = path.resolve(), folder.resolve()
    allowed = [root] + ([root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [])
    if not any(target.is_relative_to(a) for a in allowed):
        raise AdapterFileError(
            f"{path} is a symlink to {target}, outside the adapter folder {folder}; lorakit reads nothing outside "
            "it (copy the file into the folder if you trust it)"
        )
    return path


def read_small_text(path: Path, folder: Path) -> str:
    """The text of a JSON file of an adapter folder, refused (AdapterFileError) before reading if it is bigger than
    MAX_CONFIG_BYTES or a symlink out of the folder."""
    size = inside_folder(folder, path).stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise AdapterFileError(
            f"{path} is {size:,} bytes; an adapter config is a few KB (lorakit reads at most {MAX_CONFIG_BYTES:,}): "
            "it is not an adapter config, re-save or re-download the adapter"
        )
    return path.read_text()


def check_safetensors_header(path: Path) -> dict[str, Any]:
    """The header of safetensors file ``path``, checked: AdapterFileError naming ``path`` for a header that declares
    more bytes than the file (or than MAX_HEADER_BYTES) holds, an invalid entry, or tensors whose offsets are out of
    range, overlap, or do not match their shape: checked on the header alone (read after its length), before the
    file is read."""
    size, bad = path.stat().st_size, f"{path} is corrupt or truncated"
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= min(size - 8, MAX_HEADER_BYTES):
            raise AdapterFileError(
                f"{bad} (or not safetensors): its header declares {n:,} bytes, the file holds {size:,} "
                f"(a header is at most {MAX_HEADER_BYTES:,}); re-save or re-download it"
            )
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError) as e:
            raise AdapterFileError(f"{bad}: its header is not valid JSON ({e}); re-save it") from None
    if not isinstance(header, dict):
        raise AdapterFileError(f"{bad}: its header is not a JSON object; re-save it")
    data_bytes, spans = size - 8 - n, []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        ok = isinstance(info, dict) and isinstance(info.get("dtype"), str)
        shape, offsets = (info.get("shape"), info.get("data_offsets")) if ok else (None, None)
        ok = ok and isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
        ok = ok and isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
        if not ok:
            raise AdapterFileError(f"{bad}: tensor {name!r} has an invalid header entry {info!r:.200}; re-save it")
        begin, end = offsets
        if not 0 <= begin <= end <= data_bytes:
            raise AdapterFileError(
                f"{bad}: tensor {name!r} lies at bytes {begin:,}-{end:,}, outside the file's {data_bytes:,} bytes of "
                "data; re-save or re-download it"
            )
        itemsize = _DTYPE_BYTES.get(info["dtype"])  # a dtype newer than this table: its size left to safetensors
        if itemsize is not None and end - begin != math.prod(shape) * itemsize:
            raise AdapterFileError(
                f"{bad}: tensor {name!r} of shape {shape} ({info['dtype']}) does not fit its {end - begin:,} bytes; "
                "re-save it"
            )
        spans.append((begin, end, name))
    spans.sort()
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise AdapterFileError(f"{bad}: tensors {first!r} and {second!r} overlap in the file; re-save it")
    return header
