"""Resumable training checkpoints: adapter weights + optimizer + scheduler + RNG + data position.

A checkpoint is the folder ``<output>/checkpoints/step-00000050/`` holding ``adapter_model.safetensors``,
``adapter_config.json`` and ``trainer_state.pt``. It is written in a hidden temp folder and renamed into place, so
a checkpoint folder either exists complete or not at all; the newest complete one is what ``--resume`` uses.
``trainer_state.pt`` holds only tensors and plain Python values and is read with ``weights_only=True``.
"""

from __future__ import annotations

import io
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from lorakit.adapters import state as adapter_state
from lorakit.io import files, writes

CHECKPOINTS = "checkpoints"
STATE_NAME = "trainer_state.pt"


def checkpoint_root(output: str | os.PathLike) -> Path:
    return Path(output) / CHECKPOINTS


def checkpoint_path(output: str | os.PathLike, step: int) -> Path:
    """The folder of checkpoint ``step``: ``<output>/checkpoints/step-00000050``."""
    return checkpoint_root(output) / f"step-{step:08d}"


def list_checkpoints(output: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(output)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith("step-") and (p / STATE_NAME).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))


def latest_checkpoint(output: str | os.PathLike) -> Path | None:
    found = list_checkpoints(output)
    return found[-1] if found else None


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(
    output: str | os.PathLike,
    step: int,
    model: Any,
    adapter_name: str,
    optimizer: Any,
    scheduler: Any,
    extra: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint ``step`` atomically (temp folder + rename) and keep only the newest ``keep``. A full or
    read-only disk raises OutputWriteError naming the checkpoint and the bytes it needs; the temp folder is removed
    and the older checkpoints are unchanged (they are pruned only after the new one is in place)."""
    root = checkpoint_root(output)
    final = checkpoint_path(output, step)
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    tensors = adapter_state.adapter_state_dict(model, adapter_name)
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        **extra,
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    needed = buffer.tell() + sum(t.numel() * t.element_size() for t in tensors.values())
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        files.write_adapter(tmp, model.config_to_save(adapter_name).to_dict(), tensors, model.file_metadata())
        writes.atomic_write_bytes(tmp / STATE_NAME, buffer.getvalue())
        if final.exists():  # a re-run of the same step (after a resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        writes.fsync_dir(root)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno is not None:
            error = writes.write_error(final, needed, OSError(e.errno, os.strerror(e.errno)))
            if error is not e and isinstance(error, writes.OutputWriteError):
                latest = latest_checkpoint(output)
                raise writes.OutputWriteError(
                    e.errno, f"{error}; the newest checkpoint is still {latest}" if latest else str(error)
                ) from None
        raise
    for old in list_checkpoints(output)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    folder: str | os.PathLike, model: Any, adapter_name: str, optimizer: Any, scheduler: Any
) -> dict[str, Any]:
    """Restore adapter weights, optimizer, scheduler and RNG from ``folder``; returns the saved state dict."""
    folder = Path(folder)
    tensors, source = files.read_weights(folder)
    adapter_state.load_adapter_state_dict(model, tensors, adapter_name, source)
    state = torch.load(folder / STATE_NAME, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state


def clean_partial(output: str | os.PathLike) -> None:
    """Remove temp folders left by a checkpoint write that was killed."""
    root = checkpoint_root(output)
    if root.is_dir():
        for p in root.glob(".tmp-step-*"):
            shutil.rmtree(p, ignore_errors=True)
