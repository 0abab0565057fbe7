"""Turning an adapter whose initializer changed the base weight (PiSSA, OLoRA) into a plain LoRA adapter for the
ORIGINAL base: what ``save_pretrained(..., path_initial_model_for_weight_conversion=DIR)`` writes, as in PEFT.

At init the base became W_res = W - s * B0 @ A0; after training the model computes W_res + s * B @ A, that is
W + s * (B @ A - B0 @ A0). The difference is a rank-2r LoRA on W (PiSSA, Meng et al. 2024)::

    A' = [A; A0]   (2r, in)        B' = [B, -B0]   (out, 2r)        B' @ A' = B @ A - B0 @ A0

and the config doubles r and lora_alpha (lora_alpha * sqrt(2) with rsLoRA) so that every scaling is unchanged.
Workflow: right after ``get_peft_model`` (before any training step) save the adapter to DIR; train; then save with
``path_initial_model_for_weight_conversion=DIR``. The result loads, in lorakit or PEFT, onto the untouched base.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from pathlib import Path

import torch
from torch import Tensor

from lorakit.config import LoraConfig
from lorakit.io import files

# file keys of LoRA factors: '<module>.lora_A.weight' / '<module>.lora_embedding_A', same for B
_FACTOR_KEY = re.compile(r"\.lora_(?:embedding_)?(?P<which>[AB])(?:\.weight)?$")


def difference_factors(A: Tensor, B: Tensor, A0: Tensor, B0: Tensor) -> tuple[Tensor, Tensor]:
    """(A' (2r, in), B' (out, 2r)) with B' @ A' = B @ A - B0 @ A0, for A, A0 (r, in) and B, B0 (out, r)."""
    return torch.cat([A, A0.to(A.dtype)], dim=0), torch.cat([B, -B0.to(B.dtype)], dim=1)


def converted_config(config: LoraConfig) -> LoraConfig:
    """The config of the converted adapter: a plain LoRA (init_lora_weights=True) with r, rank_pattern and lora_alpha,
    alpha_pattern doubled (lora_alpha * sqrt(2) with rsLoRA), so that each module keeps its scaling."""
    if config.use_dora:
        raise ValueError(
            "path_initial_model_for_weight_conversion cannot convert a DoRA adapter (use_dora=True): its magnitudes "
            "belong to the changed base, not the original one; save without conversion"
        )
    if config.kasa_config:
        raise ValueError(
            "path_initial_model_for_weight_conversion cannot convert a KaSA adapter (kasa_config): KaSA truncates the "
            "base weight, so no LoRA on the original base equals it; save without conversion"
        )
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        # rsLoRA's scaling alpha / sqrt(r) is not kept by doubling the patterns; PEFT refuses this case too
        raise ValueError(  # PEFT's words first
            "Passing `path_initial_model_for_weight_conversion` to `save_pretrained` is not supported when using "
            "`rank_pattern` or `alpha_pattern` together with `use_rslora=True` (the rank-2r adapter would change "
            "each module's scaling); save without conversion, or train with use_rslora=False or without the patterns"
        )
    data = config.to_dict()
    data.update(
        init_lora_weights=True,
        r=2 * config.r,
        lora_alpha=config.lora_alpha * (math.sqrt(2) if config.use_rslora else 2),
        rank_pattern={key: 2 * r for key, r in config.rank_pattern.items()},
        alpha_pattern={key: 2 * alpha for key, alpha in config.alpha_pattern.items()},
    )
    return LoraConfig.from_dict(data)


def converted_tensors(tensors: dict[str, Tensor], initial: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """Adapter file tensors with every LoRA pair replaced by its difference factors against the same keys of the
    ``initial`` adapter (read from ``source``); other tensors (modules_to_save copies, biases) are kept as they are.
    PEFT drops those, and also the embedding factors (lora_embedding_A/B); lorakit converts and keeps them, which is
    exact too (their base is unchanged and the initial B0 @ A0 is 0)."""
    out = dict(tensors)
    for key_A in tensors:
        match = _FACTOR_KEY.search(key_A)
        if match is None or match["which"] != "A":
            continue
        key_B = f"{key_A[: match.start('which')]}B{key_A[match.end('which') :]}"
        A0, B0 = (_initial_tensor(initial, key, tensors[key], source) for key in (key_A, key_B))
        out[key_A], out[key_B] = difference_factors(tensors[key_A], tensors[key_B], A0, B0)
    return out


def _initial_tensor(initial: dict[str, Tensor], key: str, current: Tensor, source: str) -> Tensor:
    start = initial.get(key)
    if start is None or start.shape != current.shape:
        found = "is missing" if start is None else f"has shape {tuple(start.shape)}, not {tuple(current.shape)}"
        raise files.AdapterFileError(
            f"initial adapter {source}: {key!r} {found}; save the initial adapter with save_pretrained(DIR) right "
            "after get_peft_model, with the same config, and pass that DIR"
        )
    return start


def to_original_base(
    tensors: dict[str, Tensor], config: LoraConfig, initial_dir: str | os.PathLike, adapter_name: str
) -> tuple[dict[str, Tensor], LoraConfig]:
    """(tensors, config) of adapter ``adapter_name`` converted against the initial adapter saved in ``initial_dir``
    (its sub-folder ``adapter_name`` if there is one, as save_pretrained lays out non-default adapters)."""
    new_config = converted_config(config)  # first: raises before anything is read
    if config.init_lora_weights is False:
        warnings.warn(
            "converting an adapter that started from random A and B (init_lora_weights=False) on an unchanged base: "
            "the converted adapter subtracts that start and does not reproduce this model; save it without "
            "path_initial_model_for_weight_conversion",
            stacklevel=3,
        )
    elif config.init_lora_weights == "loftq":
        warnings.warn(
            "LoftQ's base is quantized: Q(W - s*B0@A0) + s*B@A differs from W + s*(B@A - B0@A0) by the quantization "
            "error, so the converted adapter on the original base only approximates this model",
            stacklevel=3,
        )
    folder = files.adapter_folder(initial_dir, adapter_name)
    if not folder.is_dir():
        folder = Path(initial_dir)
    try:
        initial, source = files.read_weights(folder)
    except files.AdapterFileError as e:
        raise files.AdapterFileError(
            f"path_initial_model_for_weight_conversion={str(initial_dir)!r} holds no initial adapter ({e}); save "
            "the adapter there with save_pretrained right after get_peft_model, before training"
        ) from None
    return converted_tensors(tensors, initial, source), new_config
