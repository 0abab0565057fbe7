"""Adapter files in HF PEFT's format. The only module that knows file names and key naming.

A saved adapter is a folder with ``adapter_config.json`` (LoraConfig.to_dict) and ``adapter_model.safetensors``
whose keys are the model's parameter names with the adapter name removed::

    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight      # (r, in)
    base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight      # (out, r)
    base_model.model.model.embed_tokens.lora_embedding_A                # (r, vocab)
    base_model.model.score.weight                                       # a modules_to_save copy, full

Adapters other than "default" go in a sub-folder named after them. Every write is atomic (temp file in the same
folder, fsync, ``os.replace``): a crash leaves the previous file or the new one, never half of one. The two files of
an adapter are replaced one after the other, so ``write_adapter`` first writes a journal (the new config and the new
weights' SHA-256): a crash between the two files leaves new weights beside the old config, and ``read_config`` then
takes the config from the journal, so the folder always loads as one whole version.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tempfile
import types
import typing
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

from lorakit.config import ConfigError, LoraConfig

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
JOURNAL_NAME = ".adapter_config.next.json"  # the config being written, until both files are in place
EMBEDDING_NAMES = ("embed_tokens", "lm_head")


class AdapterFileError(ValueError):
    """An adapter folder or file that is missing, corrupt, or does not fit the model; the message names it."""


# -- atomic writes -----------------------------------------------------------------------------------------------
def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers only ever see the old or the complete new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


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


def _owned_keys(model: nn.Module, adapter_name: str, bias: str) -> list[str]:
    """The model state-dict keys that belong to adapter ``adapter_name`` (plus the biases its ``bias`` mode trains)."""
    from lorakit.inject import wrappers
    from lorakit.layers import LoraLayer

    prefix = _prefix_of(model)
    keys: list[str] = []
    for name, module in wrappers(_inner(model)):
        if isinstance(module, LoraLayer):
            if adapter_name not in module.r:
                continue
            for pname, _ in module.named_parameters():
                if not pname.startswith("base_layer.") and _belongs(pname, adapter_name):
                    keys.append(f"{prefix}{name}.{pname}")
            if bias == "lora_only" and getattr(module.base_layer, "bias", None) is not None:
                keys.append(f"{prefix}{name}.base_layer.bias")
        elif adapter_name in module.modules_to_save:
            keys += [
                f"{prefix}{name}.modules_to_save.{adapter_name}.{k}"
                for k in module.modules_to_save[adapter_name].state_dict()
            ]
    if bias == "all":
        others = [a for a in getattr(model, "peft_config", {}) if a != adapter_name]
        keys += [
            k
            for k in model.state_dict()
            if k.endswith(".bias") and k not in keys and not any(_belongs(k, o) for o in others)
        ]
    return keys


def _belongs(key: str, adapter_name: str) -> bool:
    return f".{adapter_name}." in f".{key}" or key.endswith(f".{adapter_name}")


def _inner(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel (base_model.model), or the model itself (a model with adapters
    injected in place: transformers' own ``base_model`` is then no LoraModel)."""
    from lorakit.model import LoraModel  # late import: lorakit.model imports this module's neighbours

    base = getattr(model, "base_model", None)
    return base.model if isinstance(base, LoraModel) else model


def _prefix_of(model: nn.Module) -> str:
    return "base_model.model." if _inner(model) is not model else ""


def adapter_state_dict(
    model: nn.Module, adapter_name: str, save_embedding_layers: bool = False, state: dict[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """The tensors of one adapter, keyed as in the file; their values from ``state`` (keyed as the model's state dict)
    if given, else from the model."""
    config: LoraConfig = model.peft_config[adapter_name]
    state = model.state_dict() if state is None else state
    out = {file_key(k, adapter_name): state[k] for k in _owned_keys(model, adapter_name, config.bias)}
    if save_embedding_layers:
        out.update({k: v for k, v in state.items() if re.search(r"\.(embed_tokens|lm_head)\.base_layer\.weight$", k)})
    return out


def load_adapter_state_dict(model: nn.Module, tensors: dict[str, Tensor], adapter_name: str, source: str) -> None:
    """Copy file ``tensors`` into adapter ``adapter_name`` of ``model``. Raises AdapterFileError naming the module and
    both shapes when the adapter was made for a base of other shapes, or listing the tensors the file lacks."""
    config: LoraConfig = model.peft_config[adapter_name]
    state = model.state_dict()
    owned = _owned_keys(model, adapter_name, config.bias)
    to_model = {file_key(k, adapter_name): k for k in owned}
    # PEFT with bias="all" also writes each modules_to_save copy's bias as '<module>.modules_to_save.bias' (a
    # duplicate of '<module>.bias'); accept it as an alias of the copy.
    mts = f".modules_to_save.{adapter_name}."
    to_model.update({k.replace(mts, ".modules_to_save."): k for k in owned if mts in k and k.endswith(".bias")})
    missing = [k for k in to_model if k not in tensors and (".lora_" in k or k.endswith("lora_embedding_A"))]
    if missing:
        raise AdapterFileError(
            f"{source} lacks {len(missing)} adapter tensors, e.g. {missing[0]!r}: the file is "
            "incomplete or was saved for other target modules"
        )
    unexpected = [k for k in tensors if k not in to_model and k not in state]
    if unexpected:
        raise AdapterFileError(
            f"{source} holds {len(unexpected)} tensors that fit no module of this model, e.g. "
            f"{unexpected[0]!r}: the adapter was saved for another model or other targets"
        )
    position = {k: i for i, k in enumerate(state)}
    order = sorted(tensors, key=lambda k: position[to_model.get(k, k)])  # model order: first layer first
    for fkey in order:  # every shape checked before anything is copied: a misfit leaves the model as it was
        tensor, mkey = tensors[fkey], to_model.get(fkey, fkey)
        target = state[mkey]
        if target.shape != tensor.shape:
            local = mkey.removeprefix(_prefix_of(model))
            module = re.sub(r"\.(lora_\w+|base_layer|modules_to_save|original_module)(\..*)?$", "", local)
            raise AdapterFileError(
                f"{source}: module {module!r} expects {fkey.removeprefix(_prefix_of(model) + module + '.')!r} "
                f"of shape {tuple(target.shape)} in this model, but the adapter holds {tuple(tensor.shape)}: "
                "it was made for a base model with other shapes; load it onto the base named in its "
                "adapter_config.json"
            )
    with torch.no_grad():
        for fkey in order:
            target = state[to_model.get(fkey, fkey)]
            target.copy_(tensors[fkey].to(target.dtype))


# -- folders -----------------------------------------------------------------------------------------------------
def adapter_folder(save_directory: str | os.PathLike, adapter_name: str) -> Path:
    """'default' lives in the folder itself, any other adapter in a sub-folder named after it (as PEFT). The name is
    checked here too (AdapterError), so that no name ('../x', '/abs', 'a/b') can point outside ``save_directory``."""
    from lorakit.model import check_adapter_name  # late import, as in _owned_keys

    check_adapter_name(adapter_name)
    return Path(save_directory) if adapter_name == "default" else Path(save_directory) / adapter_name


def write_adapter(folder: str | os.PathLike, config: LoraConfig, tensors: dict[str, Tensor]) -> None:
    """Write one adapter: the journal, the weights, the config (each atomically), then drop the journal. A crash at
    any point leaves a folder that read_config + read_weights load as the old or the new version, whole."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = _safetensors_bytes(tensors)
    journal = {"config": config.to_dict(), "weights_sha256": hashlib.sha256(data).hexdigest()}
    atomic_write_json(folder / JOURNAL_NAME, journal)
    atomic_write_bytes(folder / WEIGHTS_NAME, data)
    write_config(folder, config)  # the config, then the journal dropped


def write_config(folder: str | os.PathLike, config: LoraConfig) -> None:
    """Write ``config`` alone as the folder's adapter_config.json (atomically), as a config's save_pretrained does.
    A journal left by an interrupted write_adapter is dropped after: the config written here is the one to read."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / CONFIG_NAME, config.to_dict())
    (folder / JOURNAL_NAME).unlink(missing_ok=True)


def _journal_config(folder: Path) -> dict[str, Any] | None:
    """The config of an interrupted write_adapter whose weights are already in place (None if there is none)."""
    try:
        journal = json.loads((folder / JOURNAL_NAME).read_text())
        data = (folder / WEIGHTS_NAME).read_bytes()
    except (OSError, ValueError, RecursionError):  # no journal (the normal case), no weights, or a broken journal
        return None
    if isinstance(journal, dict) and journal.get("weights_sha256") == hashlib.sha256(data).hexdigest():
        return journal.get("config")
    return None  # the crash came before the new weights were in place: the old config fits them


def read_config(folder: str | os.PathLike) -> LoraConfig:
    """The LoraConfig in ``folder``; AdapterFileError naming the file if it is missing or invalid."""
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
            data = json.loads(path.read_text())
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, too many digits or brackets
            raise AdapterFileError(f"{path} is not valid JSON ({e}); re-save the adapter") from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"{path} must hold a JSON object, not {type(data).__name__}")
    _check_json_types(path, data)
    try:
        return LoraConfig.from_dict(data)
    except (ConfigError, TypeError) as e:
        raise AdapterFileError(f"{path}: {e}") from None


def _check_json_types(path: Path, data: dict[str, Any]) -> None:
    """AdapterFileError naming the first LoraConfig field whose JSON value has a type its annotation does not allow
    (e.g. target_modules: list[str] | str | None), or a regex (target_modules / exclude_modules as str, the keys
    of rank_pattern / alpha_pattern) that does not compile: such a file would fail later, far from its name."""
    hints = typing.get_type_hints(LoraConfig)
    for field in dataclasses.fields(LoraConfig):
        if field.name in data and not _fits(data[field.name], hints[field.name]):
            raise AdapterFileError(
                f"{path}: {field.name}={data[field.name]!r} must be of type {field.type}; fix it or re-save the adapter"
            )
    regexes = [data[k] for k in ("target_modules", "exclude_modules") if isinstance(data.get(k), str)]
    for pattern in [*regexes, *data.get("rank_pattern", {}), *data.get("alpha_pattern", {})]:
        try:
            re.compile(pattern)
        except re.error as e:
            raise AdapterFileError(f"{path}: {pattern!r} is not a valid regular expression ({e}); fix it") from None


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a type annotation (a JSON int fits float; a bool fits neither int nor float)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if typing.get_origin(hint) is list:
        return isinstance(value, list) and all(_fits(v, typing.get_args(hint)[0]) for v in value)
    if typing.get_origin(hint) is dict:
        key, item = typing.get_args(hint)
        return isinstance(value, dict) and all(_fits(k, key) and _fits(v, item) for k, v in value.items())
    if hint is type(None):
        return value is None
    return isinstance(value, hint) if isinstance(hint, type) else True  # Any, Literal, ...: left to LoraConfig


def read_weights(folder: str | os.PathLike) -> tuple[dict[str, Tensor], str]:
    """(tensors, file name) of the adapter in ``folder``: safetensors, else a legacy .bin read with
    ``torch.load(weights_only=True)``, which never runs code from the file."""
    folder = _existing_folder(folder)
    path = folder / WEIGHTS_NAME
    if path.is_file():
        try:
            return st_load(path.read_bytes()), str(path)
        except (SafetensorError, ValueError, OSError) as e:
            raise AdapterFileError(f"{path} is corrupt or truncated ({e}); re-save or re-download it") from None
    legacy = folder / LEGACY_WEIGHTS_NAME
    if legacy.is_file():
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


def check_ranks(config: LoraConfig, tensors: dict[str, Tensor], source: str) -> None:
    """Every ``lora_A`` in the file must have the rank the config gives its module (checked before any adapter is
    built, so that a config with a wrong or absurd ``r`` fails here, naming the file, not in an allocation)."""
    for module, (A, _) in lora_pairs(tensors).items():
        expected = config.rank_for(module)
        rank = A.shape[0]
        if rank != expected:
            raise AdapterFileError(
                f"{source} holds rank {rank} for module {module!r}, but its adapter_config.json gives r={expected}: "
                "the two files do not belong together; re-save the adapter"
            )
