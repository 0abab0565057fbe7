"""lorakit: LoRA fine-tuning for Hugging Face transformers models, a drop-in for HF PEFT's LoRA API."""

from lorakit.config import ConfigError, LoftQConfig, LoraConfig, TaskType
from lorakit.inject import TargetError
from lorakit.io import AdapterFileError
from lorakit.layers import LoraEmbedding, LoraLayer, LoraLinear
from lorakit.model import AdapterError, LoraModel
from lorakit.peft_model import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    get_peft_model,
)

__version__ = "0.1.0"

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
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "TargetError",
    "TaskType",
    "get_peft_model",
]
