"""On the real bundled default model (SmolLM2-135M-Instruct, dequantized from its GGUF): a short fine-tune lowers
the eval loss, the adapter round-trips through files and through HF PEFT with equal logits, and merge is exact."""

import json

import pytest
import torch

from lorakit import AutoPeftModelForCausalLM, PeftModel
from lorakit.commands.demo import make_examples
from lorakit.io.models import DEFAULT_MODEL, load_model, load_tokenizer
from lorakit.training.trainer import train

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    for name, n, seed in (("train.jsonl", 48, 0), ("eval.jsonl", 16, 1)):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in make_examples(n, seed)))
    summary = train(data=str(root / "train.jsonl"), eval_data=str(root / "eval.jsonl"), output=str(root / "out"),
                    r=8, alpha=16, dropout=0.0, lr=1e-3, batch_size=4, max_steps=8, max_length=96, progress=False)
    return root, summary


def test_short_fine_tune_lowers_eval_loss(trained):
    _, summary = trained
    assert summary["eval_loss"] < 0.7 * summary["eval_loss_start"], summary
    assert summary["trainable_params"] > 0


def test_adapter_records_the_bundled_base_and_reloads_equal(trained):
    root, summary = trained
    config = json.loads((root / "out" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == DEFAULT_MODEL
    tokenizer = load_tokenizer()
    ids = tokenizer("Rewrite this date: May 1, 2000", return_tensors="pt")["input_ids"]
    tuned = summary["model"].eval()
    with torch.no_grad():
        expect = tuned(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(load_model(), root / "out")
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expect, atol=1e-4, rtol=0)
        auto = AutoPeftModelForCausalLM.from_pretrained(root / "out")  # base resolved from the recorded id, offline
        assert auto.get_base_model().name_or_path == DEFAULT_MODEL
        torch.testing.assert_close(auto(input_ids=ids).logits, expect, atol=1e-4, rtol=0)
        merged = reloaded.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, expect, atol=1e-4, rtol=0)


def test_hf_peft_loads_the_adapter_with_equal_logits(trained):
    peft = pytest.importorskip("peft")
    root, summary = trained
    ids = torch.tensor([[1, 504, 2593, 28, 3108]])
    with torch.no_grad():
        expect = summary["model"].eval()(input_ids=ids).logits
        theirs = peft.PeftModel.from_pretrained(load_model(), str(root / "out"))
        torch.testing.assert_close(theirs(input_ids=ids).logits, expect, atol=1e-4, rtol=0)


PEFT_AUTO = """
import json, sys, torch, peft
model = peft.AutoPeftModelForCausalLM.from_pretrained(sys.argv[1])
with torch.no_grad():
    logits = model(input_ids=torch.tensor([[1, 504, 2593, 28, 3108]])).logits[0, -1]
print(json.dumps({"name": model.get_base_model().name_or_path, "logits": logits.tolist()}))
"""


def test_peft_finds_the_base_by_its_hub_id_offline_from_a_local_copy(trained, tmp_path):
    """The recorded base is the hub id: PEFT's own AutoPeftModelForCausalLM, offline, loads it from a copy in the
    Hugging Face cache (here the bundled copy, linked in), with lorakit's logits. The adapter file names the
    bundled file it was trained on; loading it onto a base lorakit did not load from that file warns."""
    import os
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    from lorakit.io import files
    from lorakit.io.models import bundled_base_tag, resolve_model

    root, summary = trained
    assert files.read_metadata(root / "out")[files.BASE_TAG_KEY] == bundled_base_tag()
    repo = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-135M-Instruct"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    local = resolve_model(DEFAULT_MODEL)
    for name in os.listdir(local):
        (snapshot / name).symlink_to(os.path.join(local, name))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    done = subprocess.run([sys.executable, "-c", PEFT_AUTO, str(root / "out")], capture_output=True, text=True,
                          env=env, check=True, timeout=600)  # fmt: skip
    theirs = json.loads(done.stdout.splitlines()[-1])
    assert theirs["name"] == DEFAULT_MODEL
    with torch.no_grad():
        ours = summary["model"].eval()(input_ids=torch.tensor([[1, 504, 2593, 28, 3108]])).logits[0, -1]
    torch.testing.assert_close(torch.tensor(theirs["logits"]), ours, atol=1e-4, rtol=0)
    with pytest.warns(UserWarning, match="trained on lorakit's bundled default model"):
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(snapshot), root / "out")
