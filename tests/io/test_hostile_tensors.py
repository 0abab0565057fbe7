"""Adapter files whose tensors have a dtype or shape other than the format and the config imply: integer or bool
weights, LoRA tensors that are not matrices, A and B of two ranks, B or A sized for another model. Each is an
AdapterFileError naming the file, the tensor and what it should be (the file-level ones on the safetensors header,
before the data is read); float64 / float16 / bfloat16 weights are cast to the module's dtype, as PEFT does."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import tiny_llama
from safetensors.torch import load_file, save_file
from torch import Tensor

import lorakit.io.files as lio
from lorakit import AdapterFileError, LoraConfig, PeftModel, get_peft_model

MODULE = "base_model.model.model.layers.0.self_attn.q_proj"
A, B = f"{MODULE}.lora_A.weight", f"{MODULE}.lora_B.weight"  # (4, 32), (32, 4)


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("hostile") / "good"
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(tiny_llama(), config).save_pretrained(folder)
    return folder


def _hostile(good: Path, folder: Path, change: Callable[[dict[str, Tensor]], None]) -> Path:
    shutil.copytree(good, folder)
    tensors = load_file(good / lio.WEIGHTS_NAME)
    change(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / lio.WEIGHTS_NAME, metadata={"format": "pt"})
    return folder


def _set(key: str, make: Callable[[Tensor], Tensor]) -> Callable[[dict[str, Tensor]], None]:
    def change(tensors: dict[str, Tensor]) -> None:
        tensors[key] = make(tensors[key])

    return change


NOT_FLOAT = r"tensor '{key}' is {dtype}, but an adapter's weights are floating point \(float32, float16 or bfloat16\)"
NOT_MATRIX = r"tensor '{key}' has shape {shape}, but a LoRA {which} is a matrix {expected}"
OTHER_MODEL = r"module 'model.layers.0.self_attn.q_proj' expects '{leaf}' of shape {want} in this model, but the " \
              r"adapter holds {got}"  # fmt: skip
CASES = {
    "lora_A int32": (_set(A, lambda t: (t * 100).to(torch.int32)), NOT_FLOAT.format(key=A, dtype="int32")),
    "lora_B int64": (_set(B, lambda t: (t * 100).long()), NOT_FLOAT.format(key=B, dtype="int64")),
    "lora_A bool": (_set(A, lambda t: t > 0), NOT_FLOAT.format(key=A, dtype="bool")),
    "lora_A uint8": (_set(A, lambda t: t.abs().mul(100).to(torch.uint8)), NOT_FLOAT.format(key=A, dtype="uint8")),
    "lora_A 3-d": (_set(A, lambda t: t[None]),
                   NOT_MATRIX.format(key=A, shape=r"\(1, 4, 32\)", which="A", expected=r"\(r, in_features\)")),
    "lora_A scalar": (_set(A, lambda t: t[0, 0]),
                      NOT_MATRIX.format(key=A, shape=r"\(\)", which="A", expected=r"\(r, in_features\)")),
    "lora_B 4-d": (_set(B, lambda t: t[:, :, None, None]),
                   NOT_MATRIX.format(key=B, shape=r"\(32, 4, 1, 1\)", which="B", expected=r"\(out_features, r\)")),
    "A and B of two ranks": (_set(B, lambda t: t[:, :3]),
                             r"module 'model.layers.0.self_attn.q_proj' holds 'lora_A.weight' of shape \(4, 32\) "
                             r"\(rank 4\) and 'lora_B.weight' of shape \(32, 3\) \(rank 3\); A \(r, in\) and B "
                             r"\(out, r\) share one rank r"),
    "lora_B for a wider model": (_set(B, lambda t: torch.cat([t, t[:1]])),
                                 OTHER_MODEL.format(leaf="lora_B.weight", want=r"\(32, 4\)", got=r"\(33, 4\)")),
    "lora_A for a narrower model": (_set(A, lambda t: t[:, :31]),
                                    OTHER_MODEL.format(leaf="lora_A.weight", want=r"\(4, 32\)", got=r"\(4, 31\)")),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_a_tensor_of_another_dtype_or_shape_is_refused_naming_file_and_tensor(good, tmp_path, case):
    change, expected = CASES[case]
    folder = _hostile(good, tmp_path / "adapter", change)
    with pytest.raises(AdapterFileError, match=rf"^{folder / lio.WEIGHTS_NAME}: {expected}"):
        PeftModel.from_pretrained(tiny_llama(), folder)


@pytest.mark.parametrize("case", ["lora_A int32", "lora_A 3-d", "A and B of two ranks"])
def test_file_level_misfits_are_refused_on_the_header_before_the_data_is_read(good, tmp_path, monkeypatch, case):
    change, expected = CASES[case]
    folder = _hostile(good, tmp_path / "adapter", change)

    def no_read(data: bytes) -> None:
        raise AssertionError("the tensors were read")

    monkeypatch.setattr(lio, "st_load", no_read)
    with pytest.raises(AdapterFileError, match=expected):
        lio.read_weights(folder)


def test_a_legacy_bin_with_integer_weights_is_refused(good, tmp_path):
    folder = tmp_path / "adapter"
    shutil.copytree(good, folder)
    tensors = load_file(folder / lio.WEIGHTS_NAME)
    (folder / lio.WEIGHTS_NAME).unlink()
    torch.save({**tensors, B: tensors[B].to(torch.int16)}, folder / lio.LEGACY_WEIGHTS_NAME)
    with pytest.raises(AdapterFileError, match=rf"^{folder / lio.LEGACY_WEIGHTS_NAME}: tensor '{B}' is int16"):
        PeftModel.from_pretrained(tiny_llama(), folder)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_float_weights_of_another_precision_are_cast_to_the_modules_dtype(good, tmp_path, dtype):
    folder = _hostile(good, tmp_path / "adapter", lambda tensors: tensors.update(
        {k: v.to(dtype) for k, v in tensors.items()}))  # fmt: skip
    stored = load_file(folder / lio.WEIGHTS_NAME)
    model = PeftModel.from_pretrained(tiny_llama(), folder)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.dtype == torch.float32
    torch.testing.assert_close(layer.lora_A["default"].weight, stored[A].float(), atol=0, rtol=0)
    torch.testing.assert_close(layer.lora_B["default"].weight, stored[B].float(), atol=0, rtol=0)
