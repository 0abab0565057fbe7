"""LoRA around a convolution: ``nn.Conv1d``, ``nn.Conv2d``, ``nn.Conv3d`` (weight (out, in / g, *k), g = groups).

    y = base_layer(x) + sum over the active adapters of B(A(dropout(x))) * s     # (N, in, *S) -> (N, out, *S')

with PEFT's layout (so that state-dict keys and shapes match): ``lora_A[name]`` a conv of the base's class from ``in``
to ``r`` channels with the base's kernel size, stride and padding, no bias; ``lora_B[name]`` a 1x1 conv from ``r`` to
``out`` channels with the base's groups (r must be a multiple of g), biased only with lora_bias. Read as matrices
(lorakit.ops.conv_math) A is (r, in * prod(k)) and B (out, r), so the layer's update is the conv weight ``s * B @ A``
and everything LoraLayer does with (out, in) matrices (merge, DoRA's row norms, add_weighted_adapter) applies with
in * prod(k) columns.

One difference from PEFT, so that the merged layer computes what the unmerged one does: A also takes the base's
dilation and padding mode (PEFT's A has dilation 1 and zero padding whatever the base has; the two agree for every
conv without dilation and with zero padding, which is what PEFT's tests use). A grouped conv (g > 1) has a dense update
(A reads every input channel) that its grouped weight cannot hold: merging it raises NotImplementedError, as in PEFT,
and so does add_weighted_adapter; its DoRA norms follow PEFT's definition (``dora_terms``).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from lorakit.adapters import mixed_batch
from lorakit.adapters.layer import LoraLayer
from lorakit.ops import conv_math

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# what PEFT initializes a conv adapter with (others: ValueError there too); "lora_ga" starts as True there, as in PEFT
INITIALIZERS = (True, False, "gaussian", "lora_ga")


def is_conv(module: nn.Module) -> bool:
    return isinstance(module, CONVS)


class LoraConv(LoraLayer):
    """LoRA around ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``; ``lora_A`` / ``lora_B`` are PEFT's names."""

    def __init__(self, base_layer: nn.Conv1d | nn.Conv2d | nn.Conv3d) -> None:
        super().__init__(base_layer, base_layer.in_channels, base_layer.out_channels)
        self.conv_type = next(c for c in CONVS if isinstance(base_layer, c))
        self.groups = base_layer.groups
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        if self.groups > 1:
            warnings.warn(
                f"LoRA on a {self.conv_type.__name__} with groups={self.groups}: its update is a dense conv that the "
                "grouped weight cannot hold, so this layer cannot be merged (merge / merge_and_unload raise)",
                stacklevel=3,
            )

    # what code reads from a conv besides weight and bias (lorakit.adapters.layer)
    @property
    def in_channels(self) -> int:
        return self.base_layer.in_channels

    @property
    def out_channels(self) -> int:
        return self.base_layer.out_channels

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return self.base_layer.kernel_size

    @property
    def stride(self) -> tuple[int, ...]:
        return self.base_layer.stride

    @property
    def padding(self) -> tuple[int, ...] | str:
        return self.base_layer.padding

    @property
    def dilation(self) -> tuple[int, ...]:
        return self.base_layer.dilation

    @property
    def module_type(self) -> str:
        """PEFT's name of the wrapper class ('lora.Conv2d'): the repr's and get_layer_status's."""
        return f"lora.{self.conv_type.__name__}"

    @property
    def magnitude_shape(self) -> tuple[int, ...]:
        """DoRA's magnitude as PEFT stores it for a conv: (1, out, 1, ...), broadcasting over (N, out, *S)."""
        return (1, -1) + (1,) * (self.base_layer.weight.dim() - 2)

    # -- adapters ------------------------------------------------------------------------------------------------
    def update_layer(self, name: str, r: int, *args: object, use_dora: bool = False, **kwargs: object) -> None:
        """LoraLayer.update_layer, after the checks that only convs need (before anything is made)."""
        kind = self.conv_type.__name__
        if r % self.groups != 0:
            raise ValueError(
                f"Targeting a {kind} with groups={self.groups} and rank {r}. Currently, support is limited to conv "
                "layers where the rank is divisible by groups. Either choose a different rank or do not target this "
                "specific layer (lora_B is grouped like the base; rank_pattern can give this layer its own r)"
            )
        init = args[2] if len(args) > 2 else kwargs.get("init_lora_weights", True)
        if not any(init is ok or (isinstance(ok, str) and init == ok) for ok in INITIALIZERS):
            raise ValueError(
                f"init_lora_weights={init!r} is not available for a {kind} target; use True, False or 'gaussian' "
                "(as in PEFT), or leave the conv layers out of target_modules"
            )
        super().update_layer(name, r, *args, use_dora=use_dora, **kwargs)

    def _create(self, name: str, r: int) -> None:
        base = self.base_layer
        ones = (1,) * (base.weight.dim() - 2)
        self.lora_A[name] = self.conv_type(
            self.in_features, r, base.kernel_size, base.stride, base.padding, base.dilation,
            bias=False, padding_mode=base.padding_mode,
        )  # fmt: skip
        self.lora_B[name] = self.conv_type(r, self.out_features, ones, ones, groups=self.groups, bias=False)

    def lora_weights(self, name: str) -> tuple[Tensor, Tensor]:
        """A (r, in * prod(k)), a view of the conv weight, and B (out, r): a view for groups=1, else the
        block-diagonal matrix of the grouped weight (a new tensor: write B through ``load_factors``)."""
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        return conv_math.as_matrix(A), conv_math.grouped_to_dense(conv_math.as_matrix(B), self.groups)

    def load_factors(self, name: str, A: Tensor, B: Tensor) -> None:
        """Set adapter ``name``'s weights from matrices A (r, in * prod(k)) and B (out, r) (B's diagonal blocks for
        a grouped conv)."""
        A_conv, B_conv = self.lora_A[name].weight, self.lora_B[name].weight
        with torch.no_grad():
            A_conv.copy_(A.reshape(A_conv.shape))
            B_conv.copy_(conv_math.dense_to_grouped(B, self.groups).reshape(B_conv.shape))

    def factor_parameters(self, name: str) -> tuple[nn.Parameter, nn.Parameter]:
        """A's and B's conv kernels (``lora_weights`` gives them as matrices)."""
        return self.lora_A[name].weight, self.lora_B[name].weight

    def _drop(self, name: str) -> None:
        del self.lora_A[name], self.lora_B[name]

    # -- weights: (out, in) is (out, in * prod(k)) -----------------------------------------------------------------
    def transpose(self, weight: Tensor) -> Tensor:
        """A weight in the base's storage layout (out, in, *k) as the (out, in * prod(k)) matrix, or back."""
        if weight.dim() == 2:
            return weight.reshape(self.base_layer.weight.shape)
        return conv_math.as_matrix(weight)

    def weight_out_in(self) -> Tensor:
        """The base weight as (out, in * prod(k)); for a grouped conv, of the dense conv it equals (zero outside
        the groups' blocks)."""
        weight = self.base_weight().detach()
        return conv_math.as_matrix(conv_math.grouped_weight_dense(weight, self.groups))

    def dora_terms(self, name: str) -> tuple[Tensor, Tensor]:
        """(W, dW) as (out, columns) matrices whose sum's row norms are DoRA's norm (lorakit.adapters.variants.Dora):
        the weight and the update for groups=1; for a grouped conv, W (out, in / g * prod(k)) and PEFT's reading of
        s * B @ A in W's shape (lorakit.ops.conv_math.peft_dora_delta), so that grouped DoRA adapters load both ways."""
        if self.groups == 1:
            return self.weight_out_in(), self.delta_out_in(name)
        weight = self.base_weight().detach()
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        delta = conv_math.peft_dora_delta(A, B, self.scaling[name], weight.shape)
        return conv_math.as_matrix(weight), conv_math.as_matrix(delta)

    def delta_weight(self, name: str) -> Tensor:
        """s * B @ A as a conv weight (out, in, *k), in the base weight's dtype."""
        self._check_mergeable([name])
        return super().delta_weight(name)

    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        names = [n for n in (adapter_names or self._active) if n in self.r and n not in self.merged_adapters]
        self._check_mergeable(names)
        super().merge(adapter_names, safe_merge)

    def check_combinable(self, combination_type: str) -> None:
        """add_weighted_adapter: a grouped conv's B is block-diagonal, which a combination of adapters (a sum, a
        stack, an SVD) is not in general; NotImplementedError before anything is added."""
        if self.groups > 1:
            raise NotImplementedError(
                f"add_weighted_adapter(combination_type={combination_type!r}) cannot combine adapters of a "
                f"{self.conv_type.__name__} with groups={self.groups}: its lora_B is grouped (block-diagonal), and "
                "the combined B would not be; leave grouped convs out of the adapters to combine"
            )

    def _check_mergeable(self, names: list[str]) -> None:
        if self.groups > 1 and names:
            raise NotImplementedError(
                f"cannot merge adapter(s) {names} into a {self.conv_type.__name__} with groups={self.groups}: the "
                "LoRA update is a dense conv (A reads every input channel) and the grouped weight (out, in / groups, "
                "*k) cannot hold it; keep the adapter unmerged (merging grouped convs is not supported in PEFT either)"
            )

    # -- forward -------------------------------------------------------------------------------------------------
    def forward(self, x: Tensor, *args: object, **kwargs: object) -> Tensor:
        if self.routing is not None:  # a mixed-adapter batch: one adapter per row
            return self._routed_forward(x, *args, **kwargs)
        result = base = self.base_layer(x, *args, **kwargs)  # (N, out, *S')
        if self._disabled or self.merged_adapters:
            return result
        for name in self._active:
            if name in self.r:  # + B(A(dropout(x))) * s, or the adapter's variant of it (DoRA)
                result = self.variants[name].conv_forward(self, name, x, base, result)
        return result

    def _routed_forward(self, x: Tensor, *args: object, **kwargs: object) -> Tensor:
        """Row i through adapter ``routing``'s name for it: the base output, then each adapter's rows (one
        contiguous call per adapter) updated as the plain forward does."""
        routing: mixed_batch.Routing = self.routing
        result = self.base_layer(x, *args, **kwargs)  # (N, out, *S')
        if self._disabled:
            return result
        mixed_batch.check_rows(routing, x.shape[0], self.base_layer)
        if self.merged_adapters:
            raise ValueError("adapter_names cannot be used while adapters are merged; call model.unmerge_adapter()")
        rows = routing.on("rows", x.device)
        for name, start, stop in routing.segments:
            if name == mixed_batch.BASE or name not in self.r:
                continue
            idx = rows[start:stop]
            part = result.index_select(0, idx)
            part = self.variants[name].conv_forward(self, name, x.index_select(0, idx), part, part)
            result = result.index_copy(0, idx, part)
        return result
