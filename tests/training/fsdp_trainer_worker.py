"""The user's script of README "Several processes" (transformers.Trainer + FSDP2 with a lorakit model), for
tests/training/test_fsdp_trainer.py. Run under torchrun (sharded) or as one plain process (the reference)::

    python fsdp_trainer_worker.py MODEL_FOLDER OUTPUT BATCH_PER_PROCESS

Under torchrun the base is sharded at load by transformers (``from_pretrained(distributed_config=
DistributedConfig(fsdp_size=WORLD_SIZE))``: FSDP2, gloo on CPU); the lorakit adapter added after it stays whole on
every process, and Trainer keeps it equal across them (broadcast from rank 0, gradients averaged). Each process
writes ``OUTPUT/rank-N.json``: what it holds of the base, its adapter parameters, and the losses Trainer logged."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
from transformers.distributed import DistributedConfig

from lorakit import LoraConfig, get_peft_model

STEPS, SAVE_EVERY, ROWS, SEQ = 4, 2, 16, 12


def rows() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(ROWS):
        ids = torch.randint(1, 100, (SEQ,), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def main(folder: str, output: str, batch: int) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    sharding = {"distributed_config": DistributedConfig(fsdp_size=world)} if world > 1 else {}
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **sharding)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    args = TrainingArguments(output_dir=output, per_device_train_batch_size=batch, max_steps=STEPS, learning_rate=5e-3,
                             logging_steps=1, save_steps=SAVE_EVERY, save_only_model=True, report_to=[], use_cpu=True,
                             seed=1, dataloader_drop_last=True)  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=rows())
    trainer.train()
    trainer.save_model(str(Path(output) / "final"))
    frozen = [p for p in model.parameters() if not p.requires_grad]
    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in frozen)
    adapter = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    report = {
        "world": world,
        "base_numel": sum(p.numel() for p in frozen),  # a DTensor's numel is the whole tensor's
        "base_numel_here": local,
        "base_sharded": sum(isinstance(p, DTensor) for p in frozen),
        "base_weights": len(frozen),
        "adapter": {n: {"dtensor": isinstance(p, DTensor), "shape": list(p.shape)} for n, p in adapter},
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
    }
    rank = int(os.environ.get("RANK", "0"))
    (Path(output) / f"rank-{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
