"""Adapter folders in HF PEFT's format: the only module that knows the file names, the journal and the key naming.
It imports only io's own modules (writes, lock, untrusted): configs come and go as JSON objects (``lorakit.config``
makes them LoraConfigs), tensors as dicts keyed as in the file (``lorakit.adapters.state`` maps them to a model's
parameters).

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

    the journal's config  if a journal exists and its SHA-256 is that of the weights file it names,
    adapter_config.json   otherwise,

with the weights on disk: the journal's weights file in the first case, else adapter_model.safetensors, else a
legacy adapter_model.bin (written with ``safe_serialization=False``, as PEFT does; read with
``weights_only=True``). ``write_adapter`` keeps that reading one whole version after each of its steps:

    0. settle: a journal whose hash is that of the weights on disk is the only record of what they are (a save
       killed between the weights and the config); its config is written as adapter_config.json, then it is dropped.
       Never overwriting such a journal is what makes kills in a row safe.
    1. write the three temp files (journal, weights, config), each fsynced: all disk space is taken before any
       visible change, so a full disk leaves the folder as it was;
    2. journal in place   (reads as old: the hash is not that of the weights on disk, unless they are the same)
    3. weights in place   (reads as new, through the journal)
    4. config in place    (reads as new)
    4b. the weights file of the other format, if any, removed (reads as new, through the journal)
    5. journal dropped    (reads as new)

A kill at any point, and any sequence of kills, leaves the folder reading as the old or the new version, whole
(tests/io/test_save_protocol.py enumerates them). Folders written by older lorakit versions use the same journal and
read the same way.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from lorakit.io.lock import folder_lock
from lorakit.io.untrusted import AdapterFileError, check_safetensors_header, inside_folder, read_small_text
from lorakit.io.writes import (
    atomic_write_bytes,
    atomic_write_json,
    fsync_dir,
    json_bytes,
    replace_durably,
    write_temp,
)

CONFIG_NAME = "adapter_config.json"
CARD_NAME = "README.md"  # the model card save_pretrained writes beside an adapter (lorakit.api.model_card)
# In the weights file's safetensors metadata of an adapter trained on lorakit's bundled default model: which file
# that base was, "<GGUF file> sha256:<hex>" (io.models.bundled_base_tag), to tell when it is loaded onto another copy.
BASE_TAG_KEY = "lorakit_base"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
JOURNAL_NAME = ".adapter_config.next.json"  # the config being written, until both files are in place
EMBEDDING_NAMES = ("embed_tokens", "lm_head")


class AdapterError(ValueError):
    """An adapter name that is invalid, unknown, or already taken."""


_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*")


def save_tensors(path: str | os.PathLike, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """Atomically write ``tensors`` as a safetensors file (copies are made contiguous and unshared)."""
    atomic_write_bytes(path, _safetensors_bytes(tensors, metadata))


def _safetensors_bytes(tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> bytes:
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    return st_save(plain, metadata=metadata or {"format": "pt"})


def _pickle_bytes(tensors: dict[str, Tensor]) -> bytes:
    """A legacy adapter_model.bin: torch.save of a plain dict of CPU tensors (what torch.load(weights_only=True)
    reads back; PEFT's safe_serialization=False file)."""
    buffer = io.BytesIO()
    torch.save({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, buffer)
    return buffer.getvalue()


# -- key naming --------------------------------------------------------------------------------------------------
def file_key(model_key: str, adapter_name: str) -> str:
    """Model parameter name -> name in the file: drop the adapter name ('lora_A.default.weight' -> 'lora_A.weight',
    'lora_embedding_A.default' -> 'lora_embedding_A', 'score.modules_to_save.default.weight' -> 'score.weight'). DoRA's
    magnitude drops its '.weight' too ('lora_magnitude_vector.default.weight' -> 'lora_magnitude_vector'): PEFT's file
    kept the key of the time its magnitude was a bare parameter."""
    magnitude = f".lora_magnitude_vector.{adapter_name}.weight"
    if model_key.endswith(magnitude):
        return model_key[: -len(magnitude)] + ".lora_magnitude_vector"
    key = model_key.replace(f".modules_to_save.{adapter_name}.", ".")
    if key.endswith(f".{adapter_name}"):
        return key[: -len(adapter_name) - 1]
    head, _, leaf = key.rpartition(".")
    return f"{re.sub(re.escape('.' + adapter_name) + '$', '', head)}.{leaf}"


# '<module>.lora_A.weight' / '<module>.lora_embedding_A', same for B.
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?:embedding_)?(?P<which>[AB])(?:\.weight)?$")


def conv_modules(tensors: dict[str, Tensor]) -> list[str]:
    """The modules of an adapter file whose LoRA A is a conv weight (r, in, *kernel): nn.Conv1d / 2d / 3d targets."""
    return [name for name, (A, _) in _raw_pairs(tensors).items() if A.dim() > 2]


def lora_pairs(tensors: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """``{module name: (A (r, in), B (out, r))}`` of the LoRA tensors in an adapter file, in natural order
    (layers.2 before layers.10), names without the ``base_model.model.`` prefix. For embeddings A is (r, vocab) and
    B (dim, r). A conv's A (r, in, *k) and 1x1 B (out, r / g, 1, ...) come as the matrices of its update: A
    (r, in * prod(k)) and B (out, r), block-diagonal for g = r / (B's input channels) groups."""
    return {name: _as_matrices(A, B) for name, (A, B) in _raw_pairs(tensors).items()}


def _raw_pairs(tensors: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    parts: dict[str, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        match = _LORA_KEY.match(key)
        if match:
            parts.setdefault(match["module"], {})[match["which"]] = tensor
    pairs = {name: (p["A"], p["B"]) for name, p in parts.items() if "A" in p and "B" in p}
    return {name: pairs[name] for name in sorted(pairs, key=_natural)}


def _as_matrices(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    if A.dim() == 2:
        return A, B
    r, B = A.shape[0], B.reshape(B.shape[0], -1)  # (out, r / g)
    groups, rows = r // B.shape[1], B.shape[0] // (r // B.shape[1])
    if groups > 1:  # output rows of group g read the g-th r / g block of A's rows
        B = torch.block_diag(*(B[g * rows : (g + 1) * rows] for g in range(groups)))
    return A.reshape(r, -1), B


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


def write_adapter(
    folder: str | os.PathLike,
    config: dict[str, Any],
    tensors: dict[str, Tensor],
    metadata: dict[str, str] | None = None,
    safe_serialization: bool = True,
    extra_files: dict[str, bytes] | None = None,
) -> None:
    """Write one adapter (``config``: the JSON object of adapter_config.json) by the journal protocol of the module
    doc: after any step, and any sequence of interrupted writes, the folder reads (read_config_json + read_weights)
    as the old or the new version, whole. All disk space is taken first: a full or read-only disk raises
    OutputWriteError naming the folder and the bytes needed, with the folder unchanged. Holds the folder's lock
    (FolderLockedError if another process writes into it). ``metadata``: the safetensors header's string map
    (default ``{"format": "pt"}``, as PEFT writes). ``safe_serialization=False`` writes adapter_model.bin instead
    (no metadata there), as PEFT does; the file of the other format, if the folder had one, is removed.
    ``extra_files`` (e.g. the README.md model card): written with the others' temp files (so a full disk stops the
    save before any change) and put in place after the config; they are not part of what the folder reads as."""
    folder = Path(folder)
    weights = WEIGHTS_NAME if safe_serialization else LEGACY_WEIGHTS_NAME
    data = _safetensors_bytes(tensors, metadata) if safe_serialization else _pickle_bytes(tensors)
    journal = {"config": config, "weights_sha256": hashlib.sha256(data).hexdigest(), "weights_file": weights}
    contents = {JOURNAL_NAME: json_bytes(journal), weights: data, CONFIG_NAME: json_bytes(config)}
    for name, content in (extra_files or {}).items():
        if name in contents or name == LEGACY_WEIGHTS_NAME or name == WEIGHTS_NAME or "/" in name:
            raise ValueError(f"extra file {name!r} would replace an adapter file; give another name")
        contents[name] = content
    needed = sum(map(len, contents.values()))
    with folder_lock(folder, needed=needed):
        _settle(folder)
        temps: dict[str, Path] = {}
        try:
            for name, content in contents.items():  # 1. the temp files, fsynced
                temps[name] = write_temp(folder / name, content, needed)
            for name in contents:  # 2-4. journal, weights, config (then the extra files) in place, in that order
                replace_durably(temps[name], folder / name)
                del temps[name]
        finally:
            for tmp in temps.values():
                tmp.unlink(missing_ok=True)
        _drop_other_format(folder, weights)  # 4b.
        (folder / JOURNAL_NAME).unlink(missing_ok=True)  # 5.


def _drop_other_format(folder: Path, weights: str) -> None:
    """Remove the weights file of the format ``weights`` is not (a .bin left when a .safetensors is written, or the
    other way round), durably: read_weights would otherwise read it once the journal is gone."""
    other = folder / (LEGACY_WEIGHTS_NAME if weights == WEIGHTS_NAME else WEIGHTS_NAME)
    if other.is_file() or other.is_symlink():
        other.unlink()
        fsync_dir(folder)


def _settle(folder: Path) -> None:
    """Step 0 of write_adapter: finish a save that was interrupted after its weights were in place (write the
    journal's config as adapter_config.json), so that the journal, the only record of what the weights are, can be
    dropped; a journal whose weights never came is dropped as it is. Temp files of killed writes are removed (the
    lock is held: no other writer is using them)."""
    journal = _journal(folder)
    if journal is not None:
        config, weights = journal
        replace_durably(write_temp(folder / CONFIG_NAME, json_bytes(config)), folder / CONFIG_NAME)
        _drop_other_format(folder, weights)
    (folder / JOURNAL_NAME).unlink(missing_ok=True)
    for name in (JOURNAL_NAME, WEIGHTS_NAME, LEGACY_WEIGHTS_NAME, CONFIG_NAME):
        for tmp in folder.glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)


def write_config_json(folder: str | os.PathLike, config: dict[str, Any]) -> None:
    """Write ``config`` alone as the folder's adapter_config.json (atomically), as a config's save_pretrained does.
    A journal left by an interrupted write_adapter is dropped after: the config written here is the one to read."""
    folder = Path(folder)
    with folder_lock(folder):
        atomic_write_json(folder / CONFIG_NAME, config)
        (folder / JOURNAL_NAME).unlink(missing_ok=True)


def _journal(folder: Path) -> tuple[dict[str, Any], str] | None:
    """(config, weights file name) of an interrupted write_adapter whose weights are already in place (None if
    there is none). A journal of older versions names no file: theirs is adapter_model.safetensors."""
    try:
        journal = json.loads(read_small_text(folder / JOURNAL_NAME, folder))
        weights = journal.get("weights_file", WEIGHTS_NAME) if isinstance(journal, dict) else None
        if weights not in (WEIGHTS_NAME, LEGACY_WEIGHTS_NAME):
            return None
        data = inside_folder(folder, folder / weights).read_bytes()
    except (OSError, ValueError, RecursionError):  # no journal (the normal case), no weights, or a broken journal
        return None  # (AdapterFileError, a ValueError: one that is too big or a symlink out of the folder: ignored)
    if journal.get("weights_sha256") == hashlib.sha256(data).hexdigest():
        return journal.get("config"), weights
    return None  # the crash came before the new weights were in place: the old config fits them


def _journal_config(folder: Path) -> dict[str, Any] | None:
    journal = _journal(folder)
    return None if journal is None else journal[0]


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
            data = json.loads(read_small_text(path, path.parent))
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
    journal = _journal(folder)  # a save interrupted after its weights: read those (the other format may remain)
    path = folder / WEIGHTS_NAME
    if path.is_file() and (journal is None or journal[1] == WEIGHTS_NAME):
        header = check_safetensors_header(inside_folder(folder, path))
        check_tensor_kinds({k: (v["dtype"], v["shape"]) for k, v in header.items() if k != "__metadata__"}, path)
        try:
            return st_load(path.read_bytes()), str(path)
        except (SafetensorError, ValueError, OSError) as e:
            raise AdapterFileError(f"{path} is corrupt or truncated ({e}); re-save or re-download it") from None
    legacy = folder / LEGACY_WEIGHTS_NAME
    if legacy.is_file():
        inside_folder(folder, legacy)
        try:
            tensors = torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means: not a plain tensor file
            raise AdapterFileError(
                f"{legacy} is not a plain tensor file ({type(e).__name__}: {e}); lorakit only loads weights, never code"
            ) from None
        if not isinstance(tensors, dict) or not all(isinstance(v, Tensor) for v in tensors.values()):
            raise AdapterFileError(f"{legacy} does not hold a dict of tensors")
        kinds = {k: (_SAFETENSORS_DTYPE.get(t.dtype, str(t.dtype)), list(t.shape)) for k, t in tensors.items()}
        check_tensor_kinds(kinds, legacy)
        return tensors, str(legacy)
    raise AdapterFileError(f"{folder} has no {WEIGHTS_NAME} (nor {LEGACY_WEIGHTS_NAME}); is the save complete?")


# safetensors' dtype names -> torch's, for messages; the floating ones are those an adapter's weights may have
_DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
                "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
                "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool"}  # fmt: skip
_SAFETENSORS_DTYPE = {getattr(torch, name): code for code, name in _DTYPE_NAMES.items() if hasattr(torch, name)}


def check_tensor_kinds(tensors: dict[str, tuple[str, list[int]]], source: str | os.PathLike) -> None:
    """The tensors of an adapter file (key -> (safetensors dtype name, shape)) checked against what the format gives
    them, on the header alone (before the data is read): every weight (a LoRA tensor, a bias, a ``.weight``) is
    floating point (F64 / F16 / BF16 are cast to the module's dtype on load, as PEFT does), and each module's
    ``lora_A`` (r, in) and ``lora_B`` (out, r) are matrices of one rank r. AdapterFileError naming the file, the
    tensor and what it should be. Their sizes against the model are checked when they are loaded into it
    (``lorakit.adapters.state``), their rank against the config before (``state.check_ranks``)."""
    for key, (dtype, _) in tensors.items():
        weight = ".lora_" in key or key.endswith((".weight", ".bias"))
        if weight and not dtype.startswith(("F", "BF")):  # F64 ... F8_E5M2, BF16; not I*, U*, BOOL, C*
            raise AdapterFileError(
                f"{source}: tensor {key!r} is {_DTYPE_NAMES.get(dtype, dtype)}, but an adapter's weights are floating "
                "point (float32, float16 or bfloat16): the file is damaged or not a LoRA adapter; re-save or "
                "re-download it"
            )
    ranks: dict[str, dict[str, tuple[str, list[int]]]] = {}
    for key, (_, shape) in tensors.items():
        match = _LORA_KEY.match(key)
        if match is None:
            continue
        which = match["which"]
        conv_b_ok = which == "A" or all(d == 1 for d in shape[2:])  # a conv's B is 1x1: (out, r / groups, 1, ...)
        if len(shape) not in (2, 3, 4, 5) or not conv_b_ok:
            expected = "(r, in_features)" if which == "A" else "(out_features, r)"
            conv = "(r, in_channels, *kernel)" if which == "A" else "(out_channels, r / groups, 1, ...)"
            raise AdapterFileError(
                f"{source}: tensor {key!r} has shape {tuple(shape)}, but a LoRA {which} is a matrix {expected} "
                f"(Linear, Conv1D, Embedding layers) or a conv weight {conv} (Conv1d / 2d / 3d layers): the file is "
                "damaged or made for other layers; re-save it"
            )
        ranks.setdefault(match["module"], {})[which] = (key, shape)
    for module, pair in ranks.items():
        if len(pair) == 2 and len(pair["A"][1]) != len(pair["B"][1]):  # a matrix beside a conv weight
            odd, other = ("A", "B") if len(pair["B"][1]) == 2 else ("B", "A")
            expected = "(r, in_features)" if odd == "A" else "(out_features, r)"
            raise AdapterFileError(
                f"{source}: tensor {pair[odd][0]!r} has shape {tuple(pair[odd][1])}, but a LoRA {odd} is a matrix "
                f"{expected} beside a {other} of shape {tuple(pair[other][1])} (a conv's A (r, in, *kernel) goes "
                "with a 1x1 conv B (out, r / groups, 1, ...)): the file is damaged or made for other layers; re-save it"
            )
        if len(pair) == 2 and len(pair["A"][1]) > 2:  # a conv: B may be grouped, r / groups input channels
            (key_a, shape_a), (key_b, shape_b) = pair["A"], pair["B"]
            if shape_a[0] % shape_b[1] != 0:
                raise AdapterFileError(
                    f"{source}: conv module {module!r} holds {key_a!r} of shape {tuple(shape_a)} (rank "
                    f"{shape_a[0]}) and {key_b!r} of shape {tuple(shape_b)}; B's {shape_b[1]} input channels must "
                    "divide the rank (r / groups): the file is damaged; re-save it"
                )
        elif len(pair) == 2 and (pair["B"][1][1] == 0 or pair["A"][1][0] % pair["B"][1][1] != 0):
            # B (out, r), or a BD-LoRA block-diagonal B packed as (out, r / nblocks)
            (key_a, shape_a), (key_b, shape_b) = pair["A"], pair["B"]
            leaf_a, leaf_b = (k.rpartition(f"{module}.")[2] for k in (key_a, key_b))
            raise AdapterFileError(
                f"{source}: module {module!r} holds {leaf_a!r} of shape {tuple(shape_a)} (rank {shape_a[0]}) and "
                f"{leaf_b!r} of shape {tuple(shape_b)} (rank {shape_b[1]}); A (r, in) and B (out, r) share one "
                "rank r (a BD-LoRA block-diagonal B: r / nblocks columns): the file is damaged; re-save it"
            )


def read_metadata(folder: str | os.PathLike) -> dict[str, str]:
    """The string map of the adapter file's safetensors header (``{}`` for a legacy .bin or none written)."""
    path = _existing_folder(folder) / WEIGHTS_NAME
    if not path.is_file():
        return {}
    metadata = check_safetensors_header(inside_folder(Path(folder), path)).get("__metadata__") or {}
    return {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}


def _existing_folder(folder: str | os.PathLike) -> Path:
    path = Path(folder)
    if not path.is_dir():
        raise AdapterFileError(f"adapter folder {str(folder)!r} does not exist; pass the folder save_pretrained wrote")
    return path
