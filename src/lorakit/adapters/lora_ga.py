"""LoRA-GA's preprocessing (``preprocess_loraga``): each target's mean gradient over the backward passes of a few
training steps the caller runs, left on the target module for ``get_peft_model`` to initialize the adapter from
(init_lora_weights='lora_ga', lorakit.ops.lora_ga).

    config = LoraConfig(init_lora_weights="lora_ga", target_modules=[...], lora_ga_config=LoraGAConfig())
    def train_step():
        for batch in batches:
            model(**batch).loss.backward()          # gradients accumulate; do not zero them in between
    preprocess_loraga(model, config, train_step)
    peft_model = get_peft_model(model, config)    # A, B from each gradient's SVD; each base weight is the residual

Only the targets' weights get gradients while train_step runs (every other parameter is frozen meanwhile), and
the model is in train mode, as in PEFT; requires_grad, the targets' .grad and the mode are restored afterwards, also
when train_step raises. The gradient is kept as PEFT keeps it (attribute ``_peft_loraga_grad``, the weight's layout
and dtype), and the cache file is PEFT's (torch.save of {"<module>._peft_loraga_grad": tensor}), so either library
reads the other's.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lorakit.adapters.find import find_targets
from lorakit.adapters.inject import LORA_GA_GRAD, takes_lora_ga
from lorakit.config import LoraConfig
from lorakit.io import tensor_files
from lorakit.quant.linear import QuantLinear


@torch.no_grad()
def preprocess_loraga(
    model: nn.Module,
    lora_config: LoraConfig,
    train_step: Callable[[], Any],
    cache_file: str | os.PathLike | None = None,
) -> None:
    """Give every nn.Linear / Conv1D target of ``lora_config`` in ``model`` its mean gradient (``_peft_loraga_grad``):
    the sum of the gradients of its weight over the backward passes ``train_step()`` runs, divided by their number.
    Other targets (embeddings, convs) start as init_lora_weights=True, as in PEFT.

    ``cache_file``: read instead of running train_step when it exists (not empty), else written (atomically) after
    it. ValueError if lora_config has no lora_ga_config, if a target is quantized (LoRA-GA needs the full-precision
    weight's gradient: preprocess and get_peft_model first, then quantize the residual base), or if no target is an
    nn.Linear / Conv1D."""
    if lora_config.lora_ga_config is None:
        raise ValueError(  # PEFT's words first (its tests match them)
            "If you want to use LoRA-GA, please initialize the LoraConfig with init_lora_weights='lora_ga' and "
            "lora_ga_config=LoraGAConfig(...)."
        )
    targets = loraga_targets(model, lora_config)
    if tensor_files.exists(cache_file):
        cache = tensor_files.load_tensors(cache_file, _device(model), "LoRA-GA cache file")
        grads = {name: cache[f"{name}.{LORA_GA_GRAD}"] for name in targets if f"{name}.{LORA_GA_GRAD}" in cache}
        if not grads:
            raise ValueError(
                f"{cache_file} holds no gradient of these targets ({sorted(targets)[:3]}, ...): it was made for other "
                "target modules; delete it (or pass another cache_file) to rebuild it for this config"
            )
    else:
        grads = mean_gradients(model, targets, train_step)
        if cache_file is not None:
            tensor_files.save_tensors(cache_file, {f"{name}.{LORA_GA_GRAD}": grad for name, grad in grads.items()})
    idle = [name for name in targets if name not in grads]
    if idle:
        warnings.warn(
            f"LoRA-GA: no gradient reached {len(idle)} target(s) ({idle[0]!r}, ...) while train_step ran (or the "
            "cache_file has none), so they start as init_lora_weights=True; make train_step compute a loss through "
            "them and call backward() (and delete the cache_file to rebuild it)",
            stacklevel=3,
        )
    for name, grad in grads.items():
        setattr(targets[name], LORA_GA_GRAD, grad)


def loraga_targets(model: nn.Module, config: LoraConfig) -> dict[str, nn.Module]:
    """{name: module} of the targets of ``config`` in ``model`` that LoRA-GA initializes (nn.Linear and GPT-2 Conv1D).
    ValueError for a quantized target and when there is none."""
    found = {name: model.get_submodule(name) for name in find_targets(model, config)}
    for name, module in found.items():
        if isinstance(module, QuantLinear) or hasattr(module, "quant_state"):
            raise ValueError(  # PEFT's words first
                f"LoRA-GA does not support quantized models. Found quantized module: '{name}'. LoRA-GA requires "
                "full-precision gradients during preprocessing: run preprocess_loraga and get_peft_model on the "
                "full-precision model, then quantize its residual base (lorakit.quantize(peft_model.get_base_model()))"
            )
    supported = {name: m for name, m in found.items() if takes_lora_ga(m)}
    if not supported:
        raise ValueError(  # PEFT's words first
            "No supported layers found for LoRA-GA initialization. LoRA-GA only supports nn.Linear and Conv1D "
            f"layers, and target_modules matched {sorted(found)[:5]}; name linear layers in target_modules (e.g. "
            "target_modules=['q_proj', 'v_proj'] or 'all-linear')"
        )
    return supported


def mean_gradients(model: nn.Module, targets: dict[str, nn.Module], train_step: Callable[[], Any]) -> dict[str, Tensor]:
    """{name: the target's weight gradient summed over the backward passes of ``train_step()``, divided by their
    number} for the targets a gradient reached. While it runs, only the targets' weights require grad and the model
    is in train mode; both are restored after (also when train_step raises), and so is each target's .grad.
    A pass is counted when it accumulates into the weight's .grad (PEFT counts the module's backward calls instead:
    the same unless a module runs more than once per forward, where PEFT's mean is too small by that factor)."""
    weights = {name: module.weight for name, module in targets.items()}
    flags = {p: p.requires_grad for p in model.parameters()}
    kept = {name: w.grad for name, w in weights.items()}
    passes = dict.fromkeys(weights, 0)

    def counter(name: str) -> Callable[[Tensor], None]:
        def hook(param: Tensor) -> None:  # once per backward pass that accumulated into param.grad
            passes[name] += 1

        return hook

    modes = {m: m.training for m in model.modules()}  # each module's own: a frozen part may be in eval mode
    handles = []
    try:
        for p in flags:
            p.requires_grad_(False)
        for name, w in weights.items():
            w.grad = None
            w.requires_grad_(True)
            handles.append(w.register_post_accumulate_grad_hook(counter(name)))
        model.train()
        with torch.enable_grad():
            train_step()
        return {
            name: w.grad.detach() / passes[name]
            for name, w in weights.items()
            if passes[name] and w.grad is not None
        }
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for name, w in weights.items():
            w.grad = kept[name]
        for m, mode in modes.items():
            m.training = mode


def _device(model: nn.Module) -> torch.device:
    model = getattr(model, "module", model)  # DataParallel / DeepSpeed wrappers, as PEFT
    return next((p.device for p in model.parameters()), torch.device("cpu"))
