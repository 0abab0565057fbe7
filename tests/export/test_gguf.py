"""export.gguf_*: llama.cpp LoRA files and merged GGUF models, checked through transformers' own GGUF reader.

The base is a tiny llama written as GGUF (gguf_helpers.write_tiny_gguf); transformers loads it with its own name map
and its own q / k reordering, which is the independent check of lorakit's layout. "llama.cpp's rule" below is
``W + (alpha / r) * B @ A`` per tensor pair, r read from the tensors, as llama.cpp's loader applies it.
"""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import gguf
import numpy as np
import pytest
import torch
from gguf_helpers import load_gguf_model, write_tiny_gguf
from helpers import input_ids, save_tiny_adapter, save_tiny_folder
from transformers import AutoModelForCausalLM
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

from lorakit import PeftModel
from lorakit.export import gguf_names
from lorakit.export.gguf_adapter import export_gguf_adapter
from lorakit.export.gguf_files import GgufTensor, copied_fields, decode, raw, write_gguf
from lorakit.export.gguf_merged import export_merged_gguf
from lorakit.export.gguf_names import gguf_arch, interleave_halves
from lorakit.export.problems import ExportError

VARIANTS = {
    "plain": dict(target_modules=["q_proj", "k_proj", "v_proj", "down_proj"]),
    "rslora_patterns": dict(
        target_modules="all-linear", use_rslora=True, rank_pattern={"o_proj": 2}, alpha_pattern={"k_proj": 3.0}
    ),
}


@pytest.fixture
def base_dir(tmp_path: Path) -> Path:
    return save_tiny_folder(tmp_path / "base")


@pytest.fixture
def base_gguf(base_dir: Path) -> Path:
    return write_tiny_gguf(AutoModelForCausalLM.from_pretrained(base_dir), base_dir.parent / "base.gguf")


def lorakit_logits(base_dir: Path, adapter_dir: Path) -> torch.Tensor:
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    with torch.no_grad():
        return model(input_ids()).logits


def gguf_logits(path: Path) -> torch.Tensor:
    with torch.no_grad():
        return load_gguf_model(path)(input_ids()).logits


def apply_like_llama_cpp(base_gguf: Path, adapter_gguf: Path, out: Path) -> Path:
    """The base GGUF with every LoRA pair of ``adapter_gguf`` added by llama.cpp's rule (module doc)."""
    adapter = gguf.GGUFReader(adapter_gguf)
    alpha = float(adapter.fields["adapter.lora.alpha"].contents())
    pairs = {t.name: decode(t) for t in adapter.tensors}
    base = gguf.GGUFReader(base_gguf)
    tensors = []
    for t in base.tensors:
        if f"{t.name}.lora_a" not in pairs:
            tensors.append(raw(t))
            continue
        A, B = pairs[f"{t.name}.lora_a"], pairs[f"{t.name}.lora_b"]
        merged = decode(t) + (alpha / A.shape[0]) * (B @ A)
        tensors.append(GgufTensor(t.name, merged.astype(np.float32), gguf.GGMLQuantizationType.F32))
    return write_gguf(out, "llama", list(copied_fields(base)), tensors)


def test_interleave_halves_is_undone_by_transformers_gguf_reader() -> None:
    rows = torch.randn(24, 5)
    for heads in (1, 2, 3):
        ours = interleave_halves(rows, heads).numpy()
        back = LlamaTensorProcessor()._reverse_permute_weights(ours, heads, heads)
        np.testing.assert_array_equal(back, rows.numpy())
    assert not torch.equal(interleave_halves(rows, 2), rows)
    with pytest.raises(ValueError, match="do not split"):
        interleave_halves(torch.randn(10, 3), 3)


def test_tiny_base_gguf_reads_back_with_the_same_logits(base_dir: Path, base_gguf: Path) -> None:
    """The fixture itself: lorakit's names and q / k layout are what transformers' GGUF reader expects, and a
    layout without the reordering would be caught."""
    hf = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    with torch.no_grad():
        expected = hf(input_ids()).logits
    torch.testing.assert_close(gguf_logits(base_gguf), expected, atol=1e-5, rtol=1e-5)
    with mock.patch.dict(gguf_names.ARCHITECTURES, {"llama": ("llama", False)}):
        broken = write_tiny_gguf(hf, base_dir.parent / "broken.gguf")
    assert (gguf_logits(broken) - expected).abs().max() > 1e-3


def test_gguf_adapter_file_has_llama_cpp_keys_names_and_shapes(base_dir: Path, tmp_path: Path) -> None:
    adapter = save_tiny_adapter(base_dir, tmp_path / "adapter", lora_alpha=8, rank_pattern={"v_proj": 2})
    result = export_gguf_adapter(adapter, tmp_path / "adapter.gguf")
    reader = gguf.GGUFReader(result.output)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields["general.type"] == "adapter" and fields["general.architecture"] == "llama"
    assert fields["adapter.type"] == "lora" and fields["adapter.lora.alpha"] == 8.0
    assert reader.fields["adapter.lora.alpha"].types == [gguf.GGUFValueType.FLOAT32]
    shapes = {t.name: [int(n) for n in t.shape] for t in reader.tensors}  # ggml order: (in, out)
    expected = {}
    for layer in range(2):
        for kind, out, r in (("attn_q", 32, 4), ("attn_v", 16, 2)):
            expected[f"blk.{layer}.{kind}.weight.lora_a"] = [32, r]
            expected[f"blk.{layer}.{kind}.weight.lora_b"] = [r, out]
    assert shapes == expected
    assert result.n_modules == 4 and all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in reader.tensors)


@pytest.mark.parametrize("variant", VARIANTS)
def test_llama_cpp_rule_on_the_gguf_adapter_gives_lorakit_logits(
    variant: str, base_dir: Path, base_gguf: Path, tmp_path: Path
) -> None:
    adapter = save_tiny_adapter(base_dir, tmp_path / "adapter", lora_alpha=8, **VARIANTS[variant])
    expected = lorakit_logits(base_dir, adapter)
    exported = export_gguf_adapter(adapter, tmp_path / "adapter.gguf").output
    applied = apply_like_llama_cpp(base_gguf, exported, tmp_path / "applied.gguf")
    torch.testing.assert_close(gguf_logits(applied), expected, atol=1e-4, rtol=1e-4)
    assert (gguf_logits(base_gguf) - expected).abs().max() > 1e-2  # the adapter changes the model


@pytest.mark.parametrize(
    ("options", "rule"),
    [
        (dict(use_dora=True), "DoRA"),
        (dict(bias="all", target_modules=["q_proj"]), "bias='all'"),
        (dict(modules_to_save=["lm_head"]), "modules_to_save"),
        (dict(target_modules=["embed_tokens", "q_proj"]), "embedding"),
    ],
)
def test_what_llama_cpp_rejects_is_an_error_naming_merged_gguf(
    options: dict, rule: str, base_dir: Path, tmp_path: Path
) -> None:
    adapter = save_tiny_adapter(base_dir, tmp_path / "adapter", **options)
    out = tmp_path / "adapter.gguf"
    with pytest.raises(ExportError, match=rule) as caught:
        export_gguf_adapter(adapter, out)
    assert "--to merged-gguf" in str(caught.value)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".adapter.gguf")]


def test_several_broken_rules_are_listed_together(base_dir: Path, tmp_path: Path) -> None:
    adapter = save_tiny_adapter(base_dir, tmp_path / "adapter", use_dora=True, modules_to_save=["lm_head"])
    with pytest.raises(ExportError) as caught:
        export_gguf_adapter(adapter, tmp_path / "adapter.gguf")
    assert len(caught.value.problems) == 2 and "1. " in str(caught.value) and "2. " in str(caught.value)


def test_unknown_architecture_names_the_fix(tmp_path: Path) -> None:
    from helpers import tiny_gpt2

    tiny_gpt2().save_pretrained(tmp_path / "gpt2")
    adapter = save_tiny_adapter(tmp_path / "gpt2", tmp_path / "adapter", target_modules=["c_attn"])
    with pytest.raises(ExportError, match="model_type 'gpt2'.*convert_hf_to_gguf"):
        export_gguf_adapter(adapter, tmp_path / "adapter.gguf")


MERGED_VARIANTS = {
    **VARIANTS,
    "dora": dict(target_modules=["q_proj", "k_proj", "down_proj"], use_dora=True),
    "modules_to_save": dict(target_modules=["k_proj"], modules_to_save=["lm_head"]),
    "embedding": dict(target_modules=["embed_tokens", "q_proj"]),
}


@pytest.mark.parametrize("variant", MERGED_VARIANTS)
def test_merged_gguf_f32_gives_lorakit_logits(variant: str, base_dir: Path, base_gguf: Path, tmp_path: Path) -> None:
    adapter = save_tiny_adapter(base_dir, tmp_path / "adapter", lora_alpha=8, **MERGED_VARIANTS[variant])
    if variant == "modules_to_save":  # a trained head, not the base's copy
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter, is_trainable=True)
        with torch.no_grad():
            model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
        model.save_pretrained(adapter)
    expected = lorakit_logits(base_dir, adapter)
    result = export_merged_gguf(adapter, tmp_path / "merged.gguf", base_gguf=base_gguf, outtype="f32")
    torch.testing.assert_close(gguf_logits(result.output), expected, atol=1e-4, rtol=1e-4)
    assert (gguf_logits(base_gguf) - expected).abs().max() > 1e-2


@pytest.mark.parametrize(("outtype", "tolerance"), [("f16", 1e-3), ("bf16", 8e-3), ("q8_0", 1e-2)])
def test_merged_gguf_types_hold_the_merged_weights_and_copy_the_rest(
    outtype: str, tolerance: float, base_dir: Path, tmp_path: Path
) -> None:
    """Changed tensors dequantize to base + update within the format's precision (relative to the tensor's
    largest value); unchanged tensors keep the base file's type and bytes (here a q8_0 base)."""
    base_q8 = write_tiny_gguf(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "base_q8.gguf", "q8_0")
    adapter = save_tiny_adapter(base_dir, tmp_path / "adapter", lora_alpha=8)
    f32 = export_merged_gguf(adapter, tmp_path / "f32.gguf", base_gguf=base_q8, outtype="f32").output
    typed = export_merged_gguf(adapter, tmp_path / f"{outtype}.gguf", base_gguf=base_q8, outtype=outtype).output
    exact = {t.name: t for t in gguf.GGUFReader(f32).tensors}
    base = {t.name: t for t in gguf.GGUFReader(base_q8).tensors}
    changed = 0
    for t in gguf.GGUFReader(typed).tensors:
        if ".attn_q." in t.name or ".attn_v." in t.name:
            changed += 1
            want = decode(exact[t.name])
            assert t.tensor_type == gguf.GGMLQuantizationType[outtype.upper()]
            assert np.abs(decode(t) - want).max() <= tolerance * np.abs(want).max()
        else:
            assert t.tensor_type == base[t.name].tensor_type
            assert np.array_equal(t.data, base[t.name].data)
    assert changed == 4


def test_merged_gguf_needs_a_base_gguf_for_other_bases(base_dir: Path, tmp_path: Path) -> None:
    adapter = save_tiny_adapter(base_dir, tmp_path / "adapter")
    with pytest.raises(ExportError, match="--base-gguf"):
        export_merged_gguf(adapter, tmp_path / "merged.gguf")


def test_gguf_output_is_never_half_written(base_dir: Path, base_gguf: Path, tmp_path: Path) -> None:
    adapter = save_tiny_adapter(base_dir, tmp_path / "adapter")
    out = tmp_path / "merged.gguf"
    out.write_bytes(b"previous")
    with pytest.raises(FileExistsError, match="overwrite"):
        export_merged_gguf(adapter, out, base_gguf=base_gguf)
    with (
        mock.patch.object(gguf.GGUFWriter, "write_tensors_to_file", side_effect=OSError(28, "No space left")),
        pytest.raises(OSError, match="free some space"),
    ):
        export_merged_gguf(adapter, out, base_gguf=base_gguf, overwrite=True)
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "base.gguf", "merged.gguf"]
    export_merged_gguf(adapter, out, base_gguf=base_gguf, overwrite=True)
    assert gguf.GGUFReader(out).fields["general.architecture"].contents() == "llama"


def test_gguf_arch_of_known_configs() -> None:
    from helpers import tiny_llama

    arch = gguf_arch(tiny_llama().config)
    assert (arch.name, arch.reorders_qk, arch.n_heads, arch.n_kv_heads) == ("llama", True, 4, 2)
    assert arch.tensor_name("base_model.model.model.layers.1.mlp.gate_proj") == "blk.1.ffn_gate.weight"
    assert arch.tensor_name("model.layers.0.self_attn.nonexistent") is None
