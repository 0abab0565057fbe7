"""io.writes: what a published file looks like to other users."""

from __future__ import annotations

import errno
from pathlib import Path

from safetensors import SafetensorError

from lorakit.io import writes
from lorakit.io.writes import atomic_write_bytes


def test_written_files_are_as_readable_as_a_plain_open_makes_them(tmp_path: Path, monkeypatch) -> None:
    """Temp files start private (mkstemp: 0600); the published file gets 0666 less the umask, as open() would,
    so an engine serving the adapter as another user can read it."""
    for umask, mode in ((0o022, 0o644), (0o077, 0o600)):
        monkeypatch.setattr(writes, "_UMASK", umask)
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        assert (tmp_path / "a.bin").stat().st_mode & 0o777 == mode


def test_a_refused_write_is_found_behind_a_rust_writers_message() -> None:
    """safetensors' writer (transformers' save_pretrained) reports a full disk as a SafetensorError, no OSError."""
    full = OSError(errno.ENOSPC, "No space left on device")
    assert writes.refused_write(full) is full
    found = writes.refused_write(SafetensorError("Error while serializing: I/O error: Read-only file system "
                                                 '(os error 30) at path "/out/.tmpS92if1"'))  # fmt: skip
    assert isinstance(found, OSError) and found.errno == errno.EROFS
    assert writes.refused_write(OSError(errno.ENOENT, "No such file or directory")) is None
    assert writes.refused_write(SafetensorError("I/O error: No such file or directory (os error 2)")) is None
    assert writes.refused_write(ValueError("header too large")) is None
