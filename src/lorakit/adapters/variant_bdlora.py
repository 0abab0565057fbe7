"""BD-LoRA as a variant: one of the factors A (r, in) or B (out, r) is block-diagonal with n blocks (the maths:
lorakit.ops.block_diagonal), so that a tensor-parallel engine with n shards applies the adapter shard by shard.
Which factor depends on the target's name (BdLoraConfig.target_modules_bd_a / _bd_b: a name containing one of the
strings); a target matching neither is plain LoRA (or an error, with ``match_strict``).

The block-diagonal factor is a ``BlockDiagonalLinear`` in ``lora_A[adapter]`` / ``lora_B[adapter]``, its weight
packed as PEFT stores it (A: (r, in / n), B: (out, r / n)): the file keys and shapes are PEFT's. It replaces the dense
factor the initializer made: a block-diagonal A is Kaiming-uniform (PEFT's draw, a = 0), a block-diagonal B zero,
whatever ``init_lora_weights`` says (as in PEFT). ``LoraLinear.lora_weights`` gives it as the dense block-diagonal
matrix, so merging, the delta weight and mixed batches are plain LoRA's maths on it.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from lorakit.adapters.variant_lora import Lora, LoraLayer
from lorakit.config import BdLoraConfig, ConfigError
from lorakit.ops import block_diagonal


class BlockDiagonalLinear(nn.Module):
    """x @ M.T for a block-diagonal M (out, in) of ``nblocks`` blocks, stored packed: ``weight`` (out, in / n)."""

    def __init__(self, in_features: int, out_features: int, nblocks: int, *, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        block_diagonal.check_divisible(in_features, out_features, nblocks)
        self.in_features, self.out_features, self.nblocks = in_features, out_features, nblocks
        self.weight = nn.Parameter(torch.zeros(out_features, in_features // nblocks, dtype=dtype, device=device))

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        return block_diagonal.apply(x, self.weight, self.nblocks)

    def dense_weight(self) -> Tensor:
        """M (out, in), zeros off the blocks (differentiable in ``weight``)."""
        return block_diagonal.dense(self.weight, self.nblocks)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nblocks={self.nblocks}"


def side_for(options: BdLoraConfig, module_name: str) -> Literal["A", "B"] | None:
    """Which factor of target ``module_name`` is block-diagonal: "A", "B", or None (plain LoRA, if not strict).
    ValueError with PEFT's words (its tests match them) for a name in both lists, or in neither with match_strict."""
    in_a = any(pattern in module_name for pattern in options.target_modules_bd_a or [])
    in_b = any(pattern in module_name for pattern in options.target_modules_bd_b or [])
    if in_a and in_b:
        raise ConfigError(
            f"Target {module_name} matches both A and B block-diagonal patterns: make the patterns of "
            "target_modules_bd_a and target_modules_bd_b match different modules"
        )
    if not (in_a or in_b) and options.match_strict:
        raise ConfigError(
            f"Target {module_name} matches neither A nor B block-diagonal patterns. If this is intentional, set "
            "match_strict=False in BdLoraConfig (the module gets plain LoRA), or add it to target_modules_bd_a / _bd_b"
        )
    return "A" if in_a else "B" if in_b else None


def dense_factors(options: BdLoraConfig | None, module_name: str, A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """A module's (A, B) as an adapter file holds them -> the dense A (r, in) and B (out, r): the block-diagonal one
    (per ``options``, the adapter's use_bdlora; None: plain LoRA) expanded from its packed form."""
    side = None if options is None else side_for(options, module_name)
    if side == "A":
        return block_diagonal.dense(A, options.nblocks), B
    if side == "B":
        return A, block_diagonal.dense(B, options.nblocks)
    return A, B


class BdLora(Lora):
    """BD-LoRA: ``side`` ("A" or "B") of the adapter is a BlockDiagonalLinear of ``nblocks`` blocks."""

    name = "bdlora"
    title = "BD-LoRA"
    runs_on = "nn.Linear and GPT-2 Conv1D layers"
    plain = False  # its factors are no plain (r, in) / (out, r) weights: the layers' fast path stays off

    def __init__(self, nblocks: int, side: Literal["A", "B"]) -> None:
        self.nblocks, self.side = nblocks, side

    def create(self, layer: LoraLayer, adapter: str) -> None:
        """Replace the dense factor ``side`` by its block-diagonal module (A: Kaiming-uniform, B: zero)."""
        dense = (layer.lora_A if self.side == "A" else layer.lora_B)[adapter]
        r = layer.r[adapter]
        kwargs = {"dtype": dense.weight.dtype, "device": dense.weight.device}
        if self.side == "A":
            A = BlockDiagonalLinear(layer.in_features, r, self.nblocks, **kwargs)
            nn.init.kaiming_uniform_(A.weight)  # fan_in = in / n, a = 0: PEFT's draw
            layer.lora_A[adapter] = A
            return
        if layer.lora_bias.get(adapter):
            raise ConfigError(
                f"BD-LoRA with a block-diagonal B (target_modules_bd_b) has no bias on B: lora_bias=True is not "
                f"supported there (adapter {adapter!r}); pass lora_bias=False, or make this module's A block-diagonal"
            )
        layer.lora_B[adapter] = BlockDiagonalLinear(r, layer.out_features, self.nblocks, **kwargs)

    def linear_forward(self, layer: LoraLayer, adapter: str, x: Tensor, base: Tensor, result: Tensor) -> Tensor:
        """``result + B(A(dropout(x))) * s``, the block-diagonal factor applied block by block."""
        A, B = layer.lora_A[adapter], layer.lora_B[adapter]
        h = layer.lora_dropout[adapter](x.to(A.weight.dtype))  # (..., in)
        return result + (B(A(h)) * layer.scaling[adapter]).to(result.dtype)  # B's bias too, with lora_bias
