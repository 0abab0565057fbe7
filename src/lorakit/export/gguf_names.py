"""Where a transformers module's weight lives in a llama.cpp GGUF file: its tensor name and its row layout.

Names come from the ``gguf`` package's own table (``get_tensor_name_map``): ``model.layers.3.self_attn.q_proj`` is
``blk.3.attn_q.weight`` for a llama. One layout differs: llama.cpp's converter reorders the rows of a llama's q and
k projections, because its rotary embedding pairs dimensions (0, 1), (2, 3), ... of each head where transformers'
``rotate_half`` pairs (j, j + d/2). Per head of d rows, transformers' row ``j`` is GGUF row ``2j`` and row
``d/2 + j`` is GGUF row ``2j + 1``::

    W.view(heads, 2, d/2, in).transpose(1, 2).reshape(out, in)          # transformers rows -> GGUF rows

A LoRA update ``B @ A`` reorders the same way through B's rows; A is untouched. Architectures whose converter keeps
the rows (qwen2, qwen3, phi3) take them as they are.

Example::

    arch = gguf_arch(config)                       # GgufArch("llama", reorders_qk=True) for a LlamaConfig
    arch.tensor_name("model.layers.0.self_attn.q_proj")   # 'blk.0.attn_q.weight'
    arch.to_gguf_rows("model.layers.0.self_attn.q_proj", B)   # B with its rows in llama.cpp's order
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import gguf
from torch import Tensor

# transformers' model_type -> (llama.cpp architecture, does its converter reorder q / k rows?). Only architectures
# whose LoRA-able weights are stored as single tensors under the gguf package's names; mistral is converted as llama.
ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "llama": ("llama", True),
    "mistral": ("llama", True),
    "qwen2": ("qwen2", False),
    "qwen3": ("qwen3", False),
    "phi3": ("phi3", False),
}

_REORDERED = re.compile(r"\.self_attn\.(?P<which>[qk])_proj$")


class UnsupportedArchitectureError(ValueError):
    """A base model whose GGUF layout lorakit does not know."""


@dataclass(frozen=True)
class GgufArch:
    """A base model's GGUF naming: ``name`` (llama.cpp's architecture), ``n_layers``, whether q / k rows are
    reordered, and the head counts that reordering needs."""

    name: str
    n_layers: int
    reorders_qk: bool
    n_heads: int
    n_kv_heads: int

    @cached_property
    def _names(self) -> gguf.TensorNameMap:
        arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == self.name)
        return gguf.get_tensor_name_map(arch, self.n_layers)

    def tensor_name(self, module_name: str) -> str | None:
        """``blk.N.<kind>.weight`` for a module name (``base_model.model.`` prefix allowed), None if unknown."""
        name = self._names.get_name(module_name.removeprefix("base_model.model."))
        return None if name is None else f"{name}.weight"

    def to_gguf_rows(self, module_name: str, rows: Tensor) -> Tensor:
        """``rows`` (a weight or a LoRA B, one row per output feature of the module) in GGUF row order."""
        match = _REORDERED.search(module_name) if self.reorders_qk else None
        if match is None:
            return rows
        heads = self.n_heads if match["which"] == "q" else self.n_kv_heads
        return interleave_halves(rows, heads)


def interleave_halves(rows: Tensor, heads: int) -> Tensor:
    """Per head of d rows, rows (0..d/2-1, d/2..d-1) -> (0, d/2, 1, d/2+1, ...): transformers' rotary layout to
    llama.cpp's (see the module doc)."""
    out = rows.shape[0]
    if out % (2 * heads):
        raise ValueError(f"{out} rows do not split into {heads} heads of an even size")
    return rows.reshape(heads, 2, out // heads // 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def gguf_arch(config: Any) -> GgufArch:
    """The GGUF naming of a transformers model config; UnsupportedArchitectureError naming the fix if unknown."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"lorakit does not know the GGUF layout of model_type {model_type!r} (known: "
            f"{', '.join(sorted(ARCHITECTURES))}); export --to merged and convert that folder with llama.cpp's "
            "convert_hf_to_gguf.py"
        )
    name, reorders = ARCHITECTURES[model_type]
    heads = config.num_attention_heads
    return GgufArch(name, config.num_hidden_layers, reorders, heads, getattr(config, "num_key_value_heads", heads))


def arch_of_gguf(reader: gguf.GGUFReader) -> GgufArch:
    """The GGUF naming of a model file, from its own metadata; UnsupportedArchitectureError if unknown."""
    name = str(field_value(reader, "general.architecture"))
    reorders = {arch: reorders for arch, reorders in ARCHITECTURES.values()}
    if name not in reorders:
        raise UnsupportedArchitectureError(
            f"lorakit does not know GGUF architecture {name!r} (known: {', '.join(sorted(reorders))}); export --to "
            "merged and convert that folder with llama.cpp's convert_hf_to_gguf.py"
        )
    heads = int(field_value(reader, f"{name}.attention.head_count"))
    return GgufArch(
        name,
        int(field_value(reader, f"{name}.block_count")),
        reorders_qk=reorders[name],
        n_heads=heads,
        n_kv_heads=int(field_value(reader, f"{name}.attention.head_count_kv", heads)),
    )


def field_value(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    """A metadata value of a read GGUF file, ``default`` if the key is absent."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()
