"""Mixed-adapter batches: row i of a batch runs with adapter ``adapter_names[i]`` (``"__base__"``: no adapter).

    peft_model.eval()
    logits = peft_model(input_ids=ids, adapter_names=["math", "__base__", "code", "math"]).logits
    out = peft_model.generate(input_ids=ids, max_new_tokens=16, adapter_names=["math", "__base__", "code", "math"])

The idea is Punica's SGMV (Chen et al. 2023, "Punica: Multi-Tenant LoRA Serving", sec. 4): sort the rows by adapter
once, then every LoRA layer does one gather, one matmul per adapter segment for A and for B, and one scatter-add,
whatever the number of adapters. ``plan`` (a pure function) sorts the rows once per forward, or once per ``generate``,
and cuts each adapter's rows into segments of L = ceil(adapted rows / adapters) rows, the last one padded by
repeating one of its rows: segment k is ``padded[k * L : (k + 1) * L]``, and all segments having L rows, the
per-segment matmuls are one batched matmul (at most L - 1 padding rows per adapter: fewer than 2x the adapted rows
in all). Per layer, with the segments' adapter weights stacked once per routing (A_k (r, in), B_k (out, r), s_k;
ranks zero-padded to the largest)::

    xs = x[padded].view(n_seg, L * T, in)          # gather, once
    h  = xs @ A_T * keep                           # (n_seg, L * T, r)    keep zeroes the padding rows
    d  = h @ sB_T                                  # (n_seg, L * T, out)  = s_k * x @ A_k.T @ B_k.T per segment
    y.index_add_(0, padded, d)                     # scatter-add into the base output y (B, T, out), once

with A_T the stacked A_k.T (n_seg, in, r) and sB_T the stacked s_k * B_k.T (n_seg, r, out), each stored contiguous:
a batched matmul reading a transposed view of (n_seg, out, r) runs about 2x slower on the CPU (measured at decoding
sizes, 8 segments of 4 rows). ``"__base__"`` rows are in no segment. An adapter that does not target a layer has
zero weights in its stack.

The routing is explicit state: ``routed(wrappers, ...)`` sets ``.routing`` on every wrapper for the duration of one
forward or one whole ``generate`` (HF generate keeps the rows in order and the batch size constant, for greedy
decoding, sampling and beam search, whose beams stay next to their prompt) and always clears it, errors included.
The wrappers' forwards hand routed calls to ``linear_forward`` / ``embedding_forward`` / ``modules_to_save_forward``.

Mixed batches are for inference: no dropout is applied and the model must be in eval mode, as in PEFT. Unlike PEFT,
DoRA adapters are supported (each segment's output rescaled by its m / ||W + s B A||, lorakit.ops.dora).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lorakit.adapters.variant_alora import ALora
from lorakit.fast import branch
from lorakit.ops import dora

# In annotations (the wrappers import this module, so it names their classes only here): a LoRA layer
# (lorakit.adapters.layer.LoraLayer; LoraLinear, LoraEmbedding) and a modules_to_save wrapper.
LoraLayer = LoraLinear = LoraEmbedding = ModulesToSaveWrapper = nn.Module

BASE = "__base__"  # the adapter name of rows that run the plain base model, as in PEFT


@dataclass(frozen=True)
class Routing:
    """Where each row of a mixed batch goes.

    ``segments``: (adapter, start, stop) per adapter in order of first appearance, ``"__base__"`` last if present;
        positions in ``rows``, the batch rows sorted by adapter (rows of one adapter in batch order).
    ``inverse``: the position of each batch row in ``rows`` (``rows[inverse] == arange``).
    ``padded`` (n_seg * slots,): the batch rows of the LoRA segments, ``slots`` rows each (padding repeats a row of
        the segment); ``keep`` (n_seg, slots, 1) is 1 for real rows, 0 for padding (None if there is no padding);
        ``segment_adapters``: the adapter of each LoRA segment (an adapter with many rows has several).
    ``in_order``: ``padded`` is ``arange(n_seg * slots)``: the layers need no gather and no scatter.
    """

    batch_size: int
    segments: tuple[tuple[str, int, int], ...]
    rows: Tensor
    inverse: Tensor
    slots: int
    padded: Tensor
    segment_adapters: tuple[str, ...]
    keep: Tensor | None
    in_order: bool
    _cache: dict[Any, Any] = field(default_factory=dict, compare=False, repr=False)

    def on(self, name: str, device: torch.device) -> Tensor:
        """Index tensor ``name`` ("rows", "inverse", "padded", "keep") on ``device``, moved once per routing."""
        key = (name, device)
        if key not in self._cache:
            self._cache[key] = getattr(self, name).to(device)
        return self._cache[key]

    def stacks(self, layer: LoraLayer) -> _Stacks | None:
        """``layer``'s weights of this batch's adapters, stacked in segment order; built on the layer's first call
        and kept for the routing (every decoding step of a generate); None if no adapter of the batch is in it."""
        key = id(layer)
        if key not in self._cache:
            self._cache[key] = _stack(layer, self.segment_adapters)
        return self._cache[key]


def plan(adapter_names: Sequence[str], repeat: int = 1) -> Routing:
    """The routing of a batch whose row i uses ``adapter_names[i // repeat]``: ``repeat`` > 1 when generate expands
    each prompt into ``repeat`` consecutive rows (beams, or several returned sequences).

    >>> r = plan(["a", "__base__", "b", "a", "a"])
    >>> r.segments
    (('a', 0, 3), ('b', 3, 4), ('__base__', 4, 5))
    >>> r.segment_adapters, r.padded.tolist(), r.keep.flatten().tolist()  # L = ceil(4 rows / 2 adapters) = 2
    (('a', 'a', 'b'), [0, 3, 4, 4, 2, 2], [1.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    """
    names = [name for name in adapter_names for _ in range(repeat)]
    by_adapter: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        by_adapter.setdefault(name, []).append(i)
    base_rows = by_adapter.pop(BASE, [])
    order: list[int] = []
    segments: list[tuple[str, int, int]] = []
    for name, indices in [*by_adapter.items(), *([(BASE, base_rows)] if base_rows else [])]:
        segments.append((name, len(order), len(order) + len(indices)))
        order.extend(indices)
    rows = torch.tensor(order, dtype=torch.long)
    inverse = torch.empty_like(rows)
    inverse[rows] = torch.arange(len(order))
    slots = -(-(len(order) - len(base_rows)) // max(len(by_adapter), 1))  # L = ceil(adapted rows / adapters)
    segment_adapters: list[str] = []
    padded: list[int] = []
    keep: list[float] = []
    for name, indices in by_adapter.items():
        for start in range(0, len(indices), slots):
            part = indices[start : start + slots]
            segment_adapters.append(name)
            padded += part + part[:1] * (slots - len(part))
            keep += [1.0] * len(part) + [0.0] * (slots - len(part))
    return Routing(
        batch_size=len(order),
        segments=tuple(segments),
        rows=rows,
        inverse=inverse,
        slots=slots,
        padded=torch.tensor(padded, dtype=torch.long),
        segment_adapters=tuple(segment_adapters),
        keep=None if all(keep) else torch.tensor(keep).view(len(segment_adapters), slots, 1),
        in_order=padded == list(range(len(padded))) and all(keep),
    )


def check_names(adapter_names: object, loaded: Sequence[str]) -> list[str]:
    """``adapter_names`` as a list, checked against the ``loaded`` adapter names (TypeError / ValueError otherwise)."""
    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
        raise TypeError(
            f"adapter_names must be a list with one adapter name per batch row, not {type(adapter_names).__name__} "
            f"{adapter_names!r}; e.g. adapter_names=['{next(iter(loaded), 'default')}', '{BASE}']"
        )
    names = list(adapter_names)
    if not all(isinstance(n, str) for n in names):
        raise TypeError(f"adapter_names must contain strings (adapter names or '{BASE}'), got {names!r}")
    unknown = sorted({n for n in names if n != BASE and n not in loaded})
    if unknown:
        raise ValueError(
            f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}; loaded adapters: {list(loaded)} "
            f"(use '{BASE}' for rows that should run without an adapter)"
        )
    return names


def check_rows(routing: Routing, rows: int, module: nn.Module | None = None) -> None:
    """ValueError unless ``rows``, the batch size of an input (of ``module``, if given), is the routing's."""
    if rows != routing.batch_size:
        where = f"the input of {type(module).__name__}" if module is not None else "the input"
        raise ValueError(
            f"Length of `adapter_names` should be the same as the number of inputs, but got {routing.batch_size} "
            f"names and {rows} rows in {where}; give exactly one adapter name per batch row ('{BASE}' for rows "
            "without an adapter)"
        )


def rows_per_prompt(generate_kwargs: Mapping[str, Any], generation_config: object | None) -> int:
    """How many rows HF generate makes of each prompt: max(num_beams, num_return_sequences), taken from the call's
    keyword arguments, else its ``generation_config``, else the model's ``generation_config``."""
    config = generate_kwargs.get("generation_config") or generation_config
    sizes = [generate_kwargs.get(key, getattr(config, key, None)) for key in ("num_beams", "num_return_sequences")]
    return max([1, *(int(s) for s in sizes if s is not None)])


@contextlib.contextmanager
def routed(
    wrappers: Sequence[nn.Module],
    adapter_names: object,
    loaded: Sequence[str],
    training: bool,
    rows: int | None = None,
    repeat: int = 1,
) -> Iterator[Routing]:
    """Within the block, every wrapper in ``wrappers`` (LoRA layers, modules_to_save) routes row i of the batch
    through adapter ``adapter_names[i // repeat]``. ``rows``: the batch size of the inputs, if known.

    Raises:
        TypeError: ``adapter_names`` is not a list of strings.
        ValueError: a name that is not loaded, a length that is not the batch size, the model in training mode, or
            adapters merged into the base weights.
    """
    names = check_names(adapter_names, loaded)
    if training:
        raise ValueError("Cannot pass `adapter_names` when the model is in training mode. Call model.eval() first")
    merged = sorted({a for m in wrappers for a in getattr(m, "merged_adapters", [])})
    if merged:
        raise ValueError(
            "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first. "
            f"(merged: {merged}; every row would get them)"
        )
    if rows is not None and rows != len(names):
        raise ValueError(
            f"Length of `adapter_names` should be the same as the number of inputs, but got {len(names)} names and "
            f"{rows} rows; give exactly one adapter name per batch row ('{BASE}' for rows without an adapter)"
        )
    routing = plan(names, repeat)
    previous = [m.routing for m in wrappers]
    for m in wrappers:
        m.routing = routing
    try:
        yield routing
    finally:
        for m, before in zip(wrappers, previous):
            m.routing = before


# -- one layer's adapters, stacked ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Stacks:
    """A layer's weights for the adapters of a routing, in segment order, ranks zero-padded to the largest (r).
    An adapter that does not target the layer has zeros (its rows get no update)."""

    A: list[Tensor | None]  # per segment: A_k (r_k, in), or None
    A_T: Tensor  # (n_seg, in, r): A_k.T, contiguous
    sB_T: Tensor  # (n_seg, r, out): s_k * B_k.T, contiguous
    alora: bool  # an adapter of the routing is an aLoRA one here: its rows get their update from the invocation on
    magnitude: Tensor | None  # (n_seg, 1, out): DoRA's m, 1 for plain adapters; None if no adapter is DoRA
    norm: Tensor | None  # (n_seg, 1, out): DoRA's ||W + s_k B_k A_k||_row, 1 for plain adapters
    sb_stack: Tensor | None = None  # (n_seg, 1, out): s_k * b_k, B's bias (lora_bias), 0 for adapters without one


def _stack(layer: LoraLayer, adapters: Sequence[str]) -> _Stacks | None:
    """The stacks of ``layer`` for segments of ``adapters`` (a name repeats when an adapter has several segments)."""
    present = [name for name in adapters if name in layer.r]
    if not present:
        return None
    factors = {name: layer.variants[name].factors(layer, name) for name in set(present)}  # KaSA's B @ diag(d)
    As: list[Tensor | None] = [factors[name][0] if name in layer.r else None for name in adapters]
    A0 = As[adapters.index(present[0])]
    ranks = {layer.r[name] for name in present}
    if len(present) == len(adapters) and len(ranks) == 1:  # the common case: one stack op each
        A_stack = torch.stack(As)  # type: ignore[arg-type]
        scales = torch.tensor([layer.scaling[name] for name in adapters], dtype=A0.dtype, device=A0.device)
        sB_stack = torch.stack([factors[name][1] for name in adapters]) * scales.view(-1, 1, 1)
    else:  # adapters missing here or of different ranks: zeros pad them
        r = max(ranks)
        A_stack = A0.new_zeros(len(adapters), r, layer.in_features)
        sB_stack = A0.new_zeros(len(adapters), layer.out_features, r)
        for k, name in enumerate(adapters):
            if name in layer.r:
                A, B = factors[name]
                A_stack[k, : A.shape[0]] = A
                sB_stack[k, :, : B.shape[1]] = B * layer.scaling[name]
    magnitude = norm = None
    if not all(layer.variants[name].plain for name in present):  # a variant that rescales rows (DoRA)
        magnitude = A0.new_ones(len(adapters), 1, layer.out_features)
        norm = torch.ones_like(magnitude)
        weight = layer.weight_out_in().to(A0.dtype)  # (out, in)
        scale_args = {n: layer.variants[n].scale_args(layer, n, weight) for n in set(present)}
        for k, name in enumerate(adapters):
            if scale_args.get(name) is not None:
                magnitude[k, 0], norm[k, 0] = scale_args[name]
    sb_stack = None
    if any(layer.lora_bias_of(name) is not None for name in present):  # lora_bias: s_k * b_k per segment
        sb_stack = A0.new_zeros(len(adapters), 1, layer.out_features)
        for k, name in enumerate(adapters):
            b = layer.lora_bias_of(name) if name in layer.r else None
            if b is not None:
                sb_stack[k, 0] = b * layer.scaling[name]
    alora = any(isinstance(layer.variants[name], ALora) for name in present)
    return _Stacks(As, A_stack.mT.contiguous(), sB_stack.mT.contiguous(), alora, magnitude, norm, sb_stack)


# -- the layers' routed forwards ------------------------------------------------------------------------------------
def linear_forward(layer: LoraLinear, x: Tensor, *args: object, **kwargs: object) -> Tensor:
    """LoraLinear's forward for a routed batch: base output plus each row's adapter update."""
    base_layer = layer.base_layer
    result = branch.base_output(base_layer, x, *args, **kwargs)  # (B, ..., out)

    def project_A(xs: Tensor, stacks: _Stacks) -> Tensor:  # (n_seg * L, ..., in) -> (n_seg, L * ..., r)
        xs = xs.reshape(len(stacks.A), -1, xs.shape[-1])
        return torch.bmm(xs if xs.dtype == stacks.A_T.dtype else xs.to(stacks.A_T.dtype), stacks.A_T)

    def x_w(base: Tensor) -> Tensor:  # DoRA's x @ W.T, from the base output
        bias = getattr(base_layer, "bias", None)
        return base if bias is None else base - bias

    return _add_updates(layer, x, result, project_A, x_w)


def embedding_forward(layer: LoraEmbedding, x: Tensor, *args: object, **kwargs: object) -> Tensor:
    """LoraEmbedding's forward for a routed batch of token ids ``x`` (B, T)."""
    result = layer.base_layer(x, *args, **kwargs)  # (B, T, dim)

    def project_A(ids: Tensor, stacks: _Stacks) -> Tensor:  # (n_seg * L, T) -> (n_seg, L * T, r): lookups in A.T
        ids = ids.reshape(len(stacks.A), -1)
        h = stacks.A_T.new_zeros(*ids.shape, stacks.A_T.shape[2])
        for k, A in enumerate(stacks.A):
            if A is not None:
                h[k, :, : A.shape[0]] = layer.lookup(ids[k], A)
        return h

    return _add_updates(layer, x, result, project_A, lambda embedded: embedded)


def _add_updates(
    layer: LoraLayer,
    x: Tensor,
    result: Tensor,
    project_A: Callable[[Tensor, _Stacks], Tensor],
    x_w: Callable[[Tensor], Tensor],
) -> Tensor:
    """``result`` (B, ..., out) plus each row's ``s * project_A(x_row) @ B.T``: one gather, one batched matmul over
    the padded segments, one scatter-add. ``x_w(base)`` is DoRA's x @ W.T from the base output (lorakit.ops.dora)."""
    routing: Routing = layer.routing
    if layer.disable_adapters:
        return result
    if x.shape[0] != routing.batch_size:
        check_rows(routing, x.shape[0], layer.base_layer)
    if layer.merged:
        raise ValueError("adapter_names cannot be used while adapters are merged; call model.unmerge_adapter() first")
    stacks = routing.stacks(layer)
    if stacks is None:
        return result
    n_seg, slots = len(stacks.A), routing.slots
    padded = None if routing.in_order else routing.on("padded", x.device)
    xs = x[: n_seg * slots] if padded is None else x.index_select(0, padded)  # (n_seg * L, ..., in), by segment
    h = project_A(xs, stacks)  # (n_seg, L * ..., r)
    if routing.keep is not None:  # padding rows add nothing
        h = (h.view(n_seg, slots, -1) * routing.on("keep", x.device)).view(h.shape)
    updates = torch.bmm(h, stacks.sB_T)  # (n_seg, L * ..., out)
    if stacks.sb_stack is not None:  # + s_k * b_k on the real rows of each segment (lora_bias)
        sb = stacks.sb_stack.unsqueeze(1)  # (n_seg, 1, 1, out)
        if routing.keep is not None:
            sb = sb * routing.on("keep", x.device).to(sb.dtype).unsqueeze(-1)  # (n_seg, L, 1, out)
        updates = (updates.view(n_seg, slots, -1, updates.shape[-1]) + sb).view(updates.shape)
    if stacks.magnitude is not None:  # DoRA: (m / n - 1) * x @ W.T + (m / n) * lora; m = n = 1 for plain adapters
        base = result[: n_seg * slots] if padded is None else result.index_select(0, padded)
        base = x_w(base).to(updates.dtype).reshape(updates.shape)
        if routing.keep is not None:
            base = (base.view(n_seg, slots, -1) * routing.on("keep", x.device)).view(updates.shape)
        updates = dora.linear_output(base, updates, stacks.magnitude, stacks.norm)
    active = _alora_positions(layer, routing, x) if stacks.alora else None
    if active is not None:  # aLoRA segments: only the positions from their rows' invocation on
        updates = updates * active.to(updates.dtype)
    updates = updates.view(n_seg * slots, *result.shape[1:])  # (n_seg * L, ..., out)
    if updates.dtype != result.dtype:
        updates = updates.to(result.dtype)
    if padded is None:
        result[: n_seg * slots] += updates
    else:
        result.index_add_(0, padded, updates)
    return result


def _alora_positions(layer: LoraLayer, routing: Routing, x: Tensor) -> Tensor | None:
    """(n_seg, L * T, 1): 1 where a segment's rows get their update, 0 elsewhere, T the positions of a row: an aLoRA
    adapter's segment has its rows' activated positions (lorakit.adapters.variant_alora), the others all ones; None
    when no segment's adapter is an aLoRA one in ``layer``."""
    kinds = [layer.variants.get(name) for name in routing.segment_adapters]
    if not any(isinstance(v, ALora) for v in kinds):
        return None
    length = x[0].numel() // x.shape[-1]  # positions per row: T of (B, T, in), 1 of (B, in)
    active = torch.ones(len(kinds), routing.slots, length, dtype=torch.bool, device=x.device)
    padded = routing.on("padded", x.device).view(len(kinds), routing.slots)  # the batch rows of each segment
    for k, variant in enumerate(kinds):
        if isinstance(variant, ALora):
            active[k] = variant.positions(routing.batch_size, length, x.device).index_select(0, padded[k])
    return active.view(len(kinds), -1, 1)


def modules_to_save_forward(wrapper: ModulesToSaveWrapper, x: Tensor, *args: object, **kwargs: object) -> Tensor:
    """A modules_to_save wrapper's forward for a routed batch: each row through its adapter's copy of the module (the
    original for ``"__base__"`` rows and adapters without a copy), one call per adapter on a contiguous slice."""
    routing: Routing = wrapper.routing
    if wrapper.disable_adapters:
        return wrapper.original_module(x, *args, **kwargs)
    check_rows(routing, x.shape[0], wrapper.original_module)
    xs = x.index_select(0, routing.on("rows", x.device))  # (B, ...) sorted by adapter
    outputs = []
    for name, start, stop in routing.segments:
        module = wrapper.modules_to_save[name] if name in wrapper.modules_to_save else wrapper.original_module
        out = module(xs[start:stop], *args, **kwargs)
        if not isinstance(out, Tensor):
            raise TypeError(
                f"adapter_names needs modules_to_save modules that return one tensor; "
                f"{type(module).__name__} returned {type(out).__name__}. Run one adapter per batch instead"
            )
        outputs.append(out)
    return torch.cat(outputs).index_select(0, routing.on("inverse", x.device))  # back in batch order
