"""Bad inputs the other test files do not cover yet: each gives a specific exception whose message names the value and
the fix, and on the command line one ``lorakit: error:`` line with exit code 2. Also: adapter names cannot reach
outside the save folder, and remote model code is off by default.

Where the other cases live (not repeated here):

- invalid LoraConfig values (r <= 0, unknown bias, dropout outside [0, 1), alpha <= 0, unknown init_lora_weights):
  test_config.py::test_invalid_values_name_field_and_fix (Python API); the CLI's ``--r 0``: test_cli.py
- a target that matches nothing, with close names:
  test_model.py::test_target_typo_is_an_error_with_suggestion_even_when_others_match
- an adapter for a base of other shapes: test_io.py::test_adapter_for_other_shapes_names_module_and_both_shapes
- truncated / corrupt adapter_model.safetensors: test_io.py::test_truncated_weights_name_the_file; CLI eval /
  generate / merge: test_cli.py; random and mutated bytes: test_fuzz.py
- invalid adapter_config.json: test_io.py::test_invalid_config_names_the_file; random bytes: test_fuzz.py
- missing adapter folder: test_io.py::test_missing_folder_and_missing_config; CLI: test_cli.py::test_eval_errors
- data files missing / empty / malformed / in no known format / all longer than max_length: test_data.py
  (test_load_missing_file, test_load_empty, test_load_malformed_jsonl_names_line, test_detect_format,
  test_all_dropped_raises); CLI eval with missing, malformed and unknown-format files: test_cli.py::test_eval_errors
- --resume with no checkpoint, an --output holding another run (Python API):
  test_trainer.py::test_output_of_another_run_and_resume_without_checkpoint_are_refused
- a pickle payload in adapter_model.bin never runs: test_io.py::test_legacy_bin_is_loaded_without_running_code
- adapter names with '/', '..' refused by add_adapter:
  test_model.py::test_adapter_names_that_could_escape_a_folder_are_refused
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from helpers import _build, _llama_config, save_tiny_adapter, save_tiny_folder, tiny_llama, tiny_tokenizer
from transformers import LlamaForCausalLM

import lorakit.io.models as models
from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.cli import main
from lorakit.io.files import AdapterError
from lorakit.training.args import TrainArgs
from lorakit.training.trainer import RUN_NAME, TrainingError, train

_PROGRESS = re.compile(r"^[\w ]+: +\d+%\|.*\| \d+/\d+ \[")  # a tqdm bar: 'Loading weights: 100%|###| 21/21 [...'
RECORD = {"prompt": "the cat sat on a mat", "completion": "hello world"}


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """base/ + adapter/ on it, wide/ (hidden 48), data files, broken adapters, and run/: a finished 2-step run
    with checkpoints."""
    w = tmp_path_factory.mktemp("robust")
    save_tiny_adapter(save_tiny_folder(w / "base"), w / "adapter")
    _build(LlamaForCausalLM, _llama_config(hidden_size=48), 0).save_pretrained(w / "wide")
    tiny_tokenizer().save_pretrained(w / "wide")
    (w / "data.jsonl").write_text((json.dumps(RECORD) + "\n") * 6)
    (w / "empty.jsonl").write_text("\n\n")
    for name, text in {"not-json": "{oops", "bad-bias": None, "zero-r": None}.items():
        shutil.copytree(w / "adapter", w / name)
        config = json.loads((w / "adapter" / "adapter_config.json").read_text())
        config.update({"bad-bias": {"bias": "some"}, "zero-r": {"r": 0}}.get(name, {}))
        (w / name / "adapter_config.json").write_text(text or json.dumps(config))
    assert main(_train(w, "run", "--save-steps", "1")) == 0
    return w


def _train(w: Path, output: str, *extra: str, data: str = "data.jsonl") -> list[str]:
    return ["train", "--model", str(w / "base"), "--data", str(w / data), "--output", str(w / output), "--r", "4",
            "--max-steps", "2", "--no-progress", *extra]  # fmt: skip


def _cases(w: Path) -> list[tuple[list[str], str]]:
    eval_on = ["--data", str(w / "data.jsonl")]
    return [
        # invalid config values given as train flags (the Python API: test_config.py)
        (_train(w, "o", "--dropout", "1.5"), r"lora_dropout=1\.5 must be a number in \[0, 1\), e\.g\. 0\.05"),
        (_train(w, "o", "--alpha", "0"), r"lora_alpha=0\.0 must be a positive number, e\.g\. 16"),
        (_train(w, "o", "--alpha", "-2"), r"lora_alpha=-2\.0 must be a positive number"),
        # a target that matches nothing
        (_train(w, "o", "--targets", "q_prj,v_proj"), r"'q_prj' matched nothing; did you mean 'q_proj'"),
        # an adapter for a base of other shapes: module and both shapes
        (["eval", "--adapter", str(w / "adapter"), "--model", str(w / "wide"), *eval_on],
         r"adapter_model\.safetensors: module 'model\.layers\.0\.self_attn\.q_proj' expects 'lora_A\.weight' of "
         r"shape \(4, 48\) in this model, but the adapter holds \(4, 32\).*load it onto the base named in"),
        # invalid adapter_config.json: the file, the value
        (["info", str(w / "not-json")], r"not-json/adapter_config\.json is not valid JSON .*re-save the adapter"),
        (["eval", "--adapter", str(w / "bad-bias"), *eval_on],
         r"bad-bias/adapter_config\.json: bias='some' is unknown; use one of: none, all, lora_only"),
        (["merge", "--adapter", str(w / "zero-r"), "--output", str(w / "merged")],
         r"zero-r/adapter_config\.json: r=0 must be a positive integer rank, e\.g\. 8"),
        # data: empty, and every example longer than --max-length (how many dropped)
        (_train(w, "o", data="empty.jsonl"), r"empty\.jsonl' contains no records; add at least one example"),
        (_train(w, "o", "--max-length", "2"),
         r"all 6 examples were dropped: none has a trainable token within max_length=2 .*raise --max-length"),
        # --resume without a checkpoint; an --output that holds another run; --resume with other options
        (_train(w, "o", "--resume"), r"--resume: no checkpoint in .*o/checkpoints; run without --resume"),
        (_train(w, "run"), r"--output .*run already holds a run; pass --resume to continue it, --overwrite to replace"),
        (_train(w, "run", "--resume", "--r", "8", "--seed", "1"),
         r"--resume: .*run holds a run with different r, seed; resume with the same options, or start a new --output"),
    ]  # fmt: skip


def test_cli_bad_inputs_are_one_line_and_exit_2(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_files = sorted(p.name for p in (work / "run").iterdir())
    for argv, match in _cases(work):
        capsys.readouterr()
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        # one error line, last; before it at most transformers' progress bars (loading the base model's weights)
        lines = [line for line in re.split(r"[\r\n]", err) if line.strip()]
        assert lines[-1].startswith("lorakit: error: ") and err.endswith("\n"), (argv, err)
        assert all(_PROGRESS.search(line) for line in lines[:-1]), (argv, err)
        assert re.search(match, err), (argv, err)
        if argv[0] == "train":  # a refused start leaves no run behind: fixing the flag needs no --overwrite
            assert not (work / "o" / RUN_NAME).exists() and not (work / "o" / "checkpoints").exists()
            assert sorted(p.name for p in (work / "run").iterdir()) == run_files


def test_resume_with_other_options_names_them(work: Path) -> None:
    args = dict(model=str(work / "base"), data=str(work / "data.jsonl"), output=str(work / "run"), r=4, max_steps=2,
                progress=False, resume=True)  # fmt: skip
    with pytest.raises(TrainingError, match=r"holds a run with different targets, batch_size; resume with the same"):
        train(TrainArgs(**{**args, "targets": "q_proj", "batch_size": 2}))
    assert train(TrainArgs(**args))["resumed_from"] == 1  # the same options resume


# -- a save interrupted at any step, and kills in a row: test_save_protocol.py --------------------------------


# -- adapter names never leave the folder -------------------------------------------------------------------------
ESCAPES = ["../x", "/abs", "a/b", "..", "."]


def _files(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


@pytest.mark.parametrize("name", ESCAPES)
def test_adapter_names_cannot_write_or_read_outside_the_folder(tmp_path: Path, name: str) -> None:
    config = dict(r=2, target_modules=["q_proj"])
    model = get_peft_model(tiny_llama(), LoraConfig(**config))
    saved = tmp_path / "box" / "adapter"
    model.save_pretrained(saved)
    before = _files(tmp_path)
    with pytest.raises(AdapterError, match=re.escape(f"adapter name {name!r} is invalid")):
        get_peft_model(tiny_llama(), LoraConfig(**config), adapter_name=name)
    with pytest.raises(AdapterError, match="invalid"):
        PeftModel.from_pretrained(tiny_llama(), saved, adapter_name=name)
    with pytest.raises(AdapterError, match="invalid"):
        model.load_adapter(saved, adapter_name=name)
    with pytest.raises(AdapterError, match="invalid"):
        model.add_weighted_adapter(["default"], [1.0], name, combination_type="linear")
    with pytest.raises(AdapterError, match="does not exist"):
        model.save_pretrained(saved, selected_adapters=[name])
    # even a name put straight into peft_config (skipping add_adapter's check) is refused when saving
    model.peft_config[name] = LoraConfig(**config)
    with pytest.raises(AdapterError, match="invalid"):
        model.save_pretrained(saved)
    del model.peft_config[name]
    assert list(model.peft_config) == ["default"]
    after = _files(tmp_path)  # the 'default' adapter was re-saved in place; nothing else changed or appeared
    assert after.keys() == before.keys()
    outside = [k for k in before if not k.startswith("box/adapter")]
    assert [after[k] for k in outside] == [before[k] for k in outside]


# -- remote code is off by default --------------------------------------------------------------------------------
class _Spy:
    """Stands in for a transformers auto class: records the keyword arguments of from_pretrained."""

    def __init__(self, cls: Any, seen: list[dict[str, Any]]) -> None:
        self.cls, self.seen = cls, seen

    def from_pretrained(self, *args: Any, **kwargs: Any) -> Any:
        self.seen.append(kwargs)
        return self.cls.from_pretrained(*args, **kwargs)


def test_trust_remote_code_is_false_by_default(
    work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[dict[str, Any]] = []
    monkeypatch.setattr(models, "AutoTokenizer", _Spy(models.AutoTokenizer, seen))
    for task, cls in list(models.TASKS.items()):
        monkeypatch.setitem(models.TASKS, task, _Spy(cls, seen))
    models.load_model(str(work / "base"))
    models.load_tokenizer(str(work / "base"))
    data = str(work / "data.jsonl")
    assert main(["eval", "--adapter", str(work / "adapter"), "--data", data, "--no-exact-match"]) == 0
    assert main(["merge", "--adapter", str(work / "adapter"), "--output", str(tmp_path / "merged")]) == 0
    assert len(seen) >= 5 and all(kwargs.get("trust_remote_code") is False for kwargs in seen), seen
    assert TrainArgs().trust_remote_code is False

    # a model folder whose config asks for its own Python code: refused in one line, the code never runs
    evil = tmp_path / "evil"
    shutil.copytree(work / "base", evil)
    config = json.loads((evil / "config.json").read_text())
    auto_map = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (evil / "config.json").write_text(json.dumps({**config, "model_type": "evil", "auto_map": auto_map}))
    marker = tmp_path / "code-ran"
    for module in ("configuration_evil", "modeling_evil"):
        (evil / f"{module}.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    capsys.readouterr()
    assert main(["eval", "--model", str(evil), "--data", data]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorakit: error: ") and err.count("\n") == 1 and "trust_remote_code" in err, err
    with pytest.raises((ValueError, OSError)):
        models.load_model(str(evil))
    assert not marker.exists()
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
