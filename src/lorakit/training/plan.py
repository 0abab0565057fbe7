"""What each optimizer step takes: its rows (a seeded permutation per epoch), its micro-batches and their tensors, and
its learning rate (warmup, then cosine / linear decay, or constant). Pure functions of the data and the options."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lorakit.data.pack import PackedRow, collate, pack_examples
from lorakit.data.tokenize import IGNORE_INDEX, Example
from lorakit.training.args import TrainArgs

Row = Example | PackedRow


@dataclass
class Plan:
    """How many optimizer steps, and which rows each one takes."""

    n_rows: int
    global_batch: int
    total_steps: int
    seed: int

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n_rows / self.global_batch)

    def rows_for_step(self, step: int) -> list[int]:
        """Row indices of optimizer step ``step`` (0-based): a slice of the epoch's seeded permutation."""
        epoch, k = divmod(step, self.steps_per_epoch)
        order = torch.randperm(self.n_rows, generator=torch.Generator().manual_seed(self.seed + epoch))
        return order[k * self.global_batch : (k + 1) * self.global_batch].tolist()


def make_plan(n_rows: int, args: TrainArgs, world: int) -> Plan:
    global_batch = args.batch_size * args.grad_accum * world
    steps = args.max_steps or max(1, math.ceil(args.epochs * math.ceil(n_rows / global_batch)))
    return Plan(n_rows, global_batch, steps, args.seed)


def micro_batches(rows: list[Row], indices: list[int], batch_size: int) -> list[list[Row]]:
    """Split this process's rows into micro-batches, longest first (less padding; the sum is unchanged)."""
    mine = sorted((rows[i] for i in indices), key=len, reverse=True)
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


def micro_batch_tensors(micro: list[Row], pad_id: int, padding_free: bool) -> dict[str, torch.Tensor]:
    """The model inputs of one micro-batch.

    Padded: ``(len(micro), longest)`` with an attention mask. Padding-free (examples, not packed rows): the same
    examples back to back in rows as long as the longest of them (``pack_examples``), ``position_ids`` restarting at
    each example and no attention mask, so no example attends to another (``data_pack``). The labelled tokens are the
    same, so the loss sum and its gradient equal the padded ones up to float rounding, for fewer computed tokens; the
    rows are no longer than the padded ones, so attention (quadratic in the row length) costs no more either.
    On chat examples of 26-326 tokens, 8 per micro-batch: 3-4 rows instead of 8; a whole fp32 run of
    ``benchmarks/end_to_end.py`` 1.6x faster.
    """
    if padding_free and not any(isinstance(row, PackedRow) for row in micro):
        return collate(pack_examples(micro, max(map(len, micro))), pad_id)
    return collate(micro, pad_id)


def n_labels(row: Row) -> int:
    return sum(label != IGNORE_INDEX for label in row.labels[1:])


def lr_lambda(args: TrainArgs, total_steps: int):  # noqa: ANN201 - returns a LambdaLR schedule function
    """Linear warmup, then cosine / linear decay to 0, or constant."""
    warmup = int(args.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if args.lr_scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * progress)) if args.lr_scheduler == "cosine" else 1 - progress

    return factor
