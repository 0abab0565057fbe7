"""Causal-LM loss as a token sum, computing logits only where a label is.

HF models compute logits for every position (B, T, vocab) in fp32 before the loss; with loss on completions only
most of them are thrown away, and for a 49k vocabulary they dominate memory. ``lm_loss_sum`` runs the model body,
keeps the hidden states whose next token has a label, and applies the output layer to those alone. When the output
layer is a plain ``nn.Linear`` (also the active copy of a ``modules_to_save`` head) or a quantized model's frozen
16-bit ``HalfLinear`` (``fast.causal_lm_loss.head_refusal``), the output layer and the cross-entropy are fused and
chunked (``fast.fused_ce``), so not even the (N, V) labelled-position logits are held.
The reference, ``lm_loss_sum_reference``, is the plain full-logits computation; ``lm_loss_sum_unfused`` is the
labelled-positions path with ordinary logits; tests check all three agree (value and gradients).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit.adapters.modules_to_save import ModulesToSaveWrapper
from lorakit.data.pack import collate
from lorakit.fast.causal_lm_loss import head_cross_entropy, head_refusal
from lorakit.fast.fused_ce import DEFAULT_CHUNK
from lorakit.io.progress import progress as show_progress

IGNORE_INDEX = -100


def lm_loss_sum_reference(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
    """(sum of next-token cross-entropies over labelled positions, their count) from full logits."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits  # (B, T, V); a cache would turn off packed-row isolation
    target = batch["labels"][:, 1:]  # position t predicts token t + 1
    loss = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), target.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss, int((target != IGNORE_INDEX).sum())


def _body_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(decoder body, output layer) of a transformers *ForCausalLM (possibly inside a PeftModel), or None when the
    model post-processes its logits (soft-capping, scaling) and the fast path would differ."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is None or getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    body = getattr(base, getattr(base, "base_model_prefix", ""), None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if not isinstance(body, nn.Module) or head is None or not type(base).__name__.endswith("ForCausalLM"):
        return None
    return body, head


def _plain_linear(head: nn.Module) -> nn.Linear | None:
    """The ``nn.Linear`` (or frozen ``HalfLinear``) that computes ``head(x)``, or None when the head does more (a
    LoRA wrapper, NF4 weights, hooks, per-row adapter routing, another device) and only its own forward is exact."""
    if isinstance(head, ModulesToSaveWrapper):
        head = head.runs_as_current  # None: routing one adapter per row, or hooks
    return head if head is not None and head_refusal(head) is None else None  # type: ignore[return-value]


def _labelled(body: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(hidden states (N, H) of the positions whose next token has a label, those labels (N,))."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = body(**inputs, use_cache=False).last_hidden_state  # (B, T, H)
    target = batch["labels"][:, 1:]  # (B, T-1)
    keep = target != IGNORE_INDEX
    return hidden[:, :-1][keep], target[keep]


def lm_loss_sum_unfused(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
    """Same value as ``lm_loss_sum_reference``; the output layer runs on labelled positions only, as one matmul."""
    parts = _body_and_head(model)
    if parts is None:
        return lm_loss_sum_reference(model, batch)
    return _head_loss(*parts, batch)


def _head_loss(body: nn.Module, head: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
    hidden, target = _labelled(body, batch)
    logits = head(hidden)  # (N, H) -> (N, V), N labelled positions
    return F.cross_entropy(logits.float(), target, reduction="sum"), len(target)


def lm_loss_sum(model: nn.Module, batch: dict[str, Tensor], chunk: int = DEFAULT_CHUNK) -> tuple[Tensor, int]:
    """Same value as ``lm_loss_sum_reference``; the output layer runs on labelled positions only, fused with the
    cross-entropy in chunks of ``chunk`` rows when it is a plain Linear or HalfLinear (else as
    ``lm_loss_sum_unfused``)."""
    parts = _body_and_head(model)
    if parts is None:
        return lm_loss_sum_reference(model, batch)
    body, head = parts
    linear = _plain_linear(head)
    if linear is None:
        return _head_loss(body, head, batch)
    hidden, target = _labelled(body, batch)
    return head_cross_entropy(linear, hidden, target, chunk), len(target)


def loss_over_examples(
    model: nn.Module, examples: Sequence[Any], batch_size: int, pad_id: int, bf16: bool = False,
    progress: str | None = None, loss_sum: Callable[[dict[str, Tensor]], tuple[Tensor, int]] | None = None,
) -> tuple[float, int]:
    """(sum of token losses, labelled-token count) over ``examples`` in eval mode, without gradients; batches are
    formed longest first to pad little. The model's train/eval mode is restored. ``progress``: the name of a
    progress display over the batches (``lorakit.io.progress``), None for none. ``loss_sum``: a batch's (loss sum,
    count), ``lm_loss_sum(model, batch)`` if not given. A sharded run passes its FSDP root's, which runs under
    ``no_grad`` instead of ``inference_mode``: FSDP2 gathers weights into buffers it keeps for the training steps,
    and a buffer made in inference mode cannot be written outside it."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    rows = sorted(examples, key=len, reverse=True)
    device = next(model.parameters()).device
    n_batches = -(-len(rows) // batch_size)
    try:
        with (
            torch.inference_mode() if loss_sum is None else torch.no_grad(),
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16),
            show_progress(progress or "", n_batches, unit="batch", show=progress is not None) as bar,
        ):
            for i in range(0, len(rows), batch_size):
                batch = {k: v.to(device) for k, v in collate(rows[i : i + batch_size], pad_id).items()}
                loss, n = loss_sum(batch) if loss_sum is not None else lm_loss_sum(model, batch)
                total, count = total + loss.item(), count + n
                bar.update()
    finally:
        model.train(was_training)
    return total, count
