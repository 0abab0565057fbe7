"""Variants: how one adapter of a layer turns its A and B into an output and a merged weight. One object per adapter,
registered by name in ``VARIANTS`` and built from a config by ``for_config`` (inject passes it to
``LoraLayer.update_layer``; a direct caller of update_layer may pass ``use_dora`` instead).

- ``lora``: plain LoRA (Hu et al. 2021, eq. 3): the layer's output plus ``B(A(dropout(x))) * s``; merging adds
  ``s * B @ A`` to the base weight (lorakit.adapters.variant_lora, the base class of the others).
- ``dora``: weight-decomposed LoRA (Liu et al. 2024): a learned magnitude m (out,) per output row rescales the
  adapted weight, ``W' = m * (W + s * B @ A) / ||W + s * B @ A||_row`` (the maths: lorakit.ops.dora).
- ``velora``: VeLoRA (Miles et al. 2024): plain LoRA whose A gets its gradient from compressed inputs
  (lorakit.adapters.variant_velora).
- ``bdlora``: BD-LoRA: A or B block-diagonal, for tensor-parallel serving (lorakit.adapters.variant_bdlora).
- ``kasa``: KaSA (Wang et al. 2024): the update s * B @ diag(d) @ A with learned singular values d; adding it
  truncates the base weight's r smallest singular components (lorakit.adapters.variant_kasa).
- ``monteclora``: MonteCLoRA (Sengupta et al. 2024): in training, A is a learned mixture of noisy copies of itself
  (lorakit.adapters.variant_monteclora); evaluation and merging are plain LoRA's.
- ``alora``: Activated LoRA (Greenewald et al. 2025): plain LoRA applied from the last occurrence of the adapter's
  invocation tokens on, the earlier positions computing as the base model; not mergeable
  (lorakit.adapters.variant_alora).
- ``arrow``: Arrow routing (Ostapenko et al. 2024) with GenKnowSub: the router adapter mixes its layer's other
  adapters per token, softmax-weighted by the alignment of the token with each one's prototype; not mergeable
  (lorakit.adapters.variant_arrow; lorakit.create_arrow_model builds it).
- ``mica``: MiCA: ``init_lora_weights="mica"`` starts B on W's minor singular vectors and A at 0; B stays frozen
  (lorakit.adapters.variant_mica).

A variant is called by the module kinds (lorakit.adapters.linear, .embedding) and by LoraLayer's merge / unmerge, and
asked by the mixed-batch path for its row scale (``scale_args``). Weights are passed in the base weight's storage
layout where the method says so; ``layer.transpose`` turns them into (out, in).

At the end, PEFT's views of a layer's variants, which LoraLayer's attributes of PEFT's names return: the
``lora_variants`` table, ``resolve_lora_variant``, ``lora_variant`` and ``frozen_peft_weight_names``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lorakit.adapters.variant_alora import ALora
from lorakit.adapters.variant_arrow import Arrow
from lorakit.adapters.variant_bdlora import BdLora, side_for
from lorakit.adapters.variant_kasa import Kasa
from lorakit.adapters.variant_lora import Lora, LoraLayer
from lorakit.adapters.variant_mica import Mica
from lorakit.adapters.variant_monteclora import Monteclora
from lorakit.adapters.variant_velora import Velora
from lorakit.config import LoraConfig, requested_variants
from lorakit.ops import dora


class Magnitude(nn.Module):
    """DoRA's learned magnitude m of one adapter, held as ``weight`` (out,) (a conv's (1, out, 1, ...)): PEFT's layout,
    so the model's key is ``<layer>.lora_magnitude_vector.<adapter>.weight`` as in PEFT (the file drops both the
    adapter name and ``.weight``: lorakit.io.files.file_key)."""

    def __init__(self, m: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(m)


class Dora(Lora):
    """DoRA: one magnitude m (out,) in ``layer.lora_magnitude_vector[adapter].weight``; the row norm is a constant for
    the backward pass (Liu et al. 2024, sec. 4.3). While merged, the norm the merge used is kept for the unmerge."""

    name = "dora"
    title = "DoRA"
    runs_on = "nn.Linear, GPT-2 Conv1D, nn.Embedding and nn.Conv1d / 2d / 3d layers"
    plain = False

    def __init__(self) -> None:
        self.merged_norm: Tensor | None = None  # ||W + s * B @ A||_row taken at merge time

    def create(self, layer: LoraLayer, adapter: str) -> None:
        """m = ||W + s * B @ A||_row after the initializer ran, so that the adapter starts as plain LoRA would."""
        weight, delta = self.norm_terms(layer, adapter)
        A, _ = layer.lora_weights(adapter)
        with torch.no_grad():
            norm = dora.weight_norm(weight.float(), delta.to(weight.device, torch.float32))  # (out,)
        shape = getattr(layer, "magnitude_shape", (-1,))  # a conv keeps PEFT's (1, out, 1, ...)
        layer.lora_magnitude_vector[adapter] = Magnitude(norm.to(A.dtype).reshape(shape))

    def norm_terms(self, layer: LoraLayer, adapter: str) -> tuple[Tensor, Tensor]:
        """(W, s * B @ A) as (out, in) matrices, whose sum's row norms DoRA takes; a grouped conv gives PEFT's
        reading of them instead (lorakit.adapters.conv.LoraConv.dora_terms)."""
        if hasattr(layer, "dora_terms"):
            return layer.dora_terms(adapter)
        return layer.weight_out_in(), layer.delta_out_in(adapter)

    def parameters(self, layer: LoraLayer, adapter: str) -> list[nn.Parameter]:
        return [layer.lora_magnitude_vector[adapter].weight]

    def delete(self, layer: LoraLayer, adapter: str) -> None:
        del layer.lora_magnitude_vector[adapter]

    def scale_args(self, layer: LoraLayer, adapter: str, weight: Tensor) -> tuple[Tensor, Tensor]:
        """(m, ||weight + s * B @ A||_row), ``weight`` (out, in) the unmerged base; the norm detached."""
        delta = layer.delta_out_in(adapter).detach().to(weight.dtype)
        return layer.lora_magnitude_vector[adapter].weight.reshape(-1), dora.weight_norm(weight, delta).detach()

    def linear_forward(self, layer: LoraLayer, adapter: str, x: Tensor, base: Tensor, result: Tensor) -> Tensor:
        """``result + (m / n - 1) * x @ W.T + (m / n) * B(A(dropout(x))) * s`` (lorakit.ops.dora.linear_output). Its
        x @ W.T reuses the base output (bias removed) unless dropout is active: then it is computed on the dropped
        input, as PEFT does."""
        A, B = layer.lora_A[adapter], layer.lora_B[adapter]
        dropout = layer.lora_dropout[adapter]
        h = dropout(x.to(A.weight.dtype))  # (..., in)
        lora = B(A(h)) * layer.scaling[adapter]  # (..., r) -> (..., out)
        weight = layer.weight_out_in().to(h.dtype)  # (out, in)
        if isinstance(dropout, nn.Identity) or not layer.training:
            bias = getattr(layer.base_layer, "bias", None)
            x_w = (base if bias is None else base - bias).to(h.dtype)  # (..., out)
        else:
            x_w = nn.functional.linear(h, weight)  # (..., out)
        return result + dora.linear_output(x_w, lora, *self.scale_args(layer, adapter, weight)).to(result.dtype)

    def conv_forward(self, layer: LoraLayer, adapter: str, x: Tensor, base: Tensor, result: Tensor) -> Tensor:
        """A conv's ``result + (m / n - 1) * conv(x, W) + (m / n) * B(A(dropout(x))) * s``, m / n per output channel
        (lorakit.ops.dora.linear_output, broadcast over (N, out, *S')). As for a linear layer, conv(x, W) is the base
        output less its bias unless dropout is active; then it is the base conv of the dropped input, as PEFT does."""
        A, B = layer.lora_A[adapter], layer.lora_B[adapter]
        dropout, conv = layer.lora_dropout[adapter], layer.base_layer
        h = x.to(A.weight.dtype)  # (N, in, *S)
        channels = (-1,) + (1,) * (base.dim() - 2)  # (out, 1, ...): broadcasts over (N, out, *S')
        if isinstance(dropout, nn.Identity) or not layer.training:
            x_w = base if conv.bias is None else base - conv.bias.view(channels)
        else:
            h = dropout(h)
            x_w = conv._conv_forward(h, conv.weight.to(h.dtype), None)  # (N, out, *S'), the base's padding mode
        lora = B(A(h)) * layer.scaling[adapter]  # (N, out, *S')
        weight, delta = self.norm_terms(layer, adapter)  # (out, in * prod(k))
        m = layer.lora_magnitude_vector[adapter].weight.reshape(-1)  # (out,)
        norm = dora.weight_norm(weight.to(h.dtype), delta.detach().to(h.dtype)).detach()  # a constant (sec. 4.3)
        update = dora.linear_output(x_w.to(h.dtype), lora, m.view(channels), norm.view(channels))
        return result + update.to(result.dtype)

    def embedding_output(self, layer: LoraLayer, adapter: str, embedded: Tensor, lora: Tensor) -> Tensor:
        """DoRA rescales the base embedding too: (m / n) * (E[x] + lora) - E[x] (lorakit.ops.dora.embedding_output)."""
        m, norm = self.scale_args(layer, adapter, layer.weight_out_in().to(lora.dtype))
        e = embedded.to(lora.dtype)
        return dora.embedding_output(e, lora, m, norm) - e

    def merged(self, layer: LoraLayer, adapter: str, weight: Tensor) -> Tensor:
        """W' = (m / n) * (W + s * B @ A) in storage layout, n taken from the base without the adapters merged before
        (as the unmerged forward sees it), as PEFT does."""
        unmerged = weight
        for earlier in reversed(layer.merged_adapters):
            unmerged = layer.variants[earlier].unmerged(layer, earlier, unmerged)
        m, norm = self.scale_args(layer, adapter, layer.transpose(unmerged))
        self.merged_norm = norm
        delta = layer.delta_out_in(adapter).to(weight.dtype)
        merged = dora.merge_weight(layer.transpose(weight), delta, m.detach(), norm)
        return layer.transpose(merged).to(weight.dtype)

    def unmerged(self, layer: LoraLayer, adapter: str, weight: Tensor) -> Tensor:
        """The inverse of ``merged`` with the norm the merge used."""
        m = layer.lora_magnitude_vector[adapter].weight.detach().reshape(-1)
        delta = layer.delta_out_in(adapter).to(weight.dtype)
        unmerged = dora.unmerge_weight(layer.transpose(weight), delta, m, self.merged_norm)  # (out, in)
        return layer.transpose(unmerged).to(weight.dtype)

    def merged_out_in(self, layer: LoraLayer, adapter: str, weight: Tensor, base: Tensor, delta: Tensor) -> Tensor:
        """(m / ||base + delta||_row) * (weight + delta), all (out, in), ``base`` the unmerged base weight."""
        m, norm = self.scale_args(layer, adapter, base)
        return dora.merge_weight(weight, delta, m.detach().float(), norm)


VARIANTS: dict[str, type[Lora]] = {"lora": Lora, "dora": Dora, "velora": Velora, "bdlora": BdLora, "mica": Mica,
                                 "kasa": Kasa, "monteclora": Monteclora, "alora": ALora, "arrow": Arrow}


# The name under which a config asks for each variant (lorakit.config.requested_variants: a tagged field, or the
# init_lora_weights value 'mica'); a layer's ``lora_variants`` table is keyed by these, as PEFT's.
CONFIG_KEYS: dict[str, str] = {"dora": "use_dora", "velora": "velora_config", "bdlora": "use_bdlora", "mica": "mica",
                               "kasa": "kasa_config", "monteclora": "monteclora_config",
                               "alora": "alora_invocation_tokens", "arrow": "arrow_config"}


def for_config(config: LoraConfig, module_name: str) -> Lora:
    """The variant object of one adapter on target ``module_name``, with its options from ``config``: DoRA with
    use_dora, VeLoRA with velora_config, BD-LoRA with use_bdlora (plain LoRA on a target that matches neither of its
    lists, with match_strict=False), MiCA with init_lora_weights="mica", KaSA with kasa_config,
    MonteCLoRA with monteclora_config, aLoRA with alora_invocation_tokens, Arrow with arrow_config, else plain LoRA.
    ConfigError for two variants at once or, with BD-LoRA, for a target its lists do not place."""
    names = config.variant_names()
    cls = next((VARIANTS[name] for name, key in CONFIG_KEYS.items() if names == (key,)), Lora)
    return build(cls, config, module_name)


def build(cls: type[Lora], config: LoraConfig, module_name: str) -> Lora:
    """A ``cls`` variant object for target ``module_name``, with the options ``config`` holds for it."""
    if cls is Monteclora:
        return Monteclora(config.monteclora_config)
    if cls is ALora:
        return ALora(config.alora_invocation_tokens)
    if cls is Arrow:
        return Arrow(config.arrow_config)
    if cls is Velora:
        return Velora(config.velora_config)
    if cls is BdLora:
        side = side_for(config.use_bdlora, module_name)
        return Lora() if side is None else BdLora(config.use_bdlora.nblocks, side)
    return cls()




# -- PEFT's views of a layer's variants (LoraLayer.lora_variants, .resolve_lora_variant, .lora_variant,
# .frozen_peft_weight_names call these) -------------------------------------------------------------------------
def variant_table(supported: tuple[str, ...]) -> dict[tuple[str, ...], Any]:
    """PEFT's ``lora_variants`` table of a kind that runs the VARIANTS named in ``supported``: {sorted tuple of the
    names a config asks for them by (CONFIG_KEYS): variant class}, () for plain LoRA."""
    table: dict[tuple[str, ...], Any] = {(): Lora}
    for name in supported:
        if name in CONFIG_KEYS:
            table[(CONFIG_KEYS[name],)] = VARIANTS[name]
    return table


def resolve_lora_variant(layer: LoraLayer, config: Any, target_name: str = "") -> Any:
    """The variant object ``config`` asks for on ``layer``, from its ``lora_variants`` table (see
    LoraLayer.resolve_lora_variant)."""
    table = layer.lora_variants
    if any(tuple(sorted(key)) != key for key in table):
        raise ValueError("Keys in lora_variants must be sorted tuples (e.g ('a', 'b'), not ('b', 'a')); sort them")
    requested = requested_variants(config)
    missing = sorted({name for key in table for name in key} - requested.keys())
    if missing:
        raise ValueError(
            f"variant(s) {missing} found in lora_variants but neither tagged with 'is_lora_variant' in LoraConfig, "
            "nor declared as a LoRA variant in init_lora_weights: tag the config field, or drop the table entry"
        )
    key = tuple(sorted(name for name, on in requested.items() if on))
    if key not in table:
        raise ValueError(
            f"Invalid or unsupported variant combination: {key}; this {type(layer).__name__} runs "
            f"{sorted(table)}: unset the others, or leave this layer out of the targets"
        )
    cls = table[key]
    if cls is None:
        return None
    return build(cls, config, target_name) if isinstance(cls, type) and issubclass(cls, Lora) else cls()


class FrozenWeightNames(Mapping[str, tuple[str, ...]]):
    """LoraLayer.frozen_peft_weight_names: read from the layer's variants at each access, so it never goes stale."""

    def __init__(self, layer: LoraLayer) -> None:
        self.layer = layer

    def _names(self) -> dict[str, tuple[str, ...]]:
        where = {id(p): pname.split(".")[0] for pname, p in self.layer.named_parameters()}  # 'lora_B.<name>.weight'
        frozen = {a: tuple(where[id(p)] for p in v.frozen(self.layer, a)) for a, v in self.layer.variants.items()}
        return {a: names for a, names in frozen.items() if names}

    def __getitem__(self, adapter: str) -> tuple[str, ...]:
        return self._names()[adapter]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())


class SpecialVariants(Mapping[str, Lora]):
    """LoraLayer.lora_variant: the layer's variants other than plain LoRA, read at each access."""

    def __init__(self, layer: LoraLayer) -> None:
        self.layer = layer

    def _special(self) -> dict[str, Lora]:
        return {name: v for name, v in self.layer.variants.items() if v.name != "lora"}

    def __getitem__(self, adapter: str) -> Lora:
        return self._special()[adapter]

    def __iter__(self) -> Iterator[str]:
        return iter(self._special())

    def __len__(self) -> int:
        return len(self._special())

    def __repr__(self) -> str:
        return repr(self._special())

