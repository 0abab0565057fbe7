"""``lorakit export ADAPTER --to vllm | gguf | merged | merged-gguf``: one verb for every serving target, and the
lines that serve the result (printed by the CLI).

    vllm         a PEFT folder vLLM loads with --enable-lora          (lorakit.export.vllm)
    gguf         a llama.cpp / Ollama LoRA file for the base's GGUF    (lorakit.export.gguf_adapter)
    merged       base + adapter as a plain transformers folder         (lorakit.export.merged)
    merged-gguf  base + adapter as one GGUF model file                 (lorakit.export.gguf_merged)

Without ``output`` the result goes beside the adapter folder: ``runs/x`` -> ``runs/x-vllm``, ``runs/x.gguf``,
``runs/x-merged``, ``runs/x-merged.gguf``.

Example::

    done = export_adapter("runs/lorakit/adapter", "gguf")
    print("\\n".join(done.serve))   # llama-cli -m .../SmolLM2-135M-Instruct.Q4_1.gguf --lora runs/x/adapter.gguf
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from lorakit.config import base_model_id, read_config
from lorakit.export.gguf_adapter import base_arch, export_gguf_adapter, gguf_adapter_problems
from lorakit.export.gguf_merged import default_base_gguf, export_merged_gguf
from lorakit.export.merged import merge_adapter_to_folder
from lorakit.export.output import default_output
from lorakit.export.vllm import export_vllm, vllm_problems
from lorakit.io import files
from lorakit.io.progress import phase

TARGETS = ("vllm", "gguf", "merged", "merged-gguf")
DEFAULT_OUTTYPE = {"gguf": "f32", "merged-gguf": "f16"}


@dataclass(frozen=True)
class Exported:
    """What ``export_adapter`` wrote (``output``) and the lines that serve it (``serve``)."""

    target: str
    output: Path
    serve: list[str]


def export_adapter(
    adapter_dir: str | os.PathLike[str],
    target: str,
    output: str | os.PathLike[str] | None = None,
    *,
    outtype: str | None = None,
    initial_dir: str | os.PathLike[str] | None = None,
    base_gguf: str | os.PathLike[str] | None = None,
    model: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> Exported:
    """Export the adapter in ``adapter_dir`` for ``target`` (one of TARGETS); see each exporter for its options:
    ``outtype`` (gguf, merged-gguf), ``initial_dir`` (vllm: the adapter saved before training, to convert PiSSA /
    OLoRA / LoftQ), ``base_gguf`` (gguf's serve line, merged-gguf), ``model`` (the base, default: the adapter's)."""
    if target not in TARGETS:
        raise ValueError(f"unknown export target {target!r}: use one of {', '.join(TARGETS)}")
    if outtype is not None and target not in DEFAULT_OUTTYPE:
        raise ValueError(f"--outtype applies to --to gguf and --to merged-gguf, not --to {target}")
    out = Path(output) if output is not None else default_output(adapter_dir, target)
    outtype = outtype or DEFAULT_OUTTYPE.get(target)
    if target == "vllm":
        with phase(f"writing the vLLM adapter folder {out}", show=progress):
            done = export_vllm(adapter_dir, out, initial_dir=initial_dir, model=model, overwrite=overwrite)
        return Exported(target, done.output, [done.serve_command])
    if target == "merged":
        merge_adapter_to_folder(adapter_dir, out, model=model, overwrite=overwrite, progress=progress)
        return Exported(target, out, [f"AutoModelForCausalLM.from_pretrained({str(out)!r})", _cmd("vllm serve", out)])
    base = Path(base_gguf) if base_gguf is not None else default_base_gguf(base_model_id(adapter_dir, model))
    if target == "gguf":
        assert outtype is not None
        with phase(f"writing the llama.cpp LoRA file {out}", show=progress):
            export_gguf_adapter(adapter_dir, out, model=model, outtype=outtype, overwrite=overwrite)
        shown = str(base) if base is not None else "BASE.gguf"
        serve = [
            f"llama-cli -m {shlex.quote(shown)} --lora {shlex.quote(str(out))}",
            *_ollama(f"FROM {shown}", f"ADAPTER {out}"),
        ]
        if base is None:
            serve.append("BASE.gguf: the adapter's base model as GGUF (llama.cpp's convert_hf_to_gguf.py)")
        return Exported(target, out, serve)
    assert outtype is not None
    with phase(f"merging into {base} and writing {out}", show=progress):
        export_merged_gguf(adapter_dir, out, base_gguf=base, model=model, outtype=outtype, overwrite=overwrite)
    return Exported(target, out, [_cmd("llama-cli -m", out), *_ollama(f"FROM {out}")])


def _ollama(*modelfile: str) -> list[str]:
    lines = [f"    {line}" for line in modelfile]
    return ["Ollama: a file named Modelfile holding", *lines, "  then: ollama create NAME -f Modelfile"]


def _cmd(prefix: str, path: Path) -> str:
    return f"{prefix} {shlex.quote(str(path))}"


def engine_lines(adapter_dir: str | os.PathLike[str]) -> list[str]:
    """For ``lorakit info``: which engines take the adapter as it is, and why not where one does not."""
    config = read_config(adapter_dir)
    tensors, _ = files.read_weights(adapter_dir)
    base = base_model_id(adapter_dir, config=config)
    checks = {
        "vLLM (--to vllm)": vllm_problems(config, tensors),
        "llama.cpp / Ollama LoRA (--to gguf)": gguf_adapter_problems(config, tensors, base_arch(base)),
    }
    lines = []
    for engine, problems in checks.items():
        if not problems:
            lines.append(f"{engine}: yes")
        else:
            lines.append(f"{engine}: no")
            lines += [f"    {p}" for p in problems]
    has_gguf = default_base_gguf(base) is not None
    lines.append(f"merged GGUF (--to merged-gguf): {'yes' if has_gguf else 'with --base-gguf FILE (the base as GGUF)'}")
    lines.append("merged transformers folder (--to merged): yes")
    return lines
