"""What every config module of lorakit shares: its errors and warnings (PEFT's class names), the field helper that
gives each field its one help text, and the tags that say which fields choose a LoRA variant."""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any

from lorakit.io.untrusted import AdapterFileError


class PeftError(Exception):
    """The base of the errors PEFT code catches as ``peft.PeftError`` (PEFT's class of the name)."""


class ConfigError(ValueError, PeftError):
    """A LoraConfig field holds a value lorakit cannot use; the message names the field and the allowed values."""


class ConfigTypeError(ConfigError, TypeError):
    """A LoraConfig field holds a value of the wrong type (a TypeError too, as PEFT raises there)."""


class NotAPeftConfigError(AdapterFileError, TypeError):
    """A JSON object that is no PEFT config: no ``peft_type`` and keys no config has (a TypeError, as PEFT's)."""


class PeftWarning(UserWarning):
    """A warning about an adapter's setup that still works but may not do what was meant (PEFT's class of the name)."""


def described(text: str, default: Any = None, factory: Any = None, **metadata: Any) -> Any:
    """A field with its help text (and ``metadata``: PEFT's variant tags, see ``requested_variants``)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": text, **metadata})
    return field(default=default, metadata={"help": text, **metadata})


VARIANT = {"is_lora_variant": True}  # metadata of a field that chooses a LoRA variant when set (PEFT's tag)


def requested_variants(config: Any) -> dict[str, bool]:
    """{variant name: whether ``config`` asks for it}, read from the tags of its dataclass fields, as PEFT's
    ``resolve_lora_variant`` reads them: a field tagged ``is_lora_variant`` names a variant that is on when the field
    is set; the values ``init_lora_weights``'s ``lora_variants`` metadata lists are variants of their own
    (init_lora_weights='mica')."""
    requested: dict[str, bool] = {}
    for f in dataclasses.fields(config):
        if f.name == "init_lora_weights":
            value = config.init_lora_weights
            for option in f.metadata.get("lora_variants", ()):
                requested[option] = isinstance(value, str) and value.lower() == option.lower()
        elif f.metadata.get("is_lora_variant"):
            requested[f.name] = bool(getattr(config, f.name))
    return requested
