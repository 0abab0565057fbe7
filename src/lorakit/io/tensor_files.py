"""The files of data-driven initializers' preprocessing (CorDA's covariances and decompositions, LoRA-GA's
gradients): a dict of named tensors, written with torch.save (PEFT's format, so either library reads the other's)
and read back with ``weights_only=True`` (tensors only: no code runs from the file)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch
from torch import Tensor

from lorakit.io.writes import atomic_write_bytes


def exists(path: str | os.PathLike | None) -> bool:
    """Whether ``path`` names a file with something in it (an empty one is rebuilt, as PEFT does)."""
    return path is not None and os.path.exists(path) and os.path.getsize(path) > 0


def load_tensors(path: str | os.PathLike, device: torch.device, what: str) -> dict[str, Tensor]:
    """The dict of tensors in ``path``, on ``device``; ValueError naming ``what`` the file should be if it holds
    something else."""
    data = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(data, dict):
        raise ValueError(f"{path} is no {what} (a dict of tensors); delete it to rebuild it")
    return data


def save_tensors(path: str | os.PathLike, tensors: dict[str, Tensor]) -> None:
    """torch.save of ``tensors`` (each stored on its own, not as a view of a larger tensor), written atomically."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({k: v.detach().contiguous().clone() for k, v in tensors.items()}, buffer)
    atomic_write_bytes(path, buffer.getvalue())
