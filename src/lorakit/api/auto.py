"""AutoPeftModel*: load an adapter folder together with the base model its config names, as PEFT's classes do.

    model = AutoPeftModelForCausalLM.from_pretrained("runs/x")   # its base (offline if it can), then the adapter
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from torch import nn

from lorakit.api.peft_model import (
    MODEL_TYPE_TO_PEFT_MODEL,
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


def _base_class(config: LoraConfig, auto_class_name: str, source: Path) -> Any:
    """The class that loads the base, as PEFT chooses it: the adapter's ``auto_mapping`` (the base model's own class,
    recorded when there is no task_type) before the Auto class. Only transformers' classes are imported: a config is
    a stranger's file, and importing the module it names would run that module's code."""
    import transformers

    mapping = config.auto_mapping if config.task_type is None else None
    if not mapping or "base_model_class" not in mapping:
        return getattr(transformers, auto_class_name)
    library, name = str(mapping.get("parent_library", "")), str(mapping["base_model_class"])
    if library != "transformers" and not library.startswith("transformers."):
        raise files.AdapterFileError(
            f"{source / files.CONFIG_NAME}: auto_mapping names {library}.{name}, outside transformers; lorakit does "
            "not import modules a config names. Load the base model yourself and use PeftModel.from_pretrained"
        )
    base_cls = getattr(importlib.import_module(library), name, None)
    if base_cls is None:
        raise files.AdapterFileError(f"{source / files.CONFIG_NAME}: auto_mapping names {library}.{name}, which this "
                                     f"transformers ({transformers.__version__}) does not have")  # fmt: skip
    return base_cls


def _auto_base_model(model_id: str | os.PathLike, config: LoraConfig, auto_class_name: str, **kwargs: Any) -> nn.Module:
    base_id = config.base_model_name_or_path
    if not base_id:
        raise files.AdapterFileError(
            f"{Path(model_id) / files.CONFIG_NAME} names no base_model_name_or_path; load the base "
            "model yourself and use PeftModel.from_pretrained(model, folder)"
        )
    # heavy (transformers' model classes): only when a base is loaded
    from lorakit.io.models import name_model, resolve_model

    auto_cls = _base_class(config, auto_class_name, Path(model_id))
    trust = kwargs.pop("trust_remote_code", False)
    base = auto_cls.from_pretrained(
        resolve_model(base_id),
        trust_remote_code=trust,
        **{k: v for k, v in kwargs.items() if k in ("dtype", "torch_dtype", "num_labels")},
    )
    name_model(base, base_id)  # the id, not the cache folder it resolved to
    return base


class _AutoPeftModel:
    auto_class_name = "AutoModel"
    peft_class: type[PeftModel] = PeftModel

    @classmethod
    def from_pretrained(
        cls, model_id: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False, **kwargs: Any
    ) -> PeftModel:
        """Load the base model named in the adapter's config (resolved offline where possible), then the adapter.
        A task_type other than this class's is refused, as PEFT refuses it."""
        config = read_config(model_id)
        _check_task(cls, config, Path(model_id))
        base = _auto_base_model(model_id, config, cls.auto_class_name, **kwargs)
        return cls.peft_class.from_pretrained(
            base, model_id, adapter_name=adapter_name, is_trainable=is_trainable, config=config
        )


def _check_task(cls: type[_AutoPeftModel], config: LoraConfig, source: Path) -> None:
    if config.task_type is None or cls.peft_class is PeftModel:
        return
    expected = MODEL_TYPE_TO_PEFT_MODEL.get(config.task_type)
    if expected is not None and expected is not cls.peft_class:
        task = getattr(config.task_type, "value", config.task_type)
        raise ValueError(
            f"{source / files.CONFIG_NAME} has task_type {task}: load it with AutoPeftModelFor"
            f"{expected.__name__.removeprefix('PeftModelFor')}, not {cls.__name__}"
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
