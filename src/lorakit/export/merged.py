"""Merge an adapter folder into its base model and write a plain transformers folder (no lorakit needed to load it).

The merged weights are ``W + s * B @ A`` for every wrapped module (``LoraModel.merge_and_unload``). The folder is
built in a temporary sibling and moved into place with ``os.replace``: a crash never leaves a half-written folder,
and a full or read-only disk raises OutputWriteError naming the folder and the bytes it needs, the previous folder
unchanged.

Example::

    merge_adapter_to_folder("runs/lorakit/adapter", "runs/merged")
    AutoModelForCausalLM.from_pretrained("runs/merged")   # same logits as base + adapter
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from lorakit.api.peft_model import PeftModel
from lorakit.config import TaskType, base_model_id, read_config
from lorakit.export.output import check_output
from lorakit.export.problems import ExportError, unmergeable
from lorakit.io import files
from lorakit.io.models import load_model, resolve_model
from lorakit.io.progress import phase
from lorakit.io.writes import publish_folder

TASK_OF = {None: "causal_lm", TaskType.CAUSAL_LM: "causal_lm", TaskType.SEQ_CLS: "seq_cls"}


def merge_adapter_to_folder(
    adapter_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    model: str | None = None,
    overwrite: bool = False,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    progress: bool = False,
) -> Path:
    """Load the base model (``model``, else the adapter's base_model_name_or_path) + the adapter in ``adapter_dir``,
    merge, and save model (safetensors) + tokenizer to ``output_dir``. Returns ``output_dir``.

    The tokenizer is the one saved with the adapter if there is one, else the base model's. ``progress``: a line
    as each phase (load, merge, write) starts and ends (``lorakit.io.progress.phase``).

    Raises:
        FileExistsError: ``output_dir`` is a file, or a non-empty folder and ``overwrite`` is False.
        AdapterFileError: the adapter folder is missing, corrupt, names no base, or does not fit the base.
        ModelNotFoundError: the base model cannot be found.
        OutputWriteError: the disk is full or read-only (``output_dir`` as it was, no temp folder left).
    """
    adapter_dir, output = Path(adapter_dir), Path(output_dir)
    check_output(adapter_dir, output, overwrite)
    config = read_config(adapter_dir)
    if config.task_type not in TASK_OF:
        raise files.AdapterFileError(
            f"{adapter_dir}: merging supports task_type CAUSAL_LM or SEQ_CLS adapters, not {config.task_type}; "
            "load it with PeftModel.from_pretrained and call merge_and_unload() yourself"
        )
    if refused := unmergeable(config):
        raise ExportError("a merged model", refused, source=str(adapter_dir))
    base_id = base_model_id(adapter_dir, model)
    files.read_weights(adapter_dir)  # a corrupt file fails before the (slow) base model load
    with phase(f"loading base model {base_id}", show=progress):
        base = load_model(base_id, task=TASK_OF[config.task_type], dtype=dtype, trust_remote_code=trust_remote_code)
    with phase(f"merging {adapter_dir} into it", show=progress):
        merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload(safe_merge=True)
    tokenizer = _tokenizer(adapter_dir, base_id)

    def write(folder: Path) -> None:
        merged.save_pretrained(folder, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)

    with phase(f"writing {output}", show=progress):
        publish_folder(output, write, needed=weight_bytes(merged))
    return output


def weight_bytes(model: torch.nn.Module) -> int:
    """The bytes of ``model``'s state dict as safetensors stores it: each tensor's data once (tied weights are saved
    once). The estimate a full disk's error gives for a merged folder (config and tokenizer files add a little)."""
    tensors = {t.data_ptr(): t for t in model.state_dict().values()}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _tokenizer(adapter_dir: Path, base_id: str) -> PreTrainedTokenizerBase | None:
    """The adapter's own tokenizer if saved with it, else the base model's; None (with a warning) if neither has one."""
    source = str(adapter_dir) if (adapter_dir / "tokenizer_config.json").is_file() else resolve_model(base_id)
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as e:
        warnings.warn(f"no tokenizer found in {source} ({e}); the merged folder has none: copy one in", stacklevel=3)
        return None
