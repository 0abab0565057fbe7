"""Base + adapter as one GGUF model file that llama.cpp, Ollama and LM Studio load alone: the base's GGUF with the
tensors the adapter changes replaced.

The base is read from its own GGUF file (for the bundled default model, the bundled SmolLM2 Q4_1 file), so the
vocabulary, chat template and every setting are the base's own, copied key by key. lorakit trained against
transformers' dequantized copy of that same file, so for each module the adapter changes::

    W_merged = dequantize(W_gguf) + rows_in_gguf_order(scaling * B @ A)      # then encoded in --outtype

(DoRA: ``m * (W + scaling * B @ A) / ||W + scaling * B @ A||`` per row; a row's norm does not depend on the row
order.) Full modules saved with the adapter (``modules_to_save``, biases with ``bias="all"``) replace the base's
tensors. Every other tensor is copied byte for byte in its original type.

Example::

    export_merged_gguf("runs/lorakit/adapter", "runs/merged.gguf", outtype="q8_0")
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import Tensor

from lorakit.adapters.variant_bdlora import dense_factors
from lorakit.config import LoraConfig, base_model_id, read_config, scaling_for
from lorakit.export.gguf_adapter import KASA, REPLICATED
from lorakit.export.gguf_files import (
    GgufTensor,
    check_outtype,
    copied_fields,
    decode,
    encode,
    raw,
    write_gguf,
)
from lorakit.export.gguf_names import GgufArch, UnsupportedArchitectureError, arch_of_gguf
from lorakit.export.output import check_output_file
from lorakit.export.problems import ExportError, Problem, unmergeable
from lorakit.io import files
from lorakit.io.models import bundled_gguf, is_default_model
from lorakit.ops import dora

_MAGNITUDE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_magnitude_vector(?:\.weight)?$")
_FULL = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<kind>weight|bias)$")


@dataclass(frozen=True)
class MergedGgufExport:
    """What was written: the file, the base GGUF it came from, and how many tensors the adapter changed."""

    output: Path
    base_gguf: Path
    n_changed: int


def default_base_gguf(base: str) -> Path | None:
    """The GGUF file of base model ``base`` (an adapter's base_model_id) when lorakit knows it (the bundled default
    model), else None."""
    return Path(os.path.join(*bundled_gguf())) if is_default_model(base) else None


def merged_rows(config: LoraConfig, tensors: dict[str, Tensor], arch: GgufArch) -> dict[str, Tensor]:
    """``{gguf tensor name: what to do}`` per tensor the adapter changes, in GGUF row order: a LoRA module maps to
    its update ``scaling * B @ A`` (key ``name``), a DoRA magnitude to ``name + ':magnitude'``, a full tensor saved
    with the adapter to ``name + ':replace'``."""
    out: dict[str, Tensor] = {}
    for module, (A, B) in files.lora_pairs(tensors).items():
        A, B = dense_factors(config.use_bdlora, module, A, B)  # BD-LoRA's packed block-diagonal factor, expanded
        target = _named(arch, module)
        scaling = scaling_for(config.alpha_for(module), A.shape[0], config.use_rslora)
        delta = scaling * (B.detach().double() @ A.detach().double())
        if _is_embedding(tensors, module):
            delta = delta.T  # an embedding's A is (r, vocab), B (dim, r); its weight is (vocab, dim)
        out[target] = arch.to_gguf_rows(module, delta.float())
    for key, tensor in tensors.items():
        if ".lora_" in key and not key.endswith("lora_magnitude_vector"):
            continue
        magnitude = _MAGNITUDE.match(key)
        if magnitude:
            module = magnitude["module"]
            out[_named(arch, module) + ":magnitude"] = arch.to_gguf_rows(module, tensor.detach().float())
        elif (full := _FULL.match(key)) is not None:
            module = full["module"]
            name = _named(arch, module).removesuffix(".weight") + "." + full["kind"]
            out[name + ":replace"] = arch.to_gguf_rows(module, tensor.detach().float())
    return out


def _is_embedding(tensors: dict[str, Tensor], module: str) -> bool:
    return any(f"{prefix}{module}.lora_embedding_A" in tensors for prefix in ("", "base_model.model."))


def _named(arch: GgufArch, module: str) -> str:
    name = arch.tensor_name(module)
    if name is None:
        raise ExportError(
            "GGUF",
            [
                Problem(
                    f"the base GGUF has no tensor for module {module}",
                    "leave it out of target_modules / modules_to_save",
                )
            ],
        )
    return name


def export_merged_gguf(
    adapter_dir: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    base_gguf: str | os.PathLike[str] | None = None,
    model: str | None = None,
    outtype: str = "f16",
    overwrite: bool = False,
) -> MergedGgufExport:
    """Write base + the adapter in ``adapter_dir`` as one GGUF model file at ``output``.

    ``base_gguf``: the base model's GGUF file (default: the bundled file when the base is lorakit's default model).
    ``outtype`` (f32, f16, bf16, q8_0): the type of the changed tensors; the others keep the base file's types.

    Raises:
        ExportError: no base GGUF is known (the fix names ``base_gguf`` / ``--base-gguf``), or the base's
            architecture or a module has no GGUF layout lorakit knows.
        FileExistsError: ``output`` exists and ``overwrite`` is False, or is a folder.
    """
    output = Path(output)
    check_outtype(outtype)
    check_output_file(output, overwrite)
    config = read_config(adapter_dir)
    if refused := unmergeable(config):
        raise ExportError("GGUF", refused, source=str(adapter_dir))
    tensors, _ = files.read_weights(adapter_dir)
    base_id = base_model_id(adapter_dir, model, config)
    base = Path(base_gguf) if base_gguf is not None else default_base_gguf(base_id)
    if base is None:
        raise ExportError(
            "GGUF",
            [
                Problem(
                    f"a merged GGUF is built from the base model's own GGUF file; lorakit has none for "
                    f"{base_id!r}",
                    "pass base_gguf= (CLI: --base-gguf FILE): the base converted once with llama.cpp's "
                    "convert_hf_to_gguf.py",
                )
            ],
            source=str(adapter_dir),
        )
    reader = gguf.GGUFReader(base)
    try:
        arch = arch_of_gguf(reader)
    except UnsupportedArchitectureError as e:
        raise ExportError(
            "GGUF",
            [
                Problem(
                    str(e).split("; ")[0], "export --to merged and convert it with llama.cpp's convert_hf_to_gguf.py"
                )
            ],
        ) from None
    if config.kasa_config:
        raise ExportError("GGUF", [KASA], source=str(adapter_dir))
    if config.layer_replication:
        raise ExportError("GGUF", [REPLICATED], source=str(adapter_dir))
    convs = files.conv_modules(tensors)
    if convs:
        raise ExportError(
            "GGUF",
            [Problem(f"lorakit merges no conv layers (nn.Conv1d / 2d / 3d: {', '.join(convs[:3])}) into a GGUF file",
                     "export --to merged and convert it with llama.cpp's convert_hf_to_gguf.py")],
            source=str(adapter_dir),
        )
    changes = merged_rows(config, tensors, arch)
    base_names = {t.name for t in reader.tensors}
    missing = sorted({name.split(":")[0] for name in changes} - base_names)
    if missing:
        raise ExportError(
            "GGUF",
            [
                Problem(
                    f"{base} has no tensor {', '.join(missing[:3])}",
                    "pass the GGUF file of the adapter's own base model",
                )
            ],
        )
    written = [_merged(t, changes, outtype) for t in reader.tensors]
    n_changed = sum(1 for t in reader.tensors if _changed(t.name, changes))
    write_gguf(output, arch.name, list(copied_fields(reader)), written)
    return MergedGgufExport(output, base, n_changed)


def _changed(name: str, changes: dict[str, Tensor]) -> bool:
    return any(f"{name}{suffix}" in changes for suffix in ("", ":magnitude", ":replace"))


def _merged(tensor: gguf.ReaderTensor, changes: dict[str, Tensor], outtype: str) -> GgufTensor:
    """One tensor of the merged file: the base's bytes, or the changed values encoded in ``outtype``."""
    name = tensor.name
    if not _changed(name, changes):
        return raw(tensor)
    if f"{name}:replace" in changes:
        values = changes[f"{name}:replace"]
    else:
        weight = torch.from_numpy(decode(tensor))
        values = weight + changes.get(name, torch.zeros(()))
        if f"{name}:magnitude" in changes:
            delta = changes.get(name, torch.zeros_like(weight))
            norm = dora.weight_norm(weight, delta)
            values = dora.merge_weight(weight, delta, changes[f"{name}:magnitude"], norm)
    data = np.asarray(values.float().numpy())
    if data.ndim == 1:  # norms and biases stay f32, as llama.cpp's converters keep them
        return GgufTensor(name, data.astype(np.float32), gguf.GGMLQuantizationType.F32)
    return GgufTensor(name, *encode(data, outtype))
