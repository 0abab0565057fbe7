"""Adapter folders in HF PEFT's format: the only module that knows the file names, the journal and the key naming.
It imports nothing else of lorakit: configs come and go as JSON objects (``lorakit.config`` makes them LoraConfigs),
tensors as dicts keyed as in the file (``lorakit.adapters.state`` maps them to a model's parameters).

A saved adapter is a folder with ``adapter_config.json`` (LoraConfig.to_dict) and ``adapter_model.safetensors``
whose keys are the model's parameter names with the adapter name removed::

    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight      # (r, in)
    base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight      # (out, r)
    base_model.model.model.embed_tokens.lora_embedding_A                # (r, vocab)
    base_model.model.score.weight                                       # a modules_to_save copy, full

Adapters other than "default" go in a sub-folder named after them. Every write is atomic (temp file in the same
folder, fsync, ``os.replace``, fsync of the folder): a crash leaves the previous file or the new one, never half of
one. The two files of an adapter are replaced one after the other, so ``write_adapter`` keeps a journal
(``.adapter_config.next.json``: the new config and the new weights' SHA-256) while it does, and a folder *reads as*:

    the journal's config  if a journal exists and its SHA-256 is that of adapter_model.safetensors,
    adapter_config.json   otherwise,

with the weights on disk. ``write_adapter`` keeps that reading one whole version after each of its steps:

    0. settle: a journal whose hash is that of the weights on disk is the only record of what they are (a save
       killed between the weights and the config); its config is written as adapter_config.json, then it is dropped.
       Never overwriting such a journal is what makes kills in a row safe.
    1. write the three temp files (journal, weights, config), each fsynced: all disk space is taken before any
       visible change, so a full disk leaves the folder as it was;
    2. journal in place   (reads as old: the hash is not that of the weights on disk, unless they are the same)
    3. weights in place   (reads as new, through the journal)
    4. config in place    (reads as new)
    5. journal dropped    (reads as new)

A kill at any point, and any sequence of kills, leaves the folder reading as the old or the new version, whole
(tests/io/test_save_protocol.py enumerates them). Folders written by older lorakit versions use the same journal and
read the same way.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

try:
    import fcntl
except ImportError:  # not POSIX (Windows): folders are not locked
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
JOURNAL_NAME = ".adapter_config.next.json"  # the config being written, until both files are in place
LOCK_NAME = ".lorakit.lock"  # the pid of the process writing into the folder, while it does
MAX_CONFIG_BYTES = 16 * 2**20  # an adapter_config.json is a few KB (a rank_pattern for every module: some 100 KB)
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit on a header
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}  # fmt: skip
EMBEDDING_NAMES = ("embed_tokens", "lm_head")


class AdapterFileError(ValueError):
    """An adapter folder or file that is missing, corrupt, or does not fit the model; the message names it."""


class AdapterError(ValueError):
    """An adapter name that is invalid, unknown, or already taken."""


class OutputWriteError(OSError):
    """A write refused by the disk (full, read-only, no permission); the message names the path and the bytes it
    needed, and says that what was there before is unchanged. ``errno`` is the original one (ENOSPC, EROFS, ...)."""

    def __str__(self) -> str:
        return str(self.strerror)


class FolderLockedError(OSError):
    """Another running process writes into the folder; the message names it (pid, command, since when)."""


_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*")


# -- atomic writes -----------------------------------------------------------------------------------------------
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


def _write_temp(path: Path, data: bytes, needed: int | None = None) -> Path:
    """A new temp file beside ``path`` holding ``data``, fsynced (its disk space taken); removed again if the write
    fails, which raises OutputWriteError naming ``path`` and ``needed`` bytes (default: ``len(data)``)."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
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


def _replace(tmp: Path, path: Path) -> None:
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
    tmp = _write_temp(path, data)
    try:
        _replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise write_error(path, len(data), e) from None
        raise


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, _json_bytes(obj))


def save_tensors(path: str | os.PathLike, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """Atomically write ``tensors`` as a safetensors file (copies are made contiguous and unshared)."""
    atomic_write_bytes(path, _safetensors_bytes(tensors, metadata))


def _safetensors_bytes(tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> bytes:
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    return st_save(plain, metadata=metadata or {"format": "pt"})


# -- key naming --------------------------------------------------------------------------------------------------
def file_key(model_key: str, adapter_name: str) -> str:
    """Model parameter name -> name in the file: drop the adapter name ('lora_A.default.weight' -> 'lora_A.weight',
    'lora_embedding_A.default' -> 'lora_embedding_A', 'score.modules_to_save.default.weight' -> 'score.weight')."""
    key = model_key.replace(f".modules_to_save.{adapter_name}.", ".")
    if key.endswith(f".{adapter_name}"):
        return key[: -len(adapter_name) - 1]
    head, _, leaf = key.rpartition(".")
    return f"{re.sub(re.escape('.' + adapter_name) + '$', '', head)}.{leaf}"


# '<module>.lora_A.weight' / '<module>.lora_embedding_A', same for B.
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?:embedding_)?(?P<which>[AB])(?:\.weight)?$")


def lora_pairs(tensors: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """``{module name: (A (r, in), B (out, r))}`` of the LoRA tensors in an adapter file, in natural order
    (layers.2 before layers.10), names without the ``base_model.model.`` prefix. For embeddings A is (r, vocab) and
    B (dim, r)."""
    parts: dict[str, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        match = _LORA_KEY.match(key)
        if match:
            parts.setdefault(match["module"], {})[match["which"]] = tensor
    pairs = {name: (p["A"], p["B"]) for name, p in parts.items() if "A" in p and "B" in p}
    return {name: pairs[name] for name in sorted(pairs, key=_natural)}


def _natural(name: str) -> list[Any]:
    """Sort key putting 'layers.2' before 'layers.10'."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def check_adapter_name(name: str) -> str:
    """Adapter names become module keys and folder names: letters, digits, '_' and '-' only (no '.', '/', '..')."""
    if not isinstance(name, str) or not _ADAPTER_NAME.fullmatch(name):
        raise AdapterError(
            f"adapter name {name!r} is invalid: use letters, digits, '_' and '-' only (e.g. 'default', 'task_a')"
        )
    return name


def adapter_folder(save_directory: str | os.PathLike, adapter_name: str) -> Path:
    """'default' lives in the folder itself, any other adapter in a sub-folder named after it (as PEFT). The name is
    checked here too (AdapterError), so that no name ('../x', '/abs', 'a/b') can point outside ``save_directory``."""
    check_adapter_name(adapter_name)
    return Path(save_directory) if adapter_name == "default" else Path(save_directory) / adapter_name


def write_adapter(folder: str | os.PathLike, config: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    """Write one adapter (``config``: the JSON object of adapter_config.json) by the journal protocol of the module
    doc: after any step, and any sequence of interrupted writes, the folder reads (read_config_json + read_weights)
    as the old or the new version, whole. All disk space is taken first: a full or read-only disk raises
    OutputWriteError naming the folder and the bytes needed, with the folder unchanged. Holds the folder's lock
    (FolderLockedError if another process writes into it)."""
    folder = Path(folder)
    data = _safetensors_bytes(tensors)
    contents = {
        JOURNAL_NAME: _json_bytes({"config": config, "weights_sha256": hashlib.sha256(data).hexdigest()}),
        WEIGHTS_NAME: data,
        CONFIG_NAME: _json_bytes(config),
    }
    needed = sum(map(len, contents.values()))
    with folder_lock(folder, needed=needed):
        _settle(folder)
        temps: dict[str, Path] = {}
        try:
            for name, content in contents.items():  # 1. the temp files, fsynced
                temps[name] = _write_temp(folder / name, content, needed)
            for name in contents:  # 2-4. journal, weights, config in place, in that order
                _replace(temps[name], folder / name)
                del temps[name]
        finally:
            for tmp in temps.values():
                tmp.unlink(missing_ok=True)
        (folder / JOURNAL_NAME).unlink(missing_ok=True)  # 5.


def _settle(folder: Path) -> None:
    """Step 0 of write_adapter: finish a save that was interrupted after its weights were in place (write the
    journal's config as adapter_config.json), so that the journal, the only record of what the weights are, can be
    dropped; a journal whose weights never came is dropped as it is. Temp files of killed writes are removed (the
    lock is held: no other writer is using them)."""
    config = _journal_config(folder)
    if config is not None:
        _replace(_write_temp(folder / CONFIG_NAME, _json_bytes(config)), folder / CONFIG_NAME)
    (folder / JOURNAL_NAME).unlink(missing_ok=True)
    for name in (JOURNAL_NAME, WEIGHTS_NAME, CONFIG_NAME):
        for tmp in folder.glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)


def write_config_json(folder: str | os.PathLike, config: dict[str, Any]) -> None:
    """Write ``config`` alone as the folder's adapter_config.json (atomically), as a config's save_pretrained does.
    A journal left by an interrupted write_adapter is dropped after: the config written here is the one to read."""
    folder = Path(folder)
    with folder_lock(folder):
        atomic_write_json(folder / CONFIG_NAME, config)
        (folder / JOURNAL_NAME).unlink(missing_ok=True)


# -- one writer per folder ---------------------------------------------------------------------------------------
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
    os.pwrite(fd, _json_bytes(me), 0)
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


def _journal_config(folder: Path) -> dict[str, Any] | None:
    """The config of an interrupted write_adapter whose weights are already in place (None if there is none)."""
    try:
        journal = json.loads(_read_small(folder / JOURNAL_NAME, folder))
        data = _inside(folder, folder / WEIGHTS_NAME).read_bytes()
    except (OSError, ValueError, RecursionError):  # no journal (the normal case), no weights, or a broken journal
        return None  # (AdapterFileError, a ValueError: one that is too big or a symlink out of the folder: ignored)
    if isinstance(journal, dict) and journal.get("weights_sha256") == hashlib.sha256(data).hexdigest():
        return journal.get("config")
    return None  # the crash came before the new weights were in place: the old config fits them


def read_config_json(folder: str | os.PathLike) -> tuple[dict[str, Any], Path]:
    """(the JSON object of the folder's adapter config, the file it came from): the journal's config if an
    interrupted write_adapter left new weights in place, else adapter_config.json. AdapterFileError naming the file
    if it is missing or not a JSON object. ``lorakit.config.read_config`` turns it into a LoraConfig."""
    path = _existing_folder(folder) / CONFIG_NAME
    data = _journal_config(path.parent)
    if data is not None:
        path = path.parent / JOURNAL_NAME
    elif not path.is_file():
        raise AdapterFileError(
            f"{path} does not exist: {folder} is not an adapter folder (save one with "
            "save_pretrained, or pass the folder that holds adapter_config.json)"
        )
    else:
        try:
            data = json.loads(_read_small(path, path.parent))
        except AdapterFileError:
            raise
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, too many digits or brackets
            raise AdapterFileError(f"{path} is not valid JSON ({e}); re-save the adapter") from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data, path


def read_weights(folder: str | os.PathLike) -> tuple[dict[str, Tensor], str]:
    """(tensors, file name) of the adapter in ``folder``: safetensors, else a legacy .bin read with
    ``torch.load(weights_only=True)``, which never runs code from the file."""
    folder = _existing_folder(folder)
    path = folder / WEIGHTS_NAME
    if path.is_file():
        _check_safetensors(_inside(folder, path))
        try:
            return st_load(path.read_bytes()), str(path)
        except (SafetensorError, ValueError, OSError) as e:
            raise AdapterFileError(f"{path} is corrupt or truncated ({e}); re-save or re-download it") from None
    legacy = folder / LEGACY_WEIGHTS_NAME
    if legacy.is_file():
        _inside(folder, legacy)
        try:
            tensors = torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means: not a plain tensor file
            raise AdapterFileError(
                f"{legacy} is not a plain tensor file ({type(e).__name__}: {e}); lorakit only loads weights, never code"
            ) from None
        if not isinstance(tensors, dict) or not all(isinstance(v, Tensor) for v in tensors.values()):
            raise AdapterFileError(f"{legacy} does not hold a dict of tensors")
        return tensors, str(legacy)
    raise AdapterFileError(f"{folder} has no {WEIGHTS_NAME} (nor {LEGACY_WEIGHTS_NAME}); is the save complete?")


def _existing_folder(folder: str | os.PathLike) -> Path:
    path = Path(folder)
    if not path.is_dir():
        raise AdapterFileError(f"adapter folder {str(folder)!r} does not exist; pass the folder save_pretrained wrote")
    return path


# -- files from strangers: bounded reads, nothing outside the folder ---------------------------------------------
def _inside(folder: Path, path: Path) -> Path:
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


def _read_small(path: Path, folder: Path) -> str:
    """The text of a JSON file of an adapter folder, refused (AdapterFileError) before reading if it is bigger than
    MAX_CONFIG_BYTES or a symlink out of the folder."""
    size = _inside(folder, path).stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise AdapterFileError(
            f"{path} is {size:,} bytes; an adapter config is a few KB (lorakit reads at most {MAX_CONFIG_BYTES:,}): "
            "it is not an adapter config, re-save or re-download the adapter"
        )
    return path.read_text()


def _check_safetensors(path: Path) -> None:
    """AdapterFileError naming ``path`` for a safetensors header that declares more bytes than the file (or than
    MAX_HEADER_BYTES) holds, an invalid entry, or tensors whose offsets are out of range, overlap, or do not match
    their shape: checked on the header alone (read after its length), before the file is read."""
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
