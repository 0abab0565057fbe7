"""LoRA around a linear layer: ``nn.Linear`` (weight (out, in)), GPT-2's ``Conv1D`` (weight stored (in, out),
``fan_in_fan_out``) and lorakit's ``QuantLinear`` (an NF4 / int8 base, (out, in)).

    y = base_layer(x) + sum over the active adapters of B(A(dropout(x))) * s        # (..., in) -> (..., out)

with ``lora_A[name]`` an ``nn.Linear(in, r)`` and ``lora_B[name]`` an ``nn.Linear(r, out)``, no biases (PEFT's
layout, so that state-dict keys match); with ``lora_bias=True`` B has a bias b and the update is s * (B A x + b).
A BD-LoRA adapter has one of them a ``BlockDiagonalLinear`` (lorakit.adapters.variant_bdlora).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lorakit.adapters import mixed_batch
from lorakit.adapters.layer import LoraLayer
from lorakit.adapters.variant_bdlora import BlockDiagonalLinear
from lorakit.config import LoraConfig
from lorakit.fast import branch
from lorakit.ops import block_diagonal
from lorakit.quant.linear import QuantLinear, is_conv1d


class LoraLinear(LoraLayer):
    """LoRA around ``nn.Linear``, GPT-2's ``Conv1D`` or a ``QuantLinear``."""

    variants_supported = ("lora", "dora", "velora", "bdlora", "mica", "kasa", "monteclora", "alora",
                          "arrow")

    def __init__(self, base_layer: nn.Module, adapter_name: str | None = None, config: LoraConfig | None = None, *,
                 r: int | None = None, lora_alpha: float | None = None) -> None:
        """Wrap ``base_layer``; with ``adapter_name`` and ``config`` (PEFT's constructor), also add that adapter, active
        (``r`` / ``lora_alpha`` as given, else the config's)."""
        if isinstance(base_layer, QuantLinear):  # QLoRA: a quantized base, (out, in) like nn.Linear
            fan_in_fan_out, in_f, out_f = False, base_layer.in_features, base_layer.out_features
        else:
            weight = base_layer.weight
            fan_in_fan_out = is_conv1d(base_layer)  # transformers' Conv1D stores (in, out); others (out, in)
            in_f, out_f = (weight.shape[0], weight.shape[1]) if fan_in_fan_out else (weight.shape[1], weight.shape[0])
        super().__init__(base_layer, in_f, out_f)
        self.fan_in_fan_out = fan_in_fan_out
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self._fast: tuple[str, dict, dict, nn.Module] | None = None  # the one plain adapter to run by fast.branch
        # an nn.Linear subclass with a forward of its own (a MoE router's returns a tuple): its output is checked to be
        # a tensor the update can be added to
        self._own_forward = isinstance(base_layer, nn.Linear) and type(base_layer).forward is not nn.Linear.forward
        if adapter_name is not None:
            if config is None:
                raise TypeError(f"LoraLinear(base_layer, {adapter_name!r}) needs the adapter's LoraConfig too: "
                                f"LoraLinear(base_layer, {adapter_name!r}, config)")
            self._add_from_config(adapter_name, config, r, lora_alpha)

    def _create(self, name: str, r: int) -> None:
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False)

    def lora_weights(self, name: str) -> tuple[Tensor, Tensor]:
        """A (r, in) and B (out, r): the modules' weights, or the dense matrix of a BD-LoRA block-diagonal factor
        (a new tensor: write it through ``load_factors``, which keeps its blocks)."""
        return _matrix(self.lora_A[name]), _matrix(self.lora_B[name])

    def load_factors(self, name: str, A: Tensor, B: Tensor) -> None:
        """Set adapter ``name``'s factors to A (r, in) and B (out, r) (the diagonal blocks of a block-diagonal one)."""
        with torch.no_grad():
            for module, matrix in ((self.lora_A[name], A), (self.lora_B[name], B)):
                if isinstance(module, BlockDiagonalLinear):
                    matrix = block_diagonal.packed(matrix, module.nblocks)
                module.weight.copy_(matrix)

    def factor_parameters(self, name: str) -> tuple[nn.Parameter, nn.Parameter]:
        """A's and B's weights (packed, for a block-diagonal one)."""
        return self.lora_A[name].weight, self.lora_B[name].weight

    def _drop(self, name: str) -> None:
        del self.lora_A[name], self.lora_B[name]

    def forward(self, x: Tensor, *args: object, **kwargs: object) -> Tensor:
        if self.routing is not None:  # a mixed-adapter batch: one adapter per row
            return mixed_batch.linear_forward(self, x, *args, **kwargs)
        if self._fast is not None and not args and not kwargs:  # one plain adapter: the loop below, by fast.branch
            name, A, B, dropout = self._fast
            if self._own_forward:  # never fused (fast.branch fuses plain nn.Linear only): the layer, then the branch
                result = self.base_layer(x)
                if not isinstance(result, Tensor):
                    raise _not_a_tensor(self.base_layer, result)
                return branch.lora_add(result, x, A["weight"], B["weight"], self.scaling[name], dropout)
            base = self._modules["base_layer"]  # (the table nn.Module's attribute lookup reads, read directly)
            return branch.linear_with_lora(base, x, A["weight"], B["weight"], self.scaling[name], dropout)
        base_layer = self._modules["base_layer"]
        if self._disabled or self.merged_adapters:  # the base layer alone (F.linear itself where it is exactly that)
            return branch.base_output(base_layer, x, *args, **kwargs)
        result = base = base_layer(x, *args, **kwargs)  # (..., out)
        if not isinstance(result, Tensor):
            raise _not_a_tensor(self.base_layer, result)
        for name in self._active:
            if name in self.r:  # + B(A(dropout(x))) * s, or the adapter's variant of it (DoRA)
                result = self.variants[name].linear_forward(self, name, x, base, result)
        return result

    def _refresh(self) -> None:
        """The fast path runs when exactly one adapter of this layer is active, plain, unmerged and enabled. It keeps
        the A and B modules' parameter dicts, not the Parameters: a Parameter replaced by assignment, ``.to()`` or
        ``load_state_dict(assign=True)`` is read at the next call."""
        active = [n for n in self._active if n in self.r]
        self._fast = None
        plain = len(active) == 1 and self.variants[active[0]].plain and not self.lora_bias.get(active[0])
        if plain and not self._disabled and not self.merged_adapters:
            name = active[0]
            self._fast = (name, self.lora_A[name]._parameters, self.lora_B[name]._parameters, self.lora_dropout[name])


def _matrix(factor: nn.Module) -> Tensor:
    """A LoRA factor module's matrix: an nn.Linear's weight, a BlockDiagonalLinear's dense block-diagonal matrix."""
    return factor.dense_weight() if isinstance(factor, BlockDiagonalLinear) else factor.weight


def _not_a_tensor(base: nn.Module, result: object) -> TypeError:
    """The error for a wrapped nn.Linear subclass whose forward returns no tensor (transformers 5's Phimoe / Llama 4
    routers return (scores, logits); PEFT fails there too, inside its addition)."""
    return TypeError(
        f"LoRA wrapped a {type(base).__name__} (an nn.Linear subclass) whose forward returns a "
        f"{type(result).__name__}, not a tensor, so there is no output to add the update to (all-linear takes every "
        "nn.Linear, a MoE router too). Leave it out of the targets, e.g. exclude_modules=['router'] (its name in the "
        "model), and adapt its weight instead, if wanted, with target_parameters=['router.weight']"
    )
