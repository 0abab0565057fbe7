"""The ``lorakit`` command: argument parsing and printing only; the work is done by the library modules.

    lorakit train --data train.jsonl [--config run.yaml] [--r 8 --lr 1e-4 --packing ...]   # lorakit.train
    lorakit generate [--adapter DIR] [--model M] [--prompts-file F] [prompt ...]             # lorakit.commands.generate
    lorakit eval [--adapter DIR] [--model M] --data eval.jsonl [--json]                     # lorakit.commands.evaluate
    lorakit export DIR --to vllm|gguf|merged|merged-gguf [--output P] [--outtype T] ...     # lorakit.commands.export
    lorakit merge --adapter DIR --output DIR2 [--model M] [--overwrite]    # export --to merged; lorakit.export.merged
    lorakit info DIR [--json]                                                               # lorakit.commands.info
    lorakit demo [--output DIR] [--steps N] [--quick]                                       # lorakit.commands.demo

Parsing, argument errors and the input checks done before a model loads (data files, --config) need neither torch
nor transformers: each command's module is imported inside its ``_cmd_*`` function, after the parser, so that
``lorakit --help`` and a missing data file answer at once (``benchmarks/startup.py``). Those imports are the
function-local ones tests/test_layout.py allows for the CLI.

Every expected failure (bad data, bad options, missing or corrupt files, unknown models) ends with one line
``lorakit: error: <what is wrong and what to do>`` on stderr and exit code 2. Set ``LORAKIT_DEBUG=1`` to get the
traceback instead. With ``HF_HUB_OFFLINE=1`` the network is never used (see ``lorakit.io.models``).
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from lorakit import __version__
from lorakit.data.records import detect_dataset_format, load_records, read_prompts
from lorakit.export.output import check_export_output, check_output
from lorakit.training.args import HF_NAMES, TrainArgs, read_train_config, train_fields
from lorakit.training.preflight import check_inputs

EXIT_OK, EXIT_USAGE, EXIT_INTERRUPTED = 0, 2, 130


class CliError(Exception):
    """An expected failure whose message is shown as-is on one line."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one ``lorakit: error:`` line like every other expected failure, and an
    unknown flag gets the closest known one ("did you mean --output?")."""

    commands: dict[str, _Parser]  # the subcommands' parsers (set by build_parser)

    def error(self, message: str) -> typing.NoReturn:
        raise CliError(f"{message} (see `{self.prog} --help`)")

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            command = getattr(self, "commands", {}).get(getattr(ns, "command", None), self)
            hint = did_you_mean(extras, [o for a in command._actions for o in a.option_strings])
            command.error(f"unrecognized arguments: {' '.join(extras)}" + (f"; did you mean {hint}?" if hint else ""))
        return ns


def did_you_mean(extras: Sequence[str], options: Sequence[str]) -> str | None:
    """The known flag closest to the first unknown one in ``extras``: a Hugging Face name of a train option
    (``--learning-rate`` -> ``--lr``, as a --config file accepts in its message), else the nearest spelling
    (``--outptu`` -> ``--output``); None if nothing is close."""
    flag = next((e.split("=", 1)[0] for e in extras if e.startswith("--")), None)
    if flag is None:
        return None
    hf = HF_NAMES.get(flag[2:].replace("-", "_"))
    if hf is not None and "--" + hf.replace("_", "-") in options:
        return "--" + hf.replace("_", "-")
    close = difflib.get_close_matches(flag, [o for o in options if o.startswith("--")], n=1, cutoff=0.6)
    return close[0] if close else None


# -- train: flags built from the TrainArgs dataclass --------------------------------------------------------------
def _add_train_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainArgs field (``grad_accum`` -> ``--grad-accum``), help from the field's metadata. Defaults
    are SUPPRESSed so that only flags given on the command line appear in the namespace (they override --config)."""
    parser.add_argument("--config", metavar="FILE", help="YAML file of these options (names with '-' or '_'); "
                        "flags given on the command line override it.")  # fmt: skip
    for name, (field, typ) in train_fields().items():
        flags = ["--" + name.replace("_", "-")]
        lora = field.metadata.get("lora_field", name)
        if lora != name:  # LoraConfig's name as an alias (--lora-alpha), as a --config file accepts it
            flags.append("--" + lora.replace("_", "-"))
        text = f"{field.metadata.get('help', '')} (default: {field.default})"
        if typ is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text)
        else:
            parser.add_argument(*flags, type=typ, default=argparse.SUPPRESS, metavar=name.upper(), help=text)


def train_args_from_namespace(ns: argparse.Namespace) -> TrainArgs:
    """TrainArgs from the --config file (if any), overridden by the flags given on the command line."""
    values = read_train_config(ns.config) if getattr(ns, "config", None) else {}
    values.update({name: getattr(ns, name) for name in train_fields() if hasattr(ns, name)})
    return TrainArgs(**values)


def _cmd_train(ns: argparse.Namespace) -> int:
    args = train_args_from_namespace(ns)
    check_inputs(args)  # data and option combinations, before torch and the model load
    from lorakit.training.trainer import TrainingError, train  # torch (see the module doc); tests replace train

    try:
        summary = train(args) or {}
    except TrainingError as e:
        raise CliError(str(e)) from e
    output = Path(args.output)
    print(f"lorakit: training finished; outputs in {output}")
    paths = {"adapter": summary.get("adapter", output), "metrics": output / "metrics.jsonl",
             "summary": output / "summary.json", "plot": summary.get("plot", output / "loss.png")}  # fmt: skip
    for key, path in paths.items():
        if Path(path).exists():
            print(f"  {key:<8} {path}")
    for key, value in summary.items():
        if key not in paths and (value is None or isinstance(value, (str, int, float, bool))):
            print(f"  {key}: {value}")
    return EXIT_OK


# -- generate / eval / merge / info / demo -----------------------------------------------------------------------
def _check_adapter_folder(path: str | None) -> None:
    """An --adapter folder that is not there, said before torch loads (its files are lorakit.io.files' to check,
    which happens before the base model loads)."""
    if path is not None and not Path(path).is_dir():
        raise CliError(f"adapter folder '{path}' does not exist; pass the folder that lorakit train wrote")


def _cmd_generate(ns: argparse.Namespace) -> int:
    if not ns.prompt and not ns.prompts_file:
        raise CliError("no prompt given; pass prompt text (lorakit generate 'Hello') or --prompts-file FILE")
    _check_adapter_folder(ns.adapter)
    prompts = list(ns.prompt) + (read_prompts(ns.prompts_file) if ns.prompts_file else [])
    from lorakit.commands.generate import generate, load_pretrained  # torch (see the module doc)

    model, tokenizer = load_pretrained(ns.model, ns.adapter)
    options = dict(max_new_tokens=ns.max_new_tokens, do_sample=ns.sample, temperature=ns.temperature,
                   top_p=ns.top_p, top_k=ns.top_k, batch_size=ns.batch_size, chat=ns.chat)  # fmt: skip
    if len(prompts) == 1:
        generate(model, tokenizer, prompts, stream=lambda text: print(text, end="", flush=True), **options)
        print()
        return EXIT_OK
    for prompt, output in zip(prompts, generate(model, tokenizer, prompts, progress="generating", **options)):
        print(f"### {prompt}\n{output}\n")
    return EXIT_OK


def _finite(value: Any) -> Any:
    """JSON has no NaN / Infinity: such floats become null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _cmd_eval(ns: argparse.Namespace) -> int:
    records = load_records(ns.data)
    detect_dataset_format(records)  # bad records fail before a model is loaded
    _check_adapter_folder(ns.adapter)
    from lorakit.commands.evaluate import evaluate  # torch, after the data checks (see the module doc)
    from lorakit.commands.generate import load_pretrained

    model, tokenizer = load_pretrained(ns.model, ns.adapter)
    result = evaluate(model, tokenizer, records, max_length=ns.max_length, batch_size=ns.batch_size,
                      exact_match=ns.exact_match, max_new_tokens=ns.max_new_tokens, progress=True)  # fmt: skip
    if ns.json:
        meta = {"data": ns.data, "adapter": ns.adapter, "model": ns.model}
        print(json.dumps({**meta, **{k: _finite(v) for k, v in result.items()}}))
        return EXIT_OK
    print(f"loss         {result['loss']:.4f}  ({result['n_tokens']} tokens in {result['n_examples']} examples)")
    print(f"perplexity   {result['perplexity']:.3f}")
    if result["exact_match"] is None:
        print(f"exact match  n/a ({result['exact_match_note']})")
    else:
        print(f"exact match  {result['exact_match']:.3f}  ({result['n_exact_match']} examples, greedy, "
              f"{result['exact_match_note']})")  # fmt: skip
    return EXIT_OK


def _cmd_merge(ns: argparse.Namespace) -> int:
    _check_adapter_folder(ns.adapter)
    check_output(Path(ns.adapter), Path(ns.output), ns.overwrite)
    from lorakit.export.merged import merge_adapter_to_folder  # torch (see the module doc)

    output = merge_adapter_to_folder(ns.adapter, ns.output, model=ns.model, overwrite=ns.overwrite, progress=True)
    print(f"merged model written to {output} (load it with transformers' AutoModelForCausalLM.from_pretrained)")
    return EXIT_OK


def _cmd_export(ns: argparse.Namespace) -> int:
    _check_adapter_folder(ns.adapter_dir)
    check_export_output(ns.adapter_dir, ns.to, ns.output, ns.overwrite)
    from lorakit.commands.export import export_adapter  # torch (see the module doc)

    done = export_adapter(
        ns.adapter_dir, ns.to, ns.output, outtype=ns.outtype, initial_dir=ns.initial, base_gguf=ns.base_gguf,
        model=ns.model, overwrite=ns.overwrite, progress=True,
    )  # fmt: skip
    print(f"exported for {ns.to}: {done.output}")
    print("serve it with:")
    for line in done.serve:
        print(f"  {line}")
    return EXIT_OK


def _cmd_info(ns: argparse.Namespace) -> int:
    _check_adapter_folder(ns.adapter_dir)
    from lorakit.commands.export import engine_lines  # torch (see the module doc)
    from lorakit.commands.info import adapter_info, format_info

    info = adapter_info(ns.adapter_dir)
    info["engines"] = engine_lines(ns.adapter_dir)
    print(json.dumps(info, indent=2) if ns.json else format_info(info, modules=ns.modules))
    return EXIT_OK


def _cmd_demo(ns: argparse.Namespace) -> int:
    from lorakit.commands import demo  # torch (see the module doc); looked up per call: tests replace demo.run

    return demo.run_from_args(ns)


# -- parser and entry point ---------------------------------------------------------------------------------------
def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", metavar="DIR", help="Adapter folder (as written by train / save_pretrained).")
    parser.add_argument("--model", metavar="M", help="Base model: local folder, hub id, or 'default' (default: the "
                        "adapter's base_model_name_or_path, else the bundled SmolLM2-135M-Instruct).")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lorakit", description="LoRA fine-tuning for Hugging Face transformers models.")
    parser.add_argument("--version", action="version", version=f"lorakit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("train", help="Train a LoRA adapter.", description="Train a LoRA adapter.")
    _add_train_flags(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("generate", help="Generate text with a base model or an adapter.")
    _add_model_flags(p)
    p.add_argument("prompt", nargs="*", help="Prompt text (one prompt per argument).")
    p.add_argument("--prompts-file", metavar="F", help='Prompts, one per line, or .jsonl with a "prompt" string.')
    p.add_argument("--max-new-tokens", type=int, default=128, help="Tokens to generate per prompt (default: 128).")
    p.add_argument("--sample", action="store_true", help="Sample (default: greedy decoding).")
    p.add_argument("--temperature", type=float, default=0.7, help="Sampling temperature (default: 0.7).")
    p.add_argument("--top-p", type=float, default=0.9, help="Nucleus sampling mass (default: 0.9).")
    p.add_argument("--top-k", type=int, default=None, help="Sample from the k likeliest tokens only.")
    p.add_argument("--batch-size", type=int, default=8, help="Prompts decoded together (default: 8).")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="Wrap prompts in the chat template (default: if the tokenizer has one).")  # fmt: skip
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("eval", help="Loss, perplexity and exact match on a dataset.")
    _add_model_flags(p)
    p.add_argument("--data", required=True, metavar="F", help="Evaluation data (.jsonl, .json, .csv, .parquet, .txt).")
    p.add_argument("--json", action="store_true", help="Print one JSON object instead of text.")
    p.add_argument("--max-length", type=int, default=512, help="Truncate examples to this many tokens (default: 512).")
    p.add_argument("--batch-size", type=int, default=8, help="Examples per forward pass (default: 8).")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="Answer length for exact match (default: the longest reference + 8 tokens).")  # fmt: skip
    p.add_argument("--exact-match", action=argparse.BooleanOptionalAction, default=None,
                   help="Score greedy answers against the references (default: when every reference is at most "
                   "32 tokens long).")  # fmt: skip
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser(
        "merge",
        help="Merge an adapter into its base model and save a plain transformers folder "
        "(the same as export --to merged).",
    )
    p.add_argument("--adapter", required=True, metavar="DIR", help="Adapter folder.")
    p.add_argument("--output", required=True, metavar="DIR2", help="Folder for the merged model.")
    p.add_argument("--model", metavar="M", help="Base model (default: the adapter's base_model_name_or_path).")
    p.add_argument("--overwrite", action="store_true", help="Replace a non-empty --output folder.")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("export", help="Export an adapter for vLLM, llama.cpp / Ollama (GGUF), or merged.")
    p.add_argument("adapter_dir", metavar="DIR", help="Adapter folder.")
    p.add_argument(
        "--to",
        required=True,
        choices=["vllm", "gguf", "merged", "merged-gguf"],
        help="vllm: a PEFT folder for vllm serve --enable-lora; gguf: a llama.cpp / Ollama LoRA file; "
        "merged: base + adapter as a transformers folder; merged-gguf: base + adapter as one GGUF file.",
    )
    p.add_argument("--output", metavar="PATH", help="Where to write (default: beside DIR, e.g. DIR.gguf, DIR-vllm).")
    p.add_argument(
        "--outtype",
        choices=["f32", "f16", "bf16", "q8_0"],
        help="Tensor type: gguf f32 (default) / f16 / bf16; merged-gguf: of the changed tensors, "
        "f16 (default) / f32 / bf16 / q8_0 (the others keep the base file's types).",
    )
    p.add_argument(
        "--initial",
        metavar="DIR0",
        help="vllm: the adapter saved right after get_peft_model (before "
        "training), to convert a PiSSA / OLoRA / LoftQ adapter to plain LoRA on the original base.",
    )
    p.add_argument(
        "--base-gguf",
        metavar="FILE",
        help="The base model as GGUF (default: the bundled file for the "
        "default model); merged-gguf builds on it, gguf names it in the serve line.",
    )
    p.add_argument("--model", metavar="M", help="Base model (default: the adapter's base_model_name_or_path).")
    p.add_argument("--overwrite", action="store_true", help="Replace what is at --output.")
    p.set_defaults(func=_cmd_export)  # fmt: skip

    p = sub.add_parser("info", help="Summarize an adapter: base, kind, ranks, targets, size (--modules: each module).")
    p.add_argument("adapter_dir", metavar="DIR", help="Adapter folder.")
    p.add_argument("--modules", action="store_true", help="Also each module's rank, shape, update norm.")
    p.add_argument("--json", action="store_true", help="Print JSON instead of text (modules included).")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("demo", help="Fine-tune the bundled model on a small task and show before / after.")
    p.add_argument("--output", default="runs/demo", metavar="DIR", help="Output folder (default: runs/demo).")
    p.add_argument("--steps", type=int, default=None, help="Training steps (default: 40; 15 with --quick).")
    p.add_argument("--train-examples", type=int, default=400, help="Generated training examples.")
    p.add_argument("--test-examples", type=int, default=None, help="Held-out examples (default: 50).")
    p.add_argument("--model", default=None, help="Base model (default: the bundled SmolLM2-135M-Instruct).")
    p.add_argument("--seed", type=int, default=0, help="Random seed (data and adapter init).")
    p.add_argument("--quick", action="store_true", help="A short run (15 steps, 20 test dates), for a smoke test.")
    p.set_defaults(func=_cmd_demo)
    parser.commands = sub.choices  # name -> that command's parser, for did_you_mean
    return parser


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``lorakit`` command line; returns the exit code (0 ok, 2 bad input, 130 interrupted)."""
    try:
        ns = build_parser().parse_args(argv)
        return ns.func(ns)
    except SystemExit as e:  # --help / --version (code 0), or a parser inside a subcommand (demo)
        return e.code if isinstance(e.code, int) else (EXIT_OK if e.code is None else EXIT_USAGE)
    except KeyboardInterrupt as e:  # training's RunInterrupted names the checkpoint and the --resume command
        print(f"lorakit: {_one_line(e) if str(e) else 'interrupted'}", file=sys.stderr)
        return getattr(e, "exit_code", EXIT_INTERRUPTED)
    except (CliError, ValueError, OSError, yaml.YAMLError) as e:
        # ValueError covers DataError, ConfigError, TargetError, AdapterFileError, AdapterError and TrainArgs
        # checks; OSError covers ModelNotFoundError and missing / unwritable files.
        if os.environ.get("LORAKIT_DEBUG"):
            raise
        print(f"lorakit: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
