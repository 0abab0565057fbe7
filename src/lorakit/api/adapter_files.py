"""An adapter folder as PeftModel reads and writes it: the file's tensors (key mapping), checks before anything is
built or written (ranks against the config, a folder made for another base), all-or-nothing loading, how a
loaded adapter is initialized before its tensors arrive, and the writing itself: ``save_pretrained`` (PeftModel's
method of the name, defined here: lorakit.api.peft_model assigns it) and push_to_hub."""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.adapters import convert, state
from lorakit.adapters.targets import TargetError
from lorakit.config import LoraConfig
from lorakit.io import files, writes
from lorakit.io.files import CARD_NAME, AdapterError
from lorakit.ops.init import mutates_base


def load_tensors(
    model: nn.Module, tensors: dict[str, torch.Tensor], adapter_name: str, source: str, kwargs: dict[str, Any]
) -> None:
    """state.load_adapter_state_dict, all or nothing. PEFT's ``ignore_mismatched_sizes=True`` loads the rest and leaves
    the tensors that do not fit at their initial values; lorakit does not: a misfit raises with the flag too, and the
    error says so (an adapter whose tensors all fit loads as without the flag)."""
    try:
        state.load_adapter_state_dict(model, tensors, adapter_name, source)
    except files.AdapterFileError as e:
        if not kwargs.get("ignore_mismatched_sizes"):
            raise
        raise files.AdapterFileError(
            f"{e} (ignore_mismatched_sizes=True does not leave misfit tensors out in lorakit: it loads all of an "
            "adapter or nothing; for a resized embedding, load onto the base resized as it was when the adapter was "
            "saved)"
        ) from None


def target_error(
    model: nn.Module, model_id: str | os.PathLike, config: LoraConfig, tensors: dict[str, torch.Tensor], e: TargetError
) -> files.AdapterFileError:
    """A saved adapter whose targets match nothing in ``model``: when a module of its file is not in the model, say
    that it was made for another base (the base it records, that module and its shape) instead of listing this
    model's module names."""
    names = {name for name, _ in model.named_modules()}
    pairs = files.lora_pairs(tensors)  # {module: (A (r, in), B (out, r))}
    module = next((name for name in pairs if name not in names), None)
    if module is None:
        return files.AdapterFileError(f"{Path(model_id) / files.CONFIG_NAME}: {e}")
    A, B = pairs[module]
    recorded = config.base_model_name_or_path
    base = f"base_model_name_or_path {recorded!r}" if recorded else "no base_model_name_or_path"
    name = getattr(model, "name_or_path", "")
    return files.AdapterFileError(
        f"{model_id} was made for another base model: it records {base}, and its module {module!r} "
        f"({B.shape[0]} x {A.shape[1]}) is not in this {type(model).__name__}{f' ({name!r})' if name else ''}; "
        "load it onto its own base (lorakit: leave out --model) or train an adapter for this model"
    )


def check_loadable(name: str, saved: LoraConfig, tensors: dict[str, torch.Tensor]) -> None:
    """AdapterError, before anything is written, for an adapter whose tensors the loader would refuse beside the
    config saved with them (state.check_ranks): a rank other than the config's, as after
    prepare_model_for_compiled_hotswap(target_rank=...), which pads A and B with zeros."""
    try:
        state.check_ranks(saved, tensors, "the adapter's tensors")
    except files.AdapterFileError as e:
        raise AdapterError(
            f"cannot save adapter {name!r}, nothing was written: {str(e).split(': the two files')[0]}, and lorakit "
            "would refuse to load that file. If prepare_model_for_compiled_hotswap(target_rank=...) padded the model, "
            "save the adapter before padding it, or keep the file it was loaded from"
        ) from None


def read_weights(
    model: nn.Module, model_id: str | os.PathLike, key_mapping: dict[str, str] | None
) -> tuple[dict[str, torch.Tensor], str]:
    """The adapter file's tensors, keys renamed by ``key_mapping`` (default: the model's
    ``_checkpoint_conversion_mapping``), and the file's name for messages."""
    tensors, source = files.read_weights(model_id)
    if key_mapping is None:
        key_mapping = getattr(model, "_checkpoint_conversion_mapping", None)
    return state.remap_keys(tensors, key_mapping), source


def init_for_loading(config: LoraConfig) -> bool | str:
    """How to initialize an adapter whose weights are about to be loaded: skip the work (True: cheap kaiming), except
    for initializers that change the base weight (PiSSA, OLoRA), whose adapters fit the residual base only: re-run
    those to rebuild it, as PEFT does, and for 'mica', which also chooses the adapter's variant (its B frozen)."""
    keep = mutates_base(config.init_lora_weights) or "mica" in config.variant_names()
    return config.init_lora_weights if keep else True


def check_base(model: nn.Module, model_id: str | os.PathLike) -> None:
    """Warn when an adapter trained on lorakit's bundled default model is loaded onto another copy of that model
    (e.g. the hub's original weights): the outputs then differ from the training run's by the Q4_1 rounding."""
    tag = files.read_metadata(model_id).get(files.BASE_TAG_KEY)
    if tag and getattr(model, "_lorakit_base_tag", None) != tag:
        warnings.warn(
            f"{model_id} was trained on lorakit's bundled default model ({tag}); this base is "
            f"{getattr(model, 'name_or_path', type(model).__name__)!r}, another copy: its outputs differ from the "
            "training run's by the bundled file's Q4_1 rounding. Load the base with lorakit.load_default_model() "
            "to get the copy it was trained on",
            stacklevel=3,
        )


def push_to_hub(model: Any, repo_id: str, commit_message: str, private: bool | None, token: str | bool | None,
                revision: str | None, create_pr: bool, **save_kwargs: Any) -> object:
    """PeftModel.push_to_hub: ``model.save_pretrained`` into a temporary folder, uploaded to ``repo_id``."""
    import huggingface_hub  # only here: nothing else in lorakit talks to the Hub

    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise RuntimeError(
            f"push_to_hub({repo_id!r}) needs the network, but HF_HUB_OFFLINE is set; unset it, or save with "
            "save_pretrained(folder) and upload the folder later (hf upload <repo> <folder>)"
        )
    api = huggingface_hub.HfApi(token=token)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, **save_kwargs)
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id, folder_path=folder, commit_message=commit_message, revision=revision,
            create_pr=create_pr,
        )


def save_pretrained(
    self: Any,
    save_directory: str | os.PathLike,
    safe_serialization: bool = True,
    selected_adapters: list[str] | None = None,
    save_embedding_layers: bool | str = "auto",
    is_main_process: bool = True,
    path_initial_model_for_weight_conversion: str | os.PathLike | None = None,
    **kwargs: Any,
) -> None:
    """PeftModel.save_pretrained (a method of lorakit.api.peft_model.PeftModel, ``self``, defined here).

    Write each selected adapter (default: all) in PEFT's format; 'default' in ``save_directory`` itself,
    others in a sub-folder named after them. Only ``is_main_process`` writes (for torch.distributed).
    ``safe_serialization=False`` writes adapter_model.bin (torch.save of the tensors) as PEFT does; lorakit reads
    such files with ``torch.load(weights_only=True)`` only.
    ``path_initial_model_for_weight_conversion``: the folder where the adapter was saved right after
    get_peft_model; a PiSSA / OLoRA adapter is then written as a plain rank-2r LoRA for the original base
    (see lorakit.adapters.convert)."""
    if os.path.isfile(save_directory):
        raise ValueError(f"save_directory {str(save_directory)!r} is a file; pass a folder")
    names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
    for name in names:
        if name not in self.peft_config:
            raise AdapterError(f"cannot save adapter {name!r}: it does not exist (have {list(self.peft_config)})")
    if not is_main_process:
        return
    writes_due = []  # everything is gathered and checked before the first file is written
    for name in names:
        # Unlike PEFT's "auto", the full base embedding is saved only on request: adapters stay small.
        try:
            tensors = state.adapter_state_dict(self, name, save_embedding_layers=save_embedding_layers is True)
        except KeyError as e:  # a state_dict() overridden to leave adapter tensors out
            raise AdapterError(
                f"cannot save adapter {name!r}: the model's state_dict() lacks its tensor {e.args[0]!r}, and a "
                "file without it could not be loaded (lorakit writes whole adapters only); save from a "
                "state_dict() that holds every adapter tensor"
            ) from None
        saved = self.config_to_save(name)
        if path_initial_model_for_weight_conversion is not None:
            tensors, saved = convert.to_original_base(
                tensors, saved, path_initial_model_for_weight_conversion, name
            )
        check_loadable(name, saved, tensors)
        writes_due.append((name, saved, tensors))
    for name, saved, tensors in writes_due:
        folder = files.adapter_folder(save_directory, name)
        card = {CARD_NAME: self.model_card(save_directory)} if folder == Path(save_directory) else {}
        files.write_adapter(
            folder, saved.to_dict(), tensors, self.file_metadata(), safe_serialization, extra_files=card
        )
    if "default" not in names:  # no adapter in save_directory itself: its card is written alone
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        writes.atomic_write_bytes(Path(save_directory) / CARD_NAME, self.model_card(save_directory))
