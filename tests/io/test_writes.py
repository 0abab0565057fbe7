"""io.writes: what a published file looks like to other users."""

from __future__ import annotations

from pathlib import Path

from lorakit.io import writes
from lorakit.io.writes import atomic_write_bytes


def test_written_files_are_as_readable_as_a_plain_open_makes_them(tmp_path: Path, monkeypatch) -> None:
    """Temp files start private (mkstemp: 0600); the published file gets 0666 less the umask, as open() would,
    so an engine serving the adapter as another user can read it."""
    for umask, mode in ((0o022, 0o644), (0o077, 0o600)):
        monkeypatch.setattr(writes, "_UMASK", umask)
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        assert (tmp_path / "a.bin").stat().st_mode & 0o777 == mode
