"""An adapter as a llama.cpp LoRA file (GGUF): what ``llama-cli -m BASE.gguf --lora ADAPTER.gguf`` and Ollama's
``ADAPTER`` line load on top of the base model's own GGUF.

llama.cpp reads, per base tensor ``blk.N.attn_q.weight``, the pair ``blk.N.attn_q.weight.lora_a`` (A, ``(r, in)``)
and ``.lora_b`` (B, ``(out, r)``) and adds ``scale * B @ A`` with ``scale = adapter.lora.alpha / r``, r read from
the tensors. lorakit's scaling of a module is ``alpha_m / r_m`` (or ``alpha_m / sqrt(r_m)`` with rsLoRA), alpha_m
and r_m from ``alpha_pattern`` / ``rank_pattern``. With alpha = ``lora_alpha`` in the file, B is written as::

    B_gguf = rows_in_gguf_order(B) * scaling_m / (lora_alpha / r_m)      # llama.cpp's rule then gives scaling_m

so every module's update equals lorakit's (gguf_names.py explains the row order of a llama's q / k).

Example::

    export_gguf_adapter("runs/lorakit/adapter", "runs/adapter.gguf")   # base: the adapter's base_model_name_or_path
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import gguf
from torch import Tensor
from transformers import AutoConfig

from lorakit.adapters.variant_bdlora import dense_factors
from lorakit.config import LoraConfig, base_model_id, read_config, scaling_for
from lorakit.export.gguf_files import GgufTensor, encode, write_gguf
from lorakit.export.gguf_names import GgufArch, UnsupportedArchitectureError, arch_of_gguf, gguf_arch
from lorakit.export.output import check_output_file
from lorakit.export.problems import ExportError, Problem, unmergeable
from lorakit.io import files
from lorakit.io.models import bundled_gguf, is_default_model, resolve_model

ADAPTER_OUTTYPES = ("f32", "f16", "bf16")  # B has r columns: too few for q8_0's blocks of 32
_MERGED_GGUF = "--to merged-gguf (the adapter merged into one GGUF model file)"
KASA = Problem(  # also for --to merged-gguf (lorakit.export.gguf_merged), which merges into the untruncated base
    "a KaSA adapter (kasa_config) has learned singular values between B and A and a truncated base weight, which "
    "neither a llama.cpp LoRA file nor the base model's GGUF file holds",
    "export --to merged (merge_and_unload: the truncated base with the update) and convert it with llama.cpp's "
    "convert_hf_to_gguf.py",
)
REPLICATED = Problem(  # also for --to merged-gguf: the base GGUF it merges into has the original layers only
    "a layer_replication adapter belongs to a deeper model than the base (its copies of layers), which neither a "
    "llama.cpp LoRA file nor the base model's GGUF file holds",
    "export --to merged (merge_and_unload: each replicated layer with its own merged weights) and convert it with "
    "llama.cpp's convert_hf_to_gguf.py",
)


@dataclass(frozen=True)
class GgufAdapterExport:
    """What was written: the file, its architecture, its alpha and how many module pairs it holds."""

    output: Path
    arch: str
    alpha: float
    n_modules: int


def gguf_adapter_problems(config: LoraConfig, tensors: dict[str, Tensor], arch: GgufArch | str) -> list[Problem]:
    """The rules of llama.cpp's LoRA loader that the adapter breaks (``arch`` as a string: the reason the base's
    architecture is unknown)."""
    problems = []
    if isinstance(arch, str):
        problems.append(Problem(f"llama.cpp needs a base architecture lorakit can name: {arch}", "see the reason"))
    if config.use_dora:
        problems.append(Problem("llama.cpp's LoRA files have no DoRA magnitudes (use_dora=True)", _MERGED_GGUF))
    if config.bias != "none":
        problems.append(Problem(f"llama.cpp's LoRA files carry no biases (bias={config.bias!r})", _MERGED_GGUF))
    if config.lora_bias:
        problems.append(Problem("llama.cpp's LoRA files carry no bias on B (lora_bias=True)", _MERGED_GGUF))
    if config.kasa_config:
        problems.append(KASA)
    if config.layer_replication:
        problems.append(REPLICATED)
    problems += unmergeable(config)
    if config.trainable_token_indices:
        problems.append(
            Problem(
                "llama.cpp's LoRA files carry no trained embedding rows "
                f"(trainable_token_indices={config.trainable_token_indices})",
                _MERGED_GGUF,
            )
        )
    if config.target_parameters:
        problems.append(
            Problem(
                "llama.cpp's LoRA files adapt whole matrices, not parameters such as fused expert stacks "
                f"(target_parameters={config.target_parameters})",
                _MERGED_GGUF,
            )
        )
    if config.modules_to_save:
        problems.append(
            Problem(
                f"llama.cpp's LoRA files carry no full modules (modules_to_save={config.modules_to_save})", _MERGED_GGUF
            )
        )
    if files.conv_modules(tensors):
        problems.append(Problem("llama.cpp's LoRA files adapt matrices, not conv layers (nn.Conv1d / 2d / 3d)",
                                _MERGED_GGUF))
    if any(".lora_embedding_" in key for key in tensors):
        problems.append(Problem("lorakit writes no llama.cpp LoRA for embedding layers", _MERGED_GGUF))
    if not isinstance(arch, str):
        unnamed = [name for name in files.lora_pairs(tensors) if arch.tensor_name(name) is None]
        if unnamed:
            problems.append(
                Problem(
                    f"llama.cpp has no tensor for {', '.join(unnamed[:3])}{' ...' if len(unnamed) > 3 else ''}",
                    "leave these modules out of target_modules",
                )
            )
    return problems


def base_arch(base: str) -> GgufArch | str:
    """The GGUF naming of base model ``base`` (an adapter's base_model_id), read from its config alone (no
    weights), or why not."""
    try:
        if is_default_model(base):  # its own GGUF file tells, without building the converted copy
            return arch_of_gguf(gguf.GGUFReader(os.path.join(*bundled_gguf())))
        return gguf_arch(AutoConfig.from_pretrained(resolve_model(base)))
    except (UnsupportedArchitectureError, OSError) as e:
        return str(e)


def gguf_lora_tensors(config: LoraConfig, tensors: dict[str, Tensor], arch: GgufArch) -> list[tuple[str, Tensor]]:
    """``[(gguf name, tensor)]``: A and B of every module, B in GGUF row order with the scaling folded in (see the
    module doc), in float32."""
    alpha = float(config.lora_alpha)
    out = []
    for name, (A, B) in files.lora_pairs(tensors).items():
        A, B = dense_factors(config.use_bdlora, name, A, B)  # BD-LoRA's packed block-diagonal factor, expanded
        r = A.shape[0]
        target = arch.tensor_name(name)
        scaling = scaling_for(config.alpha_for(name), r, config.use_rslora)
        llama_cpp_scale = alpha / r if alpha else 1.0  # llama.cpp: alpha == 0 means scale 1
        B = arch.to_gguf_rows(name, B.detach().float()) * (scaling / llama_cpp_scale)
        out += [(f"{target}.lora_a", A.detach().float()), (f"{target}.lora_b", B)]
    return out


def export_gguf_adapter(
    adapter_dir: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    model: str | None = None,
    outtype: str = "f32",
    overwrite: bool = False,
) -> GgufAdapterExport:
    """Write the adapter in ``adapter_dir`` as a llama.cpp LoRA GGUF file at ``output``.

    ``model``: the base (default: the adapter's base_model_name_or_path); only its config is read. ``outtype``:
    f32 (default, exact), f16 or bf16.

    Raises:
        ExportError: the adapter breaks llama.cpp's rules (DoRA, biases, modules_to_save, embedding LoRA, an
            unknown architecture); every broken rule is listed with its fix. Nothing is written.
        FileExistsError: ``output`` exists and ``overwrite`` is False, or is a folder.
    """
    output = Path(output)
    if outtype not in ADAPTER_OUTTYPES:
        raise ValueError(f"outtype {outtype!r} for a LoRA file: use one of {', '.join(ADAPTER_OUTTYPES)}")
    check_output_file(output, overwrite)
    config = read_config(adapter_dir)
    tensors, _ = files.read_weights(adapter_dir)
    arch = base_arch(base_model_id(adapter_dir, model, config))
    problems = gguf_adapter_problems(config, tensors, arch)
    if problems:
        raise ExportError("llama.cpp (GGUF LoRA)", problems, source=str(adapter_dir))
    assert not isinstance(arch, str)
    written = [GgufTensor(name, *encode(t.numpy(), outtype)) for name, t in gguf_lora_tensors(config, tensors, arch)]
    fields = [
        (gguf.Keys.General.TYPE, gguf.GGUFType.ADAPTER, gguf.GGUFValueType.STRING),
        (gguf.Keys.Adapter.TYPE, "lora", gguf.GGUFValueType.STRING),
        (gguf.Keys.Adapter.LORA_ALPHA, float(config.lora_alpha), gguf.GGUFValueType.FLOAT32),
        (gguf.Keys.General.NAME, f"lorakit adapter {Path(adapter_dir).name}", gguf.GGUFValueType.STRING),
    ]
    if config.base_model_name_or_path:
        fields.append(("general.base_model.0.name", str(config.base_model_name_or_path), gguf.GGUFValueType.STRING))
        fields.append(("general.base_model.count", 1, gguf.GGUFValueType.UINT32))
    write_gguf(output, arch.name, fields, written)
    return GgufAdapterExport(output, arch.name, float(config.lora_alpha), len(written) // 2)
