"""add_weighted_adapter: combine several LoRA adapters of a model into a new one.

``add_weighted_adapter`` (LoraModel's method of the name, defined here: lorakit.adapters.model assigns it) checks the
request, adds the new adapter and writes each layer's combination into its A and B. The rest is the maths of one
layer, pure tensor functions; A is (r, in), B is (out, r), delta = B @ A in (out, in) orientation, as in the layers.
The new adapter's scaling is 1: the source scalings are folded into its weights.

Combination types, as in HF PEFT (the task-tensor merges live in lorakit.ops.merge_math):

* ``cat``: stack the factors (exact, rank = sum of ranks);
* ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: merge the A factors and the B factors
  separately (not the deltas; needs equal ranks), see ``factorwise``;
* ``svd`` and ``<merge>_svd``: merge the dense deltas s_i * B_i @ A_i, then the best rank-r factorization.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
from torch import Generator, Tensor, nn

from lorakit.adapters.modules_to_save import ModulesToSaveWrapper
from lorakit.config import LoraConfig
from lorakit.io.files import AdapterError
from lorakit.ops import merge_math

PRUNING = ("ties", "dare_linear", "dare_ties", "magnitude_prune")  # need a density
SAME_RANK = ("linear", *PRUNING)  # merged factor by factor
DENSE = ("svd", *(f"{m}_svd" for m in PRUNING))  # merged as deltas, then factorized
COMBINATIONS = ("cat", *SAME_RANK, *DENSE)

TaskMerge = Callable[[list[Tensor], list[float]], Tensor]  # (task tensors, weights) -> merged tensor


def plan(
    combination_type: str,
    configs: list[LoraConfig],
    svd_rank: int | None,
    density: float | None = None,
    majority_sign_method: str = "total",
) -> tuple[str, int]:
    """Check the request and return (combination_type, rank of the new adapter), following PEFT's rules."""
    if combination_type not in COMBINATIONS:
        raise ValueError(f"combination_type={combination_type!r} is unknown; use one of: {', '.join(COMBINATIONS)}")
    merge_math.check_majority_sign_method(majority_sign_method)
    if any(c.use_dora for c in configs):
        raise ValueError(
            "add_weighted_adapter cannot combine DoRA adapters (use_dora=True): each rescales its rows by its own "
            "magnitude, which a sum of low-rank updates cannot express; merge_and_unload them instead"
        )
    if any(c.kasa_config for c in configs):
        raise ValueError(
            "add_weighted_adapter cannot combine KaSA adapters (kasa_config): each update has its learned singular "
            "values d between B and A, which the combined factors cannot keep apart; merge_and_unload them instead"
        )
    if any(c.use_bdlora for c in configs):
        raise ValueError(
            "add_weighted_adapter cannot combine BD-LoRA adapters (use_bdlora): a combination of block-diagonal "
            "factors is no longer block-diagonal, so the new adapter could not hold it; merge_and_unload them instead"
        )
    if _merge_name(combination_type) in PRUNING:
        merge_math.check_density(density, f"combination_type={combination_type!r}")
    if len(configs) == 1:
        combination_type = "linear"
    ranks = [max(c.r, *c.rank_pattern.values()) if c.rank_pattern else c.r for c in configs]
    if combination_type in SAME_RANK:
        if len(set(ranks)) != 1:
            dense = "svd" if combination_type == "linear" else f"{combination_type}_svd"
            raise ValueError(
                f"combination_type={combination_type!r} needs adapters of equal rank, got ranks {ranks}; "
                f"use 'cat' or {dense!r} for different ranks"
            )
        return combination_type, ranks[0]
    if combination_type == "cat":
        return combination_type, sum(ranks)
    if svd_rank is not None and svd_rank <= 0:
        raise ValueError(f"svd_rank={svd_rank} must be a positive integer")
    return combination_type, svd_rank or max(ranks)


def combined_config(configs: list[LoraConfig], new_rank: int, layer_names: list[str]) -> LoraConfig:
    """The new adapter's config: the first source's settings with rank ``new_rank``, scaling 1, and the union of
    the sources' targets (a list of module names when the sources were not all lists or all regexes) and of their
    modules_to_save."""
    specs = [c.target_modules for c in configs]
    if all(isinstance(s, list) for s in specs):
        targets: list[str] | str = sorted({t for s in specs for t in s})  # type: ignore[union-attr]
    elif all(isinstance(s, str) and s != "all-linear" for s in specs):
        targets = "|".join(f"({s})" for s in specs)
    else:
        targets = list(layer_names)
    alpha = math.sqrt(new_rank) if configs[0].use_rslora else new_rank  # scaling alpha/sqrt(r) or alpha/r == 1
    saved = sorted({name for c in configs for name in c.modules_to_save or []})  # each from the one source with it
    return dataclasses.replace(
        configs[0],
        r=new_rank,
        lora_alpha=alpha,
        target_modules=targets,
        modules_to_save=saved or None,
        rank_pattern={},
        alpha_pattern={},
        layers_to_transform=None,
        layers_pattern=None,
    )


def _merge_name(combination_type: str) -> str:
    """The task-tensor merge behind a combination type: 'svd' -> 'linear', 'ties_svd' -> 'ties', 'ties' -> 'ties'."""
    return "linear" if combination_type == "svd" else combination_type.removesuffix("_svd")


def task_merge(
    combination_type: str,
    density: float | None = None,
    majority_sign_method: str = "total",
    generator: Generator | None = None,
) -> TaskMerge:
    """The task-tensor merge (see lorakit.ops.merge_math) that ``combination_type`` applies to factors or deltas.
    ``generator`` seeds the DARE types' random pruning (the global torch RNG when None)."""
    name = _merge_name(combination_type)
    if name == "linear":
        return merge_math.task_arithmetic
    d = merge_math.check_density(density, f"combination_type={combination_type!r}")
    sign = majority_sign_method
    merges: dict[str, TaskMerge] = {
        "ties": lambda ts, ws: merge_math.ties(ts, ws, d, sign),
        "dare_linear": lambda ts, ws: merge_math.dare_linear(ts, ws, d, generator),
        "dare_ties": lambda ts, ws: merge_math.dare_ties(ts, ws, d, sign, generator),
        "magnitude_prune": lambda ts, ws: merge_math.magnitude_prune(ts, ws, d),
    }
    return merges[name]


def factorwise(merge: TaskMerge, As: list[Tensor], Bs: list[Tensor], weights: list[float]) -> tuple[Tensor, Tensor]:
    """merge(A_i, sign_i*sqrt|w_i|) and merge(B_i, sqrt|w_i|) (weights already times each adapter's scaling), so a
    lone adapter gives w * B @ A. Not a merge of the deltas (cross terms B_i A_j appear), exactly as PEFT does."""
    wa = [math.copysign(math.sqrt(abs(w)), w) for w in weights]
    wb = [math.sqrt(abs(w)) for w in weights]
    return merge(As, wa).to(As[0].dtype), merge(Bs, wb).to(Bs[0].dtype)


def linear(As: list[Tensor], Bs: list[Tensor], weights: list[float]) -> tuple[Tensor, Tensor]:
    """sum_i sign_i*sqrt|w_i| A_i and sum_i sqrt|w_i| B_i: ``factorwise`` task arithmetic."""
    return factorwise(merge_math.task_arithmetic, As, Bs, weights)


def cat(As: list[Tensor], Bs: list[Tensor], weights: list[float]) -> tuple[Tensor, Tensor]:
    """Stack the adapters: A = [w_1 A_1; w_2 A_2; ...] (sum r, in), B = [B_1 B_2 ...] (out, sum r), so
    B @ A = sum_i w_i B_i @ A_i exactly."""
    return torch.cat([w * a for w, a in zip(weights, As)], dim=0), torch.cat(Bs, dim=1)


def factorize(
    delta: Tensor,
    rank: int,
    clamp: float | None = None,
    full_matrices: bool = True,
    driver: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Best rank-``rank`` factorization of ``delta`` (out, in): B = U S (out, rank), A = Vh (rank, in).
    ``clamp`` (a quantile in [0, 1]) clips both factors to the quantile of their absolute values, as PEFT does."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)  # type: ignore[arg-type]
    B = U[:, :rank] @ torch.diag(S[:rank])
    A = Vh[:rank, :]
    if clamp is not None:
        hi = torch.quantile(torch.cat([B.flatten(), A.flatten()]), clamp)
        B, A = B.clamp(-hi, hi), A.clamp(-hi, hi)
    return A, B


def svd(
    deltas: list[Tensor],
    weights: list[float],
    rank: int,
    clamp: float | None = None,
    full_matrices: bool = True,
    driver: str | None = None,
) -> tuple[Tensor, Tensor]:
    """``factorize`` sum_i w_i delta_i (each (out, in))."""
    return factorize(merge_math.task_arithmetic(deltas, weights), rank, clamp, full_matrices, driver)


def combine_layer(
    module: object,
    present: list[tuple[str, float]],
    combination_type: str,
    rank: int,
    svd_clamp: float | None,
    full_matrices: bool = True,
    driver: str | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    generator: Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Combine the adapters ``present`` ((name, weight) pairs) of one LoRA layer into (A, B) for a scaling of 1."""
    names = [n for n, _ in present]
    factors = [tuple(t.detach() for t in module.lora_weights(n)) for n in names]  # (A (r, in), B (out, r))
    with torch.no_grad():
        if combination_type == "cat":
            return cat([a for a, _ in factors], [b for _, b in factors], [w * module.scaling[n] for n, w in present])
        merge = task_merge(combination_type, density, majority_sign_method, generator)
        if combination_type in DENSE:
            # deltas in (out, in) orientation; s * B @ A of each adapter
            deltas = [((b @ a) * module.scaling[n]).float() for (a, b), n in zip(factors, names)]
            delta = merge(deltas, [w for _, w in present])
            return factorize(delta, rank, svd_clamp, full_matrices, driver)
        scaled = [w * module.scaling[n] for n, w in present]
        return factorwise(merge, [a for a, _ in factors], [b for _, b in factors], scaled)


def add_weighted_adapter(
    self: nn.Module,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    generator: Generator | None = None,
) -> None:
    """LoraModel.add_weighted_adapter (a method of lorakit.adapters.model.LoraModel, ``self``, defined here).

    Add ``adapter_name`` = a weighted combination of existing adapters (``plan``, ``combined_config``,
    ``combine_layer``). Like PEFT, the new adapter is added inactive; call set_adapter to use it. The ``dare_*``
    types are random: pass a seeded torch.Generator (an addition to PEFT's signature) or seed the global RNG to
    reproduce them."""
    if adapter_name in self.peft_config:
        raise AdapterError(
            f"Adapter with name {adapter_name!r} already exists; pick another name or delete_adapter it"
        )
    for name in adapters:
        self._check_exists(name)
    if len(adapters) != len(weights):
        raise ValueError(f"got {len(adapters)} adapters but {len(weights)} weights; give one weight per adapter")
    configs = [self.peft_config[a] for a in adapters]
    with_parameters = [a for a, c in zip(adapters, configs) if c.target_parameters]
    if with_parameters:
        raise ValueError(
            f"add_weighted_adapter does not support targeting nn.Parameter (adapter {with_parameters[0]!r} has "
            "target_parameters), as in PEFT: an expert stack has no single (out, in) update to combine"
        )
    saved = [m for m in self.model.modules() if isinstance(m, ModulesToSaveWrapper)]
    shared = [m for m in saved if sum(a in m.modules_to_save for a in adapters) > 1]
    if shared:  # PEFT's words first
        raise ValueError(
            f"Cannot add weighted adapters if they target the same module with modules_to_save, but found "
            f"{len(shared)} such instance(s). Trained copies of one module cannot be combined: combine adapters "
            "that save different modules, or delete_adapter the copies' adapters you do not need"
        )
    combination_type, new_rank = plan(combination_type, configs, svd_rank, density, majority_sign_method)
    layer_names = [n for n, m in self._lora_layers() if any(a in m.r for a in adapters)]
    for _, module in self._lora_layers():  # a kind whose factors cannot hold a combination refuses, first
        if any(a in module.r for a in adapters) and hasattr(module, "check_combinable"):
            module.check_combinable(combination_type)
    self.add_adapter(adapter_name, combined_config(configs, new_rank, layer_names))
    for wrapper in saved:  # the new adapter's copy of a saved module is its one source's trained copy
        source = next((a for a in adapters if a in wrapper.modules_to_save), None)
        if source is not None and adapter_name in wrapper.modules_to_save:
            wrapper.modules_to_save[adapter_name].load_state_dict(wrapper.modules_to_save[source].state_dict())
    for _, module in self._lora_layers():
        if adapter_name not in module.r:
            continue
        present = [(a, w) for a, w in zip(adapters, weights) if a in module.r]
        if not present:
            continue
        A, B = combine_layer(
            module,
            present,
            combination_type,
            new_rank,
            svd_clamp=svd_clamp,
            full_matrices=svd_full_matrices,
            driver=svd_driver,
            density=density,
            majority_sign_method=majority_sign_method,
            generator=generator,
        )
        new_A, new_B = module.lora_weights(adapter_name)
        new_A.data.zero_()
        new_B.data.zero_()
        new_A.data[: A.shape[0], :] = A.to(new_A.dtype)
        new_B.data[:, : B.shape[1]] = B.to(new_B.dtype)
    self._set_trainable()
