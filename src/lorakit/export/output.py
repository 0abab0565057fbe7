"""The output of an export (a folder, or one file): checked before anything is read or written, so a wrong path
fails at once."""

from __future__ import annotations

import os
from pathlib import Path

# Where an export goes without --output: beside the adapter folder (runs/x -> runs/x.gguf, runs/x-vllm, ...).
DEFAULT_SUFFIX = {"vllm": "-vllm", "gguf": ".gguf", "merged": "-merged", "merged-gguf": "-merged.gguf"}
FILE_TARGETS = ("gguf", "merged-gguf")  # one file; the others write a folder


def check_output(adapter_dir: Path, output: Path, overwrite: bool) -> None:
    """FileExistsError naming the fix if ``output`` is a file, the adapter folder itself, or a non-empty folder
    (unless ``overwrite``); an empty or missing folder is fine."""
    if output.is_file():
        raise FileExistsError(f"output '{output}' is a file; pass a folder path for the export")
    if output.resolve() == adapter_dir.resolve():
        raise FileExistsError(f"output '{output}' is the adapter folder itself; pass another folder")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise FileExistsError(
            f"output folder '{output}' already exists and is not empty; pass another folder, or overwrite=True "
            "(CLI: --overwrite) to replace it"
        )


def check_output_file(output: Path, overwrite: bool) -> None:
    """FileExistsError naming the fix if ``output`` cannot be written: a folder, or a file and not ``overwrite``."""
    if output.is_dir():
        raise FileExistsError(f"output '{output}' is a folder; pass a file path ending in .gguf")
    if output.exists() and not overwrite:
        raise FileExistsError(
            f"output file '{output}' already exists; pass another path, or overwrite=True (CLI: --overwrite)"
        )


def default_output(adapter_dir: str | os.PathLike[str], target: str) -> Path:
    adapter = Path(adapter_dir).resolve()
    return adapter.with_name(adapter.name + DEFAULT_SUFFIX[target])


def check_export_output(
    adapter_dir: str | os.PathLike[str], target: str, output: str | os.PathLike[str] | None, overwrite: bool
) -> Path:
    """The output path of ``lorakit export --to target`` (default: ``default_output``), checked as a file or a
    folder as the target writes one; returns it."""
    out = Path(output) if output is not None else default_output(adapter_dir, target)
    if target in FILE_TARGETS:
        check_output_file(out, overwrite)
    else:
        check_output(Path(adapter_dir), out, overwrite)
    return out
