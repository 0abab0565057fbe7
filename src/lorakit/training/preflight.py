"""The checks a training run passes before anything loads or is written: its data files and option combinations.

``check_inputs(args)`` reads and checks the data the run needs (``--data``, ``--eval-data``: they exist, parse,
hold records of one known format) and the options that only make sense together, and raises the error a user
can act on. It needs neither torch nor transformers, so ``lorakit train`` runs it before importing them (an
answer in well under a second), and ``trainer.setup`` runs it before the output folder is made and the model
loads (so a run that fails these checks leaves nothing on disk). The output folder itself (another run in it,
``--resume`` without a checkpoint) is ``trainer.check_output``'s, which knows the run's file names.

Example::

    inputs = check_inputs(TrainArgs(data="train.jsonl", eval_fraction=0.1))
    inputs.fmt, len(inputs.records)       # ("messages", 300)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.data.records import detect_dataset_format, load_records, split_eval
from lorakit.training.args import TrainArgs


@dataclass
class Inputs:
    """The records a run reads, checked: training records, eval records (from --eval-data, or held out of --data
    by --eval-fraction, else none) and the training records' format ("text", "prompt_completion", "messages")."""

    records: list[dict[str, Any]]
    fmt: str
    eval_records: list[dict[str, Any]] = field(default_factory=list)


def check_inputs(args: TrainArgs) -> Inputs:
    """Read and check the data and option combinations of ``args``; raise ValueError / FileNotFoundError (DataError
    names the file and row) with what to do, before any model loads or any file is written."""
    if not args.data:
        raise ValueError("no training data: pass --data FILE (.jsonl, .json, .csv, .parquet or .txt)")
    if args.eval_data and args.eval_fraction > 0:
        raise ValueError(
            f"--eval-data {args.eval_data} and --eval-fraction {args.eval_fraction} both choose the eval set; "
            "pass one of them"
        )
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in --output and --overwrite replaces it; pass one of them")
    if args.fsdp:
        _check_fsdp(args)
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output} is a file, not a folder; choose a folder path")
    records = load_records(args.data)
    fmt = detect_dataset_format(records)
    eval_records: list[dict[str, Any]] = []
    if args.eval_data:
        eval_records = load_records(args.eval_data)
        detect_dataset_format(eval_records)
    elif args.eval_fraction > 0:  # the seeded holdout the run evaluates on (DataError if it leaves no training row)
        records, eval_records = split_eval(records, args.eval_fraction, args.seed)
    return Inputs(records, fmt, eval_records)


def _check_fsdp(args: TrainArgs) -> None:
    """--fsdp shards the base across the processes torchrun started (its WORLD_SIZE), and shards Parameters only."""
    world = int(os.environ.get("WORLD_SIZE", "1") or "1")
    if world < 2:
        raise ValueError(
            "--fsdp shards the base model across torchrun processes, and this run has one: start it with "
            "'torchrun --nproc_per_node=2 -m lorakit.cli train ...', or drop --fsdp"
        )
    if args.quantize:
        raise ValueError(
            f"--fsdp with --quantize {args.quantize}: a quantized base keeps its weights in buffers, which FSDP2 "
            "does not shard (every process would hold them whole); pass one of them"
        )
