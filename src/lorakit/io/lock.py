"""One writer per folder: ``folder_lock(folder)`` holds ``folder/.lorakit.lock`` (flock'ed, holding the pid) while a
block writes there; a second process gets ``FolderLockedError`` naming the holder at once, and a lock left by a
dead process is taken over.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lorakit.io.writes import json_bytes, write_error

try:
    import fcntl
except ImportError:  # not POSIX (Windows): folders are not locked
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

LOCK_NAME = ".lorakit.lock"  # the pid of the process writing into the folder, while it does


class FolderLockedError(OSError):
    """Another running process writes into the folder; the message names it (pid, command, since when)."""


_held: dict[Path, list[Any]] = {}  # lock file -> [fd, depth, folders the lock created]: re-entrant per process


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str | None = None, needed: int = 0) -> Iterator[None]:
    """Hold ``folder``'s lock (the file ``.lorakit.lock``, flock'ed, holding this process's pid and command) while
    the block runs; re-entrant within a process. If another live process holds it, FolderLockedError names that
    process at once. A lock file left by a process that died (kill -9) is no longer flock'ed and is taken over.
    The lock file is removed on release, and the folders the lock created if they are still empty. A folder that
    cannot be written raises OutputWriteError (``needed``: the bytes the caller is about to write, for its message)."""
    folder = Path(folder)
    try:
        created = [d for d in (folder, *folder.parents) if not d.is_dir()]  # deepest first
        folder.mkdir(parents=True, exist_ok=True)
        path = folder.resolve() / LOCK_NAME
    except OSError as e:
        raise write_error(folder, needed, e) from None
    if path in _held or fcntl is None:
        if path in _held:
            _held[path][1] += 1
        try:
            yield
        finally:
            if path in _held:
                _held[path][1] -= 1
        return
    fd = _acquire(path, folder, what, needed)
    _held[path] = [fd, 1, created]
    try:
        yield
    finally:
        _held.pop(path)
        try:
            with contextlib.suppress(OSError):
                path.unlink()  # while still holding it: a process opening this file re-checks it (see _acquire)
        finally:
            os.close(fd)
        with contextlib.suppress(OSError):
            for d in created:
                d.rmdir()  # only if empty: a run refused by its checks leaves nothing behind


def _acquire(path: Path, folder: Path, what: str | None, needed: int) -> int:
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise write_error(path, needed, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderLockedError(
                f"{folder} is in use by {_holder(path)}; wait for it to end, stop it, or write to another folder "
                f"(the lock: {path})"
            ) from None
        try:  # the file locked must still be the one at ``path``: a releasing holder unlinks it before closing
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    old = os.pread(fd, 4096, 0)
    if old.strip():
        logger.warning("%s: took over the lock left by %s, which is no longer running", folder, _describe(old))
    me = {"pid": os.getpid(), "host": socket.gethostname(), "command": what or " ".join(sys.argv)[:300],
          "since": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
    os.ftruncate(fd, 0)
    os.pwrite(fd, json_bytes(me), 0)
    return fd


def _holder(path: Path) -> str:
    for _ in range(20):  # the holder writes its pid right after taking the lock
        with contextlib.suppress(OSError):
            data = path.read_bytes()
            if data.strip():
                return _describe(data)
        time.sleep(0.01)
    return "another process (its pid is not written yet)"


def _describe(data: bytes) -> str:
    try:
        info = json.loads(data)
        return f"process {info['pid']} on {info['host']} ({info['command']}, since {info['since']})"
    except (ValueError, KeyError, TypeError):
        return "another process"
