"""A training checkpoint's adapter files are what save_pretrained writes: PEFT's AutoPeftModel can open a checkpoint
folder as it opens a saved adapter (auto_mapping for a config without task_type, the base file's tag)."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import torch
from helpers import input_ids, tiny_llama

from lorakit import LoraConfig, get_peft_model
from lorakit.io import files
from lorakit.training import checkpoint


def _checkpoint(output: Path, model: object) -> Path:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return checkpoint.save_checkpoint(output, 3, model, "default", optimizer, scheduler, {}, keep=2)


def test_a_checkpoint_records_the_config_save_pretrained_records(tmp_path: Path) -> None:
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    folder = _checkpoint(tmp_path / "run", model)
    ours = json.loads((folder / files.CONFIG_NAME).read_text())
    assert ours["auto_mapping"] == {
        "base_model_class": "LlamaForCausalLM",
        "parent_library": type(tiny_llama()).__module__,
    }
    assert ours == json.loads((saved / files.CONFIG_NAME).read_text())


def test_peft_auto_class_opens_a_checkpoint(tmp_path: Path, monkeypatch: object) -> None:
    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    model = get_peft_model(
        tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    ).eval()
    model.peft_config["default"].base_model_name_or_path = str(base)
    folder = _checkpoint(tmp_path / "run", model)
    theirs = peft.AutoPeftModel.from_pretrained(folder).eval()
    ids = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
