"""export.vllm: every vLLM 0.32 rule refuses an offending adapter with its fix and writes nothing; what passes (or is
converted) loads in lorakit and HF PEFT with the logits of the trained model; the --max-lora-rank is vLLM's next one.
The real engine is checked by compat/engines/vllm_check.py (opt-in)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from helpers import CHATML, perturb_, save_tiny_folder, tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.export.problems import ExportError
from lorakit.export.vllm import export_vllm, vllm_max_lora_rank, vllm_problems

IDS = torch.tensor([[7, 8, 9, 10, 11, 12], [20, 21, 22, 23, 24, 25]])
TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture
def base_dir(tmp_path: Path) -> Path:
    return save_tiny_folder(tmp_path / "base")


def train_adapter(base_dir: Path, **options: Any) -> Any:
    """A lorakit model on the base in ``base_dir`` whose LoRA factors are moved off their start (a stand-in for
    training), so that it computes something else than the base."""
    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(**{"r": 4, **options}))
    perturb_([p for name, p in model.named_parameters() if "lora_" in name], seed=2, scale=0.3)
    return model.eval()


def save_adapter(base_dir: Path, folder: Path, **options: Any) -> Path:
    train_adapter(base_dir, **{"target_modules": TARGETS, **options}).save_pretrained(folder)
    return folder


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def base(base_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(base_dir).eval()


def edit_config(folder: Path, **changes: Any) -> None:
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# -- each rule: refused with the rule and its fix, nothing written ------------------------------------------------
RULES = {
    "dora": ({"use_dora": True}, {}, r"DoRA \(use_dora=True\); fix: export the merged model.*--to merged"),
    "bias": ({"bias": "all"}, {}, r"biases \(bias='all'.*--to merged"),
    "modules_to_save": ({"modules_to_save": ["lm_head"]}, {}, r"or 'score'\), not \['lm_head'\].*--to merged"),
    "init": ({"init_lora_weights": "pissa"}, {}, r"init_lora_weights='pissa'.*--initial DIR \(initial_dir=DIR\)"),
    "rank": ({"rank_pattern": {"q_proj": 513}}, {}, r"--max-lora-rank is at most 512.*rank is 513.*--to merged"),
    "lora_bias": ({}, {"lora_bias": True}, r"LoRA bias \(lora_bias\); fix: .*merge_and_unload.*without lora_bias"),
    "layer_replication": ({}, {"layer_replication": [[0, 2]]}, r"support layer_replication; fix: .*merge_and_unload"),
}  # fmt: skip


@pytest.mark.parametrize("rule", RULES)
def test_each_rule_refuses_with_its_fix_and_writes_nothing(base_dir: Path, rule: str) -> None:
    options, json_changes, message = RULES[rule]
    adapter = save_adapter(base_dir, base_dir.parent / "adapter", **options)
    edit_config(adapter, **json_changes)
    with pytest.raises(ExportError, match=rf"cannot export .*adapter for vLLM: 1\. .*{message}") as error:
        export_vllm(adapter, base_dir.parent / "out")
    assert len(error.value.problems) == 1
    assert {p.name for p in base_dir.parent.iterdir()} == {"base", "adapter"}  # no output, no temp folder


def test_all_broken_rules_are_listed_at_once(base_dir: Path) -> None:
    adapter = save_adapter(base_dir, base_dir.parent / "adapter", use_dora=True, modules_to_save=["lm_head"])
    with pytest.raises(ExportError) as error:
        export_vllm(adapter, base_dir.parent / "out")
    assert [p.rule.split(" (")[0] for p in error.value.problems] == [
        "vLLM does not support DoRA",
        "vLLM loads modules_to_save only for a classification head",
    ]
    assert ". 2. vLLM loads modules_to_save" in str(error.value)


def test_problems_are_pure_and_read_the_tensors_ranks() -> None:
    assert vllm_problems(LoraConfig(r=512, rank_pattern={"q_proj": 8})) == []
    assert vllm_problems(LoraConfig(init_lora_weights="gaussian", modules_to_save=["score"])) == []
    assert vllm_problems(LoraConfig(init_lora_weights="kaiming")) == []  # exported as True
    tensors = {"model.q.lora_A.weight": torch.zeros(600, 4), "model.q.lora_B.weight": torch.zeros(4, 600)}
    (problem,) = vllm_problems(LoraConfig(r=8), tensors)
    assert "largest rank is 600" in problem.rule and not problem.convertible


def test_pissa_is_convertible_given_the_initial_adapter_and_its_rank_counts_doubled() -> None:
    (problem,) = vllm_problems(LoraConfig(init_lora_weights="pissa_niter_4"))
    assert problem.convertible and "--initial DIR" in problem.fix
    assert vllm_problems(LoraConfig(init_lora_weights="olora", r=256), initial_dir="runs/init") == []
    (problem,) = vllm_problems(LoraConfig(init_lora_weights="olora", r=257), initial_dir="runs/init")
    assert "largest rank is 514 (doubled by the conversion" in problem.rule and "at most 256" in problem.fix


@pytest.mark.parametrize("init", ["corda", "lora_ga"])
def test_other_base_changing_initializers_are_converted_too(init: str) -> None:
    (problem,) = vllm_problems(LoraConfig(init_lora_weights=init))
    assert problem.convertible and f"init_lora_weights={init!r}" in problem.rule and "--initial DIR" in problem.fix
    assert vllm_problems(LoraConfig(init_lora_weights=init), initial_dir="runs/init") == []


def test_pissa_that_lorakit_cannot_convert_says_merge() -> None:
    config = LoraConfig(init_lora_weights="pissa", use_rslora=True, alpha_pattern={"q_proj": 4})
    (problem,) = vllm_problems(config, initial_dir="runs/init")
    assert "not supported when using `rank_pattern` or `alpha_pattern` together with `use_rslora=True`" in problem.rule
    assert not problem.convertible and "--to merged" in problem.fix


def test_one_classification_head_per_adapter() -> None:
    tensors = {"base_model.model.score.weight": torch.zeros(2, 4), "base_model.model.classifier.weight": torch.zeros(2)}
    (problem,) = vllm_problems(LoraConfig(modules_to_save=["classifier", "score"]), tensors)
    assert "one classification head per adapter; this one saves ['classifier', 'score']" in problem.rule


# -- what passes: the folder, the rank, the command ---------------------------------------------------------------
@pytest.mark.parametrize(("rank", "allowed"), [(1, 1), (2, 8), (12, 16), (16, 16), (300, 320), (321, 512), (512, 512)])
def test_max_lora_rank_is_the_next_allowed_value(rank: int, allowed: int) -> None:
    assert vllm_max_lora_rank(rank) == allowed


def test_max_lora_rank_above_512_is_refused() -> None:
    with pytest.raises(ValueError, match="above vLLM's largest --max-lora-rank 512.*--to merged"):
        vllm_max_lora_rank(513)


@pytest.mark.parametrize(("r", "allowed"), [(12, 16), (300, 320)])
def test_export_names_the_max_lora_rank_and_the_serve_command(base_dir: Path, r: int, allowed: int) -> None:
    adapter = save_adapter(base_dir, base_dir.parent / "adapter", r=r)
    export = export_vllm(adapter, base_dir.parent / "out")
    assert export.max_lora_rank == allowed and export.base == str(base_dir)
    assert export.serve_command == (
        f"vllm serve {base_dir} --enable-lora --lora-modules out={base_dir.parent.resolve() / 'out'} "
        f"--max-lora-rank {allowed}"
    )
    assert {p.name for p in export.output.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}


def test_a_base_not_on_this_machine_is_named_as_it_is(base_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    adapter = save_adapter(base_dir, base_dir.parent / "adapter")
    export = export_vllm(adapter, base_dir.parent / "out", model="nobody/not-cached")
    assert export.base == "nobody/not-cached" and "vllm serve nobody/not-cached --enable-lora" in export.serve_command
    assert "HF_HUB_OFFLINE" not in os.environ  # looked up offline, and the environment restored


def test_patterns_and_rslora_round_trip_in_lorakit_and_peft(base_dir: Path) -> None:
    patterns = dict(rank_pattern={"v_proj": 6}, alpha_pattern={"q_proj": 16})
    trained = train_adapter(base_dir, target_modules=TARGETS, r=4, use_rslora=True, **patterns)
    trained.save_pretrained(base_dir.parent / "adapter")
    out = export_vllm(base_dir.parent / "adapter", base_dir.parent / "out").output
    config = json.loads((out / "adapter_config.json").read_text())
    assert {key: config[key] for key in patterns} == patterns and config["use_rslora"] is True
    want = logits(trained)
    assert (want - logits(base(base_dir))).abs().max() > 1e-2  # the adapter changes the model
    torch.testing.assert_close(logits(PeftModel.from_pretrained(base(base_dir), out).eval()), want, atol=1e-5, rtol=0)
    theirs = peft.PeftModel.from_pretrained(base(base_dir), out).eval()
    torch.testing.assert_close(logits(theirs), want, atol=1e-5, rtol=0)


def test_pissa_with_its_initial_adapter_becomes_a_plain_lora_on_the_original_base(base_dir: Path) -> None:
    torch.manual_seed(1)
    model = get_peft_model(base(base_dir), LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="pissa"))
    model.save_pretrained(base_dir.parent / "initial")  # before training
    perturb_([p for name, p in model.named_parameters() if "lora_" in name], seed=2, scale=0.3)  # "training"
    model.eval().save_pretrained(base_dir.parent / "adapter")
    export = export_vllm(base_dir.parent / "adapter", base_dir.parent / "out", initial_dir=base_dir.parent / "initial")
    config = json.loads((export.output / "adapter_config.json").read_text())
    assert (config["init_lora_weights"], config["r"], config["lora_alpha"], export.max_lora_rank) == (True, 8, 16, 8)
    want = logits(model)
    assert (want - logits(base(base_dir))).abs().max() > 1e-2
    served = PeftModel.from_pretrained(base(base_dir), export.output).eval()  # the ORIGINAL base
    torch.testing.assert_close(logits(served), want, atol=1e-4, rtol=0)
    theirs = peft.PeftModel.from_pretrained(base(base_dir), export.output).eval()
    torch.testing.assert_close(logits(theirs), want, atol=1e-4, rtol=0)


def test_kaiming_by_name_is_exported_as_true(base_dir: Path) -> None:
    adapter = save_adapter(base_dir, base_dir.parent / "adapter", init_lora_weights="kaiming")
    out = export_vllm(adapter, base_dir.parent / "out").output
    assert json.loads((out / "adapter_config.json").read_text())["init_lora_weights"] is True


def test_an_initial_adapter_that_is_not_needed_is_ignored_with_a_warning(base_dir: Path) -> None:
    adapter = save_adapter(base_dir, base_dir.parent / "adapter")
    with pytest.warns(UserWarning, match="initial_dir=.* is not used: init_lora_weights=True leaves the base"):
        out = export_vllm(adapter, base_dir.parent / "out", initial_dir=base_dir.parent / "nowhere").output
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4


def test_the_adapters_tokenizer_goes_along(base_dir: Path) -> None:
    adapter = save_adapter(base_dir, base_dir.parent / "adapter")
    tiny_tokenizer().save_pretrained(adapter)
    out = export_vllm(adapter, base_dir.parent / "out").output
    assert (out / "tokenizer_config.json").is_file()
    assert AutoTokenizer.from_pretrained(out).chat_template == CHATML


def test_output_folder_rules(base_dir: Path) -> None:
    adapter = save_adapter(base_dir, base_dir.parent / "adapter")
    out = base_dir.parent / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"not empty.*--overwrite"):
        export_vllm(adapter, out)
    assert (out / "keep.txt").read_text() == "mine"
    export_vllm(adapter, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "adapter_model.safetensors").is_file()
    with pytest.raises(FileExistsError, match="adapter folder itself"):
        export_vllm(adapter, adapter, overwrite=True)
    (base_dir.parent / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        export_vllm(adapter, base_dir.parent / "file")


def test_a_full_disk_leaves_the_previous_export(base_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC while the folder is written: OutputWriteError naming the folder and the bytes, the old export kept."""
    import errno

    from lorakit.io import files
    from lorakit.io.writes import OutputWriteError

    adapter = save_adapter(base_dir, base_dir.parent / "adapter")
    out = export_vllm(adapter, base_dir.parent / "out").output
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files, "write_adapter", full)
    with pytest.raises(OutputWriteError, match=r"no space left on device \([\d,]+ bytes needed"):
        export_vllm(adapter, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(["adapter", "base", "out"])
