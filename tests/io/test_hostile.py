"""Hostile adapter files: a clear AdapterFileError naming the file, no large allocation (tracemalloc peak), nothing
outside the folder read. Random and mutated bytes: test_fuzz.py; a pickle payload in adapter_model.bin:
test_files.py; remote model code: test_robustness.py."""

from __future__ import annotations

import json
import os
import struct
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import tiny_llama

import lorakit.io.models as models
from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.cli import main
from lorakit.config import read_config
from lorakit.io import files as lio
from lorakit.io.files import AdapterFileError

LIMIT = 20 * 2**20  # bytes a refused file may make lorakit allocate


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "a")
    return tmp_path / "a"


def _refused(load: Callable[[], Any], match: str) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(AdapterFileError, match=match):
            load()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < LIMIT, f"{peak:,} bytes allocated"


def _safetensors(header: dict[str, Any], data: bytes, declared: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if declared is None else declared) + text + data


def test_header_declaring_an_absurd_length(folder: Path) -> None:
    path = folder / lio.WEIGHTS_NAME
    path.write_bytes(_safetensors({}, b"", declared=2**63 - 1))
    _refused(lambda: lio.read_weights(folder), rf"{path} is corrupt or truncated .*header declares 9,223,372,036")
    # a sparse 1 GB file whose header claims most of it: refused before the file is read
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 900 * 2**20))
        f.truncate(2**30)
    _refused(lambda: lio.read_weights(folder), r"header declares 943,718,400 bytes")
    _refused(lambda: PeftModel.from_pretrained(tiny_llama(), folder), lio.WEIGHTS_NAME)


@pytest.mark.parametrize(
    "entries, match",
    [
        ({"a": ([0, 16], [2, 2]), "b": ([8, 24], [2, 2])}, r"tensors 'a' and 'b' overlap"),
        ({"a": ([0, 10**12], [2, 2])}, r"tensor 'a' lies at bytes 0-1,000,000,000,000, outside the file's 32 bytes"),
        ({"a": ([-8, 8], [2, 2])}, r"tensor 'a' lies at bytes -8-8"),
        ({"a": ([0, 16], [10**6, 10**6])}, r"tensor 'a' of shape \[1000000, 1000000\] \(F32\) does not fit its 16"),
        ({"a": ([0, 16], "2x2")}, r"tensor 'a' has an invalid header entry"),
    ],
)
def test_offsets_out_of_range_overlapping_or_not_the_shape(folder: Path, entries: dict, match: str) -> None:
    header = {
        name: {"dtype": "F32", "shape": shape, "data_offsets": offsets} for name, (offsets, shape) in entries.items()
    }
    (folder / lio.WEIGHTS_NAME).write_bytes(_safetensors(header, b"\0" * 32))
    _refused(lambda: lio.read_weights(folder), rf"{folder / lio.WEIGHTS_NAME} is corrupt or truncated: {match}")


def test_a_config_of_hundreds_of_megabytes(folder: Path) -> None:
    path = folder / lio.CONFIG_NAME
    with open(path, "wb") as f:  # sparse: '{"r": 8, "x": "' and then 300 MB of NUL bytes
        f.write(b'{"r": 8, "x": "')
        f.truncate(300 * 2**20)
    _refused(lambda: read_config(folder), rf"{path} is 314,572,800 bytes; an adapter config is a few KB")
    _refused(lambda: PeftModel.from_pretrained(tiny_llama(), folder), lio.CONFIG_NAME)


def test_a_config_nested_a_million_levels_deep(folder: Path) -> None:
    (folder / lio.CONFIG_NAME).write_text("[" * 10**6 + "]" * 10**6)
    with pytest.raises(AdapterFileError, match=rf"{folder / lio.CONFIG_NAME} is not valid JSON"):
        read_config(folder)
    (folder / lio.CONFIG_NAME).write_text('{"r": ' + "[" * 10**6)
    with pytest.raises(AdapterFileError, match=lio.CONFIG_NAME):
        PeftModel.from_pretrained(tiny_llama(), folder)


@pytest.mark.parametrize("name", [lio.WEIGHTS_NAME, lio.CONFIG_NAME])
def test_a_symlink_out_of_the_folder_is_not_followed(folder: Path, tmp_path: Path, name: str) -> None:
    outside = tmp_path / "secret"
    outside.write_bytes((folder / name).read_bytes())  # a valid file: only where it is makes it refused
    (folder / name).unlink()
    os.symlink(outside, folder / name)
    message = rf"{folder / name} is a symlink to {outside}, outside the adapter folder {folder}; lorakit reads nothing"
    with pytest.raises(AdapterFileError, match=message):
        lio.read_weights(folder) if name == lio.WEIGHTS_NAME else read_config(folder)
    with pytest.raises(AdapterFileError, match=message):
        PeftModel.from_pretrained(tiny_llama(), folder)
    # a journal linking out is ignored (as if it were not there), never read
    (folder / name).unlink()
    os.symlink(outside, folder / lio.JOURNAL_NAME)
    (folder / name).write_bytes(outside.read_bytes())
    assert lio.read_config_json(folder)[1] == folder / lio.CONFIG_NAME


def test_symlinks_inside_the_folder_and_a_hub_cache_snapshot_are_fine(folder: Path, tmp_path: Path) -> None:
    snapshot = tmp_path / "hub" / "models--x--y" / "snapshots" / "abc123"
    blobs = tmp_path / "hub" / "models--x--y" / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for name in (lio.WEIGHTS_NAME, lio.CONFIG_NAME):
        (blobs / name).write_bytes((folder / name).read_bytes())
        os.symlink(Path("../../blobs") / name, snapshot / name)
    PeftModel.from_pretrained(tiny_llama(), snapshot)
    (folder / "real.safetensors").write_bytes((folder / lio.WEIGHTS_NAME).read_bytes())
    (folder / lio.WEIGHTS_NAME).unlink()
    os.symlink("real.safetensors", folder / lio.WEIGHTS_NAME)
    PeftModel.from_pretrained(tiny_llama(), folder)


@pytest.mark.parametrize("kind", ["truncated", "corrupted"])
def test_a_truncated_or_corrupted_gguf_as_model(tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Refused by what it is (a file, not a model folder), before a byte of it is read: one line naming it."""
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 64 if kind == "truncated" else os.urandom(4096))
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "a b", "completion": "c"}) + "\n")
    with pytest.raises(models.ModelNotFoundError, match=rf"model '{gguf}' is a GGUF file, not a model folder"):
        models.load_model(str(gguf))
    capsys.readouterr()
    argv = ["train", "--model", str(gguf), "--data", str(data), "--output", str(tmp_path / "out"), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lorakit: error: model '{gguf}' is a GGUF file") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()
