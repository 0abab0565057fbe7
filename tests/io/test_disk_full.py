"""A full (ENOSPC) or read-only (EROFS) disk during save_pretrained or a checkpoint: OutputWriteError naming the
path and the bytes needed, the previous adapter / checkpoint unchanged and loadable, no temp file left. By fault
injection at every write of the writer, and for real on a small tmpfs (mounted when the tests run as root; skipped
otherwise)."""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import mounted_tmpfs, tiny_llama

from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.io import files as lio
from lorakit.io import writes
from lorakit.training import checkpoint

NEEDED = r"\((\d[\d,]*) bytes needed(, [\d,]+ free)?\)"


def _model(r: int, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    return get_peft_model(tiny_llama(), LoraConfig(r=r, target_modules=["q_proj", "v_proj"], init_lora_weights=False))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _fsync_fails_at(k: int, monkeypatch: pytest.MonkeyPatch, code: int = errno.ENOSPC) -> list[int]:
    """The k-th os.fsync of a file (the point where a full disk says so, at the latest) raises OSError(code)."""
    count, real = [0], os.fsync

    def fsync(fd: int) -> None:
        count[0] += 1
        if count[0] - 1 == k:
            raise OSError(code, os.strerror(code))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return count


def test_save_pretrained_on_a_full_disk_at_any_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "adapter"
    _model(2).save_pretrained(folder)
    before = _snapshot(folder)
    new = _model(8, seed=1)
    with pytest.MonkeyPatch.context() as mp:
        n = _fsync_fails_at(-1, mp)
        new.save_pretrained(tmp_path / "count")
    assert n[0] >= 3
    failed = 0
    for k in range(n[0]):
        with pytest.MonkeyPatch.context() as mp:
            _fsync_fails_at(k, mp)
            try:
                new.save_pretrained(folder)
            except writes.OutputWriteError as e:
                assert e.errno == errno.ENOSPC
                message = str(e)
            else:  # the failing fsync was a folder's (after a rename): the save went through
                assert _snapshot(folder) != before
                _model(2).save_pretrained(folder)
                continue
        assert message.startswith(f"cannot write {folder}/"), message
        needed = int(re.search(NEEDED, message)[1].replace(",", ""))
        assert needed >= (tmp_path / "count" / lio.WEIGHTS_NAME).stat().st_size
        assert "no space left on device" in message and "unchanged" in message
        assert _snapshot(folder) == before, k  # unchanged, no temp file
        PeftModel.from_pretrained(tiny_llama(), folder)
        failed += 1
    assert failed >= 3  # each of the three files' writes


def _checkpoint(output: Path, step: int, model: Any) -> Path:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return checkpoint.save_checkpoint(output, step, model, "default", optimizer, scheduler, {}, keep=2)


def _loads(folder: Path, model: Any) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    checkpoint.load_checkpoint(folder, model, "default", optimizer, scheduler)


def test_a_checkpoint_on_a_full_disk_at_any_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(4)
    first = _checkpoint(tmp_path, 1, model)
    before = _snapshot(tmp_path)
    failed = 0
    for k in range(8):
        with pytest.MonkeyPatch.context() as mp:
            _fsync_fails_at(k, mp)
            try:
                _checkpoint(tmp_path, 2, model)
            except writes.OutputWriteError as e:
                message = str(e)
            else:  # the failing fsync was a folder's (after a rename): the checkpoint went through
                shutil.rmtree(checkpoint.checkpoint_path(tmp_path, 2))
                continue
        assert message.startswith(f"cannot write {checkpoint.checkpoint_path(tmp_path, 2)}: no space left"), message
        assert re.search(NEEDED, message) and message.endswith(f"the newest checkpoint is still {first}")
        assert _snapshot(tmp_path) == before, k  # step 1 unchanged, no temp folder
        _loads(first, _model(4))
        failed += 1
    assert failed >= 4  # the adapter's three files and trainer_state.pt


# -- for real, on a small tmpfs ----------------------------------------------------------------------------------
@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    with mounted_tmpfs(tmp_path / "tmpfs", "512k") as mount:
        yield mount


def _fill(mount: Path, leave: int) -> None:
    """Fill the file system but ``leave`` bytes."""
    free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
    with open(mount / f"ballast-{uuid.uuid4().hex}", "wb") as f:
        try:
            f.write(b"\0" * max(free - leave, 0))
        except OSError:
            pass


def test_real_full_and_read_only_disk(tmpfs: Path) -> None:
    adapter, output = tmpfs / "adapter", tmpfs / "run"
    _model(2).save_pretrained(adapter)
    model = _model(4)
    first = _checkpoint(output, 1, model)
    before = _snapshot(adapter), _snapshot(output)
    _fill(tmpfs, 4096)
    with pytest.raises(writes.OutputWriteError, match=rf"cannot write {adapter}/.*no space left on device {NEEDED}"):
        _model(64, seed=1).save_pretrained(adapter)
    step_2 = f"{output}/checkpoints/step-00000002"
    with pytest.raises(writes.OutputWriteError, match=rf"cannot write {step_2}: no space left"):
        _checkpoint(output, 2, model)
    assert (_snapshot(adapter), _snapshot(output)) == before
    PeftModel.from_pretrained(tiny_llama(), adapter)
    _loads(first, _model(4))

    for ballast in tmpfs.glob("ballast-*"):
        ballast.unlink()
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    with pytest.raises(writes.OutputWriteError, match=rf"cannot write {adapter}.*: read-only file system {NEEDED}"):
        _model(8, seed=1).save_pretrained(adapter)
    with pytest.raises(writes.OutputWriteError, match=r"read-only file system"):
        _checkpoint(output, 2, model)
    assert (_snapshot(adapter), _snapshot(output)) == before
    PeftModel.from_pretrained(tiny_llama(), adapter)
