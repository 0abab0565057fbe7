"""transformers.Trainer + FSDP2 with a lorakit model (README "Several processes"), on 2 torchrun processes (gloo,
CPU): the base sharded at load by transformers (``DistributedConfig(fsdp_size=2)``), the lorakit adapter whole and
trainable on each process; 2 processes x 2 rows train the adapter of 1 process x 4 rows (within 1e-5), and every
checkpoint is a PEFT adapter folder (no base weights) that lorakit and HF PEFT load back.

The script is tests/training/fsdp_trainer_worker.py; one torchrun run (4 steps, checkpoints at 2 and 4) and one
plain process, shared by the tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
from helpers import save_tiny_folder, tiny_llama
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import lorakit

WORKER = Path(__file__).with_name("fsdp_trainer_worker.py")
ADAPTER, CONFIG = "adapter_model.safetensors", "adapter_config.json"
FOLDERS = ("checkpoint-2", "checkpoint-4", "final")


def _run(command: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fsdp_trainer")
    model = save_tiny_folder(root / "model")
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
          str(model), str(root / "sharded"), "2"])  # fmt: skip
    _run([sys.executable, str(WORKER), str(model), str(root / "one"), "4"])
    return {"model": model, "sharded": root / "sharded", "one": root / "one"}


def _reports(run: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(run.glob("rank-*.json"))]


def test_two_sharded_processes_equal_one_process(runs):
    """The same global batch of 4 rows a step; the adapter of every checkpoint and the losses Trainer logged."""
    diffs = []
    for folder in FOLDERS:
        one, two = load_file(runs["one"] / folder / ADAPTER), load_file(runs["sharded"] / folder / ADAPTER)
        assert one.keys() == two.keys()
        for key in one:
            torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=0)
        diffs.append(max((one[k] - two[k]).abs().max().item() for k in one))
    assert max(abs(v) for k in load_file(runs["one"] / "final" / ADAPTER).values() for v in k.flatten()) > 1e-3
    (one,), sharded = _reports(runs["one"]), _reports(runs["sharded"])
    assert len(one["losses"]) == 4 and all(r["losses"] == sharded[0]["losses"] for r in sharded)
    torch.testing.assert_close(torch.tensor(sharded[0]["losses"]), torch.tensor(one["losses"]), atol=1e-5, rtol=0)
    print(f"max |2 sharded - 1 process| over the adapter, per checkpoint: {diffs}")


def test_the_base_is_sharded_and_the_adapter_stays_whole_and_trainable(runs):
    (one,), sharded = _reports(runs["one"]), _reports(runs["sharded"])
    assert [r["world"] for r in sharded] == [2, 2]
    for report in sharded:
        assert report["base_sharded"] == report["base_weights"] > 0  # every frozen weight a DTensor
        assert report["base_numel_here"] * 2 == report["base_numel"] == one["base_numel"]
        assert report["adapter"] == one["adapter"]  # the same trainable parameters, none of them a DTensor
        assert not any(a["dtensor"] for a in report["adapter"].values())
    assert len(one["adapter"]) == 2 * 2 * 2  # lora_A / lora_B of q_proj and v_proj in 2 layers


def test_each_checkpoint_is_a_peft_adapter_folder_that_loads_back(runs):
    """Adapter files only (no base weights, no FSDP shards), of the size of the adapter's tensors, read back equal
    by lorakit and by HF PEFT."""
    (one,) = _reports(runs["one"])
    adapter_bytes = sum(4 * torch.Size(a["shape"]).numel() for a in one["adapter"].values())  # fp32
    for folder in FOLDERS:
        path = runs["sharded"] / folder
        names = {p.name for p in path.iterdir()}
        assert {ADAPTER, CONFIG} <= names and not any("model" in n and n != ADAPTER for n in names), names
        with open(path / ADAPTER, "rb") as f:
            header = 8 + int.from_bytes(f.read(8), "little")
        assert (path / ADAPTER).stat().st_size - header == adapter_bytes
        saved = load_file(path / ADAPTER)
        assert all(k.startswith("base_model.model.") and ".lora_" in k for k in saved)
        ours = lorakit.PeftModel.from_pretrained(tiny_llama(0), str(path))
        theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(runs["model"]), str(path))
        for model in (ours, theirs):
            state = model.state_dict()
            for key, value in saved.items():
                assert torch.equal(state[key.replace(".weight", ".default.weight")], value), (type(model), key)
