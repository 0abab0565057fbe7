"""The output of an export (a folder, or one file): checked before anything is read or written, so a wrong path
fails at once."""

from __future__ import annotations

from pathlib import Path


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
