"""AutoPeftModel*: load an adapter folder together with the base model its config names, as PEFT's classes do.

    model = AutoPeftModelForCausalLM.from_pretrained("runs/x")   # its base (offline if it can), then the adapter
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from lorakit.api.peft_model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)
from lorakit.config import LoraConfig, read_config
from lorakit.io import files


def _auto_base_model(model_id: str | os.PathLike, auto_class_name: str, **kwargs: Any) -> tuple[nn.Module, LoraConfig]:
    config = read_config(model_id)
    base_id = config.base_model_name_or_path
    if not base_id:
        raise files.AdapterFileError(
            f"{Path(model_id) / files.CONFIG_NAME} names no base_model_name_or_path; load the base "
            "model yourself and use PeftModel.from_pretrained(model, folder)"
        )
    import transformers

    from lorakit.io.models import resolve_model  # heavy (transformers' model classes): only when a base is loaded

    auto_cls = getattr(transformers, auto_class_name)
    trust = kwargs.pop("trust_remote_code", False)
    base = auto_cls.from_pretrained(
        resolve_model(base_id),
        trust_remote_code=trust,
        **{k: v for k, v in kwargs.items() if k in ("dtype", "torch_dtype", "num_labels")},
    )
    base.name_or_path = base.config._name_or_path = base_id  # the id, not the cache folder it resolved to
    return base, config


class _AutoPeftModel:
    auto_class_name = "AutoModel"
    peft_class: type[PeftModel] = PeftModel

    @classmethod
    def from_pretrained(
        cls, model_id: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False, **kwargs: Any
    ) -> PeftModel:
        """Load the base model named in the adapter's config (resolved offline where possible), then the adapter."""
        base, config = _auto_base_model(model_id, cls.auto_class_name, **kwargs)
        return cls.peft_class.from_pretrained(
            base, model_id, adapter_name=adapter_name, is_trainable=is_trainable, config=config
        )


class AutoPeftModel(_AutoPeftModel):
    pass


class AutoPeftModelForCausalLM(_AutoPeftModel):
    auto_class_name = "AutoModelForCausalLM"
    peft_class = PeftModelForCausalLM


class AutoPeftModelForSequenceClassification(_AutoPeftModel):
    auto_class_name = "AutoModelForSequenceClassification"
    peft_class = PeftModelForSequenceClassification


class AutoPeftModelForTokenClassification(_AutoPeftModel):
    auto_class_name = "AutoModelForTokenClassification"
    peft_class = PeftModelForTokenClassification


class AutoPeftModelForSeq2SeqLM(_AutoPeftModel):
    auto_class_name = "AutoModelForSeq2SeqLM"
    peft_class = PeftModelForSeq2SeqLM


class AutoPeftModelForQuestionAnswering(_AutoPeftModel):
    auto_class_name = "AutoModelForQuestionAnswering"
    peft_class = PeftModelForQuestionAnswering


class AutoPeftModelForFeatureExtraction(_AutoPeftModel):
    auto_class_name = "AutoModel"  # the bare encoder: hidden states, no head
    peft_class = PeftModelForFeatureExtraction
