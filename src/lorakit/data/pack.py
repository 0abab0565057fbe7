"""Packing tokenized examples into rows, and collating rows into padded tensors.

Packed examples never attend to each other. The mechanism is transformers' own packed-sequence detection
(``transformers.masking_utils``, >= 4.56 / 5.x): when a model is called with ``position_ids`` and **no**
``attention_mask`` (and no cache), ``find_packed_sequence_indices`` starts a new sequence wherever the position ids
do not increase by exactly 1, and ``create_causal_mask`` ANDs the causal mask with a same-sequence mask. This is
used by sdpa, eager and flex attention alike; flash-attention builds varlen ``cu_seqlens`` from the same position
ids. So a packed batch is ``input_ids``, ``labels`` and ``position_ids`` that restart at 0 for each example, and no
``attention_mask`` (passing one turns the detection off). Right padding gets positions 0, 1, 2, ...: it becomes
its own sequence, which no real token attends to, and its labels are -100.

**Call the model with ``use_cache=False``** (or set ``model.config.use_cache = False``): the detection is skipped
when a cache exists, and Llama & co. create a ``DynamicCache`` whenever ``use_cache`` is true -- its config default,
even in ``.train()`` mode. With a cache, packed examples silently attend to each other. (Training never needs the
cache anyway.) Checked against transformers 5.24 ``masking_utils._preprocess_mask_arguments``.

Caveat: models whose code does not pass ``position_ids`` to ``create_causal_mask`` (e.g. ALiBi models such as
Bloom and MPT, encoder-decoders) do not isolate packed examples; do not pack for those.

Labels stay aligned: HF causal-LM losses predict ``labels[t + 1]`` from position ``t``, and each example's first
label is -100, so no example is trained to predict the next one's first token. The loss of a packed batch is the
token-weighted mean of the examples' own losses.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.data.records import DataError
from lorakit.data.tokenize import IGNORE_INDEX, Example


@dataclass
class PackedRow:
    """Several examples concatenated; ``position_ids`` restart at 0 at each example, ``lengths`` are theirs."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    lengths: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def pack_examples(examples: Sequence[Example], max_length: int) -> list[PackedRow]:
    """Pack examples into rows of at most ``max_length`` tokens without splitting any example.

    Greedy best-fit decreasing: longest examples first, each into the fullest row that still has room (else a new
    row). Deterministic; rows are in creation order, examples inside a row in input order. The first label of each
    example is set to -100 (see the module docstring).

    Raises:
        DataError: an example is longer than ``max_length`` (truncate with ``tokenize_records`` first).
    """
    rows: list[list[int]] = []  # example indices per row
    free: list[tuple[int, int]] = []  # (tokens left, row index), sorted
    for i in sorted(range(len(examples)), key=lambda i: -len(examples[i])):
        n = len(examples[i])
        if n > max_length:
            raise DataError(
                f"example {i} has {n} tokens, more than the packing length {max_length}; "
                "tokenize with the same max_length (it truncates) or pack with a larger one"
            )
        k = bisect.bisect_left(free, (n, -1))  # first row with room >= n, i.e. the fullest that fits
        if k < len(free):
            room, r = free.pop(k)
            rows[r].append(i)
        else:
            room, r = max_length, len(rows)
            rows.append([i])
        if room - n > 0:
            bisect.insort(free, (room - n, r))
    return [_concat([examples[i] for i in sorted(row)]) for row in rows]


def _concat(examples: list[Example]) -> PackedRow:
    row = PackedRow(input_ids=[], labels=[], position_ids=[], lengths=[])
    for example in examples:
        row.input_ids += example.input_ids
        row.labels += [IGNORE_INDEX] + example.labels[1:]
        row.position_ids += list(range(len(example)))
        row.lengths.append(len(example))
    return row


def collate(batch: Sequence[Example | PackedRow], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad rows to the longest one and stack them into ``(B, T)`` long tensors for ``model(**batch)``.

    Returns ``input_ids``, ``labels`` (-100 on padding) and ``position_ids``; plus ``attention_mask`` (1 = token,
    0 = padding) only if no row is a ``PackedRow``. A packed batch has no ``attention_mask`` on purpose: it is what
    makes transformers isolate the packed examples (module docstring); padding is its own sequence there.
    Run packed batches as ``model(**batch, use_cache=False)``: with a KV cache, transformers skips the isolation.
    Count tokens with ``labels != -100`` rather than with the attention mask.

    Args:
        batch: examples or packed rows (mixing is allowed; an ``Example`` is a row of one).
        pad_token_id: id put in padding positions, e.g. ``tokenizer.pad_token_id`` or ``tokenizer.eos_token_id``.
    """
    if not batch:
        raise ValueError("collate got an empty batch; pass at least one example")
    if pad_token_id is None:
        raise ValueError("pad_token_id is None; pass tokenizer.pad_token_id, or tokenizer.eos_token_id if it has none")
    packed = any(isinstance(row, PackedRow) for row in batch)
    width = max(len(row.input_ids) for row in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    position_ids = torch.arange(width).repeat(len(batch), 1)  # (B, T)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
    for b, row in enumerate(batch):
        n = len(row.input_ids)
        input_ids[b, :n] = torch.tensor(row.input_ids, dtype=torch.long)
        labels[b, :n] = torch.tensor(row.labels, dtype=torch.long)
        attention_mask[b, :n] = 1
        if packed:
            positions = row.position_ids if isinstance(row, PackedRow) else list(range(n))
            position_ids[b, :n] = torch.tensor(positions, dtype=torch.long)
            position_ids[b, n:] = torch.arange(width - n)  # padding: a sequence of its own
    out = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    if not packed:
        out["attention_mask"] = attention_mask
    return out


def isolates_packed_rows(model: nn.Module, atol: float = 1e-3) -> bool:
    """Whether ``model`` keeps packed examples apart: the logits of an example packed after another one must equal its
    logits alone. Two forwards of a few tokens, in eval mode and fp32, without gradients; the mode is restored.

    False for models that ignore ``position_ids`` when masking (see the module docstring) or take none at all.
    """
    vocab = model.get_input_embeddings().num_embeddings
    first = [(7 * i + 3) % vocab for i in range(5)]
    second = [(5 * i + 11) % vocab for i in range(4)]
    was_training = model.training
    device = model.get_input_embeddings().weight.device
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            packed = model(
                input_ids=torch.tensor([first + second], device=device),
                position_ids=torch.tensor([list(range(len(first))) + list(range(len(second)))], device=device),
                use_cache=False,
            ).logits[0, len(first) :]  # (4, V)
            alone = model(
                input_ids=torch.tensor([second], device=device),
                position_ids=torch.tensor([list(range(len(second)))], device=device),
                use_cache=False,
            ).logits[0]  # (4, V)
    except TypeError:  # no position_ids argument (e.g. ALiBi models): packed rows cannot be told apart
        return False
    finally:
        model.train(was_training)
    return bool(torch.allclose(packed.float(), alone.float(), rtol=0, atol=atol))
