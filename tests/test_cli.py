"""lorakit.cli: run ``main([...])`` in-process on a tiny llama folder; every bad input is one stderr line + exit 2."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import save_tiny_adapter, save_tiny_folder, tiny_tokenizer
from transformers import AutoModelForCausalLM

from lorakit import PeftModel
from lorakit.cli import build_parser, main
from lorakit.commands.evaluate import evaluate
from lorakit.commands.generate import generate
from lorakit.io.models import load_model
from lorakit.training.args import TrainArgs

RECORDS = [
    {"messages": [{"role": "user", "content": "what is two plus four"}, {"role": "assistant", "content": "six"}]},
    {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello world"}]},
]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """base/ (tiny llama + ChatML tokenizer), adapter/ (on base/), data.jsonl, and broken variants."""
    w = tmp_path_factory.mktemp("cli")
    save_tiny_adapter(save_tiny_folder(w / "base"), w / "adapter")
    (w / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    (w / "broken.jsonl").write_text(json.dumps(RECORDS[0]) + "\n" + '{"messages": [\n')
    (w / "unknown.jsonl").write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    (w / "data.xml").write_text("<data/>")
    shutil.copytree(w / "adapter", w / "corrupt")
    weights = w / "corrupt" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return w


def run(capsys: pytest.CaptureFixture[str], *argv: Any) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what the test itself printed (e.g. transformers' loading bars)
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(capsys: pytest.CaptureFixture[str], argv: list[Any], match: str) -> str:
    code, _, err = run(capsys, *argv)
    assert code == 2, err
    assert err.startswith("lorakit: error: ") and err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err
    assert re.search(match, err), err
    return err


# -- train: flags -> TrainArgs (training itself is tested with the trainer) ----------------------------------------
@pytest.fixture
def fake_train(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[TrainArgs]:
    """Replace training.trainer.train by a function that records its TrainArgs (and fails on data 'fail.jsonl'),
    in a temp folder holding d.jsonl and fail.jsonl (the CLI checks the data before it calls train)."""
    import lorakit.training.trainer

    monkeypatch.chdir(tmp_path)
    for name in ("d.jsonl", "fail.jsonl"):
        Path(name).write_text("".join(json.dumps(r) + "\n" for r in RECORDS))

    calls: list[TrainArgs] = []

    def train(args: TrainArgs) -> dict[str, Any]:
        if args.data == "fail.jsonl":
            raise lorakit.training.trainer.TrainingError("step 3: loss is not finite;\nlower --lr")
        calls.append(args)
        return {"train_loss": 1.5, "adapter": args.output, "model": object()}

    monkeypatch.setattr(lorakit.training.trainer, "train", train)
    return calls


def test_every_train_args_field_is_a_flag_with_its_help() -> None:
    train = build_parser()._subparsers._group_actions[0].choices["train"]  # type: ignore[union-attr]
    flags = {opt: action for action in train._actions for opt in action.option_strings}
    for field in dataclasses.fields(TrainArgs):
        action = flags["--" + field.name.replace("_", "-")]
        assert field.metadata["help"] in action.help
    assert "--no-packing" in flags and "--no-progress" in flags


def test_train_flags_build_train_args(fake_train: list[TrainArgs], capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["train", "--data", "d.jsonl", "--r", "8", "--lr", "1e-3", "--packing", "--grad-accum", "3"]
    code, out, _ = run(capsys, *argv, "--no-completion-only-loss", "--targets", "q_proj,v_proj", "--model", "m")
    assert code == 0
    (args,) = fake_train
    expected = TrainArgs(
        data="d.jsonl", r=8, lr=1e-3, packing=True, grad_accum=3, completion_only_loss=False,
        targets="q_proj,v_proj", model="m",
    )  # fmt: skip
    assert args == expected
    assert "runs/lorakit" in out and "train_loss: 1.5" in out and "object" not in out


def test_lora_config_names_are_flag_aliases(fake_train: list[TrainArgs], capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["train", "--data", "d.jsonl", "--lora-alpha", "7", "--lora-dropout", "0.2", "--target-modules", "q_proj"]
    code, _, err = run(capsys, *argv)
    assert code == 0, err
    (args,) = fake_train
    assert (args.alpha, args.dropout, args.targets) == (7.0, 0.2, "q_proj")


def test_config_file_with_flag_overrides(
    fake_train: list[TrainArgs], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "c.yaml").write_text(
        "data: d.jsonl\nr: 4\nlr: 1e-3\nbatch-size: 2\npacking: true\ntargets: [q_proj, v_proj]\nwarmup_ratio: 0\n"
    )
    code, _, err = run(capsys, "train", "--config", tmp_path / "c.yaml", "--r", "8", "--no-packing")
    assert code == 0, err
    (args,) = fake_train
    assert (args.r, args.packing) == (8, False)  # flags win
    assert (args.lr, args.batch_size, args.targets, args.warmup_ratio) == (1e-3, 2, "q_proj,v_proj", 0.0)  # file
    assert args.alpha == TrainArgs().alpha  # neither: default


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("learning_rate: 1e-3\n", r"unknown option 'learning_rate'; did you mean 'lr'\?"),
        ("r: abc\n", r"option 'r' must be int, got 'abc'"),
        ("r: [1, 2\n", r"not valid YAML"),
        ("- r\n- 4\n", r"must hold a mapping"),
        ("r: 0\n", r"--r: r=0 must be a positive integer rank"),
    ],
)
def test_bad_config_file(
    fake_train: list[TrainArgs], capsys: pytest.CaptureFixture[str], tmp_path: Path, content: str, match: str
) -> None:
    (tmp_path / "c.yaml").write_text(content)
    assert_one_line_error(capsys, ["train", "--config", tmp_path / "c.yaml"], match)
    assert fake_train == []


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["train", "--data", "missing.jsonl"], r"data file 'missing.jsonl' does not exist"),
        (["train"], r"no training data: pass --data FILE"),
        (["train", "--data", "d.jsonl", "--eval-data", "d.jsonl", "--eval-fraction", "0.5"], r"pass one of them"),
        (["train", "--r", "0"], r"--r: r=0 must be a positive integer rank"),
        (["train", "--r", "abc"], r"invalid int value: 'abc'.*lorakit train --help"),
        (["train", "--lr-scheduler", "step"], r"--lr-scheduler 'step' is unknown"),
        (["train", "--config", "missing.yaml"], r"config file 'missing.yaml' does not exist"),
        (["train", "--data", "fail.jsonl"], r"step 3: loss is not finite; lower --lr"),
        (["train", "--bogus"], r"unrecognized arguments: --bogus"),
        (["frobnicate"], r"invalid choice: 'frobnicate'"),
        ([], r"required: COMMAND"),
    ],
)
def test_bad_train_and_usage(
    fake_train: list[TrainArgs], capsys: pytest.CaptureFixture[str], argv: list[str], match: str
) -> None:
    assert_one_line_error(capsys, argv, match)


# -- eval ----------------------------------------------------------------------------------------------------------
def test_eval_json_is_one_object_equal_to_the_library_result(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "eval", "--model", work / "base", "--data", work / "data.jsonl", "--json",
                       "--max-new-tokens", "3", "--batch-size", "2")  # fmt: skip
    assert code == 0
    result = json.loads(out)  # exactly one JSON document on stdout
    expected = evaluate(load_model(str(work / "base")).eval(), tiny_tokenizer(), RECORDS, max_new_tokens=3)
    for key in ("loss", "perplexity"):
        assert result[key] == pytest.approx(expected[key], rel=1e-5)
    assert (result["n_examples"], result["n_exact_match"], result["adapter"]) == (2, 2, None)
    assert result["exact_match"] == expected["exact_match"]

    code, out, _ = run(capsys, "eval", "--adapter", work / "adapter", "--data", work / "data.jsonl", "--json",
                       "--no-exact-match")  # fmt: skip
    tuned = json.loads(out)
    assert code == 0 and tuned["exact_match"] is None
    assert abs(tuned["loss"] - result["loss"]) > 1e-3  # the adapter (base read from its config) is applied


def test_eval_prints_text(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "eval", "--model", work / "base", "--data", work / "data.jsonl", "--max-new-tokens", 2)
    assert code == 0
    assert re.search(r"loss\s+\d+\.\d{4}", out) and "perplexity" in out and re.search(r"exact match\s+0\.\d+", out)


def test_eval_errors(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base, data = ["--model", work / "base"], ["--data", work / "data.jsonl"]
    cases = [
        (["eval", *base, "--data", work / "missing.jsonl"], r"missing\.jsonl' does not exist"),
        (["eval", *base, "--data", work / "broken.jsonl"], r"broken\.jsonl' line 2: invalid JSON"),
        (["eval", *base, "--data", work / "unknown.jsonl"], r"row 1 is in no known format: it has keys"),
        (["eval", *base, "--data", work / "data.xml"], r"unsupported extension '\.xml'"),
        (["eval", "--adapter", work / "nope", *data], r"adapter folder '.*nope' does not exist"),
        (["eval", "--adapter", work / "corrupt", *data], r"adapter_model\.safetensors is corrupt or truncated"),
        (["eval", "--model", work / "no-model", *data], r"model folder '.*no-model' does not exist"),
        (["eval", *base], r"the following arguments are required: --data"),
    ]
    for argv, match in cases:
        assert_one_line_error(capsys, argv, match)


# -- generate ------------------------------------------------------------------------------------------------------
def test_generate_streams_a_single_prompt(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "generate", "--adapter", work / "adapter", "--max-new-tokens", 5, "hello world")
    assert code == 0
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(work / "base"), work / "adapter").eval()
    expected = generate(peft, tiny_tokenizer(), ["hello world"], max_new_tokens=5)[0]
    assert out.strip() == expected.strip() and len(expected.split()) == 5


def test_generate_prompts_file(work: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "p.jsonl").write_text('{"prompt": "hello"}\n{"prompt": "the cat"}\n')
    code, out, _ = run(capsys, "generate", "--model", work / "base", "--max-new-tokens", 3,
                       "--prompts-file", tmp_path / "p.jsonl")  # fmt: skip
    assert code == 0
    base = load_model(str(work / "base")).eval()
    for prompt, text in zip(["hello", "the cat"], generate(base, tiny_tokenizer(), ["hello", "the cat"], 3)):
        assert f"### {prompt}\n{text}\n" in out


def test_generate_errors(work: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"text": "b"}\n')
    cases = [
        (["generate", "--model", work / "base"], r"no prompt given"),
        (["generate", "--prompts-file", tmp_path / "nope.txt"], r"prompts file '.*nope\.txt' does not exist"),
        (["generate", "--prompts-file", tmp_path / "bad.jsonl"], r"line 2: expected an object with a \"prompt\""),
        (["generate", "--adapter", work / "nope", "hi"], r"adapter folder '.*nope' does not exist"),
        (["generate", "--adapter", work / "corrupt", "hi"], r"corrupt or truncated"),
    ]
    for argv, match in cases:
        assert_one_line_error(capsys, argv, match)


# -- merge / info / demo -------------------------------------------------------------------------------------------
def test_merge_writes_a_loadable_folder(work: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out_dir = tmp_path / "merged"
    code, out, _ = run(capsys, "merge", "--adapter", work / "adapter", "--output", out_dir)
    assert code == 0 and str(out_dir) in out
    merged = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(work / "base"), work / "adapter").eval()
    ids = torch.tensor([[7, 8, 9, 10]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft(ids).logits, atol=1e-5, rtol=0)
    assert_one_line_error(capsys, ["merge", "--adapter", work / "adapter", "--output", out_dir], r"--overwrite")
    assert run(capsys, "merge", "--adapter", work / "adapter", "--output", out_dir, "--overwrite")[0] == 0
    assert_one_line_error(capsys, ["merge", "--adapter", work / "corrupt", "--output", tmp_path / "m2"], "corrupt")
    assert_one_line_error(capsys, ["merge", "--adapter", work / "adapter"], r"required: --output")


def test_info_prints_a_summary_and_modules_on_request(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "info", work / "adapter")
    assert code == 0
    assert "r=4, lora_alpha=8" in out and str(work / "base") in out
    summary, engines = out.split("\nengines         ")
    assert "targets         4 modules: q_proj 2, v_proj 2" in summary and len(summary.splitlines()) == 6
    assert engines.splitlines()[:2] == ["vLLM (--to vllm): yes", " " * 16 + "llama.cpp / Ollama LoRA (--to gguf): yes"]
    assert not re.findall(r"self_attn\.[qv]_proj\s+r=4 ", out)
    code, out, _ = run(capsys, "info", work / "adapter", "--modules")
    assert code == 0
    assert len(re.findall(r"self_attn\.[qv]_proj\s+r=4 ", out)) == 4
    code, out, _ = run(capsys, "info", work / "adapter", "--json")
    assert code == 0 and json.loads(out)["n_tensors"] == 8 and len(json.loads(out)["modules"]) == 4
    assert json.loads(out)["engines"][0] == "vLLM (--to vllm): yes"
    assert_one_line_error(capsys, ["info", work / "nope"], r"adapter folder '.*nope' does not exist")


def test_demo_forwards_its_options(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import lorakit.commands.demo

    seen: list[tuple] = []

    def fake_run(*args: Any) -> dict[str, Any]:
        seen.append(args)
        return {"accuracy_before": 0.1, "accuracy_after": 0.9, "total_wall_time_s": 1.0, "adapter": "a", "plot": "p"}

    monkeypatch.setattr(lorakit.commands.demo, "run", fake_run)
    code, out, _ = run(capsys, "demo", "--output", "o", "--steps", 5, "--quick")
    assert code == 0 and "10% -> 90% (+80 points)" in out
    assert run(capsys, "demo")[0] == 0
    assert seen == [("o", 400, 20, 5, 0, None), ("runs/demo", 400, 50, 40, 0, None)]


def test_help_and_version_exit_zero(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.startswith("lorakit ")
    code, out, _ = run(capsys, "train", "--help")
    assert code == 0 and "--grad-accum" in out and "Micro-batches per optimizer step" in out
