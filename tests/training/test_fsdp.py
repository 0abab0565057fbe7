"""lorakit train --fsdp (training/fsdp.py): the frozen base sharded by FSDP2 over 2 torchrun processes (gloo, CPU)
trains the adapter of a 1-process unsharded run (within 1e-5), each process holding half the base's weights, and a
sharded run resumed from its checkpoint ends with the adapter of the uninterrupted one.

Each process of it has glibc return freed large blocks before its first step (the mallopt of --fsdp).

One sharded run (4 steps, a checkpoint at step 2) is shared by the tests; with the resume, two torchrun runs of about
6 s each on 2 cores."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import save_tiny_folder, save_word_data, tiny_llama
from safetensors.torch import load_file

from lorakit import LoraConfig, get_peft_model
from lorakit.io.base_rows import BaseWeights
from lorakit.io.models import load_model
from lorakit.training import fsdp
from lorakit.training.args import TrainArgs
from lorakit.training.preflight import check_inputs
from lorakit.training.trainer import train

STEPS, SAVE_AT = 4, 2
ADAPTER = "adapter_model.safetensors"




@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fsdp")
    (root / "cfg.yaml").write_text("r: 4\n")  # torchrun's parser takes --r for one of its own options
    data, eval_data = save_word_data(root / "train.jsonl", 24, 0), save_word_data(root / "eval.jsonl", 8, 1)
    return {"root": root, "model": save_tiny_folder(root / "model"), "data": data, "eval": eval_data,
            "config": root / "cfg.yaml"}  # fmt: skip


def _options(inputs: dict[str, Path]) -> list[str]:
    return ["--config", str(inputs["config"]), "--data", str(inputs["data"]), "--eval-data", str(inputs["eval"]),
            "--model", str(inputs["model"]), "--max-steps", str(STEPS), "--save-steps", str(SAVE_AT), "--lr", "5e-3",
            "--dropout", "0", "--seed", "1", "--no-bf16", "--no-progress"]  # fmt: skip


def _torchrun(inputs: dict[str, Path], output: Path, *extra: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "lorakit.cli", "train", *_options(inputs), "--batch-size", "2", "--fsdp", "--output", str(output),
               *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def sharded(inputs: dict[str, Path]) -> Path:
    """The output folder of a 2-process --fsdp run: batch 2 per process."""
    output = inputs["root"] / "sharded"
    _torchrun(inputs, output)
    return output


def _assert_same_adapter(folder: Path, reference: Path, atol: float) -> float:
    a, b = load_file(reference / ADAPTER), load_file(folder / ADAPTER)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=atol, rtol=0)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_two_sharded_processes_equal_one_unsharded_process(inputs, sharded, tmp_path):
    """The same global batch of 4: 2 processes x 2 rows with the base sharded == 1 process x 4 rows, unsharded."""
    one = train(TrainArgs(data=str(inputs["data"]), eval_data=str(inputs["eval"]), model=str(inputs["model"]), r=4,
                          max_steps=STEPS, save_steps=SAVE_AT, lr=5e-3, dropout=0.0, seed=1, bf16=False, progress=False,
                          batch_size=4, output=str(tmp_path / "one")))  # fmt: skip
    diff = _assert_same_adapter(sharded, tmp_path / "one", atol=1e-5)
    summary = json.loads((sharded / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == STEPS
    assert abs(summary["eval_loss"] - one["eval_loss"]) < 1e-5
    assert summary["padding_free"] is one["padding_free"] is True  # the isolation check, run through the root
    print(f"max |2 sharded - 1 unsharded| over the adapter: {diff:.2e}")


def test_each_process_holds_half_of_the_base(sharded):
    """The bytes of frozen base weights each process holds after sharding (its DTensor shards' storage), as the
    run measured and wrote them into summary.json."""
    report = json.loads((sharded / "summary.json").read_text())["fsdp"]
    whole, per_process = report["base_bytes"], report["base_bytes_per_process"]
    assert whole == sum(p.numel() * p.element_size() for p in tiny_llama(0).parameters())
    assert per_process == [whole // 2, whole // 2]  # every weight's dim 0 is even: no padding row
    print(f"frozen base {whole} bytes; per process {per_process}")


def test_each_process_reads_only_its_rows_of_the_base(sharded):
    """Every frozen weight was read by each process as its own rows from model.safetensors (fsdp.read_own_rows), not
    paged in whole from the loaded model (and the run above equals the unsharded one with them)."""
    report = json.loads((sharded / "summary.json").read_text())["fsdp"]
    n = len(list(tiny_llama(0).parameters()))
    assert report["base_weights"] == n and report["base_weights_read_as_rows"] == [n, n]


@pytest.mark.parametrize("rows", [1, 2, 7, 8])
def test_own_rows_are_fsdp2s_chunks(rows):
    """FSDP2 keeps torch.chunk(weight, world)[rank] (padded to the first chunk's size); fewer chunks than processes
    leave the last ones empty."""
    whole = torch.arange(rows)
    for world in (2, 3):
        chunks = torch.chunk(whole, world)
        for rank in range(world):
            start, stop = fsdp.own_rows(rows, rank, world)
            expected = chunks[rank].tolist() if rank < len(chunks) else []
            assert whole[start:stop].tolist() == expected, (rows, world, rank)


def test_a_weight_read_as_rows_holds_the_loaded_rows_and_a_transformed_one_keeps_its_tensor(inputs):
    """Process 1 of 2, without torch.distributed: each frozen weight gets a fresh tensor whose own rows equal the
    loaded ones; a weight whose loaded values differ from its file (as a conversion at load would make them) keeps
    its loaded tensor."""
    model = get_peft_model(load_model(str(inputs["model"])), LoraConfig(r=2, target_modules=["q_proj"]))
    loaded = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    changed = model.get_base_model().model.norm.weight
    with torch.no_grad():
        changed.add_(1.0)
    kept = changed.data_ptr()
    frozen = [p for p in model.parameters() if not p.requires_grad]
    keys = fsdp.base_keys(model)
    assert "model.layers.0.self_attn.q_proj.weight" in keys.values()  # the wrapper's base_layer level dropped
    read = fsdp.read_own_rows(frozen, keys, BaseWeights.open(inputs["model"]), rank=1, world=2)
    assert read == len(frozen) - 1 and changed.data_ptr() == kept and not keys
    for name, p in model.named_parameters():
        if not p.requires_grad and p is not changed:
            start, stop = fsdp.own_rows(p.shape[0], 1, 2)
            assert torch.equal(p.data[start:stop], loaded[name][start:stop]), name


def test_resume_of_a_sharded_run_equals_the_uninterrupted_one(inputs, sharded):
    """The run's folder as it was after step 2 (its checkpoint; the final adapter gone), resumed sharded."""
    resumed = inputs["root"] / "resumed"
    shutil.copytree(sharded, resumed)
    for name in (ADAPTER, "summary.json"):
        (resumed / name).unlink()
    shutil.rmtree(resumed / "checkpoints" / f"step-{STEPS:08d}", ignore_errors=True)
    assert [p.name for p in (resumed / "checkpoints").iterdir()] == [f"step-{SAVE_AT:08d}"]
    _torchrun(inputs, resumed, "--resume")
    assert json.loads((resumed / "summary.json").read_text())["resumed_from"] == SAVE_AT
    _assert_same_adapter(resumed, sharded, atol=1e-6)
    rows = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, STEPS + 1))


# -- what --fsdp refuses, before torch.distributed starts --------------------------------------------------------


def test_fsdp_needs_torchrun_and_an_unquantized_base(inputs, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match=r"--fsdp shards .* this run has one: start it with 'torchrun"):
        check_inputs(TrainArgs(data=str(inputs["data"]), fsdp=True))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"--fsdp with --quantize 4: .* buffers, which FSDP2 does not shard"):
        check_inputs(TrainArgs(data=str(inputs["data"]), fsdp=True, quantize=4))
    check_inputs(TrainArgs(data=str(inputs["data"]), fsdp=True))


def test_blocks_are_the_decoder_layers_and_a_model_without_them_is_refused():
    model = get_peft_model(tiny_llama(0), LoraConfig(r=2, target_modules=["q_proj"]))
    base = model.get_base_model()
    assert fsdp.decoder_blocks(model) == list(base.model.layers)
    base._no_split_modules = None
    with pytest.raises(fsdp.FsdpError, match=r"LlamaForCausalLM names no decoder block class .* without --fsdp"):
        fsdp.decoder_blocks(model)


def test_a_base_of_mixed_dtypes_is_refused():
    model = get_peft_model(tiny_llama(0), LoraConfig(r=2, target_modules=["q_proj"]))
    model.get_base_model().lm_head.to(torch.bfloat16)
    with pytest.raises(fsdp.FsdpError, match=r"mix dtypes \['torch.bfloat16', 'torch.float32'\]"):
        fsdp.shard(model, world=2)


def test_each_process_returns_freed_large_blocks_before_its_first_step(sharded):
    """--fsdp sets glibc's mmap threshold (``fsdp.map_large_allocations``) before the first step, in every process:
    each one, probed after sharding, serves a block freed and allocated again by mmap (``large_allocations_mmapped``,
    written into summary.json); with glibc's default threshold the second block comes from the heap."""
    if fsdp.large_allocations_mmapped() is None:
        pytest.skip("not glibc >= 2.33: the allocator cannot be asked")
    report = json.loads((sharded / "summary.json").read_text())["fsdp"]
    assert report["large_allocations_mmapped"] == [True, True]


def test_the_probe_tells_the_default_threshold_from_a_fixed_one():
    """In processes of their own: glibc's default (dynamic) threshold, mallopt's, and the user's environment."""
    if fsdp.large_allocations_mmapped() is None:
        pytest.skip("not glibc >= 2.33: the allocator cannot be asked")
    code = "from lorakit.training import fsdp; {} print(fsdp.large_allocations_mmapped())"
    clean = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    for setup, env, expected in [("", {}, "False"), ("fsdp.map_large_allocations();", {}, "True"),
                                 ("", {"MALLOC_MMAP_THRESHOLD_": "65536"}, "True")]:  # fmt: skip
        done = subprocess.run([sys.executable, "-c", code.format(setup)], env={**clean, **env}, capture_output=True,
                              text=True)  # fmt: skip
        assert done.stdout.strip() == expected, (setup, env, done.stderr)


@pytest.mark.parametrize(("env", "expected"), [({}, "True"), ({"MALLOC_MMAP_THRESHOLD_": "65536"}, "False")])
def test_large_allocations_are_mmapped_unless_the_user_chose(env, expected):
    """In a process of its own: mallopt changes the whole process's allocator."""
    code = "from lorakit.training.fsdp import map_large_allocations; print(map_large_allocations())"
    clean = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    done = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True)
    assert done.stdout.strip() == expected, done.stderr
