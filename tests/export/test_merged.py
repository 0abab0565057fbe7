"""export.merged: the merged folder is plain transformers, has base + adapter logits, and is written atomically; a
full or read-only disk (by fault injection, and for real on a tmpfs when run as root) is an OutputWriteError naming
the folder and the bytes, the previous folder unchanged."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from helpers import CHATML, mounted_tmpfs, save_tiny_adapter, save_tiny_folder, tiny_llama
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorakit import AdapterFileError, PeftModel
from lorakit.export.merged import merge_adapter_to_folder
from lorakit.io.models import ModelNotFoundError
from lorakit.io.writes import OutputWriteError

IDS = torch.tensor([[7, 8, 9, 10, 11, 12], [20, 21, 22, 23, 24, 25]])


@pytest.fixture
def base_and_adapter(tmp_path: Path) -> tuple[Path, Path]:
    base = save_tiny_folder(tmp_path / "base")
    return base, save_tiny_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "v_proj", "down_proj"])


def reference_logits(base_dir: Path, adapter_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(base logits, base + adapter logits) with the adapter unmerged."""
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    with torch.no_grad():
        tuned = peft(IDS).logits
        with peft.disable_adapter():
            base = peft(IDS).logits
    return base, tuned


def siblings(folder: Path) -> set[str]:
    return {p.name for p in folder.parent.iterdir()}


def test_merged_folder_loads_with_transformers_and_matches_base_plus_adapter(
    base_and_adapter: tuple[Path, Path],
) -> None:
    base_dir, adapter_dir = base_and_adapter
    out = base_dir.parent / "merged"
    assert merge_adapter_to_folder(adapter_dir, out) == out
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    base_logits, tuned_logits = reference_logits(base_dir, adapter_dir)
    with torch.no_grad():
        merged_logits = merged(IDS).logits
    torch.testing.assert_close(merged_logits, tuned_logits, atol=1e-5, rtol=0)
    assert (merged_logits - base_logits).abs().max() > 1e-2  # the adapter changes the model
    assert AutoTokenizer.from_pretrained(out).chat_template == CHATML
    assert siblings(out) == {"base", "adapter", "merged"}  # no temp folder left behind


def test_refuses_non_empty_output_unless_overwrite(base_and_adapter: tuple[Path, Path]) -> None:
    base_dir, adapter_dir = base_and_adapter
    out = base_dir.parent / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"not empty.*--overwrite"):
        merge_adapter_to_folder(adapter_dir, out)
    assert (out / "keep.txt").read_text() == "mine"
    merge_adapter_to_folder(adapter_dir, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert siblings(out) == {"base", "adapter", "merged"}


def test_empty_output_folder_is_fine(base_and_adapter: tuple[Path, Path]) -> None:
    base_dir, adapter_dir = base_and_adapter
    (base_dir.parent / "merged").mkdir()
    merge_adapter_to_folder(adapter_dir, base_dir.parent / "merged")
    assert (base_dir.parent / "merged" / "model.safetensors").is_file()


def test_output_must_not_be_a_file_or_the_adapter(base_and_adapter: tuple[Path, Path]) -> None:
    base_dir, adapter_dir = base_and_adapter
    (base_dir.parent / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        merge_adapter_to_folder(adapter_dir, base_dir.parent / "file")
    with pytest.raises(FileExistsError, match="adapter folder itself"):
        merge_adapter_to_folder(adapter_dir, adapter_dir, overwrite=True)


def test_model_overrides_the_recorded_base(base_and_adapter: tuple[Path, Path]) -> None:
    base_dir, adapter_dir = base_and_adapter
    moved = base_dir.parent / "moved-base"
    shutil.move(base_dir, moved)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        merge_adapter_to_folder(adapter_dir, base_dir.parent / "merged")
    merge_adapter_to_folder(adapter_dir, base_dir.parent / "merged", model=str(moved))
    assert (base_dir.parent / "merged" / "model.safetensors").is_file()


def test_adapter_without_base_needs_model(base_and_adapter: tuple[Path, Path]) -> None:
    _, adapter_dir = base_and_adapter
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    (adapter_dir / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    with pytest.raises(AdapterFileError, match="--model"):
        merge_adapter_to_folder(adapter_dir, adapter_dir.parent / "merged")


def test_crash_while_writing_leaves_no_output(
    base_and_adapter: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    base_dir, adapter_dir = base_and_adapter

    def crash(self: object, folder: str, **kwargs: object) -> None:
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr("transformers.PreTrainedModel.save_pretrained", crash)
    with pytest.raises(OSError, match="disk full"):
        merge_adapter_to_folder(adapter_dir, base_dir.parent / "merged")
    assert siblings(base_dir) == {"base", "adapter"}


# -- a full or read-only disk while the merged folder is written ------------------------------------------------
def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _weights_fail(code: int) -> Callable[..., None]:
    """transformers' safetensors writer on a refusing disk: half the file written, then the Rust writer's error."""

    def save_file(tensors: dict, filename: str, metadata: object = None) -> None:
        Path(filename).write_bytes(b"half")
        raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(code)} (os error {code})")

    return save_file


def _tokenizer_fails(self: object, folder: str, **kwargs: object) -> None:
    (Path(folder) / "tokenizer.json").write_text("{")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _mkdtemp_fails(*args: object, **kwargs: object) -> str:
    raise OSError(errno.EROFS, os.strerror(errno.EROFS))


FAULTS = {
    "weights, full": ("transformers.modeling_utils.safe_save_file", _weights_fail(errno.ENOSPC), errno.ENOSPC),
    "weights, read-only": ("transformers.modeling_utils.safe_save_file", _weights_fail(errno.EROFS), errno.EROFS),
    "tokenizer, full": ("transformers.PreTrainedTokenizerBase.save_pretrained", _tokenizer_fails, errno.ENOSPC),
    "temp folder, read-only": ("tempfile.mkdtemp", _mkdtemp_fails, errno.EROFS),
}
REFUSED = {errno.ENOSPC: "no space left on device", errno.EROFS: "read-only file system"}


def _assert_refused(error: OutputWriteError, out: Path, code: int) -> None:
    """The error names the folder and the merged weights' bytes (tiny llama: 99,968 in fp32)."""
    needed = sum(p.numel() * p.element_size() for p in tiny_llama().parameters())
    assert error.errno == code
    message = str(error)
    assert message.startswith(f"cannot write {out}: {REFUSED[code]} ({needed:,} bytes needed"), message
    assert message.endswith("What was there before is unchanged and the temp files are removed"), message


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_refusing_disk_leaves_the_previous_merged_folder(
    base_and_adapter: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    base_dir, adapter_dir = base_and_adapter
    out = base_dir.parent / "merged"
    merge_adapter_to_folder(adapter_dir, out)
    before = _snapshot(out)
    target, replacement, code = FAULTS[fault]
    with monkeypatch.context() as mp:
        mp.setattr(target, replacement)
        with pytest.raises(OutputWriteError) as caught:
            merge_adapter_to_folder(adapter_dir, out, overwrite=True)
    _assert_refused(caught.value, out, code)
    assert _snapshot(out) == before
    assert siblings(out) == {"base", "adapter", "merged"}  # no temp folder left behind
    AutoModelForCausalLM.from_pretrained(out)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (when the tests run as root; skipped otherwise)."""
    with mounted_tmpfs(tmp_path / "tmpfs", "1m") as mount:
        yield mount


def test_a_real_full_then_read_only_disk(base_and_adapter: tuple[Path, Path], tmpfs: Path) -> None:
    base_dir, adapter_dir = base_and_adapter
    out = tmpfs / "merged"
    merge_adapter_to_folder(adapter_dir, out)
    before = _snapshot(out)
    free = os.statvfs(tmpfs).f_bavail * os.statvfs(tmpfs).f_frsize
    (tmpfs / "ballast").write_bytes(b"\0" * (free - 40_000))  # less room than the 99,968 bytes of weights
    with pytest.raises(OutputWriteError) as caught:
        merge_adapter_to_folder(adapter_dir, out, overwrite=True)
    _assert_refused(caught.value, out, errno.ENOSPC)
    assert _snapshot(out) == before and {p.name for p in tmpfs.iterdir()} == {"merged", "ballast"}
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    with pytest.raises(OutputWriteError) as caught:
        merge_adapter_to_folder(adapter_dir, out, overwrite=True)
    _assert_refused(caught.value, out, errno.EROFS)
    assert _snapshot(out) == before
    AutoModelForCausalLM.from_pretrained(out)
