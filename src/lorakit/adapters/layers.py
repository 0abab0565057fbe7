"""LoRA wrappers around one base module: Linear (and GPT-2 Conv1D) and Embedding.

A wrapper holds the untouched ``base_layer`` and, per named adapter, a low-rank update ``delta W = s * B @ A`` with
A (r, in), B (out, r) and scaling s = alpha / r (or alpha / sqrt(r) with rsLoRA). The forward is the base output plus
``B(A(dropout(x))) * s`` for each active adapter (Hu et al. 2021, eq. 3). Merging adds ``s * B @ A`` into the base
weight; it happens only when ``merge()`` is called, never as a side effect of ``train()`` / ``eval()``.

With DoRA (``use_dora``, Liu et al. 2024) an adapter also owns a magnitude vector m (out,) in
``lora_magnitude_vector[name]``, and the adapted weight is ``m * (W + s * B @ A) / ||W + s * B @ A||_row``; the maths
is in lorakit.ops.dora.

State changes are explicit calls or attribute assignments (``active_adapters = [...]``, ``disable_adapters = True``,
``routing = ...``, ``base_layer = ...``); a Linear wrapper looks up what its forward needs for the current state once
(``LoraLinear._plan``) and every such change drops that plan.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module_hooks

from lorakit.adapters import mixed_batch
from lorakit.config import scaling_for
from lorakit.fast import branch
from lorakit.fast.shared_cast import shared_cast
from lorakit.ops import dora
from lorakit.ops.init import get_initializer
from lorakit.quant.linear import QuantizedBaseError, QuantLinear, is_conv1d


class LoraLayer(nn.Module):
    """Base of the wrappers: adapter bookkeeping, merge / unmerge. Subclasses own the parameter layout."""

    fan_in_fan_out: bool = False  # True if base weight is stored (in, out) instead of (out, in)

    def __init__(self, base_layer: nn.Module, in_features: int, out_features: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = in_features, out_features
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disable_adapters = False
        self.merged_adapters: list[str] = []
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA adapters only: m (out,) per adapter
        self._dora_norms: dict[str, Tensor] = {}  # ||W + s * B @ A||_row of each merged DoRA adapter, for unmerge
        self.routing: mixed_batch.Routing | None = None  # set while a batch runs one adapter per row (adapter_names)

    # -- the forward's plan: lookups done once per state, dropped on every state change -----------------------------
    def __setattr__(self, name: str, value: object) -> None:
        self._replan()  # an assigned attribute is state: the active set, disable, routing, the base layer, ...
        super().__setattr__(name, value)

    def _replan(self) -> None:
        self.__dict__["_plan"] = None

    def _apply(self, fn: Callable[..., Tensor], recurse: bool = True) -> nn.Module:
        self._replan()  # .to() / .half() may put new Parameter objects in place
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._replan()  # load_state_dict(assign=True) puts new Parameter objects in place
        super()._load_from_state_dict(*args, **kwargs)

    # -- parameter layout (subclasses) ---------------------------------------------------------------------------
    def _create(self, name: str, r: int) -> None:
        raise NotImplementedError

    def lora_weights(self, name: str) -> tuple[Tensor, Tensor]:
        """The (A (r, in), B (out, r)) parameters of adapter ``name``."""
        raise NotImplementedError

    def _drop(self, name: str) -> None:
        raise NotImplementedError

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """Every trainable parameter of adapter ``name``: A, B, and DoRA's magnitude if it has one."""
        params = list(self.lora_weights(name))
        if name in self.lora_magnitude_vector:
            params.append(self.lora_magnitude_vector[name])
        return params

    @property
    def adapter_names(self) -> list[str]:
        return list(self.r)

    # -- adapters ------------------------------------------------------------------------------------------------
    def update_layer(
        self,
        name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        init_lora_weights: bool | str,
        use_rslora: bool = False,
        init_options: dict[str, Any] | None = None,
        use_dora: bool = False,
    ) -> None:
        """Add adapter ``name`` with rank ``r``, initialized by ``init_lora_weights`` (see lorakit.ops.init).
        ``init_options`` (a config's loftq_config) go to initializers that name them as keyword parameters.
        ``use_dora`` adds a DoRA magnitude m = ||W + s * B @ A||_row, taken after the initializer ran."""
        self.r[name], self.lora_alpha[name] = r, lora_alpha
        self.scaling[name] = scaling_for(lora_alpha, r, use_rslora)
        self._replan()
        self.lora_dropout[name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self._create(name, r)
        self.train(self.base_layer.training)  # new modules start in train mode; follow the model's mode instead
        init = get_initializer(init_lora_weights, embedding=isinstance(self, LoraEmbedding))
        weight = self.weight_out_in()  # (out, in)
        A0, B0, residual = init(weight, r, self.scaling[name], **_accepted(init, init_options or {}))
        A, B = self.lora_weights(name)
        with torch.no_grad():
            A.copy_(A0)
            B.copy_(B0)
            if residual is not None:
                self._set_base_weight(residual)
            if use_dora:
                delta = self._delta_out_in(name).to(weight.device, torch.float32)  # A, B move to the base below
                norm = dora.weight_norm(self.weight_out_in().float(), delta)  # (out,)
                self.lora_magnitude_vector[name] = nn.Parameter(norm.to(A.dtype))
        if A.device != weight.device:
            self.to(weight.device)

    def set_scale(self, name: str, scaling: float) -> None:
        self.scaling[name] = scaling
        self._replan()

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise RuntimeError(f"adapter {name!r} is merged into {type(self.base_layer).__name__}; unmerge it first")
        self._replan()
        self._drop(name)
        if name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]
        for d in (self.r, self.lora_alpha, self.scaling):
            d.pop(name, None)
        del self.lora_dropout[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    # -- merging -------------------------------------------------------------------------------------------------
    def base_weight(self) -> nn.Parameter:
        return self.base_layer.weight

    def weight_out_in(self) -> Tensor:
        """The base weight as (out, in), whatever its storage layout (fp32 dequantized for a quantized base)."""
        if self.quantized:
            return self.base_layer.dequantize()
        return _transpose(self.base_weight().detach(), self.fan_in_fan_out)

    # -- a quantized base (QLoRA, lorakit.quant): read-only codes, adapters in full precision -----------------------
    @property
    def quantized(self) -> bool:
        return isinstance(self.base_layer, QuantLinear)

    def _set_base_weight(self, weight: Tensor) -> None:
        """Make ``weight`` (out, in) the base weight. A quantized base stores it quantized: lossless for LoftQ's
        residual (already a dequantized weight), lossy for other residuals (PiSSA, OLoRA)."""
        if self.quantized:
            self.base_layer.requantize_(weight)
        else:
            self.base_weight().copy_(_transpose(weight, self.fan_in_fan_out))

    def _delta_out_in(self, name: str) -> Tensor:
        """s * B @ A as (out, in), in the adapter's dtype."""
        A, B = self.lora_weights(name)
        return (B @ A) * self.scaling[name]  # (out, r) @ (r, in) -> (out, in)

    def delta_weight(self, name: str) -> Tensor:
        """s * B @ A, in the base weight's storage layout and dtype."""
        dtype = torch.float32 if self.quantized else self.base_weight().dtype
        return _transpose(self._delta_out_in(name), self.fan_in_fan_out).to(dtype)

    def dora_scale_args(self, name: str, weight: Tensor) -> tuple[Tensor, Tensor]:
        """(m, ||weight + s * B @ A||_row) of DoRA adapter ``name``; ``weight`` (out, in) is the unmerged base. The
        norm is detached: a constant for the backward pass (Liu et al. 2024, sec. 4.3)."""
        delta = self._delta_out_in(name).detach().to(weight.dtype)
        return self.lora_magnitude_vector[name], dora.weight_norm(weight, delta).detach()

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Add the updates of ``adapter_names`` (default: the active ones) into the base weight."""
        names = [n for n in (adapter_names or self.active_adapters) if n in self.r and n not in self.merged_adapters]
        if not names:
            return
        if self.quantized:
            raise QuantizedBaseError(
                f"cannot merge adapter(s) {names} in place into a quantized base ({self.base_layer.extra_repr()}): "
                "adding s * B @ A would mean quantizing the sum again, which rounds the update away. Use "
                "merge_and_unload(), which returns full-precision nn.Linear layers (dequantized W + s * B @ A), or "
                "keep the adapter unmerged"
            )
        weight = self.base_weight()
        for name in names:
            with torch.no_grad():
                if name in self.lora_magnitude_vector:
                    new = self._dora_merged(name)
                else:
                    new = weight.data + self.delta_weight(name)
                if safe_merge and not torch.isfinite(new).all():
                    raise ValueError(f"merging adapter {name!r} gives NaN/inf weights; the adapter is broken")
                weight.data = new
            self.merged_adapters.append(name)
            self._replan()

    def unmerge(self) -> None:
        """Subtract every merged update from the base weight, newest first."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            self._replan()
            with torch.no_grad():
                weight = self.base_weight()
                weight.data = self._unmerged(weight.data, name, self._dora_norms.pop(name, None))

    def _unmerged(self, weight: Tensor, name: str, norm: Tensor | None) -> Tensor:
        """``weight`` (storage layout) with merged adapter ``name`` taken out; ``norm`` is a DoRA adapter's norm."""
        if norm is None:
            return weight - self.delta_weight(name)
        m, delta = self.lora_magnitude_vector[name].detach(), self._delta_out_in(name).to(weight.dtype)
        unmerged = dora.unmerge_weight(_transpose(weight, self.fan_in_fan_out), delta, m, norm)  # (out, in)
        return _transpose(unmerged, self.fan_in_fan_out).to(weight.dtype)

    def _dora_merged(self, name: str) -> Tensor:
        """The base weight (storage layout) with DoRA adapter ``name`` merged: W' = (m / n) * (W + s * B @ A), n taken
        from the base without the adapters merged before (as the unmerged forward sees it), as PEFT does."""
        weight = self.base_weight().data
        unmerged = weight
        for earlier in reversed(self.merged_adapters):
            unmerged = self._unmerged(unmerged, earlier, self._dora_norms.get(earlier))
        m, norm = self.dora_scale_args(name, _transpose(unmerged, self.fan_in_fan_out))
        self._dora_norms[name] = norm
        delta = self._delta_out_in(name).to(weight.dtype)
        merged = dora.merge_weight(_transpose(weight, self.fan_in_fan_out), delta, m.detach(), norm)
        return _transpose(merged, self.fan_in_fan_out).to(weight.dtype)


class LoraLinear(LoraLayer):
    """LoRA around ``nn.Linear`` (weight (out, in)) or GPT-2's ``Conv1D`` (weight (in, out), fan_in_fan_out)."""

    def __init__(self, base_layer: nn.Module) -> None:
        if isinstance(base_layer, QuantLinear):  # QLoRA: a quantized base, (out, in) like nn.Linear
            fan_in_fan_out, in_f, out_f = False, base_layer.in_features, base_layer.out_features
        else:
            weight = base_layer.weight
            fan_in_fan_out = not isinstance(base_layer, nn.Linear)  # transformers' Conv1D stores (in, out)
            in_f, out_f = (weight.shape[0], weight.shape[1]) if fan_in_fan_out else (weight.shape[1], weight.shape[0])
        super().__init__(base_layer, in_f, out_f)
        self.fan_in_fan_out = fan_in_fan_out
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def _create(self, name: str, r: int) -> None:
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False)

    def lora_weights(self, name: str) -> tuple[Tensor, Tensor]:
        return self.lora_A[name].weight, self.lora_B[name].weight

    def _drop(self, name: str) -> None:
        del self.lora_A[name], self.lora_B[name]

    def forward(self, x: Tensor, *args: object, **kwargs: object) -> Tensor:
        plan = self._plan if self._plan is not None else self._make_plan()
        if plan:  # at most one plain adapter, no routing: the common case, its lookups done once per state
            base_layer, name, A_params, B_params, dropout, linear_base = plan
            if name is None:  # disabled, merged, or no adapter of this layer active
                return base_layer(x, *args, **kwargs)
            A, B = A_params["weight"], B_params["weight"]  # read per call: a replaced Parameter is seen
            if linear_base and torch.is_autocast_enabled("cpu"):  # one cast of x for this layer, its branch and
                x = shared_cast(x)  # the layers beside it (q, k, v) instead of one per layer and branch
            if torch.is_grad_enabled() and not args and not kwargs and _fusable(base_layer, x, A, B):
                return branch.linear_lora_add(base_layer, x, A, B, self.scaling[name], dropout)
            result = base_layer(x, *args, **kwargs)  # (..., out)
            if torch.is_grad_enabled() or dropout.training or not x.dtype == A.dtype == B.dtype == result.dtype:
                return branch.lora_add(result, x, A, B, self.scaling[name], dropout)
            return branch.lora_add_no_grad(result, x, A, B, self.scaling[name])
        if self.routing is not None:  # a mixed-adapter batch: one adapter per row
            return mixed_batch.linear_forward(self, x, *args, **kwargs)
        result = base = self.base_layer(x, *args, **kwargs)  # (..., out)
        if self.disable_adapters or self.merged:
            return result
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            A, B = self.lora_A[name], self.lora_B[name]
            if name not in self.lora_magnitude_vector:  # plain LoRA: fast.branch, tested against the math
                result = branch.lora_add(result, x, A.weight, B.weight, self.scaling[name], self.lora_dropout[name])
                continue
            h = self.lora_dropout[name](x.to(A.weight.dtype))  # (..., in)
            lora = self._dora_output(name, base, h, B(A(h)) * self.scaling[name])  # (..., r) -> (..., out)
            result = result + lora.to(result.dtype)
        return result

    def _make_plan(self) -> tuple:
        """What forward needs in the current state, looked up once: (base_layer, name, A's and B's parameter dicts,
        dropout, whether the base is an nn.Linear) of the one active plain adapter; (base_layer, None, ...) if the
        output is the base layer's alone (adapters disabled or merged, none of this layer active); () for the general
        loop (routing, DoRA, several adapters). The parameter dicts (not the Parameters) are kept, so that assigning a
        new Parameter to lora_A[name].weight needs no replanning."""
        active = [n for n in self.active_adapters if n in self.lora_A]
        plan: tuple = ()
        if self.routing is not None:
            pass
        elif self.disable_adapters or self.merged or not active:
            plan = (self.base_layer, None, None, None, None, False)
        elif len(active) == 1 and active[0] not in self.lora_magnitude_vector:
            name = active[0]
            A_params, B_params = self.lora_A[name]._parameters, self.lora_B[name]._parameters
            linear_base = isinstance(self.base_layer, nn.Linear)
            plan = (self.base_layer, name, A_params, B_params, self.lora_dropout[name], linear_base)
        self.__dict__["_plan"] = plan
        return plan

    def _dora_output(self, name: str, base: Tensor, h: Tensor, lora: Tensor) -> Tensor:
        """DoRA's addition to the base output (lorakit.ops.dora.linear_output). Its x @ W.T reuses the base output
        (bias removed) unless dropout is active: then it is computed on the dropped input h, as PEFT does."""
        weight = self.weight_out_in().to(h.dtype)  # (out, in)
        if isinstance(self.lora_dropout[name], nn.Identity) or not self.training:
            bias = getattr(self.base_layer, "bias", None)
            x_w = (base if bias is None else base - bias).to(h.dtype)  # (..., out)
        else:
            x_w = nn.functional.linear(h, weight)  # (..., out)
        return dora.linear_output(x_w, lora, *self.dora_scale_args(name, weight))


class LoraEmbedding(LoraLayer):
    """LoRA around ``nn.Embedding`` (weight (num_embeddings, dim)): A (r, num_embeddings) is looked up by token id,
    then projected by B (dim, r). No dropout on token ids, as in PEFT."""

    fan_in_fan_out = True  # weight is (in=num_embeddings, out=dim)

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer, base_layer.num_embeddings, base_layer.embedding_dim)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def _create(self, name: str, r: int) -> None:
        self.lora_embedding_A[name] = nn.Parameter(torch.zeros(r, self.in_features))
        self.lora_embedding_B[name] = nn.Parameter(torch.zeros(self.out_features, r))

    def lora_weights(self, name: str) -> tuple[Tensor, Tensor]:
        return self.lora_embedding_A[name], self.lora_embedding_B[name]

    def _drop(self, name: str) -> None:
        del self.lora_embedding_A[name], self.lora_embedding_B[name]

    def forward(self, x: Tensor, *args: object, **kwargs: object) -> Tensor:
        if self.routing is not None:  # a mixed-adapter batch: one adapter per row
            return mixed_batch.embedding_forward(self, x, *args, **kwargs)
        result = embedded = self.base_layer(x, *args, **kwargs)  # (B, T, dim)
        if self.disable_adapters or self.merged:
            return result
        base = self.base_layer
        for name in self.active_adapters:
            if name not in self.lora_embedding_A:
                continue
            A, B = self.lora_weights(name)
            after_A = nn.functional.embedding(
                x, A.T, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse
            )  # (B, T, r)
            lora = (after_A @ B.T) * self.scaling[name]  # (B, T, dim)
            if name in self.lora_magnitude_vector:  # DoRA rescales the base embedding too: add the difference
                m, norm = self.dora_scale_args(name, self.weight_out_in().to(lora.dtype))
                e = embedded.to(lora.dtype)
                lora = dora.embedding_output(e, lora, m, norm) - e
            result = result + lora.to(result.dtype)
        return result


def _fusable(base_layer: nn.Module, x: Tensor, A: Tensor, B: Tensor) -> bool:
    """Whether the base layer and the LoRA branch may run as one autograd node (branch.linear_lora_add): a plain
    frozen ``nn.Linear`` (not a subclass with its own forward), no hooks that expect it to be called, and x, W, A and
    B of one dtype, or under CPU autocast fp32 parameters and x fp32 or already cast (lorakit.fast.shared_cast)."""
    if type(base_layer) is not nn.Linear:
        return False
    weight, bias = base_layer.weight, base_layer.bias
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return False
    if torch.is_autocast_enabled(x.device.type):
        if x.device.type != "cpu" or not weight.dtype == A.dtype == B.dtype == torch.float32:
            return False
        if x.dtype not in (torch.float32, torch.get_autocast_dtype("cpu")):
            return False
    elif not x.dtype == weight.dtype == A.dtype == B.dtype:
        return False
    hooks = (base_layer._forward_hooks, base_layer._forward_pre_hooks, base_layer._backward_hooks,
             base_layer._backward_pre_hooks, _module_hooks._global_forward_hooks,
             _module_hooks._global_forward_pre_hooks, _module_hooks._global_backward_hooks,
             _module_hooks._global_backward_pre_hooks)
    return not any(hooks)


def wrap(module: nn.Module) -> LoraLayer:
    """The LoRA wrapper for ``module``; TypeError if lorakit cannot wrap its type."""
    if isinstance(module, nn.Embedding):
        return LoraEmbedding(module)
    if isinstance(module, (nn.Linear, QuantLinear)) or is_conv1d(module):
        return LoraLinear(module)
    raise TypeError(
        f"lorakit can wrap nn.Linear, lorakit QuantLinear, GPT-2 Conv1D and nn.Embedding, not {type(module).__name__}; "
        "choose target_modules that name such layers"
    )


def _transpose(weight: Tensor, fan_in_fan_out: bool) -> Tensor:
    return weight.T if fan_in_fan_out else weight


def _accepted(init: Callable[..., object], options: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``options`` that ``init`` names as optional parameters: an initializer declares the options it
    reads (LoftQ: loftq_bits, loftq_iter), the others are called with (weight, r, scaling) only."""
    if not options:
        return {}
    params = inspect.signature(init).parameters
    return {k: v for k, v in options.items() if k in params and params[k].default is not inspect.Parameter.empty}
