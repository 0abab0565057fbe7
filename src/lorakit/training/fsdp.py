"""``--fsdp``: the frozen base sharded across torchrun processes by PyTorch FSDP2 (``torch.distributed.fsdp.
fully_shard``; gloo on CPU).

Each decoder block is one FSDP unit, and the root unit is the loss itself (``ShardedLoss``, whose forward is
``lm_loss_sum``): it holds what no block does (embeddings, final norm, output layer). Between steps a process keeps
1/world of every frozen base weight (dim 0, padded to a multiple of world); a block's weights are gathered for its
forward, freed, and gathered again for its backward; the root's stay gathered from its forward to the end of the
backward. So a step holds the shards, the root's weights and one block's.

The adapter (every trainable parameter: LoRA A / B, DoRA magnitudes, ``modules_to_save`` copies, trained biases) is
left out of FSDP (``ignored_params``): it stays whole and identical on every process, its gradients are summed by
``distributed.all_reduce_grads`` as in a run without --fsdp, so the optimizer state, the checkpoints and the saved
adapter file are those of an unsharded run; rank 0 writes them as they are.

Loading: ``from_pretrained`` maps the safetensors file without reading it, and whatever a process touches of it
stays resident until the file's last weight is freed. So ``shard``, given the model's ``BaseWeights``
(``io/base_rows.py``), gives each frozen weight, just before its unit is sharded, a fresh tensor holding only this
process's rows, read from the file (``read_own_rows``); and the trainer runs its one whole-model check (packing
isolation) through the sharded root (``GatheredModel``) instead of before sharding. Each process then reads 1/world
of the base (SmolLM2-135M on 2 processes: peak resident memory up to the first step 901 MiB per process, against
1,176-1,187 MiB when each paged in its rows from the mapped file and ran the check on the whole model).

Example (under torchrun, after ``dist.init_process_group("gloo")``)::

    root = shard(model, world=2, weights=BaseWeights.open(folder))   # model: a PeftModel loaded from folder
    loss, n = root(batch)                  # = lm_loss_sum(model, batch)
    local, whole = base_bytes(model)       # local ~ whole / 2
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import resource
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from lorakit.io.base_rows import BaseWeights
from lorakit.training.loss import lm_loss_sum

logger = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
MMAP_THRESHOLD = 1 << 20  # bytes


class FsdpError(RuntimeError):
    """A model --fsdp cannot shard; the message says why and what to do."""


class ShardedLoss(nn.Module):
    """The FSDP root: ``forward(batch)`` is ``lm_loss_sum(model, batch)``, (sum of token losses, labelled count).

    The loss runs the model's body and applies the output layer's weight itself (``training/loss.py``), outside
    the model's forward; making the loss the root's forward gathers the root's weights for exactly that."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
        return lm_loss_sum(self.model, batch)

    def run_model(self, **inputs: Any) -> Any:
        """``model(**inputs)`` with the sharded weights gathered (an FSDP forward method: ``shard`` registers it)."""
        return self.model(**inputs)


class GatheredModel:
    """What a check that runs the whole model asks of it (``data.pack.isolates_packed_rows``: a call, its mode, its
    input embeddings), answered by the sharded model through its FSDP root, which gathers the weights as for a step.
    The root keeps its own weights gathered after a forward without backward: ``root.reshard()`` after the check."""

    def __init__(self, root: ShardedLoss) -> None:
        self.root, self.model = root, root.model

    @property
    def training(self) -> bool:
        return self.model.training

    def train(self, mode: bool = True) -> GatheredModel:
        self.model.train(mode)
        return self

    def eval(self) -> GatheredModel:
        return self.train(False)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def get_base_model(self) -> nn.Module:
        return self.model.get_base_model()

    def __call__(self, **inputs: Any) -> Any:
        return self.root.run_model(**inputs)


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: the modules of the classes transformers keeps whole when it splits a model over
    devices (``_no_split_modules``, e.g. LlamaDecoderLayer), outermost ones only."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    blocks: list[nn.Module] = []
    for module in base.modules():
        if type(module).__name__ in names and not any(_inside(module, b) for b in blocks):
            blocks.append(module)
    if not blocks:
        raise FsdpError(
            f"--fsdp: {type(base).__name__} names no decoder block class (transformers' _no_split_modules is "
            f"{getattr(base, '_no_split_modules', None)!r}), so there is nothing to shard by; run without --fsdp"
        )
    return blocks


def _inside(module: nn.Module, block: nn.Module) -> bool:
    return any(m is module for m in block.modules())


def shard(model: nn.Module, world: int, weights: BaseWeights | None = None) -> ShardedLoss:
    """Shard ``model``'s frozen weights over the ``world`` processes of the default process group: one FSDP unit per
    decoder block, then the root (``ShardedLoss``); its trainable parameters stay whole. Returns the root, whose
    forward is the training loss. With ``weights`` (the files ``model`` was loaded from), each process reads its
    own rows of every frozen weight the files hold as loaded (``read_own_rows``) instead of paging them in from the
    loaded model; ``root.rows_read`` counts those weights, of ``root.frozen`` in all."""
    adapter = {p for p in model.parameters() if p.requires_grad}
    frozen_dtypes = {p.dtype for p in model.parameters() if not p.requires_grad}
    if len(frozen_dtypes) > 1:  # FSDP2 gathers a unit's weights in one flat buffer of one dtype
        raise FsdpError(
            f"--fsdp: the base model's frozen weights mix dtypes {sorted(map(str, frozen_dtypes))}; FSDP2 needs "
            "one: load the model in one dtype, or run without --fsdp"
        )
    blocks = decoder_blocks(model)
    mesh = init_device_mesh("cpu", (world,))
    keys = base_keys(model)  # read_own_rows takes each out: no reference to a weight's unsharded tensor stays
    frozen, read = len(keys), 0
    for block in blocks:  # each unit's rows read just before it is sharded: one unit's whole weights at a time
        read += read_own_rows(_frozen(block), keys, weights, mesh.get_local_rank(), world)
        fully_shard(block, mesh=mesh, ignored_params=adapter)
    root = ShardedLoss(model)
    read += read_own_rows(_frozen(root), keys, weights, mesh.get_local_rank(), world)
    fully_shard(root, mesh=mesh, ignored_params=adapter)
    register_fsdp_forward_method(root, "run_model")
    root.rows_read, root.frozen = read, frozen
    return root


def _frozen(unit: nn.Module) -> list[nn.Parameter]:
    """The frozen parameters of ``unit`` not yet sharded (those of an inner unit already are DTensors)."""
    return [p for p in unit.parameters() if not p.requires_grad and not isinstance(p, DTensor)]


def base_keys(model: nn.Module) -> dict[nn.Parameter, str]:
    """Each frozen parameter's key in the base model's files: its name in the base model without the wrapper
    levels lorakit adds (``q_proj.base_layer.weight`` -> ``q_proj.weight``, as PEFT names them too)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    keys = {}
    for name, p in base.named_parameters():  # a tied weight once, under its first name
        if not p.requires_grad:
            keys[p] = name.replace(".base_layer.", ".").replace(".original_module.", ".")
    return keys


def own_rows(rows: int, rank: int, world: int) -> tuple[int, int]:
    """The rows ``start:stop`` of a weight with ``rows`` rows that FSDP2 keeps in process ``rank``: dim 0 cut in
    chunks of ceil(rows / world), the last ones shorter or empty (torch.chunk's split)."""
    chunk = -(-rows // world)
    return min(rank * chunk, rows), min((rank + 1) * chunk, rows)


def read_own_rows(
    params: list[nn.Parameter], keys: dict[nn.Parameter, str], weights: BaseWeights | None, rank: int, world: int
) -> int:
    """Give each of ``params`` fresh storage holding only this process's rows (``own_rows``), read from ``weights``;
    the other rows are left unwritten (never paged in): ``fully_shard`` copies out this process's rows and drops the
    rest. A weight the files do not hold as the model loaded it (another key or shape, or values transformed at
    load, compared on the first and last row read) keeps its loaded tensor. Returns how many were read."""
    read = 0
    for p in params:
        key = keys.pop(p, "")
        entry = weights.entries.get(key) if weights is not None else None
        if entry is None or entry.shape != tuple(p.shape) or p.dim() == 0:
            continue
        start, stop = own_rows(p.shape[0], rank, world)
        fresh = torch.empty(p.shape, dtype=p.dtype)  # large blocks are mmapped: unwritten rows stay unallocated
        weights.read_rows(key, start, stop, fresh[start:stop])
        if stop > start and not all(torch.equal(fresh[i], p.data[i]) for i in (start, stop - 1)):
            logger.info("--fsdp: %s differs from its file as loaded; its loaded tensor is sharded", key)
            continue
        p.data = fresh
        read += 1
    return read


def base_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of the frozen base weights this process holds, bytes of the whole frozen base): each sharded weight
    counts its local shard's storage (padding included), any other frozen weight in full. Measured between steps,
    when every unit is sharded (``shard`` leaves them so, and a step's backward reshards them)."""
    local = whole = 0
    for p in model.parameters():  # each shared (tied) weight once
        if p.requires_grad:
            continue
        whole += p.numel() * p.element_size()  # a DTensor's numel is the whole tensor's
        # the shard's own storage: FSDP2 pads dim 0 to a multiple of world, so the storage can exceed the view
        local += p.to_local().untyped_storage().nbytes() if isinstance(p, DTensor) else p.numel() * p.element_size()
    return local, whole


def map_large_allocations() -> bool:
    """On glibc, serve allocations from 1 MiB up by mmap, so that memory freed is returned to the system at once
    (``mallopt(M_MMAP_THRESHOLD)``, for the whole process); whether it was set. Not when MALLOC_MMAP_THRESHOLD_
    is already set (the user's choice) or on another C library.

    FSDP2 allocates and frees every block's gather buffers twice a step, in the training thread and gloo's. With
    glibc's default threshold (which rises to 32 MiB once a large block is freed) they stay in malloc's arenas:
    SmolLM2-135M on 2 processes grew to 2.6 GB resident each within 8 steps, for 0.65 GB live (malloc_trim), at
    3.4-3.9 s a step; with 1 MiB it stayed at 0.89 GB, at 2.9-3.1 s a step (an unsharded process: 1.15 GB)."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or platform.libc_ver()[0] != "glibc":
        return False
    done = bool(ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))  # 1 on success
    logger.info("--fsdp: allocations from %d bytes are mmapped (mallopt M_MMAP_THRESHOLD): %s", MMAP_THRESHOLD, done)
    return done


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far, in bytes (``getrusage``'s ru_maxrss: KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Mallinfo2(ctypes.Structure):  # glibc >= 2.33, malloc.h: struct mallinfo2, ten size_t counters
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]  # fmt: skip


def large_allocations_mmapped(size: int = 4 << 20) -> bool | None:
    """Whether this process's allocator serves a block of ``size`` bytes by mmap even after such a block was freed,
    which is what ``map_large_allocations`` asks for (and what MALLOC_MMAP_THRESHOLD_ at or below ``size`` does);
    None where it cannot be asked (not glibc, or a glibc before 2.33).

    glibc's default threshold is dynamic: freeing an mmapped block raises it past that block's size, so the next
    block of that size comes from the heap and is not returned when freed. The probe mallocs, frees and mallocs
    ``size`` bytes and reads whether the second block is one more mmapped block (``mallinfo2().hblks``). Run once
    with the default threshold it raises the threshold to ``size`` itself, as the first large free of a run would."""
    if platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallinfo2"):
        return None
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.restype, libc.free.argtypes = None, [ctypes.c_void_p]
    libc.mallinfo2.restype = _Mallinfo2
    libc.free(libc.malloc(size))
    before = libc.mallinfo2().hblks
    block = libc.malloc(size)
    mmapped = libc.mallinfo2().hblks == before + 1
    libc.free(block)
    return mmapped
