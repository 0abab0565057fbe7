"""What an adapter folder holds: its config, tensor counts, file size, and how large each module's update is.

The size of a module's update is ``||s * B @ A||_F`` with s = alpha / r (or alpha / sqrt(r) with rsLoRA), the
Frobenius norm of the weight change the adapter makes. It is computed from two (r, r) Gram matrices,
``||B A||_F^2 = sum((B^T B) * (A A^T))``, so the dense (out, in) product is never built.

Example::

    print(format_info(adapter_info("runs/lorakit/adapter")))                # the summary
    print(format_info(adapter_info("runs/lorakit/adapter"), modules=True))  # and one line per module
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from torch import Tensor

from lorakit.config import read_config, scaling_for
from lorakit.io import files


def delta_norm(A: Tensor, B: Tensor, scaling: float) -> float:
    """``||scaling * B @ A||_F`` via (r, r) Gram matrices, in float64."""
    A64, B64 = A.detach().double(), B.detach().double()
    squared = ((B64.T @ B64) * (A64 @ A64.T)).sum().clamp_min(0)  # (r, r) * (r, r) -> ||B A||_F^2
    return abs(scaling) * float(squared.sqrt())


def adapter_info(adapter_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """A JSON-ready summary of the adapter saved in ``adapter_dir``.

    Keys: ``path``, ``base_model``, ``peft_type``, ``task_type``, ``use_dora``, ``target_modules`` (as configured),
    ``targets`` ({module leaf name: how many modules of that name carry LoRA}), ``ranks`` ({r: how many modules}),
    ``r``, ``lora_alpha``, ``use_rslora``, ``rank_pattern``, ``alpha_pattern``, ``modules_to_save``, ``n_tensors``,
    ``n_parameters``, ``file``, ``file_size`` (bytes), and ``modules``: ``{name: {"r", "alpha", "scaling",
    "shape" (out, in), "delta_norm"}}`` with the rank read from the tensors themselves.

    Raises:
        AdapterFileError: the folder, its config or its weights are missing or corrupt.
    """
    config = read_config(adapter_dir)
    tensors, source = files.read_weights(adapter_dir)
    modules: dict[str, dict[str, Any]] = {}
    for name, (A, B) in files.lora_pairs(tensors).items():
        r, alpha = A.shape[0], config.alpha_for(name)
        scaling = scaling_for(alpha, r, config.use_rslora)
        modules[name] = {
            "r": r,
            "alpha": alpha,
            "scaling": scaling,
            "shape": [B.shape[0], A.shape[1]],
            "delta_norm": delta_norm(A, B, scaling),
        }
    task = config.task_type
    return {
        "path": str(adapter_dir),
        "base_model": config.base_model_name_or_path,
        "peft_type": config.peft_type.value,
        "task_type": getattr(task, "value", task),
        "use_dora": config.use_dora,
        "target_modules": config.target_modules,
        # a second parameter of one module (target_parameters) is '<module>.base_layer': counted under the module
        "targets": dict(Counter(name.replace(".base_layer", "").rsplit(".", 1)[-1] for name in modules)),
        "target_parameters": config.target_parameters,
        "ranks": dict(Counter(m["r"] for m in modules.values())),
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "use_rslora": config.use_rslora,
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": dict(config.alpha_pattern),
        "modules_to_save": config.modules_to_save,
        "n_tensors": len(tensors),
        "n_parameters": sum(t.numel() for t in tensors.values()),
        "file": source,
        "file_size": Path(source).stat().st_size,
        "modules": modules,
    }


def _size(n_bytes: int) -> str:
    """E.g. 1536 -> '1.5 KB'."""
    size, unit = float(n_bytes), "B"
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            break
        size /= 1024
    return f"{n_bytes} B" if unit == "B" else f"{size:.1f} {unit}"


def format_info(info: dict[str, Any], modules: bool = False) -> str:
    """``adapter_info(...)`` as an aligned, human-readable report: a summary (base, kind, ranks, targets by count,
    size, and the engines that take it when ``info`` has ``engines``); with ``modules`` also one line per module
    (rank, alpha, shape, ||delta W||_F)."""
    kind = "DoRA" if info["use_dora"] else "LoRA"
    ranks = info["ranks"]
    rank = f"r={info['r']}, lora_alpha={info['lora_alpha']:g}"
    if info["use_rslora"]:
        rank += " (rsLoRA: alpha / sqrt(r))"
    if len(ranks) > 1 or (ranks and info["r"] not in ranks):  # rank_pattern: say how many modules have which rank
        rank += "; " + ", ".join(f"r={r} on {n}" for r, n in sorted(ranks.items(), reverse=True)) + " modules"
    targets = info["target_modules"]
    configured = ", ".join(targets) if isinstance(targets, list) else str(targets)
    counts = ", ".join(f"{name} {n}" for name, n in info["targets"].items())
    lines = [
        f"adapter         {info['path']}",
        f"base model      {info['base_model'] or '(not recorded)'}",
        f"kind            {kind}, task {info['task_type'] or '(none)'}",
        f"rank            {rank}",
        f"targets         {len(info['modules'])} modules: {counts or 'none'} (target_modules: {configured})",
    ]
    if info.get("target_parameters"):
        lines.append(f"parameters      {', '.join(info['target_parameters'])} (target_parameters; a rank there counts "
                     "r rows per expert)")
    if info["rank_pattern"]:
        lines.append(f"rank_pattern    {info['rank_pattern']}")
    if info["alpha_pattern"]:
        lines.append(f"alpha_pattern   {info['alpha_pattern']}")
    if info["modules_to_save"]:
        lines.append(f"modules_to_save {', '.join(info['modules_to_save'])}")
    lines.append(
        f"size            {_size(info['file_size'])} in {Path(info['file']).name} ({info['n_parameters']:,} "
        f"parameters in {info['n_tensors']} tensors)"
    )
    for i, line in enumerate(info.get("engines", [])):  # commands.export.engine_lines, set by the CLI
        lines.append(f"{'engines' if i == 0 else '':<16}{line}")
    if not modules:
        lines.append(f"(per-module ranks, shapes and update norms: lorakit info {info['path']} --modules)")
        return "\n".join(lines)
    table = info["modules"]
    lines.append(f"modules         {len(table)} with LoRA, ||delta W||_F = ||scaling * B @ A||_F:")
    width = max((len(name) for name in table), default=0)
    for name, m in table.items():
        shape = "x".join(map(str, m["shape"]))
        lines.append(
            f"  {name:<{width}}  r={m['r']:<3} alpha={m['alpha']:<6g} {shape:>11}  ||dW||={m['delta_norm']:.4g}"
        )
    return "\n".join(lines)
