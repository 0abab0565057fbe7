"""The PEFT workflow, end to end, with lorakit: code written for HF PEFT runs after changing the import.

Runs offline on a small GPT-2 built from a config (no download):

    python examples/seed_workflow.py [WORKDIR]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from lorakit import AutoPeftModelForCausalLM, LoraConfig, TaskType, get_peft_model  # was: from peft import ...


class CountingDataset(torch.utils.data.Dataset):
    """Sequences 'n, n+1, n+2, ...' (mod vocab): easy to learn, so the loss visibly drops."""

    def __init__(self, n: int, length: int, vocab: int) -> None:
        self.rows = [torch.arange(i, i + length) % vocab for i in range(n)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def main(workdir: str | Path) -> dict[str, float]:
    workdir = Path(workdir)
    torch.manual_seed(0)
    # 1. a base model, saved to a folder so that the adapter can name it (base_model_name_or_path)
    config = GPT2Config(vocab_size=64, n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(workdir / "base")
    model = GPT2LMHeadModel.from_pretrained(workdir / "base")

    # 2. describe the adapter and wrap the model
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"], lora_dropout=0.05, task_type=TaskType.CAUSAL_LM)
    model = get_peft_model(model, lora)
    model.print_trainable_parameters()

    # 3. train with transformers.Trainer
    args = TrainingArguments(output_dir=str(workdir / "trainer"), max_steps=30, per_device_train_batch_size=8,
                             learning_rate=5e-3, logging_steps=10, save_strategy="no", report_to=[], use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=CountingDataset(64, 16, config.vocab_size))
    result = trainer.train()
    print(f"train loss {result.training_loss:.3f}")

    # 4. save only the adapter, load it back with the base it names
    model.save_pretrained(workdir / "adapter")
    model = AutoPeftModelForCausalLM.from_pretrained(workdir / "adapter")
    model.eval()

    # 5. generate
    prompt = torch.arange(4, 10).unsqueeze(0)
    out = model.generate(input_ids=prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)
    print("generated:", out[0, prompt.shape[1]:].tolist())

    # 6. manage adapters
    with torch.no_grad():
        adapted = model(input_ids=prompt).logits
    model.merge_adapter()
    with torch.no_grad():
        merged_diff = (model(input_ids=prompt).logits - adapted).abs().max().item()
    model.unmerge_adapter()
    model.load_adapter(workdir / "adapter", adapter_name="copy")
    model.add_weighted_adapter(["default", "copy"], [0.5, 0.5], "avg", combination_type="cat")
    model.set_adapter("avg")
    with torch.no_grad():
        avg_diff = (model(input_ids=prompt).logits - adapted).abs().max().item()
    model.set_adapter("default")
    model.delete_adapter("copy")
    model.delete_adapter("avg")
    plain = model.merge_and_unload()
    with torch.no_grad():
        unload_diff = (plain(input_ids=prompt).logits - adapted).abs().max().item()
    print(f"max |logit diff|: merged {merged_diff:.2e}, average of two copies {avg_diff:.2e}, merged+unloaded "
          f"{unload_diff:.2e}")
    return {"train_loss": result.training_loss, "merged_diff": merged_diff, "avg_diff": avg_diff,
            "unload_diff": unload_diff, "generated": out[0, prompt.shape[1]:].tolist()}


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="lorakit-seed-"))
