"""transformers.Trainer's own checkpointing on a lorakit model (api/hf_trainer.py): checkpoints hold the adapter in
PEFT's format, resume_from_checkpoint ends where an uninterrupted run ends, load_best_model_at_end loads an adapter;
the patch takes whatever order the user imports things in and touches no other model."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from helpers import input_ids, tiny_gpt2, tiny_llama

import lorakit
from lorakit.io import files

CONFIG = dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, lora_dropout=0.0)


def rows(n: int = 16) -> list[dict[str, torch.Tensor]]:
    ids = input_ids(batch=n, seq=8, seed=3)
    return [{"input_ids": row, "labels": row} for row in ids]


def args(output: Path, **overrides: object) -> transformers.TrainingArguments:
    """Trainer's defaults where users keep them (save_strategy="steps", AdamW, linear schedule), tiny sizes."""
    options: dict = dict(output_dir=str(output), use_cpu=True, report_to=[], per_device_train_batch_size=4,
                         max_steps=6, save_steps=3, logging_steps=1, learning_rate=1e-2, seed=0,
                         dataloader_num_workers=0, disable_tqdm=True)  # fmt: skip
    return transformers.TrainingArguments(**{**options, **overrides})


def trained(output: Path, factory=tiny_llama, config=CONFIG, resume: str | bool | None = None, **overrides):
    torch.manual_seed(0)
    model = lorakit.get_peft_model(factory(0), lorakit.LoraConfig(**config))
    trainer = transformers.Trainer(model=model, args=args(output, **overrides), train_dataset=rows(),
                                   eval_dataset=rows(4))  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=resume)
    return model, trainer


def lora_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2_tied_embeddings"])
def test_checkpoints_hold_the_adapter_in_peft_format(factory, tmp_path: Path) -> None:
    config = CONFIG if factory is tiny_llama else dict(CONFIG, target_modules=["c_attn"])
    trained(tmp_path, factory=factory, config=config)
    checkpoints = sorted(p.name for p in tmp_path.glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-3", "checkpoint-6"]
    for name in checkpoints:
        folder = tmp_path / name
        assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
        assert not (folder / "model.safetensors").exists()
        assert (folder / "adapter_model.safetensors").stat().st_size < 200_000
        tensors, _ = files.read_weights(folder)
        assert tensors and all(".lora_" in key for key in tensors)


def test_resume_from_checkpoint_ends_where_an_uninterrupted_run_ends(tmp_path: Path) -> None:
    whole, _ = trained(tmp_path / "whole")
    first, _ = trained(tmp_path / "cut", max_steps=6, save_steps=3)
    (tmp_path / "cut" / "checkpoint-6").rename(tmp_path / "unused")  # resume from step 3, not from the end
    resumed, _ = trained(tmp_path / "cut", resume=str(tmp_path / "cut" / "checkpoint-3"))
    expected, got = lora_weights(whole), lora_weights(resumed)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=1e-5)
    fresh = lora_weights(lorakit.get_peft_model(tiny_llama(0), lorakit.LoraConfig(**CONFIG)))
    assert any(not torch.equal(fresh[k], got[k]) for k in got)  # training moved the adapter


def test_resume_true_and_load_best_model_at_end(tmp_path: Path) -> None:
    trained(tmp_path, max_steps=3)
    model, trainer = trained(tmp_path, resume=True, eval_strategy="steps", eval_steps=3, save_total_limit=1,
                             load_best_model_at_end=True, metric_for_best_model="eval_loss")  # fmt: skip
    best = trainer.state.best_model_checkpoint
    assert best is not None and Path(best).name in {"checkpoint-3", "checkpoint-6"}
    saved, _ = files.read_weights(best)
    live = {files.file_key(k, "default"): v for k, v in model.named_parameters() if "lora_" in k}
    for key, tensor in saved.items():
        torch.testing.assert_close(live[key], tensor)  # the model ends with the best checkpoint's adapter


SCRIPT = """
import sys; sys.path.insert(0, {tests!r})
import helpers, lorakit
{first}
model = lorakit.get_peft_model(helpers.tiny_llama(0), lorakit.LoraConfig(target_modules=["q_proj"]))
{second}
from transformers.trainer_utils import _is_peft_model
import transformers.trainer as t
print(_is_peft_model(model), t._is_peft_model(model), t.Trainer._save.__name__, _is_peft_model(helpers.tiny_llama(0)))
"""


@pytest.mark.parametrize("trainer_first", [True, False], ids=["trainer_imported_first", "model_created_first"])
def test_trainer_is_patched_whatever_the_import_order(trainer_first: bool, tmp_path: Path) -> None:
    tests = str(Path(__file__).resolve().parents[1])
    imports = "from transformers import Trainer"
    code = SCRIPT.format(tests=tests, first=imports if trainer_first else "", second="" if trainer_first else imports)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split() == ["True", "True", "_save", "False"]
    env["LORAKIT_PATCH_TRAINER"] = "0"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split()[:2] == ["False", "False"]
