"""Activated LoRA (aLoRA, Greenewald et al. 2025, arXiv 2504.12397): pure tensor functions.

An aLoRA adapter is switched on by an invocation token sequence c (k,): in a row of token ids (T,), every position
from the start of the *last* occurrence of c on gets the LoRA update, every earlier one sees the base model only (so
the base model's KV cache of the prefix can be reused, sec. 3). The position is kept as an offset counted from the
row's end, PEFT's convention, which stays right when a KV cache means a forward sees only the last tokens::

    offset        = T - start of the last occurrence of c       # >= k; None when c does not occur
    active[b, t]  = t >= T' - min(offset_b, T')                  # (B, T'): T' the positions of this forward
    y             = base(x) + active[..., None] * s * B(A(x))    # (B, T', out)

With a KV cache T' = 1 while decoding: every new token is past the invocation, so it gets the update.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def last_offset(row: Tensor, invocation: Sequence[int]) -> int | None:
    """T - (start of the last occurrence of ``invocation`` in ``row`` (T,)), or None if it does not occur.

    >>> last_offset(torch.tensor([1, 2, 1, 2]), [1, 2]), last_offset(torch.tensor([0, 4, 5]), [1])
    (2, None)
    """
    k, length = len(invocation), row.shape[-1]
    if k == 0 or k > length:
        return None
    windows = row.unfold(0, k, 1)  # (T - k + 1, k): every window of k consecutive ids
    hits = (windows == torch.as_tensor(invocation, dtype=row.dtype, device=row.device)).all(dim=-1).nonzero()
    return None if hits.numel() == 0 else length - int(hits.max())


def offsets(input_ids: Tensor, invocations: Sequence[Sequence[int] | None]) -> list[int | None]:
    """One offset per row of ``input_ids`` (B, T): ``last_offset`` of row b's invocation ``invocations[b]`` (None for a
    row without one: no position of it is activated)."""
    if len(invocations) != input_ids.shape[0]:
        raise ValueError(f"{len(invocations)} invocation sequences for {input_ids.shape[0]} rows; give one per row")
    return [None if c is None else last_offset(row, c) for row, c in zip(input_ids, invocations)]


def activation_mask(row_offsets: Sequence[int | None], length: int, device: torch.device | None = None) -> Tensor:
    """(B, length) bool: True at the positions of row b that get the update, the last min(offset_b, length) ones
    (none for an offset of None)."""
    last = torch.tensor([0 if o is None else min(int(o), length) for o in row_offsets], device=device)  # (B,)
    return torch.arange(length, device=device).unsqueeze(0) >= (length - last).unsqueeze(1)


def masked_add(result: Tensor, x: Tensor, mask: Tensor, update: Callable[[Tensor], Tensor]) -> Tensor:
    """``result`` (B, ..., out) plus ``update(x)`` at the positions where ``mask`` (B, T), T the product of the middle
    dimensions, is True, and nothing elsewhere; ``update`` maps (n, in) -> (n, out) and runs on the active positions
    only. Out of place: equal to ``result + mask[..., None] * update(x)``."""
    rows, out = result.shape[0], result.shape[-1]
    if mask.shape != (rows, result.numel() // max(rows * out, 1)):
        raise ValueError(f"mask {tuple(mask.shape)} does not fit output {tuple(result.shape)}; it needs (B, T)")
    index = mask.reshape(-1).nonzero().squeeze(-1)  # (n,): active positions among the B * T
    if index.numel() == 0:
        return result
    x_active = x.reshape(-1, x.shape[-1]).index_select(0, index)  # (n, in)
    flat = result.reshape(-1, out).index_add(0, index, update(x_active).to(result.dtype))  # (B * T, out)
    return flat.view(result.shape)
