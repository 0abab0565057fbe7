"""EVA's data pass (``get_eva_state_dict``) and its use (``initialize_lora_eva_weights``): forward hooks run the
incremental PCA of lorakit.ops.eva on each target's inputs, batch after batch of the caller's data, until the
components the rank budget gives each layer have converged; then each adapter's A is set to them.

    config = LoraConfig(r=8, target_modules=[...], init_lora_weights="eva", eva_config=EvaConfig(rho=2.0))
    peft_model = get_peft_model(model, config)
    initialize_lora_eva_weights(peft_model, dataloader)   # batches of {"input_ids", "attention_mask", "labels"}

A layer whose rank becomes 0 is unwrapped; the config's rank_pattern / alpha_pattern / target_modules are updated
so the saved adapter loads as PEFT saves it. Single process only (no gathering of inputs across ranks).
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lorakit.adapters.find import find_targets
from lorakit.adapters.inject import parent_and_module
from lorakit.adapters.linear import LoraLinear
from lorakit.config import EvaConfig, LoraConfig
from lorakit.ops import eva as ops

_PREFIX = "base_model.model."


def forward_fn_dict(model: nn.Module, inputs: Mapping[str, Any]) -> Any:
    return model(**inputs)


def prepare_model_inputs_fn_language_modeling(model_input: Mapping[str, Tensor], peft_config: LoraConfig) -> Tensor:
    """(N, 2) (batch, position) of the tokens the PCA uses: attention_mask set and, with use_label_mask, labels not
    label_mask_value."""
    if not isinstance(model_input, Mapping):
        raise TypeError("EVA's default input preparation needs dict batches ({'input_ids': ...}); pass your own "
                        "prepare_model_inputs_fn and prepare_layer_inputs_fn for other batches")
    mask = model_input.get("attention_mask", torch.ones_like(model_input["input_ids"])).bool()
    settings = peft_config.eva_config
    if settings is not None and settings.use_label_mask and "labels" in model_input:
        mask = mask & (model_input["labels"] != settings.label_mask_value)
    return mask.nonzero()


def prepare_layer_inputs_fn_language_modeling(layer_input: Any, model_input: Tensor, layer_name: str) -> Tensor:
    """The layer's input rows at the (batch, position) pairs ``model_input`` lists: (N, in)."""
    x = layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input
    if not isinstance(x, Tensor):
        raise TypeError(f"EVA: layer {layer_name!r} got a {type(x).__name__}; pass a prepare_layer_inputs_fn for it")
    return x[model_input.T.unbind()]


@torch.no_grad()
def get_eva_state_dict(
    model: nn.Module,
    dataloader: Iterable[Any],
    peft_config: LoraConfig | None = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = forward_fn_dict,
    prepare_model_inputs_fn: Callable[[Any, LoraConfig], Any] | None = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: Callable[[Any, Any, str], Tensor] | None = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
) -> dict[str, Tensor]:
    """{layer name: A (rank, in)} for the nn.Linear / Conv1D targets of ``model`` (a PeftModel: its LoRA layers,
    adapters off during the pass; else the targets of ``peft_config``). The dataloader is cycled until every layer's
    assigned components have converged. ``show_progress_bar`` is accepted for PEFT's signature; nothing is drawn."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and gather_distributed_inputs:
        raise NotImplementedError("lorakit's EVA does not gather inputs across processes; pass "
                                  "gather_distributed_inputs=False (each process then uses its own batches)")
    is_peft = hasattr(model, "peft_config")
    config = model.peft_config[adapter_name] if is_peft and peft_config is None else peft_config
    if config is None:
        raise ValueError("peft_config is required if model is not a PeftModel")
    settings = config.eva_config if config.eva_config is not None else EvaConfig()
    if is_peft:
        names = [n for n, m in model.named_modules() if isinstance(m, LoraLinear)]
    else:
        names = [n for n in find_targets(model, config)
                 if isinstance(model.get_submodule(n), nn.Linear) or type(model.get_submodule(n)).__name__ == "Conv1D"]
    if not names:
        raise ValueError("EVA found no nn.Linear / Conv1D target to initialize; check target_modules")
    modules = {n: model.get_submodule(n) for n in names}
    ranks = {n: config.rank_for(n.removeprefix(_PREFIX)) for n in names}
    width = {n: _in_features(m) for n, m in modules.items()}
    max_ranks = {n: min(round(ranks[n] * settings.rho), width[n]) for n in names}
    budget = sum(ranks.values())
    prepare_model = prepare_model_inputs_fn or (lambda batch, _cfg: batch)
    prepare_layer = prepare_layer_inputs_fn or _flat
    forward = forward_fn or forward_fn_dict
    states: dict[str, ops.SvdState | None] = dict.fromkeys(names)
    done = {n: torch.zeros(max_ranks[n], dtype=torch.bool) for n in names}
    current: dict[str, Any] = {}

    def hook_for(name: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            x = prepare_layer(args, current["model_input"], name)
            if x.shape[0] < max_ranks[name]:
                return  # too few rows for the components: wait for another batch (as PEFT)
            previous = states[name]
            states[name] = ops.svd_step(previous, x, max_ranks[name])
            before = None if previous is None else previous.components
            done[name] = ops.converged(before, states[name].components, settings.tau)

        return hook

    assigned = dict(max_ranks)
    handles: dict[str, Any] = {}
    training = model.training
    context = model.disable_adapter() if is_peft else contextlib.nullcontext()
    try:
        model.eval()
        with context:
            for batch in itertools.cycle(dataloader):
                for name in names:  # hooks only on layers whose assigned components still move
                    finished = bool(done[name][: assigned[name]].all()) and states[name] is not None
                    if finished and name in handles:
                        handles.pop(name).remove()
                    elif not finished and name not in handles:
                        handles[name] = modules[name].register_forward_hook(hook_for(name))
                if not handles:
                    break
                current["model_input"] = prepare_model(batch, config)
                forward(model, batch)
                if all(s is not None for s in states.values()):
                    ratios = {n: ops.explained_variance_ratio(s) for n, s in states.items()}
                    assigned = ops.rank_budget(ratios, budget, max_ranks)
    finally:
        for handle in handles.values():
            handle.remove()
        model.train(training)
    out = {}
    for name in names:
        state, rank = states[name], assigned[name]
        A = state.components[:rank]
        if settings.whiten:
            A = A / state.singular_values[:rank].sqrt()[:, None]
        out[name] = A.to(modules[name].weight.device)
    return out


@torch.no_grad()
def initialize_lora_eva_weights(
    model: nn.Module,
    dataloader: Iterable[Any] | None = None,
    eva_state_dict: dict[str, Tensor] | None = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = forward_fn_dict,
    prepare_model_inputs_fn: Callable[[Any, LoraConfig], Any] | None = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: Callable[[Any, Any, str], Tensor] | None = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
) -> nn.Module:
    """Set each LoRA layer's A of adapter ``adapter_name`` (init_lora_weights='eva') from ``eva_state_dict`` (computed
    from ``dataloader`` if not given): its rank becomes the rows given (0: the layer is unwrapped), lora_alpha scales
    with it if EvaConfig.adjust_scaling_factors; B stays 0, so the model is unchanged. Returns ``model``."""
    if not hasattr(model, "peft_config"):
        raise ValueError("model must be a PeftModel (get_peft_model(model, config) with init_lora_weights='eva')")
    if len(model.active_adapters) > 1:
        raise ValueError("`initialize_lora_eva_weights` currently only works with a single active adapter")
    config = model.peft_config[adapter_name]
    if config.init_lora_weights != "eva":
        raise ValueError("`initialize_lora_eva_weights` can only be used with `init_lora_weights='eva'`")
    if eva_state_dict is None:
        if dataloader is None:
            raise ValueError("dataloader is required if eva_state_dict is not provided")
        eva_state_dict = get_eva_state_dict(model, dataloader, None, forward_fn, prepare_model_inputs_fn,
                                            prepare_layer_inputs_fn, adapter_name, gather_distributed_inputs,
                                            show_progress_bar)
    given = {k.removeprefix(_PREFIX): v for k, v in eva_state_dict.items()}
    settings = config.eva_config if config.eva_config is not None else EvaConfig()
    kept, missing, rank_pattern, alpha_pattern = [], [], {}, {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, LoraLinear) or adapter_name not in module.r:
            continue
        short = name.removeprefix(_PREFIX)
        r, alpha = config.rank_for(short), config.alpha_for(short)
        A = given.get(short)
        if A is None:
            missing.append(short)
            new_r = r
        elif A.shape[0] == 0:
            parent, _, child = parent_and_module(model, name)
            setattr(parent, child, module.base_layer)
            continue
        else:
            new_r = A.shape[0]
            if new_r != r:
                alpha = alpha * new_r / r if settings.adjust_scaling_factors else alpha
                active = module.active_adapters
                module.delete_adapter(adapter_name)
                module.update_layer(adapter_name, new_r, alpha, config.lora_dropout, "eva", config.use_rslora)
                module.set_adapter(active)
            module.load_factors(adapter_name, A.to(torch.float32), torch.zeros(module.out_features, new_r))
        kept.append(short)
        if new_r != config.r:
            rank_pattern[short] = new_r
        if alpha != config.lora_alpha:
            alpha_pattern[short] = alpha
    config.target_modules, config.rank_pattern, config.alpha_pattern = kept, rank_pattern, alpha_pattern
    if missing:
        warnings.warn(f"the following layers were initialized with init_lora_weights=True because they were not "
                      f"found in the eva state_dict: {missing}", stacklevel=2)
    return model


def _in_features(module: nn.Module) -> int:
    if isinstance(module, LoraLinear):
        return module.in_features
    return module.weight.shape[0] if type(module).__name__ == "Conv1D" else module.weight.shape[1]


def _flat(layer_input: Any, model_input: Any, layer_name: str) -> Tensor:
    x = layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input
    return x.reshape(-1, x.shape[-1])

