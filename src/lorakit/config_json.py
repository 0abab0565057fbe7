"""A LoraConfig's JSON side: what adapter_config.json holds as PEFT writes it besides LoraConfig's fields (keys of
PEFT features lorakit lacks, at their "off" value; keys that only describe the file), and a file's values checked
against the fields' types before a config is made of them. The file itself is read and written by
lorakit.config.read_config / write_config, through lorakit.io.files."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any

from lorakit.io.untrusted import AdapterFileError

# Keys PEFT writes that only describe the file (ignored silently, whatever their value).
INFORMATIONAL_PEFT_KEYS = {"megatron_core", "qalora_group_size"}

# Keys PEFT writes for features lorakit does not implement, with the value that means "feature off".
NEUTRAL_PEFT_KEYS: dict[str, Any] = {
    "megatron_config": None,
    "use_qalora": False,
}


def peft_file_keys() -> dict[str, Any]:
    """The keys of PEFT's adapter_config.json that are no LoraConfig field, with the values PEFT writes for a LoRA
    adapter (``peft_version`` is a field: see lorakit.config.__version__)."""
    return {
        **NEUTRAL_PEFT_KEYS,
        "megatron_core": "megatron.core",
        "qalora_group_size": 16,
    }


def neutral(key: str, value: Any) -> bool:
    """Whether a PEFT key holds its "feature off" value. An empty list counts as None."""
    return value == NEUTRAL_PEFT_KEYS[key] or (NEUTRAL_PEFT_KEYS[key] is None and value == [])


def check_json_types(path: Path, data: dict[str, Any], cls: type) -> None:
    """AdapterFileError naming the first field of ``cls`` (LoraConfig) whose JSON value has a type its annotation does
    not allow (e.g. target_modules: list[str] | str | None), or a regex (target_modules / exclude_modules as str, the
    keys of rank_pattern / alpha_pattern) that does not compile: such a file would fail later, far from its name."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in data and not _fits(data[f.name], hints[f.name]):
            raise AdapterFileError(
                f"{path}: {f.name}={data[f.name]!r} must be of type {f.type}; fix it or re-save the adapter"
            )
    regexes = [data[k] for k in ("target_modules", "exclude_modules") if isinstance(data.get(k), str)]
    for pattern in [*regexes, *data.get("rank_pattern", {}), *data.get("alpha_pattern", {})]:
        try:
            re.compile(pattern)
        except re.error as e:
            message = f"{path}: {pattern!r} is not a valid regular expression ({e}); fix it"
            raise AdapterFileError(message) from None


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
