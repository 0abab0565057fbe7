"""lorakit: LoRA fine-tuning for Hugging Face transformers models, a drop-in for HF PEFT's LoRA API.

The public names are imported on first use (PEP 562 ``__getattr__``): ``import lorakit`` and the ``lorakit``
command's parser need neither torch nor transformers, so ``lorakit --help`` answers at once. ``from lorakit import
LoraConfig`` works as usual; the table ``_PUBLIC`` says which module each name comes from.
"""

from __future__ import annotations

import importlib
import typing

if typing.TYPE_CHECKING:  # the same names, for type checkers and tests/test_layout.py's import graph
    from lorakit.adapters.corda import preprocess_corda
    from lorakit.adapters.embedding import LoraEmbedding
    from lorakit.adapters.eva import get_eva_state_dict, initialize_lora_eva_weights
    from lorakit.adapters.layer import LoraLayer
    from lorakit.adapters.linear import LoraLinear
    from lorakit.adapters.lora_ga import preprocess_loraga
    from lorakit.adapters.model import LoraModel
    from lorakit.adapters.quantize import quantize
    from lorakit.adapters.targets import NoMatchingPeftModuleError, TargetError
    from lorakit.api.arrow import create_arrow_model
    from lorakit.api.auto import (
        AutoPeftModel,
        AutoPeftModelForCausalLM,
        AutoPeftModelForFeatureExtraction,
        AutoPeftModelForQuestionAnswering,
        AutoPeftModelForSeq2SeqLM,
        AutoPeftModelForSequenceClassification,
        AutoPeftModelForTokenClassification,
    )
    from lorakit.api.functions import (
        PEFT_TYPE_TO_CONFIG_MAPPING,
        PEFT_TYPE_TO_TUNER_MAPPING,
        get_base_model_state_dict,
        get_peft_model_state_dict,
        inject_adapter_in_model,
        prepare_model_for_kbit_training,
        set_base_model_state_dict,
        set_peft_model_state_dict,
    )
    from lorakit.api.hotswap import (
        check_hotswap_configs_compatible,
        hotswap_adapter,
        hotswap_adapter_from_state_dict,
        prepare_model_for_compiled_hotswap,
    )
    from lorakit.api.mapping import get_peft_model
    from lorakit.api.peft_model import (
        PeftModel,
        PeftModelForCausalLM,
        PeftModelForFeatureExtraction,
        PeftModelForQuestionAnswering,
        PeftModelForSeq2SeqLM,
        PeftModelForSequenceClassification,
        PeftModelForTokenClassification,
    )
    from lorakit.api.status import get_layer_status, get_model_status
    from lorakit.config import (
        ArrowConfig,
        BdLoraConfig,
        ConfigError,
        CordaConfig,
        EvaConfig,
        KasaConfig,
        LoftQConfig,
        LoraConfig,
        LoraGAConfig,
        MontecloraConfig,
        PeftConfig,
        PeftError,
        PeftType,
        PeftWarning,
        TaskType,
        VeloraConfig,
        get_peft_config,
    )
    from lorakit.io.files import AdapterError, AdapterFileError
    from lorakit.io.models import load_default_model
    from lorakit.training.args import TrainArgs
    from lorakit.training.trainer import TrainingError, train

__version__ = "0.1.0"

# the module that defines each public name
_MODULES: dict[str, tuple[str, ...]] = {
    "lorakit.adapters.corda": ("preprocess_corda",),
    "lorakit.adapters.lora_ga": ("preprocess_loraga",),
    "lorakit.adapters.embedding": ("LoraEmbedding",),
    "lorakit.adapters.eva": ("get_eva_state_dict", "initialize_lora_eva_weights"),
    "lorakit.adapters.targets": ("NoMatchingPeftModuleError", "TargetError"),
    "lorakit.adapters.layer": ("LoraLayer",),
    "lorakit.adapters.linear": ("LoraLinear",),
    "lorakit.adapters.model": ("LoraModel",),
    "lorakit.adapters.quantize": ("quantize",),
    "lorakit.api.arrow": ("create_arrow_model",),
    "lorakit.api.auto": ("AutoPeftModel", "AutoPeftModelForCausalLM", "AutoPeftModelForFeatureExtraction",
                         "AutoPeftModelForQuestionAnswering", "AutoPeftModelForSeq2SeqLM",
                         "AutoPeftModelForSequenceClassification", "AutoPeftModelForTokenClassification"),
    "lorakit.api.functions": ("PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING",
                              "get_base_model_state_dict", "get_peft_model_state_dict", "inject_adapter_in_model",
                              "prepare_model_for_kbit_training", "set_base_model_state_dict",
                              "set_peft_model_state_dict"),
    "lorakit.api.hotswap": ("check_hotswap_configs_compatible", "hotswap_adapter", "hotswap_adapter_from_state_dict",
                            "prepare_model_for_compiled_hotswap"),
    "lorakit.api.peft_model": ("PeftModel", "PeftModelForCausalLM", "PeftModelForFeatureExtraction",
                               "PeftModelForQuestionAnswering", "PeftModelForSeq2SeqLM",
                               "PeftModelForSequenceClassification",
                               "PeftModelForTokenClassification"),
    "lorakit.api.mapping": ("get_peft_model",),
    "lorakit.api.status": ("get_layer_status", "get_model_status"),
    "lorakit.config": ("ArrowConfig", "BdLoraConfig", "ConfigError", "CordaConfig", "EvaConfig", "KasaConfig",
                       "LoftQConfig", "LoraConfig", "LoraGAConfig", "MontecloraConfig", "PeftConfig", "PeftError",
                       "PeftType", "PeftWarning", "TaskType", "VeloraConfig", "get_peft_config"),
    "lorakit.io.files": ("AdapterError", "AdapterFileError"),
    "lorakit.io.models": ("load_default_model",),
    "lorakit.training.args": ("TrainArgs",),
    "lorakit.training.trainer": ("TrainingError", "train"),
}  # fmt: skip
_PUBLIC = {name: module for module, names in _MODULES.items() for name in names}


def __getattr__(name: str) -> object:
    """A public name, imported from its module on first use (then kept in this module's namespace)."""
    if name not in _PUBLIC:
        raise AttributeError(f"module 'lorakit' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])


__all__ = sorted(_PUBLIC)
