"""PeftModel: the user-facing adapter model, a drop-in for HF PEFT's class of the same name.

``get_peft_model(model, config)`` returns one; it forwards everything a transformers model offers (forward, generate,
config, gradient checkpointing) and adds adapter management, trainable-parameter counts and PEFT-format files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from lorakit.adapters import mixed_batch, state, variant_alora
from lorakit.adapters.find import QA_HEADS, SEQ_CLS_HEADS
from lorakit.adapters.inject import wrappers
from lorakit.adapters.model import LoraModel
from lorakit.adapters.modules_to_save import ModulesToSaveWrapper
from lorakit.adapters.targets import TargetError
from lorakit.api import adapter_files, hf_trainer, model_card, signature, status
from lorakit.config import LoraConfig, PeftType, TaskType, read_config
from lorakit.fast import causal_lm_loss
from lorakit.io import files
from lorakit.io.files import CARD_NAME, check_adapter_name


class PeftModel(nn.Module):
    """A transformers model with LoRA adapters. Parameter names read ``base_model.model.<path>``, as in PEFT."""

    def __init__(
        self,
        model: nn.Module,
        peft_config: LoraConfig,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        """``autocast_adapter_dtype``: float32 adapter weights (default, as PEFT) or, False, the base layers' dtype.
        ``low_cpu_mem_usage`` is accepted for PEFT's signature; lorakit creates adapters at their size at once."""
        super().__init__()
        peft_config = self._prepare_config(model, peft_config)
        self.base_model = LoraModel(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        self._enable_input_grads_if_checkpointing()
        self.forward = signature.ForwardWithBaseSignature(self)  # type: ignore[method-assign]
        hf_trainer.install(PeftModel)  # transformers.Trainer checkpoints hold the adapter (see api/hf_trainer.py)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    @staticmethod
    def _prepare_config(model: nn.Module, config: LoraConfig) -> LoraConfig:
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
        return config

    # -- forwarding ----------------------------------------------------------------------------------------------
    # A causal LM in training mode with labels computes its loss without the (B, T, V) logits, its outputs.logits
    # computed on first read (lorakit.fast.causal_lm_loss); False: always transformers' own forward.
    fused_loss: bool = True

    def _forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """The base model's forward. ``adapter_names`` (one per batch row, ``"__base__"`` for none) runs each row
        with its own adapter, in eval mode (see lorakit.adapters.mixed_batch). A causal LM in training mode with
        ``labels`` runs lorakit's fused output layer + cross-entropy (equal loss and gradients, no full logits;
        ``outputs.logits`` computed on first read) unless ``fused_loss_refusal`` names a reason not to. aLoRA
        adapters get their offsets from ``input_ids``, or from ``alora_offsets=`` (see ``_activated``)."""
        alora_offsets = kwargs.pop("alora_offsets", None)
        with self._adapter_per_row(adapter_names, args, kwargs), self._activated(
            alora_offsets, adapter_names, args, kwargs
        ):
            base = self.get_base_model()
            if adapter_names is None and self.fused_loss_refusal(**kwargs) is None:
                return causal_lm_loss.forward(base, _head_linear(base), base, args, kwargs)
            return base(*args, **kwargs)

    def fused_loss_refusal(self, **kwargs: Any) -> str | None:
        """Why ``model(**kwargs)`` runs transformers' own forward (full logits) instead of the fused loss, or None
        when it runs the fused one (see lorakit.fast.causal_lm_loss.call_refusal)."""
        if not self.fused_loss:
            return "model.fused_loss is False"
        base = self.get_base_model()
        return causal_lm_loss.call_refusal(base, _head_linear(base), kwargs)

    forward = signature.declaring_labels(_forward, "labels")

    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """The base model's generate; ``adapter_names`` as in ``forward``, one per prompt, held for every step, and
        aLoRA offsets found in the prompts (or ``alora_offsets=``), held for every step too."""
        alora_offsets = kwargs.pop("alora_offsets", None)
        with self._adapter_per_row(adapter_names, args, kwargs, generating=True), self._activated(
            alora_offsets, adapter_names, args, kwargs, generating=True
        ):
            return self.get_base_model().generate(*args, **kwargs)

    def _activated(
        self,
        offsets: list[int | None] | None,
        adapter_names: list[str] | None,
        args: tuple,
        kwargs: dict[str, Any],
        generating: bool = False,
    ) -> contextlib.AbstractContextManager:
        """The aLoRA context of a forward / generate call: ``offsets`` (one per row), else those found in its
        input_ids, held by the aLoRA layers for the call (lorakit.adapters.variant_alora); nothing to do when no row
        uses an aLoRA adapter and no offsets are given. ValueError for beam search and reentrant gradient
        checkpointing."""
        active = next(iter(self.active_adapters), "")  # the first active adapter, as PEFT's active_adapter
        if offsets is None:
            if not variant_alora.in_batch(self.peft_config, active, adapter_names):
                return contextlib.nullcontext()
            ids = next((kwargs[k] for k in ("input_ids", "inputs") if kwargs.get(k) is not None), None)
            if ids is None and args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
                ids = args[0]
            offsets = variant_alora.call_offsets(
                self.peft_config, active, ids, kwargs.get("inputs_embeds"), adapter_names, generating
            )
        base = self.get_base_model()
        config = getattr(base, "generation_config", None) if generating else None
        variant_alora.check_call(offsets, kwargs.get("num_beams", getattr(config, "num_beams", None)))
        repeat = mixed_batch.rows_per_prompt(kwargs, config) if generating else 1
        prompts = kwargs.get("input_ids", args[0] if args else None)
        steps = (base, prompts.shape[-1]) if generating and isinstance(prompts, torch.Tensor) else None
        return variant_alora.held_for_call(base, [module for _, module in wrappers(base)], offsets, repeat, steps)

    def _adapter_per_row(
        self, adapter_names: list[str] | None, args: tuple, kwargs: dict[str, Any], generating: bool = False
    ) -> contextlib.AbstractContextManager:
        """The routing context of a forward / generate call with ``adapter_names`` (nothing to do without them)."""
        if adapter_names is None:
            return contextlib.nullcontext()
        base = self.get_base_model()
        repeat = mixed_batch.rows_per_prompt(kwargs, getattr(base, "generation_config", None)) if generating else 1
        layers = [module for _, module in wrappers(base)]
        return mixed_batch.routed(
            layers, adapter_names, list(self.peft_config), base.training, _batch_rows(args, kwargs), repeat
        )

    def get_base_model(self) -> nn.Module:
        """The transformers model (with the LoRA wrappers inside it)."""
        return self.base_model.model

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **kw: Any) -> None:
        """Enable activation (gradient) checkpointing in the base model; inputs are made to require grad so that
        the frozen embeddings do not cut the graph under reentrant checkpointing."""
        base = self.get_base_model()
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5
            base.activation_checkpointing_enable(activation_checkpointing_kwargs, **kw)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=activation_checkpointing_kwargs)
        self._enable_input_grads_if_checkpointing()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kw: Any) -> None:
        """The older name of activation_checkpointing_enable (what transformers.Trainer calls)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kw)

    def _enable_input_grads_if_checkpointing(self) -> None:
        base = self.get_base_model()
        on = getattr(base, "is_activation_checkpointing", None)
        if on is None:
            on = getattr(base, "is_gradient_checkpointing", False)
        if on and hasattr(base, "enable_input_require_grads"):
            base.enable_input_require_grads()

    # -- adapters (delegated to LoraModel, listed here for discoverability) --------------------------------------
    @property
    def peft_config(self) -> dict[str, LoraConfig]:
        return self.base_model.peft_config

    @property
    def active_adapters(self) -> list[str]:
        return list(self.base_model.active_adapters)

    @property
    def active_adapter(self) -> str | list[str]:
        return self.base_model.active_adapter

    @property
    def modules_to_save(self) -> set[str] | None:
        """PEFT's attribute: the modules_to_save names of the adapters the model holds (None if they name none)."""
        names = set().union(*(config.modules_to_save or [] for config in self.peft_config.values()))
        return names or None

    @property
    def peft_type(self) -> PeftType:
        return self.active_peft_config.peft_type

    @property
    def active_peft_config(self) -> LoraConfig:
        return self.peft_config[self.active_adapters[0]]

    def add_adapter(
        self,
        adapter_name: str,
        peft_config: LoraConfig,
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        """Add a new, inactive adapter (activate it with set_adapter); the options as for ``PeftModel(...)``."""
        config = self._prepare_config(self.get_base_model(), peft_config)
        self.base_model.add_adapter(adapter_name, config, autocast_adapter_dtype=autocast_adapter_dtype)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Activate ``adapter_name``; it trains unless ``inference_mode`` (then its parameters are frozen), as PEFT: an
        adapter loaded for inference (from_pretrained / load_adapter without is_trainable) trains too, once activated
        here (PEFT's Arrow workflow trains a task adapter so)."""
        self.base_model.set_adapter(adapter_name)
        self.base_model.set_requires_grad(adapter_name, not inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        self.base_model.delete_adapter(adapter_name)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """``with model.disable_adapter():`` runs the plain base model."""
        with self.base_model.disable_adapter():
            yield

    # -- parameter counts ----------------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, counting shared (tied) tensors once, as PEFT does."""
        trainable = total = 0
        for param in self.parameters():
            n = param.numel()
            if n == 0 and hasattr(param, "ds_numel"):
                n = param.ds_numel
            if param.__class__.__name__ == "Params4bit":  # packed 4-bit storage holds two values per byte
                n *= 2
            total += n
            if param.requires_grad:
                trainable += n
        return trainable, total

    def get_layer_status(self) -> list[status.TunerLayerStatus]:
        """Each adapter layer's state (enabled, active / merged / available adapters, requires_grad, devices)."""
        return status.get_layer_status(self)

    def get_model_status(self) -> status.TunerModelStatus:
        """The model's adapter state, "irregular" where its layers disagree (PEFT's dataclass)."""
        return status.get_model_status(self)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        share = 100 * trainable / total
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}")

    # -- files ---------------------------------------------------------------------------------------------------
    # save_pretrained(save_directory, safe_serialization=True, selected_adapters=None, ...): every adapter in PEFT's
    # format; the method is defined in lorakit.api.adapter_files, beside the adapter folder's other checks
    save_pretrained = adapter_files.save_pretrained

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str = "Upload adapter",
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        **save_kwargs: Any,
    ) -> object:
        """Save the adapters (save_pretrained with ``save_kwargs``) into a temporary folder and upload it to the
        Hugging Face Hub repository ``repo_id`` (created if missing), as PEFT's push_to_hub; returns the commit
        info. Needs the network: with HF_HUB_OFFLINE set it stops before saving anything, saying so."""
        return adapter_files.push_to_hub(self, repo_id, commit_message, private, token, revision, create_pr,
                                         **save_kwargs)

    def model_card(self, output_dir: str | os.PathLike) -> bytes:
        """``output_dir``/README.md as save_pretrained writes it (lorakit.api.model_card), as PEFT does: the card
        there, if any, updated."""
        path = Path(output_dir) / CARD_NAME
        base = self.get_base_model()
        config = getattr(base, "config", None)
        name = getattr(base, "name_or_path", None) or getattr(config, "_name_or_path", None) or None
        tags = ["lora", "lorakit", *(getattr(base, "model_tags", None) or [])]
        if type(base).__module__.startswith("transformers."):  # a transformers model class
            tags.append("transformers")
        if name:
            tags.append(f"base_model:adapter:{name}")
        pipeline = "text-generation" if isinstance(self, PeftModelForCausalLM) else None
        existing = path.read_text(encoding="utf-8") if path.is_file() else None
        return model_card.card_text(existing, name, tags, pipeline).encode("utf-8")

    def config_to_save(self, adapter_name: str) -> LoraConfig:
        """The config as an adapter folder records it (save_pretrained, and lorakit train's checkpoints): PEFT's
        inference_mode True and its auto_mapping."""
        data = self.peft_config[adapter_name].to_dict()
        return LoraConfig.from_dict({**data, "inference_mode": True, "auto_mapping": self._auto_mapping(adapter_name)})

    def file_metadata(self) -> dict[str, str] | None:
        """The adapter file's safetensors metadata: PEFT's, plus which bundled file the base was (io.models)."""
        tag = getattr(self.get_base_model(), "_lorakit_base_tag", None)
        return {"format": "pt", files.BASE_TAG_KEY: tag} if tag else None

    def _auto_mapping(self, adapter_name: str) -> dict[str, str] | None:
        """What PEFT records for a config without task_type: the base model's class and its module (PEFT's
        AutoPeftModel imports that class to load the adapter); None with a task_type."""
        if self.peft_config[adapter_name].task_type is not None:
            return None
        base = type(self.get_base_model())
        return {"base_model_class": base.__name__, "parent_library": base.__module__}

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: LoraConfig | None = None,
        autocast_adapter_dtype: bool = True,
        **kwargs: Any,
    ) -> PeftModel:
        """Wrap ``model`` with the adapter saved in folder ``model_id``: frozen and in eval mode (dropout off) unless
        ``is_trainable``, as PEFT does. A ``config`` given is the one the model keeps (``peft_config[adapter_name] is
        config``). PEFT's other keyword arguments (``low_cpu_mem_usage``, ``torch_device``, ...) are accepted and
        unused; with ``ignore_mismatched_sizes=True`` a tensor that does not fit still raises (see _load_tensors).
        ``key_mapping`` ({regex: replacement}) renames the file's keys, by default with the base model's
        ``_checkpoint_conversion_mapping`` (an adapter saved on a model's older module layout), as PEFT does."""
        check_adapter_name(adapter_name)
        config = config or read_config(model_id)
        config.inference_mode = not is_trainable
        model_cls = MODEL_TYPE_TO_PEFT_MODEL.get(config.task_type, PeftModel) if cls is PeftModel else cls
        init = adapter_files.init_for_loading(config)
        config_copy = LoraConfig.from_dict({**config.to_dict(), "init_lora_weights": init})
        config_copy._register_custom_module(config._custom_modules)  # the caller's custom kinds, which no file holds
        tensors, source = adapter_files.read_weights(model, model_id, kwargs.get("key_mapping"))
        state.check_ranks(config_copy, tensors, source)
        try:
            peft_model = model_cls(model, config_copy, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        except TargetError as e:
            raise adapter_files.target_error(model, model_id, config, tensors, e) from None
        adapter_files.load_tensors(peft_model, tensors, adapter_name, source, kwargs)
        adapter_files.check_base(model, model_id)
        for field in dataclasses.fields(config):  # what injection resolved (all-linear -> names, ...)
            if field.name != "init_lora_weights":
                setattr(config, field.name, getattr(config_copy, field.name))
        peft_model.peft_config[adapter_name] = config
        return peft_model if is_trainable else peft_model.eval()

    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str,
        is_trainable: bool = False,
        autocast_adapter_dtype: bool = True,
        **kwargs: Any,
    ) -> _IncompatibleKeys:
        """Add the adapter saved in ``model_id`` under ``adapter_name`` (inactive; use set_adapter). If
        ``adapter_name`` exists, its weights are replaced by the saved ones (shapes must match), as PEFT does: what
        transformers.Trainer does on resume_from_checkpoint and load_best_model_at_end. With ``is_trainable`` a new
        adapter's parameters train though it is inactive; without, the model is put in eval mode, as PEFT does. What
        trains already (other adapters, base weights the user unfroze) is left as it is. Returns PEFT's load result:
        lorakit loads all or nothing (a missing or surplus tensor raises), so both of its lists are empty."""
        loaded = _IncompatibleKeys(missing_keys=[], unexpected_keys=[])
        key_mapping = kwargs.get("key_mapping")
        if adapter_name in self.peft_config:
            tensors, source = adapter_files.read_weights(self.get_base_model(), model_id, key_mapping)
            state.check_ranks(self.peft_config[adapter_name], tensors, source)
            adapter_files.load_tensors(self, tensors, adapter_name, source, kwargs)
            if not is_trainable:
                self.eval()
            return loaded
        config = read_config(model_id)
        config.inference_mode = not is_trainable
        config.init_lora_weights = adapter_files.init_for_loading(config)
        tensors, source = adapter_files.read_weights(self.get_base_model(), model_id, key_mapping)
        state.check_ranks(config, tensors, source)
        try:
            self.add_adapter(adapter_name, config, autocast_adapter_dtype=autocast_adapter_dtype)
        except TargetError as e:
            raise adapter_files.target_error(self.get_base_model(), model_id, config, tensors, e) from None
        try:
            adapter_files.load_tensors(self, tensors, adapter_name, source, kwargs)
        except Exception:
            self.delete_adapter(adapter_name)
            raise
        if is_trainable:  # asked for: it trains though inactive, as in PEFT (the next set_adapter decides again)
            self.base_model.set_requires_grad(adapter_name, True)
        else:
            self.eval()
        return loaded

    # -- merging (delegated) -------------------------------------------------------------------------------------
    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        return self.base_model.merge_and_unload(progressbar, safe_merge, adapter_names)


def _head_linear(model: nn.Module) -> nn.Module | None:
    """The module that computes ``model``'s output layer: the head, or the active copy of a modules_to_save head
    (None when that copy routes rows to several adapters or has hooks)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head.runs_as_current if isinstance(head, ModulesToSaveWrapper) else head


def _batch_rows(args: tuple, kwargs: dict[str, Any]) -> int | None:
    """The batch size of a forward / generate call, from its input_ids or inputs_embeds (None if neither is given)."""
    named = (kwargs[k] for k in ("input_ids", "inputs", "inputs_embeds") if kwargs.get(k) is not None)
    inputs = args[0] if args else next(named, None)
    return inputs.shape[0] if isinstance(inputs, torch.Tensor) else None


class PeftModelForCausalLM(PeftModel):
    """PeftModel for decoder-only language models (task_type CAUSAL_LM)."""


class PeftModelForSequenceClassification(PeftModel):
    """PeftModel for classifiers: the head ('classifier' or 'score') is trained in full and saved with the adapter."""

    def __init__(self, model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default", **kwargs: Any) -> None:
        # both head names, after the config's own entries, as PEFT lists them (a name the model lacks matches nothing)
        peft_config.modules_to_save = list(peft_config.modules_to_save or []) + list(SEQ_CLS_HEADS)
        super().__init__(model, peft_config, adapter_name, **kwargs)


class PeftModelForTokenClassification(PeftModelForSequenceClassification):
    """PeftModel for token classifiers (head trained in full, like sequence classification)."""


class PeftModelForFeatureExtraction(PeftModel):
    """PeftModel for encoders used as feature extractors."""

    forward = signature.declaring_labels(PeftModel._forward)  # hidden states: no labels


class PeftModelForSeq2SeqLM(PeftModel):
    """PeftModel for encoder-decoder language models."""


class PeftModelForQuestionAnswering(PeftModel):
    """PeftModel for extractive question answering: the span head ('qa_outputs') is trained in full and saved with
    the adapter."""

    forward = signature.declaring_labels(PeftModel._forward, "start_positions", "end_positions")

    def __init__(self, model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default", **kwargs: Any) -> None:
        # after the config's own entries, as PEFT lists it
        peft_config.modules_to_save = list(peft_config.modules_to_save or []) + list(QA_HEADS)
        super().__init__(model, peft_config, adapter_name, **kwargs)


MODEL_TYPE_TO_PEFT_MODEL: dict[TaskType | None, type[PeftModel]] = {
    TaskType.CAUSAL_LM: PeftModelForCausalLM,
    TaskType.SEQ_CLS: PeftModelForSequenceClassification,
    TaskType.TOKEN_CLS: PeftModelForTokenClassification,
    TaskType.SEQ_2_SEQ_LM: PeftModelForSeq2SeqLM,
    TaskType.FEATURE_EXTRACTION: PeftModelForFeatureExtraction,
    TaskType.QUESTION_ANS: PeftModelForQuestionAnswering,
}
