"""``transformers.Trainer`` told that a lorakit model is a PEFT model, so that its checkpoints hold the adapter.

Trainer knows adapters only through HF PEFT's class: ``transformers.trainer_utils._is_peft_model(model)`` is an
``isinstance`` check against ``peft.PeftModel``, and ``Trainer._save`` writes ``model.state_dict()`` (the whole model,
which also fails on tied embeddings) for any model that is neither a ``PreTrainedModel`` nor PEFT's. Given a lorakit
model, checkpoints would hold the base model and ``resume_from_checkpoint`` / ``load_best_model_at_end`` would find
no adapter. So when the first lorakit ``PeftModel`` is created, two things are changed, each falling through to
transformers' own code for every other model:

- ``_is_peft_model`` (in ``transformers.trainer_utils`` and where ``transformers.trainer`` imported it) also answers
  True for a lorakit model: Trainer then takes its PEFT paths (label columns from the base model's signature, the
  adapter loaded back with ``model.load_adapter`` on resume and for the best model);
- ``Trainer._save`` writes a lorakit model with its ``save_pretrained`` (``adapter_config.json`` +
  ``adapter_model.safetensors``, as PEFT's checkpoints), then the tokenizer and training arguments as Trainer does.

The modules are patched when they are imported (an import hook), or at once if they already are, so the order of
the user's imports does not matter and lorakit's own trainer never imports them. ``LORAKIT_PATCH_TRAINER=0`` in the
environment turns this off (checkpoints then hold the whole model, as before).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

_lorakit_classes: tuple[type, ...] = ()  # set by install(): lorakit's PeftModel (passed in: it imports this module)


def _is_lorakit(model: Any) -> bool:
    return bool(_lorakit_classes) and isinstance(model, _lorakit_classes)


def _recognizing(original: Callable[[Any], bool]) -> Callable[[Any], bool]:
    """``original`` (an is-this-a-PEFT-model check), also True for a lorakit model (or one wrapped by DDP)."""
    if getattr(original, "_lorakit", False):
        return original

    def is_peft_model(model: Any) -> bool:
        return _is_lorakit(model) or _is_lorakit(getattr(model, "module", None)) or original(model)

    is_peft_model._lorakit = True  # type: ignore[attr-defined]
    is_peft_model.__wrapped__ = original  # type: ignore[attr-defined]
    return is_peft_model


def _patch_check(module: ModuleType, name: str) -> None:
    """Replace the check ``module.name``, and every loaded module's own binding of it (``from m import name``)."""
    original = getattr(module, name, None)
    if original is None or getattr(original, "_lorakit", False):
        return
    patched = _recognizing(original)
    for loaded in list(sys.modules.values()):
        if getattr(loaded, name, None) is original:
            setattr(loaded, name, patched)
    setattr(module, name, patched)


def _patch_trainer(module: ModuleType) -> None:
    trainer_cls = module.Trainer
    original_save = trainer_cls._save
    if getattr(original_save, "_lorakit", False):
        return

    def _save(self: Any, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not _is_lorakit(model):
            return original_save(self, output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return None
        os.makedirs(output_dir, exist_ok=True)
        model.save_pretrained(output_dir, is_main_process=True)
        tokenizer = self.processing_class or getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, module.TRAINING_ARGS_NAME))
        return None

    _save._lorakit = True  # type: ignore[attr-defined]
    trainer_cls._save = _save


# module -> its patch. The two checks are where transformers (Trainer) and accelerate (which TRL's trainers use)
# decide whether a model is PEFT's; Trainer._save is where Trainer writes a checkpoint's weights.
PATCHES: dict[str, Callable[[ModuleType], None]] = {
    "transformers.trainer_utils": lambda m: _patch_check(m, "_is_peft_model"),
    "accelerate.utils.modeling": lambda m: _patch_check(m, "is_peft_model"),
    "transformers.trainer": _patch_trainer,
}


class _PatchingLoader(importlib.abc.Loader):
    """The module's own loader, then its patch."""

    def __init__(self, loader: importlib.abc.Loader, patch: Callable[[ModuleType], None]) -> None:
        self.loader, self.patch = loader, patch

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)  # type: ignore[attr-defined]
        self.patch(module)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: ModuleType | None = None) -> Any:
        if name not in PATCHES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _PatchingLoader(spec.loader, PATCHES[name])
        return spec


def install(peft_model_class: type) -> None:
    """Patch Trainer for ``peft_model_class`` (lorakit's PeftModel) now where it is imported, and on import
    otherwise; once per process (see the module doc)."""
    global _lorakit_classes
    if _lorakit_classes or os.environ.get("LORAKIT_PATCH_TRAINER", "1") == "0":
        return
    _lorakit_classes = (peft_model_class,)
    for name, patch in PATCHES.items():  # trainer_utils first: trainer copies its _is_peft_model
        if name in sys.modules:
            patch(sys.modules[name])
    if any(name not in sys.modules for name in PATCHES):
        sys.meta_path.insert(0, _PatchOnImport())
