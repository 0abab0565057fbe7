"""Durable writes: a file is replaced whole or not at all (temp file in the same folder, fsync, ``os.replace``, fsync of
the folder), and a disk that refuses the bytes (full, read-only, forbidden) is an ``OutputWriteError`` naming the
path and the bytes needed, with nothing left behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


class OutputWriteError(OSError):
    """A write refused by the disk (full, read-only, no permission); the message names the path and the bytes it
    needed, and says that what was there before is unchanged. ``errno`` is the original one (ENOSPC, EROFS, ...)."""

    def __str__(self) -> str:
        return str(self.strerror)


_REFUSED = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "not permitted",
}


def write_error(path: str | os.PathLike, needed: int, error: OSError) -> OSError:
    """``error`` (from writing ``needed`` bytes for ``path``) as an OutputWriteError naming both, with the space free
    where it could be measured; errors other than a full, read-only or forbidden disk are returned unchanged."""
    if isinstance(error, OutputWriteError) or error.errno not in _REFUSED:
        return error
    path, free = Path(path), ""
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    with contextlib.suppress(OSError):
        free = f", {shutil.disk_usage(existing).free:,} free" if existing is not None else ""
    fix = "free some space" if error.errno in (errno.ENOSPC, errno.EDQUOT) else "make it writable"
    return OutputWriteError(
        error.errno,
        f"cannot write {path}: {_REFUSED[error.errno]} ({needed:,} bytes needed{free}); {fix} or write elsewhere. "
        "What was there before is unchanged and the temp files are removed",
    )


def write_temp(path: Path, data: bytes, needed: int | None = None) -> Path:
    """A new temp file beside ``path`` holding ``data``, fsynced (its disk space taken); removed again if the write
    fails, which raises OutputWriteError naming ``path`` and ``needed`` bytes (default: ``len(data)``)."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, public_mode())  # mkstemp's 0600 would hide the file from a server running as another user
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise write_error(path, len(data) if needed is None else needed, e) from None
        raise
    return Path(tmp)


def public_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file: 0o666 less the process umask (read once, at
    import: setting and restoring it later could race with other threads creating files)."""
    return 0o666 & ~_UMASK


def _read_umask() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


_UMASK = _read_umask()


def replace_durably(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` onto ``path`` and make the rename durable (fsync of the folder), so that the steps of a
    protocol reach the disk in their order."""
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(folder: str | os.PathLike) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a folder (EINVAL); the rename itself is atomic anyway
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers only ever see the old or the complete new file. A full or
    read-only disk raises OutputWriteError naming the path and the bytes; the old file is then unchanged."""
    path = Path(path)
    tmp = write_temp(path, data)
    try:
        replace_durably(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise write_error(path, len(data), e) from None
        raise


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, json_bytes(obj))


def refused_write(error: BaseException) -> OSError | None:
    """The OSError behind ``error`` when the disk refused a write (full, read-only, forbidden), else None. Besides
    OSError itself this reads the errno a Rust library puts in its message: safetensors' writer, which transformers'
    ``save_pretrained`` uses, raises ``SafetensorError('Error while serializing: I/O error: No space left on device
    (os error 28)')``, no OSError."""
    if isinstance(error, OSError):
        return error if error.errno in _REFUSED else None
    found = re.search(r"\(os error (\d+)\)", str(error))
    if found is None or int(found[1]) not in _REFUSED:
        return None
    return OSError(int(found[1]), os.strerror(int(found[1])))


def publish_folder(final: Path, write: Callable[[Path], None], needed: int | None = None) -> None:
    """A folder written whole or not at all: run ``write(tmp)`` in a temp sibling of ``final``, then move it to
    ``final`` (replacing what was there). With ``needed`` (the bytes the folder takes, an estimate), a disk that
    refuses the write (``refused_write``) raises OutputWriteError naming ``final`` and ``needed``; the previous
    folder is then unchanged and the temp folder removed, as after any failure."""
    try:
        _publish_folder(final, write)
    except Exception as e:
        refused = refused_write(e) if needed is not None else None
        if refused is None:
            raise
        raise write_error(final, needed, refused) from None


def _publish_folder(final: Path, write: Callable[[Path], None]) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    old: Path | None = None
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private (0o700); a model folder is normally readable
        write(tmp)
        if final.is_dir() and any(final.iterdir()):  # overwrite: rename the old folder away first
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, old)
        try:
            os.replace(tmp, final)  # atomic; replaces an empty folder
        except OSError:
            if old is not None:
                os.replace(old, final)  # put the previous folder back
                old = None
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
