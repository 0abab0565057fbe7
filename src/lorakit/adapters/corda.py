"""CorDA's preprocessing (``preprocess_corda``): each target's input covariance, collected by forward hooks while the
caller runs the model on sample data, then its decomposition (lorakit.ops.corda), left on the target module as
``eigens`` for ``get_peft_model`` to initialize the adapter from (init_lora_weights='corda').

    config = LoraConfig(init_lora_weights="corda", target_modules=[...], corda_config=CordaConfig(corda_method="kpm"))
    preprocess_corda(model, config, run_model=lambda: [model(**batch) for batch in samples])
    peft_model = get_peft_model(model, config)   # A, B from the decomposition; each base weight is the residual

The files of ``CordaConfig`` are PEFT's (torch.save of a dict of tensors): ``covariance_file`` {module: C (in, in)},
``cache_file`` {"<module>.eigens.S_WC" | "U_WC" | "V_WC": tensor}; each is read instead of recomputed when it exists.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lorakit.adapters.find import find_targets
from lorakit.config import ConfigError, LoraConfig
from lorakit.io import tensor_files
from lorakit.ops import corda as ops
from lorakit.quant.linear import is_conv1d

EIGENS = "eigens"  # a target module's cropped ops.CordaEigens until get_peft_model takes it (inject._layer_data)
_FIELDS = ("S_WC", "U_WC", "V_WC")


@torch.no_grad()
def preprocess_corda(
    model: nn.Module,
    lora_config: LoraConfig,
    run_model: Callable[[], Any] | None = None,
    hooked_model: nn.Module | None = None,
) -> None:
    """Give every nn.Linear / Conv1D target of ``lora_config`` in ``model`` its CorDA decomposition (``eigens``),
    cut to its rank (rank_pattern, else r) at the end CordaConfig.corda_method names.

    ``run_model()`` runs the model on the sample data (IPM: data of the task; KPM: of the knowledge to keep); it may
    be left out when ``cache_file`` or ``covariance_file`` exists. ``hooked_model``: the model run_model runs, if not
    ``model`` (a copy with the same module names). The hooks are removed when run_model returns or raises. Each
    target also keeps ``covariance_matrix`` (the mean over run_model's forwards) and ``sample_count`` (their number)
    unless CordaConfig.prune_temporary_fields."""
    settings = lora_config.corda_config
    if settings is None:
        raise ConfigError(
            "preprocess_corda needs lora_config.corda_config; pass LoraConfig(init_lora_weights='corda', "
            "corda_config=CordaConfig(...))"
        )
    targets = corda_targets(model, lora_config)
    device = _device(model)
    if tensor_files.exists(settings.cache_file):
        cache = tensor_files.load_tensors(settings.cache_file, device, "CorDA file")
        for name, module in targets.items():
            setattr(module, EIGENS, ops.CordaEigens(*(_entry(cache, f"{name}.{EIGENS}.{f}", settings.cache_file)
                                                       for f in _FIELDS)))
        return
    if tensor_files.exists(settings.covariance_file):
        stored = tensor_files.load_tensors(settings.covariance_file, device, "CorDA file")
        for name, module in targets.items():
            module.covariance_matrix = _entry(stored, name, settings.covariance_file)
    else:
        if run_model is None:
            raise ValueError(
                "preprocess_corda needs run_model (a function that runs the model on sample data) when neither "
                "cache_file nor covariance_file of CordaConfig exists yet"
            )
        hooked = model if hooked_model is None else hooked_model
        sums, counts = collect_covariances(hooked, list(targets), run_model, settings.use_float16_for_covariance)
        for name, module in targets.items():
            module.covariance_matrix = sums[name] / counts[name]
            module.sample_count = counts[name]
        if settings.covariance_file is not None:
            covariances = {name: m.covariance_matrix for name, m in targets.items()}
            tensor_files.save_tensors(settings.covariance_file, covariances)
    for index, (name, module) in enumerate(targets.items()):
        if settings.verbose:
            print(f"CorDA: decomposing {name} ({index + 1}/{len(targets)})", flush=True)
        full = ops.decompose(weight_out_in(module), module.covariance_matrix)
        setattr(module, EIGENS, ops.crop(full, lora_config.rank_for(name), settings.corda_method))
        if settings.prune_temporary_fields:
            del module.covariance_matrix
            if hasattr(module, "sample_count"):
                del module.sample_count
    if settings.cache_file is not None:
        tensor_files.save_tensors(settings.cache_file, {f"{name}.{EIGENS}.{f}": getattr(getattr(m, EIGENS), f)
                                                        for name, m in targets.items() for f in _FIELDS})


def collect_covariances(
    model: nn.Module, names: list[str], run_model: Callable[[], Any], use_float16: bool = False
) -> tuple[dict[str, Tensor], dict[str, int]]:
    """({name: sum of ops.covariance_step over the module's forwards}, {name: number of forwards}) while
    ``run_model()`` runs ``model`` in eval mode (its mode is restored after). The forward hooks are removed in all
    cases. ValueError naming a module of ``names`` that ``model`` lacks or that run_model never ran."""
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(
            f"hooked_model has no module {missing[0]!r}, a CorDA target of the model; pass a hooked_model with the "
            "model's module names (e.g. a deepcopy of it), or leave hooked_model out"
        )
    sums: dict[str, Tensor] = {}
    counts = dict.fromkeys(names, 0)

    def hook_for(name: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            step = ops.covariance_step(args[0], use_float16)
            sums[name] = sums[name] + step if name in sums else step
            counts[name] += 1

        return hook

    training = model.training
    handles = [modules[name].register_forward_hook(hook_for(name)) for name in names]
    try:
        model.eval()
        run_model()
    finally:
        for handle in handles:
            handle.remove()
        model.train(training)
    idle = [n for n in names if counts[n] == 0]
    if idle:
        raise ValueError(
            f"CorDA target {idle[0]!r} never ran while run_model ran, so it has no input covariance; make run_model "
            "call the model (the hooked_model, if given) on sample data, or leave that module out of target_modules"
        )
    return sums, counts


def corda_targets(model: nn.Module, config: LoraConfig) -> dict[str, nn.Module]:
    """{name: module} of the targets of ``config`` in ``model`` that CorDA initializes: nn.Linear and GPT-2 Conv1D
    (others take init_lora_weights='corda' as their kind's default, as in PEFT)."""
    found = {name: model.get_submodule(name) for name in find_targets(model, config)}
    return {name: m for name, m in found.items() if isinstance(m, nn.Linear) or is_conv1d(m)}


def weight_out_in(module: nn.Module) -> Tensor:
    """A Linear's or Conv1D's weight as (out, in) (Conv1D stores (in, out))."""
    return module.weight.T if is_conv1d(module) else module.weight


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _entry(data: dict[str, Tensor], key: str, path: str) -> Tensor:
    if key not in data:
        raise ValueError(
            f"{path} has no entry {key!r}: it was made for other target modules; delete it (or point CordaConfig to "
            "another file) to rebuild it for this config"
        )
    return data[key]
