"""HF PEFT's module-level functions that training scripts call beside ``get_peft_model``, so that such scripts run
after changing the import.

- ``get_peft_model_state_dict(model, adapter_name=...)``: one adapter's tensors keyed as in its file
  (``...q_proj.lora_A.weight``, the adapter name removed), what callbacks save or gather between processes.
- ``set_peft_model_state_dict(model, tensors, adapter_name=...)``: the inverse, into an existing adapter.
- ``get_base_model_state_dict(model)`` / ``set_base_model_state_dict(model, state_dict)``: the base model's own
  tensors keyed as before get_peft_model (lorakit.adapters.base_state), e.g. to load base weights after sharding.
- ``prepare_model_for_kbit_training(model)``: freeze every parameter, keep trainable-side dtypes in fp32, and for a
  quantized base turn on activation checkpointing (with inputs that require grad, for reentrant checkpointing).
- ``inject_adapter_in_model(config, model)``: the LoRA wrappers put into ``model`` itself, no PeftModel around it
  (for libraries that manage adapters themselves); ``model.peft_config`` records the adapter, as in PEFT, so that the
  two state-dict functions work on it (keys without the ``base_model.model.`` prefix).

Unlike PEFT, ``set_peft_model_state_dict`` loads the whole adapter or raises ``AdapterFileError`` naming what is
missing, surplus or of the wrong shape, instead of leaving part of it unloaded; the keys it returns as missing or
unexpected are therefore always empty.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.module import _IncompatibleKeys

from lorakit.adapters import base_state, state
from lorakit.adapters.model import LoraModel
from lorakit.config import LoraConfig, PeftType
from lorakit.quant.half import REDUCED_PRECISION
from lorakit.quant.linear import QuantLinear

# transformers' quantization methods whose weights PEFT leaves in their dtype (and lorakit too)
_KEEP_DTYPE_METHODS = frozenset({"gptq", "aqlm", "eetq", "torchao", "hqq"})


def get_peft_model_state_dict(
    model: nn.Module,
    state_dict: dict[str, Tensor] | None = None,
    adapter_name: str = "default",
    unwrap_compiled: bool = False,
    save_embedding_layers: bool | str = "auto",
) -> dict[str, Tensor]:
    """The tensors of adapter ``adapter_name`` of ``model`` (a PeftModel), keyed as in adapter_model.safetensors.
    ``state_dict``: take the values from it (the model's full state dict, e.g. gathered from several processes)
    instead of from the model. The base embeddings are included only if ``save_embedding_layers`` is True."""
    model = getattr(model, "_orig_mod", model) if unwrap_compiled else model  # torch.compile's wrapper
    _check_adapter(model, adapter_name, "get_peft_model_state_dict")
    try:
        return state.adapter_state_dict(model, adapter_name, save_embedding_layers is True, state_dict)
    except KeyError as e:  # only a given state_dict can lack a key of the model's own
        raise ValueError(f"get_peft_model_state_dict: state_dict lacks {e.args[0]!r}; pass the model's whole state "
                         "dict (model.state_dict()), or none to read the model") from None


def set_peft_model_state_dict(
    model: nn.Module,
    peft_model_state_dict: dict[str, Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
) -> _IncompatibleKeys:
    """Copy ``peft_model_state_dict`` (keyed as get_peft_model_state_dict returns) into adapter ``adapter_name`` of
    ``model``, which must already have it (get_peft_model / add_adapter). All or nothing: a missing, surplus or
    wrongly shaped tensor raises AdapterFileError before anything is copied."""
    if ignore_mismatched_sizes:
        raise ValueError("ignore_mismatched_sizes=True is not supported: lorakit loads an adapter only onto modules "
                         "of the shapes it was made for; load it onto the base model named in its config")
    _check_adapter(model, adapter_name, "set_peft_model_state_dict")
    state.load_adapter_state_dict(model, dict(peft_model_state_dict), adapter_name, "the state dict given")
    return _IncompatibleKeys(missing_keys=[], unexpected_keys=[])


def inject_adapter_in_model(
    peft_config: LoraConfig, model: nn.Module, adapter_name: str = "default", low_cpu_mem_usage: bool = False,
    state_dict: dict[str, Tensor] | None = None,
) -> nn.Module:
    """Wrap the target modules of ``model`` in place with adapter ``adapter_name`` and return ``model`` (no PeftModel):
    only the adapter's parameters train, and ``model.peft_config`` is ``{adapter_name: config}``. The adapter
    verbs (set_adapter, merge, unload) need a PeftModel: use get_peft_model for those. ``low_cpu_mem_usage``: the
    adapter's parameters are made on the meta device, taking no memory, for ``state_dict`` (or a later
    set_peft_model_state_dict) to fill."""
    if not isinstance(peft_config, LoraConfig):
        raise TypeError(f"peft_config must be a lorakit.LoraConfig, not {type(peft_config).__name__}")
    if getattr(model, "peft_config", None) is not None:
        raise ValueError("model already has adapters (model.peft_config is set); inject into a plain model, or use "
                         "get_peft_model and add_adapter to hold several")
    lora = LoraModel(model, peft_config, adapter_name, fast_mlp=False)  # no unload() here to undo a patch
    model.peft_config = lora.peft_config
    if low_cpu_mem_usage:  # the adapter's weights stay empty (meta) until a state dict is loaded into them
        state.to_meta(model, adapter_name)
    if state_dict is not None:
        set_peft_model_state_dict(model, state_dict, adapter_name)
    return model


# PEFT's tables from a method to its tuner class and its config class; lorakit has one method
PEFT_TYPE_TO_TUNER_MAPPING: dict[str, type[nn.Module]] = {PeftType.LORA: LoraModel}
PEFT_TYPE_TO_CONFIG_MAPPING: dict[str, type[LoraConfig]] = {PeftType.LORA: LoraConfig}


def _check_adapter(model: nn.Module, adapter_name: str, caller: str) -> None:
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        raise TypeError(f"{caller} takes a lorakit PeftModel (from get_peft_model), not {type(model).__name__}")
    if adapter_name not in configs:
        raise ValueError(f"{caller}: the model has no adapter {adapter_name!r} (it has {sorted(configs)}); "
                         "pass adapter_name=, or add it first with add_adapter")


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
    auto_clear_cache: bool = True,
) -> nn.Module:
    """Prepare a (quantized) transformers model for LoRA training, as PEFT does, in place; returns ``model``.

    1. Every parameter is frozen (the adapter added afterwards is what trains).
    2. fp16 / bf16 parameters become fp32 (norms, embeddings, heads: stabler training), except the storage of
       lorakit's quantized layers (QuantLinear, the bf16 embedding / head of lorakit.quantize) and of bases quantized
       by methods that need their dtype (GPTQ, AQLM, EETQ, torchao, HQQ).
    3. If the base is quantized (lorakit.quantize, or transformers' 4/8-bit or one of the methods above) and
       ``use_gradient_checkpointing``: activation checkpointing on (reentrant unless ``gradient_checkpointing_kwargs``
       says ``use_reentrant=False``), with the input embeddings' output made to require grad so that reentrant
       checkpointing has a graph to recompute.

    ``auto_clear_cache``: after step 2, empty the CUDA / XPU allocator's cache (memory the fp16 copies held, which
    devices that share host and accelerator memory need back), as PEFT does."""
    method = getattr(model, "quantization_method", None)
    method = getattr(method, "value", method)  # transformers' QuantizationMethod is a str enum
    keep_dtype = method in _KEEP_DTYPE_METHODS or getattr(model, "hqq_quantized", False)
    for param in model.parameters():
        param.requires_grad_(False)
    if not keep_dtype:
        for module in model.modules():
            if isinstance(module, REDUCED_PRECISION):  # their storage dtype is the point of them
                continue
            for param in module.parameters(recurse=False):
                if param.dtype in (torch.float16, torch.bfloat16):
                    param.data = param.data.float()
        if auto_clear_cache:  # the half-precision copies just freed stay reserved by the caching allocator
            _empty_accelerator_caches()
    quantized = keep_dtype or getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False)
    quantized = quantized or any(isinstance(m, QuantLinear) for m in model.modules())
    if quantized and use_gradient_checkpointing:
        kwargs = {"use_reentrant": True, **(gradient_checkpointing_kwargs or {})}  # PEFT's default, said explicitly
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
            model.activation_checkpointing_enable(kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if kwargs["use_reentrant"]:  # transformers 5 already hooks the embeddings when enabling; earlier ones not
            model.enable_input_require_grads()
    return model


def _empty_accelerator_caches() -> None:
    """Release the cached, unused blocks of the CUDA and XPU allocators (each where available)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        xpu.empty_cache()


def _base_root(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel, or a model with adapters injected in place."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def get_base_model_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The base model's tensors of ``model`` (a PeftModel, or a model from inject_adapter_in_model), keyed as the
    model's state dict was before the adapters were added; no adapter tensor among them."""
    return base_state.base_state_dict(_base_root(model))


def set_base_model_state_dict(
    model: nn.Module, state_dict: dict[str, Tensor], strict: bool = True
) -> _IncompatibleKeys:
    """Load ``state_dict`` (keyed as get_base_model_state_dict returns) into the base model's tensors of ``model``;
    the adapters are untouched. ``strict``: a missing or surplus key raises RuntimeError before anything is loaded;
    otherwise they are returned (PEFT's load result)."""
    return base_state.load_base_state_dict(_base_root(model), state_dict, strict)
