"""commands.info: counts, sizes, per-module ranks and ||s * B @ A||_F against the dense delta of the live model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import tiny_llama

from lorakit import AdapterFileError, LoraConfig, get_peft_model
from lorakit.adapters.layer import LoraLayer
from lorakit.commands.info import adapter_info, delta_norm, format_info
from lorakit.io.files import lora_pairs


def saved_adapter(folder: Path, **config: object) -> dict[str, torch.Tensor]:
    """Save a random adapter on a tiny llama; returns {module name: dense delta weight} from the live model."""
    torch.manual_seed(0)
    options: dict = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft = get_peft_model(tiny_llama(0), LoraConfig(**{**options, **config}))
    peft.save_pretrained(folder)
    prefix = "base_model.model."
    return {
        name.removeprefix(prefix): module.delta_weight("default")
        for name, module in peft.named_modules()
        if isinstance(module, LoraLayer)
    }


def test_delta_norm_equals_dense_frobenius_norm() -> None:
    gen = torch.Generator().manual_seed(0)
    A, B = torch.randn(3, 20, generator=gen), torch.randn(12, 3, generator=gen)
    assert delta_norm(A, B, 0.5) == pytest.approx(torch.linalg.norm(0.5 * B @ A).item(), rel=1e-6)
    assert delta_norm(A, torch.zeros(12, 3), 2.0) == 0.0


def test_info_counts_sizes_ranks_and_norms(tmp_path: Path) -> None:
    deltas = saved_adapter(tmp_path, rank_pattern={"v_proj": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 4})
    info = adapter_info(tmp_path)
    assert info["peft_type"] == "LORA" and info["target_modules"] == ["q_proj", "v_proj"]
    assert info["n_tensors"] == 2 * 4  # 2 layers x (q, v) x (A, B)
    assert info["n_parameters"] == 2 * (4 * (32 + 32) + 2 * (32 + 16))  # q: A (4, 32) B (32, 4); v: A (2, 32) B (16, 2)
    assert info["file_size"] == (tmp_path / "adapter_model.safetensors").stat().st_size
    assert set(info["modules"]) == set(deltas) and len(deltas) == 4
    for name, module in info["modules"].items():
        assert module["r"] == (2 if name.endswith("v_proj") else 4)
        assert module["alpha"] == (4 if name == "model.layers.1.self_attn.q_proj" else 8)
        assert module["shape"] == list(deltas[name].shape)
        assert module["delta_norm"] == pytest.approx(torch.linalg.norm(deltas[name]).item(), rel=1e-5)


def test_rslora_scaling_and_embeddings(tmp_path: Path) -> None:
    deltas = saved_adapter(tmp_path, target_modules=["embed_tokens", "q_proj"], use_rslora=True)
    info = adapter_info(tmp_path)
    embed = info["modules"]["model.embed_tokens"]
    assert embed["shape"] == [32, 100] and embed["scaling"] == pytest.approx(8 / math.sqrt(4))
    for name, module in info["modules"].items():  # embedding delta is stored (vocab, dim); same norm
        assert module["delta_norm"] == pytest.approx(torch.linalg.norm(deltas[name]).item(), rel=1e-5)


def test_lora_pairs_ignores_full_tensors() -> None:
    A, B, head = torch.zeros(2, 4), torch.zeros(3, 2), torch.zeros(5, 4)
    tensors = {
        "base_model.model.m.q.lora_A.weight": A,
        "base_model.model.m.q.lora_B.weight": B,
        "base_model.model.score.weight": head,
    }
    assert list(lora_pairs(tensors)) == ["m.q"] and lora_pairs(tensors)["m.q"][1] is B
    names = [f"base_model.model.layers.{i}.q.lora_{x}.weight" for i in (10, 2) for x in "AB"]
    assert list(lora_pairs(dict.fromkeys(names, A))) == ["layers.2.q", "layers.10.q"]


def test_format_info_starts_with_a_summary(tmp_path: Path) -> None:
    saved_adapter(tmp_path, rank_pattern={"v_proj": 2}, use_dora=True)
    info = adapter_info(tmp_path)
    assert info["targets"] == {"q_proj": 2, "v_proj": 2} and info["ranks"] == {4: 2, 2: 2}
    size = f"{info['file_size'] / 1024:.1f} KB"
    assert format_info(info).splitlines() == [
        f"adapter         {tmp_path}",
        "base model      (not recorded)",
        "kind            DoRA, task (none)",
        "rank            r=4, lora_alpha=8; r=4 on 2, r=2 on 2 modules",
        "targets         4 modules: q_proj 2, v_proj 2 (target_modules: q_proj, v_proj)",
        "rank_pattern    {'v_proj': 2}",
        f"size            {size} in adapter_model.safetensors ({info['n_parameters']:,} parameters in 12 tensors)",
        f"(per-module ranks, shapes and update norms: lorakit info {tmp_path} --modules)",
    ]


def test_format_info_lists_each_module_with_its_rank(tmp_path: Path) -> None:
    saved_adapter(tmp_path, rank_pattern={"v_proj": 2})
    text = format_info(adapter_info(tmp_path), modules=True)
    assert "r=4, lora_alpha=8" in text and "rank_pattern    {'v_proj': 2}" in text
    lines = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ")}
    assert "r=2" in lines["model.layers.0.self_attn.v_proj"] and "r=4" in lines["model.layers.1.self_attn.q_proj"]
    assert "||dW||=" in lines["model.layers.0.self_attn.v_proj"]


def test_missing_or_corrupt_adapter(tmp_path: Path) -> None:
    with pytest.raises(AdapterFileError, match="does not exist"):
        adapter_info(tmp_path / "nope")
    saved_adapter(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(AdapterFileError, match="corrupt or truncated"):
        adapter_info(tmp_path)
