"""The training loop on a tiny model: it learns, writes its records, resumes exactly, stops on NaN, refuses to mix
runs, and gives the same adapter on 2 processes (torchrun) as on 1."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import VOCAB, input_ids, save_tiny_folder, save_word_data, silence_eos_, tiny_llama, tiny_tokenizer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import lorakit.training.precision as precision
import lorakit.training.trainer as trainer
from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.data.tokenize import IGNORE_INDEX, Example
from lorakit.training import plan as step_plan
from lorakit.training.args import TrainArgs
from lorakit.training.loss import lm_loss_sum
from lorakit.training.trainer import TrainingError, train


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    data, eval_data = save_word_data(root / "train.jsonl"), save_word_data(root / "eval.jsonl", 8, seed=1)
    return save_tiny_folder(root / "model"), data, eval_data


def _args(setup, output: Path, **kw) -> TrainArgs:
    model, data, eval_data = setup
    options = dict(data=str(data), eval_data=str(eval_data), model=str(model), output=str(output), r=4, alpha=8,
                   dropout=0.1, batch_size=4, max_steps=8, lr=5e-3, progress=False, seed=3)
    options.update(kw)
    return TrainArgs(**options)


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def test_training_lowers_eval_loss_and_writes_records(setup, tmp_path):
    summary = train(_args(setup, tmp_path / "run", max_steps=30, lr=2e-2, dropout=0.0, eval_steps=10))
    assert summary["eval_loss"] < summary["eval_loss_start"] - 0.2, summary
    for name in ("adapter_model.safetensors", "adapter_config.json", "metrics.jsonl", "summary.json", "loss.png"):
        assert (tmp_path / "run" / name).is_file(), name
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0] == {"step": 0, "eval_loss": summary["eval_loss_start"]}
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 10, 20, 30]
    assert {"loss", "lr", "tokens_per_s"} <= rows[1].keys()
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert written["eval_loss"] == summary["eval_loss"] and written["trainable_params"] > 0
    config = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(setup[0]) and config["r"] == 4


def test_resume_after_interruption_gives_the_same_adapter(setup, tmp_path, monkeypatch):
    train(_args(setup, tmp_path / "full", batch_size=2, grad_accum=2))
    calls = {"n": 0}
    real = trainer.lm_loss_sum

    def crash_at_step_6(model, batch):
        if model.training:
            calls["n"] += 1
            if calls["n"] > 5 * 2:  # 4 rows per step in micro-batches of 2: 2 calls per step
                raise KeyboardInterrupt("simulated kill")
        return real(model, batch)

    monkeypatch.setattr(trainer, "lm_loss_sum", crash_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        train(_args(setup, tmp_path / "cut", save_steps=2, batch_size=2, grad_accum=2))
    monkeypatch.setattr(trainer, "lm_loss_sum", real)
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    summary = train(_args(setup, tmp_path / "cut", save_steps=2, batch_size=2, grad_accum=2, resume=True))
    assert summary["resumed_from"] == 4
    full, resumed = _adapter(tmp_path / "full"), _adapter(tmp_path / "cut")
    assert full.keys() == resumed.keys()
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], atol=1e-5, rtol=0)
    assert any(not torch.equal(v, torch.zeros_like(v)) for v in full.values())


def test_nan_loss_stops_with_the_last_good_checkpoint(setup, tmp_path, monkeypatch):
    real = trainer.lm_loss_sum
    calls = {"n": 0}

    def nan_at_step_5(model, batch):
        loss, n = real(model, batch)
        calls["n"] += model.training
        return (loss * float("nan") if calls["n"] == 5 else loss), n

    monkeypatch.setattr(trainer, "lm_loss_sum", nan_at_step_5)
    with pytest.raises(TrainingError, match=r"step 5: loss nan.*Last good checkpoint: .*step-00000004.*--resume"):
        train(_args(setup, tmp_path / "run", save_steps=2))
    assert (tmp_path / "run" / "checkpoints" / "step-00000004" / "adapter_model.safetensors").is_file()


def test_dora_and_trained_biases_are_saved_as_trained(setup, tmp_path):
    """--use-dora --bias all: magnitudes and every bias train, and the saved adapter loaded onto a fresh copy of the
    base computes what the trained model computes."""
    config = tiny_llama().config
    config.attention_bias = config.mlp_bias = True
    torch.manual_seed(0)
    silence_eos_(LlamaForCausalLM(config)).save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    summary = train(_args((tmp_path / "base", *setup[1:]), tmp_path / "run", use_dora=True, bias="all", max_steps=4))
    saved = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert (saved["use_dora"], saved["bias"]) == (True, "all")
    assert any("lora_magnitude_vector" in k for k in _adapter(tmp_path / "run"))
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    trained = summary["model"].eval()
    before = {n: p for n, p in base.named_parameters() if n.endswith("bias")}
    after = {n.replace(".base_layer", ""): p for n, p in trained.get_base_model().named_parameters()}
    assert len(before) == 2 * 7 and all(not torch.equal(after[n], p) for n, p in before.items())  # 7 per layer
    ids = input_ids()
    with torch.no_grad():
        expected = trained(ids).logits
        assert not torch.allclose(base(ids).logits, expected, atol=1e-3)
        reloaded = PeftModel.from_pretrained(base, tmp_path / "run").eval()
        torch.testing.assert_close(reloaded(ids).logits, expected, atol=1e-5, rtol=0)


def test_output_of_another_run_and_resume_without_checkpoint_are_refused(setup, tmp_path):
    train(_args(setup, tmp_path / "run", max_steps=1))
    with pytest.raises(TrainingError, match="already holds a run.*--overwrite"):
        train(_args(setup, tmp_path / "run", max_steps=1))
    with pytest.raises(TrainingError, match="no checkpoint"):
        train(_args(setup, tmp_path / "run", max_steps=1, resume=True))
    train(_args(setup, tmp_path / "run", max_steps=1, overwrite=True))


def test_packing_trains_on_the_same_tokens(setup, tmp_path):
    summary = train(_args(setup, tmp_path / "run", packing=True, max_length=64, max_steps=2))
    assert summary["n_rows"] < 24  # several examples per row


def _examples(n: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [rng.randrange(3, VOCAB) for _ in range(rng.randint(3, 20))]
        prompt = rng.randint(1, len(ids) - 1)
        out.append(Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return out


def test_padding_free_micro_batch_has_the_padded_loss_and_gradients():
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False)
    peft = get_peft_model(tiny_llama(), config).train()
    micro = sorted(_examples(6, seed=1), key=len, reverse=True)
    padded = step_plan.micro_batch_tensors(micro, 0, padding_free=False)
    free = step_plan.micro_batch_tensors(micro, 0, padding_free=True)
    assert padded["input_ids"].shape == (6, len(micro[0])) and "attention_mask" in padded
    rows, width = free["input_ids"].shape
    assert width == len(micro[0]) and 1 < rows < 6 and "attention_mask" not in free  # rows as long as the longest
    assert sum(len(e) for e in micro) > (rows - 1) * width  # packed: only the last rows can have room left
    results = []
    for batch in (padded, free):
        peft.zero_grad()
        loss, n = lm_loss_sum(peft, batch)
        loss.backward()
        results.append((loss.detach(), n, {k: p.grad.clone() for k, p in peft.named_parameters() if p.requires_grad}))
    (loss_a, n_a, grads_a), (loss_b, n_b, grads_b) = results
    assert n_a == n_b == sum(e.n_trainable for e in micro)
    torch.testing.assert_close(loss_b, loss_a, atol=1e-5, rtol=1e-6)
    assert grads_a.keys() == grads_b.keys() and any(g.abs().sum() > 0 for g in grads_a.values())
    for key in grads_a:
        torch.testing.assert_close(grads_b[key], grads_a[key], atol=1e-5, rtol=0, msg=key)


def test_padding_free_run_gives_the_padded_adapter(setup, tmp_path):
    """2 steps of batch 4 with dropout 0, fp32: the adapters agree within 1e-5."""
    runs = {}
    for padding_free in (False, True):
        out = tmp_path / str(padding_free)
        summary = train(_args(setup, out, max_steps=2, dropout=0.0, bf16=False, padding_free=padding_free))
        assert summary["padding_free"] is padding_free and summary["bf16"] is False
        runs[padding_free] = _adapter(out)
    assert any(not torch.equal(v, torch.zeros_like(v)) for v in runs[True].values())
    for key in runs[False]:
        torch.testing.assert_close(runs[True][key], runs[False][key], atol=1e-5, rtol=0, msg=key)


def test_fp32_by_default_and_bf16_none_follows_the_cpu(setup, tmp_path, monkeypatch):
    for native in (True, False):
        monkeypatch.setattr(precision, "has_native_bf16", lambda native=native: native)
        assert train(_args(setup, tmp_path / f"default{native}", max_steps=1))["bf16"] is False
        assert train(_args(setup, tmp_path / f"auto{native}", max_steps=1, bf16=None))["bf16"] is native
        assert train(_args(setup, tmp_path / f"on{native}", max_steps=1, bf16=True))["bf16"] is True


def test_models_that_mix_packed_rows_pad_or_refuse_packing(setup, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "isolates_packed_rows", lambda model: False)
    assert train(_args(setup, tmp_path / "run", max_steps=1))["padding_free"] is False
    with pytest.raises(TrainingError, match=r"--packing: LlamaForCausalLM lets examples .* run without --packing"):
        train(_args(setup, tmp_path / "packed", max_steps=1, packing=True, max_length=64))


def test_plan_covers_each_row_once_per_epoch():
    plan = step_plan.make_plan(10, TrainArgs(data="x", batch_size=2, grad_accum=2, epochs=2), world=1)
    assert plan.total_steps == 6
    epoch0 = [i for s in range(3) for i in plan.rows_for_step(s)]
    assert sorted(epoch0) == list(range(10))
    assert [i for s in range(3, 6) for i in plan.rows_for_step(s)] != epoch0  # reshuffled


def test_lr_schedule_warmup_then_cosine_to_zero():
    f = step_plan.lr_lambda(TrainArgs(data="x", warmup_ratio=0.2), total_steps=10)
    assert [round(f(s), 3) for s in (0, 1, 2)] == [0.333, 0.667, 1.0]
    assert f(9) < 0.05 and f(5) < f(3)


@pytest.mark.slow
def test_two_processes_equal_one_process(setup, tmp_path):
    """torchrun --nproc_per_node=2 with batch 2 each == 1 process with batch 4 (dropout 0), within 1e-5."""
    # torchrun's own parser takes '--r' for an abbreviation of its options: pass r in the YAML config instead
    (tmp_path / "cfg.yaml").write_text("r: 4\n")
    common = ["--config", str(tmp_path / "cfg.yaml"), "--data", str(setup[1]), "--model", str(setup[0]),
              "--max-steps", "3", "--lr", "5e-3", "--dropout", "0", "--no-progress", "--seed", "1", "--no-bf16"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    one = [sys.executable, "-m", "lorakit.cli", "train", *common, "--batch-size", "4", "--output", str(tmp_path / "1")]
    subprocess.run(one, check=True, env=env, capture_output=True)
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "lorakit.cli", "train", *common, "--batch-size", "2", "--output", str(tmp_path / "2")]
    done = subprocess.run(two, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = _adapter(tmp_path / "1"), _adapter(tmp_path / "2")
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=0)
    assert json.loads((tmp_path / "2" / "summary.json").read_text())["world_size"] == 2
