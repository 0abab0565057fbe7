"""Activated LoRA (aLoRA, Greenewald et al. 2025, arXiv 2504.12397) as a variant: ``alora_invocation_tokens=[...]``.
Each row of a batch gets the update from the last occurrence of the adapter's invocation sequence on; earlier
positions compute as the base model (the maths: lorakit.ops.alora). Not mergeable: the update depends on the position.

How the offsets reach the layers: PeftModel.forward / generate find one offset per row in ``input_ids``
(``call_offsets``, or take the caller's ``alora_offsets=``) and hold them in every aLoRA variant of the model for that
one call (``offsets_held``, restored in a ``finally``, errors included). Outside such a call a variant has no offsets
and its layer computes as the base model, as PEFT's does without offsets (so A and B get no gradient). Under
gradient checkpointing, each checkpointed layer's recomputation in backward holds the offsets of the forward it
replays (``recomputed_with_offsets``: torch's ``context_fn``, non-reentrant checkpointing only).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence

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


def check_call(offsets: Offsets | None, num_beams: object) -> None:
    """ValueError for a call aLoRA cannot run: beam search (``num_beams`` > 1)."""
    if offsets is not None and isinstance(num_beams, int) and num_beams > 1:
        raise ValueError(
            f"Beam search not yet supported for aLoRA. (num_beams={num_beams}: use num_beams=1, greedy or sampling)"
        )


@contextlib.contextmanager
def recomputed_with_offsets(model: nn.Module, offsets: Offsets | None) -> Iterator[None]:
    """Within the block, every gradient-checkpointed layer of ``model`` (transformers' layers with
    ``gradient_checkpointing`` on) recomputes in backward with this call's offsets: its checkpoint function is given
    torch's ``context_fn``, whose recompute context holds them for the layers inside it (``offsets_held``, entered
    during backward, after this call). Restored on exit. Nothing to do outside a training forward.

    ValueError for a checkpoint function that takes no ``context_fn``: reentrant checkpointing (use_reentrant=True)
    or one that is not ``torch.utils.checkpoint.checkpoint`` with keyword arguments."""
    blocks = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)
              and callable(m.__dict__.get("_gradient_checkpointing_func"))]
    if offsets is None or not blocks or not (model.training and torch.is_grad_enabled()):
        yield
        return
    for block in blocks:
        keywords = getattr(block._gradient_checkpointing_func, "keywords", None)
        if keywords is None or keywords.get("use_reentrant", True) or "context_fn" in keywords:
            raise ValueError(
                f"aLoRA with gradient checkpointing needs non-reentrant checkpointing (its recomputation in backward "
                f"gets the call's offsets through torch's context_fn); {type(block).__name__} checkpoints with "
                f"{keywords if keywords is not None else block._gradient_checkpointing_func!r}. Enable it with "
                "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})"
            )
    held = list(offsets)
    originals = [block._gradient_checkpointing_func for block in blocks]
    for block, checkpoint in zip(blocks, originals):
        layers = [m for m in block.modules() if isinstance(getattr(m, "variants", None), dict)]
        block._gradient_checkpointing_func = _with_recompute_offsets(checkpoint, layers, held)
    try:
        yield
    finally:
        for block, checkpoint in zip(blocks, originals):
            block._gradient_checkpointing_func = checkpoint


def _with_recompute_offsets(checkpoint: Callable, layers: list[nn.Module], held: Offsets) -> Callable:
    """``checkpoint`` whose recomputation runs inside ``offsets_held(layers, held)``."""

    def run(function: Callable, *args: object, **kwargs: object) -> object:
        contexts = lambda: (contextlib.nullcontext(), offsets_held(layers, held))  # noqa: E731 (forward, recompute)
        return checkpoint(function, *args, context_fn=contexts, **kwargs)

    return run


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


@contextlib.contextmanager
def held_for_call(
    model: nn.Module,
    wrappers: Sequence[nn.Module],
    offsets: Offsets | None,
    repeat: int = 1,
    generating: tuple[nn.Module, int] | None = None,
) -> Iterator[None]:
    """The offsets of one PeftModel call: held by ``wrappers`` (``offsets_held``) and by the recomputation of
    ``model``'s gradient-checkpointed layers (``recomputed_with_offsets``)."""
    with recomputed_with_offsets(model, offsets), offsets_held(wrappers, offsets, repeat, generating):
        yield
