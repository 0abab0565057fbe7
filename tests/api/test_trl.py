"""TRL's SFTTrainer given a lorakit model, as users run it with a PEFT model: completion-only loss on chat data,
checkpoints holding the adapter, and the same training as with HF PEFT's model on the same weights and data."""

from __future__ import annotations

import warnings
from pathlib import Path

import peft
import pytest
import torch
from datasets import Dataset
from helpers import tiny_llama, tiny_tokenizer

import lorakit

trl = pytest.importorskip("trl")

CONFIG = dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, lora_dropout=0.0)
CHATS = [
    {"prompt": [{"role": "user", "content": f"say {w}"}], "completion": [{"role": "assistant", "content": f"{w} {w}"}]}
    for w in ("a", "b", "c", "d", "e", "f", "g", "h")
]


def sft(model: torch.nn.Module, output: Path, bf16: bool = False) -> trl.SFTTrainer:
    """4 steps of plain SGD in fp32 (updates linear in the gradients, so equal gradients give equal weights; AdamW
    would amplify float rounding in near-zero gradients, and TRL's default bf16 autocast rounds differently along
    lorakit's and PEFT's code paths)."""
    args = trl.SFTConfig(output_dir=str(output), max_steps=4, save_steps=2, per_device_train_batch_size=4,
                         learning_rate=0.5, optim="sgd", bf16=bf16, use_cpu=True, report_to=[], max_length=64,
                         logging_steps=1, seed=0, disable_tqdm=True)  # fmt: skip
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(CHATS),
                             processing_class=tiny_tokenizer(True))  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return trainer


def lora(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.named_parameters() if "lora_" in k}


def test_sft_trainer_trains_a_lorakit_model_as_it_trains_peft_s(tmp_path: Path) -> None:
    ours = sft(lorakit.get_peft_model(tiny_llama(0), lorakit.LoraConfig(**CONFIG)), tmp_path / "lorakit")
    theirs = sft(peft.get_peft_model(tiny_llama(0), peft.LoraConfig(**CONFIG)), tmp_path / "peft")
    losses = [[log["loss"] for log in t.state.log_history if "loss" in log] for t in (ours, theirs)]
    assert len(losses[0]) == 4 and losses[0] == pytest.approx(losses[1], rel=1e-5)
    batch = ours.data_collator([ours.train_dataset[i] for i in range(4)])
    assert (batch["labels"] == -100).any() and (batch["labels"] != -100).any()  # prompts are not scored
    mine, reference = lora(ours.model), lora(theirs.model)
    assert mine.keys() == reference.keys()
    for key in mine:
        torch.testing.assert_close(mine[key], reference[key], atol=1e-5, rtol=1e-4)
    start = lora(lorakit.get_peft_model(tiny_llama(0), lorakit.LoraConfig(**CONFIG)))
    assert any(not torch.equal(start[k], mine[k]) for k in mine)
    for step in ("checkpoint-2", "checkpoint-4"):
        folder = tmp_path / "lorakit" / step
        assert (folder / "adapter_model.safetensors").is_file() and not (folder / "model.safetensors").exists()


def test_sft_trainer_default_bf16_trains_within_bf16_rounding_of_peft(tmp_path: Path) -> None:
    """TRL's default on a CPU with bf16: autocast. lorakit's and PEFT's paths round differently there; the losses
    stay within bf16's precision of each other (measured: 1.5e-4 relative)."""
    ours = sft(lorakit.get_peft_model(tiny_llama(0), lorakit.LoraConfig(**CONFIG)), tmp_path / "lorakit", bf16=True)
    theirs = sft(peft.get_peft_model(tiny_llama(0), peft.LoraConfig(**CONFIG)), tmp_path / "peft", bf16=True)
    losses = [[log["loss"] for log in t.state.log_history if "loss" in log] for t in (ours, theirs)]
    assert losses[0] == pytest.approx(losses[1], rel=4e-3)
