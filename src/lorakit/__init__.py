"""lorakit: LoRA fine-tuning for Hugging Face transformers models, a drop-in for HF PEFT's LoRA API."""

from lorakit.adapters.embedding import LoraEmbedding
from lorakit.adapters.inject import TargetError
from lorakit.adapters.layer import LoraLayer
from lorakit.adapters.linear import LoraLinear
from lorakit.adapters.model import LoraModel
from lorakit.adapters.quantize import quantize
from lorakit.api.auto import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
)
from lorakit.api.functions import (
    get_peft_model_state_dict,
    inject_adapter_in_model,
    prepare_model_for_kbit_training,
    set_peft_model_state_dict,
)
from lorakit.api.peft_model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    get_peft_model,
)
from lorakit.config import ConfigError, LoftQConfig, LoraConfig, PeftConfig, PeftType, TaskType, get_peft_config
from lorakit.io.files import AdapterError, AdapterFileError

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """``lorakit.train``, ``lorakit.TrainArgs`` and ``lorakit.TrainingError``, imported on first use (the training
    stack pulls in data loading and model resolution, which ``import lorakit`` alone does not need)."""
    if name in ("train", "TrainingError"):
        from lorakit.training import trainer

        return getattr(trainer, name)
    if name == "TrainArgs":
        from lorakit.training.args import TrainArgs

        return TrainArgs
    raise AttributeError(f"module 'lorakit' has no attribute {name!r}")


__all__ = [
    "AdapterError",
    "AdapterFileError",
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "ConfigError",
    "LoftQConfig",
    "LoraConfig",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "LoraModel",
    "PeftConfig",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "TargetError",
    "TaskType",
    "TrainArgs",
    "TrainingError",
    "get_peft_config",
    "get_peft_model",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "prepare_model_for_kbit_training",
    "quantize",
    "set_peft_model_state_dict",
    "train",
]
