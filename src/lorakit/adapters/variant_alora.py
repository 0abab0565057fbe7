"""Activated LoRA (aLoRA, Greenewald et al. 2025, arXiv 2504.12397) as a variant: ``alora_invocation_tokens=[...]``.
Each row of a batch gets the update from the last occurrence of the adapter's invocation sequence on; earlier
positions compute as the base model (the maths: lorakit.ops.alora). Not mergeable: the update depends on the position.

How the offsets reach the layers: PeftModel.forward / generate find one offset per row in ``input_ids``
(``call_offsets``, or take the caller's ``alora_offsets=``) and hold them in every aLoRA variant of the model for that
one call (``offsets_held``, restored in a ``finally``, errors included). Outside such a call a variant has no offsets
and its layer computes as the base model, as PEFT's does without offsets (so A and B get no gradient).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from lorakit.adapters.variant_lora import Lora, LoraLayer
from lorakit.config import LoraConfig
from lorakit.ops import alora

Offsets = list[int | None]  # one per batch row: positions counted from the row's end; None: no activation

BASE = "__base__"  # the adapter name of rows without an adapter (lorakit.adapters.mixed_batch)


class NotMergeableError(ValueError):
    """An aLoRA adapter asked to merge into the base weight: its update applies only to some positions."""


class ALora(Lora):
    """aLoRA: plain LoRA's A and B, applied at the positions ``offsets`` activate (``offsets`` is set only while a
    PeftModel call runs: see the module docstring)."""

    name = "alora"
    title = "aLoRA"
    runs_on = "nn.Linear and GPT-2 Conv1D layers"
    plain = False  # the layers' fused single-adapter path would apply it everywhere

    def __init__(self, invocation_tokens: Sequence[int]) -> None:
        self.invocation_tokens = list(invocation_tokens)
        self.offsets: Offsets | None = None

    def positions(self, rows: int, length: int, device: torch.device) -> Tensor:
        """(rows, length) bool: the positions that get the update in a forward of ``length`` positions."""
        if self.offsets is None:
            return torch.zeros(rows, length, dtype=torch.bool, device=device)
        if len(self.offsets) != rows:
            raise ValueError(
                f"aLoRA has {len(self.offsets)} offsets (one per row of the input_ids they were found in) for a batch "
                f"of {rows} rows; pass alora_offsets with one entry per row, or input_ids of this batch"
            )
        return alora.activation_mask(self.offsets, length, device)

    def linear_forward(self, layer: LoraLayer, adapter: str, x: Tensor, base: Tensor, result: Tensor) -> Tensor:
        """``result + active * B(A(dropout(x))) * s``, computed at the active positions only (ops.alora.masked_add);
        B's bias (lora_bias) is part of B's call."""
        A, B = layer.lora_A[adapter], layer.lora_B[adapter]
        dropout, s = layer.lora_dropout[adapter], layer.scaling[adapter]
        rows = result.shape[0]
        mask = self.positions(rows, result.numel() // max(rows * result.shape[-1], 1), result.device)
        return alora.masked_add(result, x, mask, lambda h: B(A(dropout(h.to(A.weight.dtype)))) * s)

    def merged(self, layer: LoraLayer, adapter: str, weight: Tensor) -> Tensor:
        raise _not_mergeable(adapter)

    def unmerged(self, layer: LoraLayer, adapter: str, weight: Tensor) -> Tensor:
        raise _not_mergeable(adapter)

    def merged_out_in(self, layer: LoraLayer, adapter: str, weight: Tensor, base: Tensor, delta: Tensor) -> Tensor:
        raise _not_mergeable(adapter)


def _not_mergeable(adapter: str) -> NotMergeableError:
    return NotMergeableError(
        f"adapter {adapter!r} is an aLoRA adapter (alora_invocation_tokens): its update applies only from the "
        "invocation tokens on, so no merged weight computes it. Keep it unmerged (serve it unmerged, e.g. with "
        "vLLM's aLoRA support), or merge only the other adapters (adapter_names=[...])"
    )


# -- the offsets of one call ----------------------------------------------------------------------------------------
def calculate_alora_offsets(
    peft_config: Mapping[str, LoraConfig],
    active_adapter: str,
    input_ids: Tensor | None,
    adapter_names: Sequence[str] | None = None,
) -> Offsets:
    """One offset per row of ``input_ids`` (B, T) (ops.alora.offsets): from the invocation of the row's adapter,
    ``adapter_names[i]`` if given, else ``active_adapter``; None for a ``"__base__"`` row, an adapter without
    alora_invocation_tokens, or a row without its invocation. [] without input_ids. PEFT's function of the name."""
    if input_ids is None:
        return []
    invocations: list[list[int] | None] = []
    for i in range(input_ids.shape[0]):
        name = adapter_names[i] if adapter_names and i < len(adapter_names) else active_adapter
        if name != BASE and name not in peft_config:
            warnings.warn(f"Adapter '{name}' not found in peft_config. Using base model for row {i}.", stacklevel=2)
        config = peft_config.get(name) if name != BASE else None
        invocations.append(getattr(config, "alora_invocation_tokens", None))
    return alora.offsets(input_ids, invocations)


def in_batch(peft_config: Mapping[str, LoraConfig], active_adapter: str, adapter_names: Sequence[str] | None) -> bool:
    """Whether a call's rows use an aLoRA adapter: the active one, or one of ``adapter_names``."""
    names = adapter_names if adapter_names else [active_adapter]
    return any(getattr(peft_config.get(n), "alora_invocation_tokens", None) for n in names if n != BASE)


def call_offsets(
    peft_config: Mapping[str, LoraConfig],
    active_adapter: str,
    input_ids: Tensor | None,
    inputs_embeds: Tensor | None,
    adapter_names: Sequence[str] | None,
    generating: bool,
) -> Offsets | None:
    """The offsets of a forward (``generating`` False) or generate call that has no ``alora_offsets``: found in
    ``input_ids`` (a 1-D prompt counts as one row); None, with PEFT's warning, without input_ids (inputs_embeds
    only): the aLoRA adapters then compute as the base model for that call."""
    if input_ids is not None:
        ids = input_ids.unsqueeze(0) if input_ids.dim() == 1 else input_ids
        return calculate_alora_offsets(peft_config, active_adapter, ids, adapter_names)
    if generating:
        warnings.warn(
            "Cannot calculate aLoRA offsets during generate as input_ids are not available. Disabling aLoRA. "
            "(Pass input_ids, or alora_offsets=[one per row].)",
            UserWarning,
            stacklevel=3,
        )
    elif inputs_embeds is not None:
        warnings.warn(
            "Cannot calculate aLoRA offsets when only inputs_embeds are provided. Disabling aLoRA for this forward "
            "pass. (Pass input_ids too, or alora_offsets=[one per row].)",
            UserWarning,
            stacklevel=3,
        )
    return None


def get_alora_offsets_for_forward(
    model: nn.Module, input_ids: Tensor | None = None, inputs_embeds: Tensor | None = None, **kwargs: object
) -> dict[str, object]:
    """PEFT's helper: ``kwargs`` with ``alora_offsets`` found in ``input_ids`` (``call_offsets``) when the call's
    rows use an aLoRA adapter of ``model`` (a PeftModel) and ``kwargs`` has none. PeftModel.forward does the same."""
    return _with_offsets(model, input_ids, inputs_embeds, dict(kwargs), generating=False)


def get_alora_offsets_for_generate(model: nn.Module, *args: object, **kwargs: object) -> dict[str, object]:
    """PEFT's helper: as ``get_alora_offsets_for_forward`` for a generate call, input_ids taken from ``kwargs`` or
    the first positional argument. PeftModel.generate does the same."""
    ids = kwargs.get("input_ids")
    if ids is None and args and isinstance(args[0], Tensor):
        ids = args[0]
    return _with_offsets(model, ids, kwargs.get("inputs_embeds"), dict(kwargs), generating=True)  # type: ignore


def _with_offsets(
    model: nn.Module, ids: Tensor | None, embeds: Tensor | None, kwargs: dict[str, object], generating: bool
) -> dict[str, object]:
    names = kwargs.get("adapter_names")
    active = next(iter(model.active_adapters), "")  # the first active adapter, as PEFT's active_adapter
    if kwargs.get("alora_offsets") is None and in_batch(model.peft_config, active, names):  # type: ignore[arg-type]
        kwargs["alora_offsets"] = call_offsets(model.peft_config, active, ids, embeds, names, generating)
    return kwargs


def check_call(offsets: Offsets | None, num_beams: object, model: nn.Module) -> None:
    """ValueError for a call aLoRA cannot run: beam search (``num_beams`` > 1), or a training forward under gradient
    checkpointing (the checkpointed layers recompute in backward, after the call's offsets are gone)."""
    if offsets is None:
        return
    if isinstance(num_beams, int) and num_beams > 1:
        raise ValueError(
            f"Beam search not yet supported for aLoRA. (num_beams={num_beams}: use num_beams=1, greedy or sampling)"
        )
    checkpointed = any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    if checkpointed and model.training and torch.is_grad_enabled():
        raise ValueError(
            "aLoRA with gradient checkpointing is not supported by lorakit yet: the checkpointed layers would "
            "recompute in backward without the call's offsets. Call model.gradient_checkpointing_disable() to train "
            "an aLoRA adapter"
        )


@contextlib.contextmanager
def offsets_held(
    wrappers: Sequence[nn.Module],
    offsets: Offsets | None,
    repeat: int = 1,
    generating: tuple[nn.Module, int] | None = None,
) -> Iterator[None]:
    """Within the block, every aLoRA variant of ``wrappers`` (LoRA layers) has ``offsets``, each repeated ``repeat``
    times (generate's rows per prompt: num_return_sequences); restored on exit, errors included.

    ``generating`` = (the model generate runs, the prompts' length P): the offsets then follow the tokens generated,
    k at a step whose rows are P + k long, as ``offset + k``, set by a forward pre-hook on that model removed on exit.
    With a KV cache a step sees its new token only, which is past the invocation either way; without one
    (use_cache=False) a step sees the whole row, whose invocation is k tokens further from its end."""
    variants = [v for m in wrappers for v in getattr(m, "variants", {}).values() if isinstance(v, ALora)]
    held = None if offsets is None else [o for o in offsets for _ in range(repeat)]
    before = [v.offsets for v in variants]
    for v in variants:
        v.offsets = held
    handle = None
    if generating is not None and held is not None and variants:
        model, prompt_length = generating

        def follow(module: nn.Module, args: tuple, kwargs: dict[str, object]) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            if not isinstance(ids, Tensor):
                return
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            seen = cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0  # type: ignore[union-attr]
            grown = int(seen) + ids.shape[-1] - prompt_length  # k: the tokens generated before this step
            for v in variants:
                v.offsets = [None if o is None else o + grown for o in held]

        handle = model.register_forward_pre_hook(follow, with_kwargs=True)
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()
        for v, previous in zip(variants, before):
            v.offsets = previous
