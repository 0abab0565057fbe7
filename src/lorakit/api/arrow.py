"""create_arrow_model: a base model, saved task LoRA adapters (the experts) and an ArrowConfig in, a PeftModel routing
over them per token out (PEFT's ``peft.tuners.lora.arrow.create_arrow_model``; the routing:
lorakit.adapters.variant_arrow, the maths: lorakit.ops.arrow).

The adapters are loaded from local folders as ``task_0``, ``task_1``, ... and, for GenKnowSub, ``gks_0``, ...; they
must have one rank, the same modules and the same shapes. Then the router adapter ``"arrow_router"`` is added on
their modules and made active.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from lorakit.adapters.layer import LoraLayer
from lorakit.adapters.variant_arrow import GKS_PREFIX, ROUTER, TASK_PREFIX, routable
from lorakit.api.peft_model import PeftModel
from lorakit.config import ArrowConfig, LoraConfig
from lorakit.io.files import CONFIG_NAME


def create_arrow_model(
    base_model: nn.Module,
    task_specific_adapter_paths: Sequence[str | os.PathLike],
    arrow_config: ArrowConfig,
    general_adapter_paths: Sequence[str | os.PathLike] | None = None,
    **adapter_kwargs: Any,
) -> PeftModel:
    """``base_model`` with the task adapters in ``task_specific_adapter_paths`` (local folders) loaded as
    ``task_<i>``, the general ones as ``gks_<i>`` (with ``arrow_config.use_gks``), and the active router adapter
    ``"arrow_router"`` (LoraConfig(arrow_config=arrow_config), the experts' modules and rank). ``adapter_kwargs`` go
    to each load (PeftModel.from_pretrained / load_adapter: ``autocast_adapter_dtype``, ...). As PEFT does, the
    adapter names are written into ``arrow_config`` (task_adapter_names, gks_adapter_names) and ``base_model`` is
    wrapped in place.

    Raises:
        ValueError: no task adapter path; use_gks without general adapters; a path that is no local adapter folder
            (lorakit reads no Hub ids); adapters of different ranks ("rank mismatch"), modules or shapes.
        TypeError: an adapter on a layer Arrow cannot route (not nn.Linear / GPT-2 Conv1D / quantized linear).
    """
    if not task_specific_adapter_paths:
        raise ValueError(
            "`task_specific_adapter_paths` should contain at least one adapter path: pass the folders of the task "
            "LoRA adapters Arrow routes over"
        )
    if arrow_config.use_gks and not general_adapter_paths:
        raise ValueError(
            "You should provide general LoRA paths if you want to use GenKnowSub: pass general_adapter_paths=[...], "
            "or ArrowConfig(use_gks=False)"
        )
    tasks = [_local_folder(p, "task_specific_adapter_paths") for p in task_specific_adapter_paths]
    general_paths = general_adapter_paths or [] if arrow_config.use_gks else []  # unused without GenKnowSub (PEFT)
    general = [_local_folder(p, "general_adapter_paths") for p in general_paths]
    task_names = [f"{TASK_PREFIX}{i}" for i in range(len(tasks))]
    gks_names = [f"{GKS_PREFIX}{i}" for i in range(len(general))]
    model = PeftModel.from_pretrained(base_model, tasks[0], adapter_name=task_names[0], **adapter_kwargs)
    for name, folder in [*zip(task_names[1:], tasks[1:]), *zip(gks_names, general)]:
        model.load_adapter(folder, adapter_name=name, **adapter_kwargs)
    arrow_config.task_adapter_names, arrow_config.gks_adapter_names = task_names, gks_names
    modules, r = check_compatible(model.get_base_model(), task_names + gks_names)
    check_linear_targets(model.get_base_model(), task_names + gks_names)
    model.add_adapter(ROUTER, LoraConfig(arrow_config=arrow_config, target_modules=modules, r=r))
    model.set_adapter(ROUTER)
    return model


def check_compatible(model: nn.Module, adapter_names: Sequence[str]) -> tuple[list[str], int]:
    """(the modules the adapters adapt, their rank r), once every adapter of ``adapter_names`` adapts the same
    modules of ``model`` with one rank and the same A and B shapes. ValueError, PEFT's words first, otherwise."""
    reference: tuple[str, dict[str, tuple[tuple[int, ...], tuple[int, ...]]]] | None = None
    for name in adapter_names:
        shapes = {
            module_name: tuple(tuple(w.shape) for w in layer.lora_weights(name))
            for module_name, layer in model.named_modules()
            if isinstance(layer, LoraLayer) and name in layer.r
        }  # {module: ((r, in), (out, r))}
        ranks = {a[0] for a, _ in shapes.values()}
        if len(ranks) > 1:
            raise ValueError(
                f"[{name}] has ranks {sorted(ranks)} in different modules (rank_pattern): Arrow mixes adapters of one "
                "rank; use adapters trained with one r for all their modules"
            )
        if reference is None:
            reference = (name, shapes)
            continue
        first, expected = reference
        expected_ranks = {a[0] for a, _ in expected.values()}
        if ranks != expected_ranks:
            raise ValueError(
                f"[{name}] rank mismatch: {_one(ranks)} != {_one(expected_ranks)} (the rank of {first!r}): Arrow mixes "
                "adapters of one rank; use task and general adapters trained with the same r"
            )
        if shapes.keys() != expected.keys():
            raise ValueError(
                f"[{name}] target_modules mismatch:\n  this adapter -> {sorted(shapes)}\n  reference   -> "
                f"{sorted(expected)}\n(the modules of {first!r}): use adapters trained on the same target_modules"
            )
        differing = next((m for m in shapes if shapes[m] != expected[m]), None)
        if differing is not None:
            raise ValueError(
                f"[{name}] shape mismatch: {shapes[differing]} != {expected[differing]} in {differing!r} (the shapes "
                f"of {first!r}): use adapters made for the same base model"
            )
    if reference is None or not reference[1]:
        raise ValueError(f"the adapters {list(adapter_names)} adapt no module of this model: load adapters made for it")
    modules = reference[1]
    return sorted(modules), next(a[0] for a, _ in modules.values())


def check_linear_targets(model: nn.Module, adapter_names: Sequence[str]) -> None:
    """TypeError, PEFT's words first, listing every adapter of ``adapter_names`` on a layer Arrow cannot route over
    (lorakit.adapters.variant_arrow.routable: nn.Linear, GPT-2 Conv1D and quantized linear layers only)."""
    found = []
    for module_name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        for name in adapter_names:
            if name in layer.r:
                if not routable(layer):
                    found.append(f"  - adapter '{name}' on module '{module_name}' of type "
                                 f"{type(layer.base_layer).__name__}")
    if found:
        raise TypeError(
            "LoRA adapters must only target Linear-like layers (nn.Linear, GPT-2 Conv1D or a quantized linear layer) "
            "for Arrow routing. Found:\n" + "\n".join(found) + "\nUse task and general adapters that adapt linear "
            "layers only (target_modules without convolutions or embeddings)"
        )


def resolve_adapter_source(path: str) -> tuple[str, str | None]:
    """(model id, subfolder) of an adapter ``path``, as PEFT reads it: a local folder holding adapter_config.json is
    itself (subfolder None); anything else is a Hub id, ``user/repo`` or ``user/repo/sub/folder`` (subfolder
    ``sub/folder``). ValueError for a local folder without adapter_config.json. lorakit's create_arrow_model takes the
    local folders only (``_local_folder``)."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
            raise ValueError(
                f"Local adapter path '{path}' does not contain '{CONFIG_NAME}': pass the folder save_pretrained wrote"
            )
        return path, None
    parts = path.strip("/").split("/")
    if len(parts) > 2:
        return "/".join(parts[:2]), "/".join(parts[2:])
    return ("/".join(parts), None) if len(parts) == 2 else (path, None)


def _local_folder(path: str | os.PathLike, argument: str) -> Path:
    """The local adapter folder ``path``; ValueError for anything else (lorakit reads no Hub ids)."""
    path = os.fspath(path)
    model_id, subfolder = resolve_adapter_source(path)
    if os.path.isdir(model_id):
        return Path(model_id)
    if os.path.isabs(path) or path.startswith((".", "~")):
        raise ValueError(f"{argument}: {path!r} does not exist: pass the folder save_pretrained wrote the adapter to")
    hub = f"{model_id!r}" + (f" (subfolder {subfolder!r})" if subfolder else "")
    raise ValueError(
        f"{argument}: {path!r} is no local folder. lorakit loads adapters from local folders only, not from "
        f"the Hugging Face Hub (PEFT would read {hub} there): download it first, e.g. "
        f"huggingface_hub.snapshot_download({model_id!r}, local_dir=...), and pass the adapter's folder"
    )


def _one(ranks: set[int]) -> int | str:
    """The rank of a set of one, else the set's sorted list (an adapter without modules: none)."""
    return next(iter(ranks)) if len(ranks) == 1 else str(sorted(ranks))
