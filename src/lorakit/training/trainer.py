"""The training loop: ``lorakit.train(...)`` and ``lorakit train``. Single process or torchrun (gloo on CPU).

One optimizer step takes a global batch of ``batch_size * grad_accum * world_size`` rows, in an order fixed by the
seed and the epoch. Each process takes every ``world_size``-th row of it; the loss is the sum of token losses
divided by the number of labelled tokens in the *global* batch, and gradients are summed across processes, so a
run's result does not depend on how the batch is split (processes, micro-batches). Rank 0 writes all files.
With --fsdp the frozen base is also sharded across the processes (``training/fsdp.py``); the adapter, its gradients
and everything written stay as without it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.adapters.quantize import quantize
from lorakit.api.mapping import get_peft_model
from lorakit.api.peft_model import PeftModel
from lorakit.data.pack import isolates_packed_rows, pack_examples
from lorakit.data.tokenize import Example, tokenize_records
from lorakit.io.base_rows import BaseWeights
from lorakit.io.lock import folder_lock
from lorakit.io.models import load_model, load_tokenizer, resolve_model
from lorakit.io.progress import Progress
from lorakit.io.writes import atomic_write_json
from lorakit.training import checkpoint, distributed, fsdp, interrupt, preflight
from lorakit.training.args import TrainArgs
from lorakit.training.loss import lm_loss_sum, loss_over_examples
from lorakit.training.metrics import METRICS_NAME, MetricsLog, plot_loss, write_summary
from lorakit.training.plan import Plan, Row, lr_lambda, make_plan, micro_batch_tensors, micro_batches, n_labels
from lorakit.training.precision import resolve_bf16

logger = logging.getLogger(__name__)

ADAPTER = "default"
RUN_NAME = "run.json"
# Options a --resume must share with the run.json of the run it continues (the checkpoint's rows and tensors)
RESUME_KEYS = ("data", "model", "r", "alpha", "targets", "use_dora", "bias", "batch_size", "grad_accum", "seed",
               "packing", "quantize")  # fmt: skip


class TrainingError(RuntimeError):
    """A run that cannot start or continue (bad --output / --resume, NaN loss); the message says what to do."""


def prepare_data(
    args: TrainArgs, tokenizer: Any, inputs: preflight.Inputs | None = None
) -> tuple[list[Row], list[Example], dict[str, Any]]:
    """Tokenized (and optionally packed) training rows, eval examples, and a report of what was dropped; from the
    records ``preflight.check_inputs`` read (read here if not given)."""
    inputs = inputs or preflight.check_inputs(args)
    records, eval_records = inputs.records, inputs.eval_records
    examples, stats = tokenize_records(records, tokenizer, args.max_length, args.completion_only_loss)
    eval_examples: list[Example] = []
    if eval_records:
        eval_examples, _ = tokenize_records(eval_records, tokenizer, args.max_length, args.completion_only_loss)
    rows: list[Row] = pack_examples(examples, args.max_length) if args.packing else list(examples)
    return rows, eval_examples, {"data": stats.summary(), "n_rows": len(rows), "n_eval": len(eval_examples)}


def build_model(args: TrainArgs, tokenizer: Any = None) -> tuple[PeftModel, Any]:
    """The base model with the run's adapter (``args.lora_config()``), and its tokenizer (loaded if not given)."""
    if tokenizer is None:
        tokenizer = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    model = load_model(args.model, trust_remote_code=args.trust_remote_code)
    model.config.use_cache = False
    if args.quantize:  # QLoRA: a frozen NF4 / int8 base, quantized before the adapter wraps it
        quantize(model, bits=args.quantize)
    peft = get_peft_model(model, args.lora_config())
    if args.gradient_checkpointing:
        peft.gradient_checkpointing_enable({"use_reentrant": False})
    return peft, tokenizer


def check_isolation(args: TrainArgs, model: nn.Module) -> bool:
    """Whether micro-batches run padding-free. Both that and --packing need a model that keeps examples in one row
    apart (``data_pack.isolates_packed_rows``); without it --packing is an error, padding-free falls back to padding."""
    if not (args.packing or args.padding_free):
        return False
    if isolates_packed_rows(model):
        return not args.packing  # packed rows are already dense
    name = type(model.get_base_model()).__name__ if hasattr(model, "get_base_model") else type(model).__name__
    if args.packing:
        raise TrainingError(
            f"--packing: {name} lets examples packed in one row attend to each other (it does not mask by "
            "position_ids, e.g. ALiBi models); run without --packing"
        )
    logger.info("%s does not keep packed examples apart: micro-batches are padded (--no-padding-free)", name)
    return False


def check_output(output: Path, args: TrainArgs) -> None:
    """Refuse to mix two runs in one folder; --overwrite clears the old run's records."""
    run_file = output / RUN_NAME
    old = json.loads(run_file.read_text()) if run_file.is_file() else None
    if args.resume:
        if checkpoint.latest_checkpoint(output) is None:
            raise TrainingError(
                f"--resume: no checkpoint in {output / checkpoint.CHECKPOINTS}; run without --resume "
                "(and with --save-steps N to write checkpoints)"
            )
        changed = [k for k in RESUME_KEYS if old is not None and old.get(k, getattr(TrainArgs, k)) != getattr(args, k)]
        if changed:
            raise TrainingError(
                f"--resume: {output} holds a run with different {', '.join(changed)}; resume with "
                "the same options, or start a new --output"
            )
        return
    holds_run = old is not None or (output / checkpoint.CHECKPOINTS).exists() or (output / METRICS_NAME).exists()
    if holds_run and not args.overwrite:
        raise TrainingError(
            f"--output {output} already holds a run; pass --resume to continue it, --overwrite to "
            "replace it, or choose another --output"
        )
    if holds_run:
        shutil.rmtree(output / checkpoint.CHECKPOINTS, ignore_errors=True)
        (output / METRICS_NAME).unlink(missing_ok=True)


@dataclass
class Run:
    """One training run, handed from stage to stage: what ``setup`` built, and what ``fit`` has done so far."""

    args: TrainArgs
    output: Path
    rank: int  # this process, of ``world`` (torchrun); rank 0 writes all files
    world: int
    model: PeftModel
    tokenizer: Any
    rows: list[Row]  # training rows: examples, or packed rows with --packing
    eval_examples: list[Example]
    data_report: dict[str, Any]  # what was read and dropped, for the summary
    bf16: bool
    padding_free: bool
    plan: Plan
    params: list[nn.Parameter]  # the trainable ones
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    log: MetricsLog
    start_step: int = 0  # the checkpoint's step with --resume
    eval_start: float | None = None  # eval loss before the first step (not measured on a resume)
    tokens_seen: int = 0  # tokens computed by all processes since ``fit`` started
    last: dict[str, Any] = field(default_factory=dict)  # metrics row of the latest step
    wall_time_s: float = 0.0  # of ``fit``'s steps
    wall_time_before: float = 0.0  # fit time of the segments before this one (--resume: from the checkpoint)
    sharded: fsdp.ShardedLoss | None = None  # --fsdp: the FSDP root, whose forward is the loss

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """(sum of token losses, labelled tokens) of a micro-batch: ``lm_loss_sum``, through the FSDP root with
        --fsdp (which gathers the sharded weights it needs)."""
        return self.sharded(batch) if self.sharded is not None else lm_loss_sum(self.model, batch)


def train(args: TrainArgs | None = None, **kwargs: Any) -> dict[str, Any]:
    """Fine-tune a LoRA adapter; returns the summary also written to ``<output>/summary.json``.

    ``lorakit.train(data="train.jsonl", output="runs/x", r=16)`` takes TrainArgs fields as keywords. The run holds
    the lock of its --output throughout (``io.lock.folder_lock``): a second run on the same folder stops at once
    with FolderLockedError naming this one.
    """
    args = args or TrainArgs(**kwargs)
    first_process = os.environ.get("RANK", "0") in ("", "0")  # torchrun: rank 0 writes the files, and holds the lock
    with folder_lock(args.output, "lorakit train") if first_process else contextlib.nullcontext():
        run = setup(args)
        fit(run)
        return finish(run)


def setup(args: TrainArgs) -> Run:
    """All a run needs before its first step: the inputs and the output folder checked, seeds, tokenizer and data,
    model with adapter, plan, optimizer and schedule; with --resume their state from the newest checkpoint, else
    run.json written. The output folder is made only once all that has passed."""
    inputs = preflight.check_inputs(args)  # data files and option combinations, before anything loads
    rank, world = distributed.setup()
    output = Path(args.output)
    if rank == 0:
        check_output(output, args)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    tokenizer = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    rows, eval_examples, data_report = prepare_data(args, tokenizer, inputs)  # tokenized before the model loads
    model, tokenizer = build_model(args, tokenizer)
    if rank == 0:  # only now: a run that fails its checks or its model load leaves no --output folder behind
        output.mkdir(parents=True, exist_ok=True)
        checkpoint.clean_partial(output)
    distributed.barrier()
    bf16 = resolve_bf16(args.bf16)
    sharded = None
    if args.fsdp:  # before the optimizer: it holds the trainable parameters, which FSDP leaves as they are
        fsdp.map_large_allocations()  # FSDP2's per-step gather buffers, freed, return to the system
        sharded = fsdp.shard(model, world, BaseWeights.open(resolve_model(args.model)))  # each its own rows
        padding_free = check_isolation(args, fsdp.GatheredModel(sharded))  # after: it runs the whole base
        sharded.reshard()
        data_report["fsdp"] = _fsdp_report(model, sharded)
    else:
        padding_free = check_isolation(args, model)
    plan = make_plan(len(rows), args, world)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args, plan.total_steps))
    start_step, wall_before = 0, 0.0
    if args.resume:
        state = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(output), model, ADAPTER, optimizer, scheduler)
        start_step, wall_before = state["step"], float(state.get("wall_time_s", 0.0))
    elif rank == 0:
        atomic_write_json(output / RUN_NAME, json.loads(json.dumps(args.to_dict())))
    log = MetricsLog(output, resume_step=start_step if args.resume else None)
    return Run(
        args=args, output=output, rank=rank, world=world, model=model, tokenizer=tokenizer, rows=rows,
        eval_examples=eval_examples, data_report=data_report, bf16=bf16, padding_free=padding_free, plan=plan,
        params=params, optimizer=optimizer, scheduler=scheduler, log=log, start_step=start_step,
        wall_time_before=wall_before, sharded=sharded,
    )  # fmt: skip


def fit(run: Run) -> None:
    """The steps of the run: the eval loss before the first; then after each step its metrics row, an evaluation
    every --eval-steps and after the last, a checkpoint every --save-steps, and the progress bar. A SIGTERM / SIGINT
    stops the run after the step it is in, with a checkpoint; a second one at once (``training/interrupt.py``):
    both raise RunInterrupted, naming the checkpoint and the --resume command."""
    args, total = run.args, run.plan.total_steps
    progress = None
    with interrupt.StopOnSignal() as stop:
        step = run.start_step
        stop.on_second = lambda signum: _stop_now(run, signum, step)
        try:
            if run.eval_examples and run.start_step == 0:
                run.eval_start = evaluate_loss(run)
                if run.rank == 0:
                    run.log.append({"step": 0, "eval_loss": run.eval_start})
            if stop.requested(run.world):
                raise _stop_after(run, stop.signum, run.start_step)
            run.model.train()
            progress = _progress(args, run.rank, run.start_step, total)
            started = time.perf_counter()
            for step in range(run.start_step, total):
                result = train_step(run, step)
                run.tokens_seen += int(result["tokens"])
                done = step + 1
                run.last = {
                    "step": done,
                    "epoch": round(step / run.plan.steps_per_epoch, 4),
                    "loss": result["loss"],
                    "lr": run.scheduler.get_last_lr()[0],
                    "grad_norm": result["grad_norm"],
                    "tokens_per_s": run.tokens_seen / (time.perf_counter() - started),
                    "wall_time_s": round(run.wall_time_before + time.perf_counter() - started, 3),  # all segments
                }
                if run.eval_examples and (done == total or _due(args.eval_steps, done, total)):
                    run.last["eval_loss"] = evaluate_loss(run)
                if run.rank == 0 and (done % args.logging_steps == 0 or "eval_loss" in run.last or done == total):
                    run.log.append(run.last)
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{result['loss']:.4f}", tok_s=f"{run.last['tokens_per_s']:.0f}")
                if _due(args.save_steps, done, total):
                    _save_checkpoint(run, done)
                if done < total and stop.requested(run.world):  # after the last step the run just ends
                    raise _stop_after(run, stop.signum, done)
        finally:
            if progress is not None:
                progress.close()
    run.wall_time_s = time.perf_counter() - started


def _save_checkpoint(run: Run, done: int) -> Path:
    """Checkpoint ``done`` (written by rank 0; all processes wait for it); its folder."""
    if run.rank == 0:
        run.log.sync()  # the rows up to this step, which a --resume from it keeps
        extra = {"tokens_seen": run.tokens_seen, "wall_time_s": run.last.get("wall_time_s", run.wall_time_before)}
        checkpoint.save_checkpoint(
            run.output, done, run.model, ADAPTER, run.optimizer, run.scheduler, extra, run.args.save_total_limit
        )
    distributed.barrier()
    return checkpoint.checkpoint_path(run.output, done)


def _stop_after(run: Run, signum: int | None, done: int) -> interrupt.RunInterrupted:
    """A first signal, seen after step ``done``: its checkpoint (unless --save-steps just wrote it), and the
    RunInterrupted that says so."""
    saved = checkpoint.checkpoint_path(run.output, done)
    if checkpoint.latest_checkpoint(run.output) != saved:
        saved = _save_checkpoint(run, done)
    when = f"after step {done} of {run.plan.total_steps}"
    return interrupt.interrupted(run.args, signum or signal.SIGTERM, when, saved)


def _stop_now(run: Run, signum: int, step: int) -> None:
    """A second signal: stop where the run is; the newest whole checkpoint is the one to resume from."""
    when = f"twice: stopped at once, in step {step + 1} of {run.plan.total_steps}"
    raise interrupt.interrupted(run.args, signum, when, checkpoint.latest_checkpoint(run.output))


def train_step(run: Run, step: int) -> dict[str, float]:
    """Optimizer step ``step`` (0-based): this process's micro-batches forward and backward, gradients summed over
    the processes and clipped, a stop on a non-finite loss or gradient, then the optimizer and schedule step.

    Returns the step's ``loss`` (per labelled token of the global batch), ``grad_norm`` (before clipping) and
    ``tokens`` (computed by all processes)."""
    args, rows = run.args, run.rows
    indices = run.plan.rows_for_step(step)
    n_global = sum(n_labels(rows[i]) for i in indices)
    loss_sum, n_tokens = 0.0, 0
    device = run.params[0].device if run.params else torch.device("cpu")  # batches and autocast: the model's
    for micro in micro_batches(rows, indices[run.rank :: run.world], args.batch_size):
        batch = {k: v.to(device) for k, v in micro_batch_tensors(micro, run.pad_id, run.padding_free).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=run.bf16):
            loss, _ = run.loss_sum(batch)
        (loss / max(n_global, 1)).backward()
        loss_sum += loss.item()
        n_tokens += sum(len(r) for r in micro)
    distributed.all_reduce_grads(run.params)
    loss_sum, n_tokens = distributed.sum_over_processes([loss_sum, n_tokens])
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, args.max_grad_norm or float("inf")).item()
    step_loss = loss_sum / max(n_global, 1)
    if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
        last_good = checkpoint.latest_checkpoint(run.output)
        raise TrainingError(
            f"step {step + 1}: loss {step_loss} / gradient norm {grad_norm} is not finite; the run stopped. "
            + (f"Last good checkpoint: {last_good} (resume with --resume). " if last_good else "")
            + "Lower --lr, or check the data for empty or extreme examples"
        )
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return {"loss": step_loss, "grad_norm": grad_norm, "tokens": n_tokens}


def finish(run: Run) -> dict[str, Any]:
    """The run's summary; rank 0 writes the adapter, summary.json and loss.png into --output. The returned summary
    also holds the trained model, under "model"."""
    trainable, total_params = run.model.get_nb_trainable_parameters()
    wall = run.wall_time_s  # this segment's; the summary's wall_time_s adds the segments before a --resume
    rows = run.log.rows()
    # a resumed run's eval loss before its first step is the first segment's, kept in metrics.jsonl as step 0
    eval_start = next((r["eval_loss"] for r in rows if r.get("step") == 0 and "eval_loss" in r), None)
    summary = {
        "train_loss": run.last.get("loss"),
        "eval_loss": run.last.get("eval_loss"),
        "eval_loss_start": run.eval_start if run.eval_start is not None else eval_start,
        "steps": run.plan.total_steps,
        "resumed_from": run.start_step or None,
        "wall_time_s": round(run.wall_time_before + wall, 3),
        "tokens_per_s": round(run.tokens_seen / wall, 1) if wall > 0 else None,
        "trainable_params": trainable,
        "all_params": total_params,
        "world_size": run.world,
        "bf16": run.bf16,
        "padding_free": run.padding_free,
        **run.data_report,
        "adapter": str(run.output),
        "plot": str(run.output / "loss.png"),
    }
    if run.rank == 0:
        run.model.save_pretrained(run.output)
        run.log.sync()
        write_summary(run.output, summary)
        plot_loss(run.output, rows)
    distributed.barrier()
    summary["model"] = run.model
    return summary


def evaluate_loss(run: Run) -> float:
    """Token-weighted mean eval loss over the run's eval examples (sharded over the processes)."""
    examples = run.eval_examples[run.rank :: run.world]
    shown = None
    if run.rank == 0 and run.args.progress:  # scoring the base model before the first step can take minutes
        shown = "eval loss before training" if not run.last else f"eval loss after step {run.last['step']}"
    total, count = loss_over_examples(
        run.model, examples, run.args.batch_size, run.pad_id, run.bf16, progress=shown, loss_sum=run.sharded
    )
    total, count = distributed.sum_over_processes([total, count])
    return total / max(count, 1)


def _fsdp_report(model: nn.Module, root: fsdp.ShardedLoss) -> dict[str, Any]:
    """For the summary, per process after sharding (before the first step): the bytes of frozen base weights it
    holds (and of the whole base), how many of the frozen weights it read as its own rows from the model's files
    (``fsdp.read_own_rows``), its peak resident memory so far (the load), and whether its allocator returns freed
    large blocks (``fsdp.large_allocations_mmapped``; None where it cannot be asked)."""
    local, whole = fsdp.base_bytes(model)
    mmapped = {None: -1, False: 0, True: 1}[fsdp.large_allocations_mmapped()]
    return {
        "base_bytes": whole,
        "base_bytes_per_process": distributed.gather_ints(local),
        "base_weights": root.frozen,
        "base_weights_read_as_rows": distributed.gather_ints(root.rows_read),
        "peak_rss_at_load_bytes": distributed.gather_ints(fsdp.peak_rss_bytes()),
        "large_allocations_mmapped": [None if v < 0 else bool(v) for v in distributed.gather_ints(mmapped)],
    }


def _due(every: int, done: int, total: int) -> bool:
    """Whether an every-N-steps action (--eval-steps, --save-steps; 0: never) falls after step ``done``; never after
    the last step (it is evaluated anyway, and ``finish`` saves the adapter)."""
    return bool(every) and done % every == 0 and done < total


def _progress(args: TrainArgs, rank: int, start: int, total: int) -> Progress | None:
    """The train steps' display (rank 0, unless --no-progress): a bar on a terminal, plain lines in a log."""
    if rank != 0 or not args.progress:
        return None
    return Progress("train", total, unit="step", initial=start)
