"""io/base_rows.py: rows of a model folder's safetensors weights, read by plain file reads, equal the rows of the
tensors saved; in a single file or a sharded checkpoint (index), cast to the caller's dtype, and refused when the
rows asked for do not fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lorakit.io.base_rows import INDEX, SINGLE, BaseWeights


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 5, generator=g),  # odd rows: the last process's chunk is shorter
        "b.weight": torch.randn(6, 3, generator=g).to(torch.bfloat16),
        "norm.weight": torch.randn(5, generator=g),
        "steps": torch.arange(4),  # not floating point: not offered
    }


@pytest.mark.parametrize("sharded", [False, True])
def test_rows_read_equal_the_rows_saved(tmp_path: Path, sharded: bool):
    tensors = _tensors()
    if sharded:
        save_file({k: tensors[k] for k in ("a.weight", "steps")}, tmp_path / "part-1.safetensors")
        save_file({k: tensors[k] for k in ("b.weight", "norm.weight")}, tmp_path / "part-2.safetensors")
        weight_map = {"a.weight": "part-1.safetensors", "steps": "part-1.safetensors",
                      "b.weight": "part-2.safetensors", "norm.weight": "part-2.safetensors"}  # fmt: skip
        (tmp_path / INDEX).write_text(json.dumps({"weight_map": weight_map}))
    else:
        save_file(tensors, tmp_path / SINGLE)
    weights = BaseWeights.open(tmp_path)
    assert weights is not None and set(weights.entries) == {"a.weight", "b.weight", "norm.weight"}
    for key in weights.entries:
        whole = tensors[key]
        for start, stop in [(0, 4), (4, whole.shape[0]), (2, 2)]:
            out = torch.full((stop - start, *whole.shape[1:]), float("nan"), dtype=whole.dtype)
            weights.read_rows(key, start, stop, out)
            assert torch.equal(out, whole[start:stop]), (key, start, stop)


def test_rows_are_cast_to_the_tensor_given(tmp_path: Path):
    tensors = _tensors()
    save_file(tensors, tmp_path / SINGLE)
    out = torch.empty(3, 3, dtype=torch.float32)
    BaseWeights.open(tmp_path).read_rows("b.weight", 3, 6, out)
    assert torch.equal(out, tensors["b.weight"][3:6].float())


def test_a_folder_without_safetensors_has_no_weights(tmp_path: Path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    assert BaseWeights.open(tmp_path) is None


def test_rows_that_do_not_fit_are_refused(tmp_path: Path):
    save_file(_tensors(), tmp_path / SINGLE)
    weights = BaseWeights.open(tmp_path)
    with pytest.raises(ValueError, match=r"a.weight: rows 0:4 of \(7, 5\) do not fit a tensor of \(3, 5\)"):
        weights.read_rows("a.weight", 0, 4, torch.empty(3, 5))


def test_a_file_cut_short_is_named(tmp_path: Path):
    save_file(_tensors(), tmp_path / SINGLE)
    weights = BaseWeights.open(tmp_path)  # header read while the file was whole
    data = (tmp_path / SINGLE).read_bytes()
    last = max(weights.entries.values(), key=lambda e: e.offset)
    (tmp_path / SINGLE).write_bytes(data[: last.offset + 4])
    key = next(k for k, e in weights.entries.items() if e is last)
    with pytest.raises(OSError, match=rf"tensor '{key}' ends before its rows"):
        weights.read_rows(key, 0, last.shape[0], torch.empty(last.shape, dtype=last.dtype))
