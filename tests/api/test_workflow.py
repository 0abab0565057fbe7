"""The seed workflow of the README (examples/seed_workflow.py) runs end to end and its numbers hold."""

import importlib.util
import math
from pathlib import Path

import pytest


@pytest.mark.slow
def test_seed_workflow_example(tmp_path, capsys):
    path = Path(__file__).parents[2] / "examples" / "seed_workflow.py"
    spec = importlib.util.spec_from_file_location("seed_workflow", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(tmp_path)
    out = capsys.readouterr().out
    assert "trainable params: 4,096 || all params: 112,384 || trainable%: 3.6446" in out
    assert math.isfinite(result["train_loss"]) and len(result["generated"]) == 10
    assert result["merged_diff"] < 1e-5 and result["avg_diff"] < 1e-5 and result["unload_diff"] < 1e-5
    assert (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size < 50_000


def test_trainer_keeps_the_columns_of_a_model_without_task_type(tmp_path):
    """Trainer keeps only dataset columns named in model.forward's signature: it must be the base model's."""
    import inspect

    import torch
    from helpers import tiny_gpt2
    from transformers import Trainer, TrainingArguments

    from lorakit import LoraConfig, get_peft_model

    model = get_peft_model(tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn"]))
    assert {"input_ids", "labels", "token_type_ids"} <= set(inspect.signature(model.forward).parameters)
    rows = [{"input_ids": torch.arange(i, i + 8) % 100, "labels": torch.arange(i, i + 8) % 100} for i in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, save_strategy="no",
                             report_to=[], use_cpu=True)
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    Trainer(model=model, args=args, train_dataset=rows).train()
    after = [p for p in model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
