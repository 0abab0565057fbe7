"""Rewiring a model onto the storage formats of lorakit.quant, in place: ``quantize(model, bits)``.

Every ``nn.Linear`` and GPT-2 ``Conv1D`` (also the base layer inside a LoRA wrapper) becomes a ``QuantLinear`` (NF4 or
int8 codes, lorakit.quant.linear), and the input embedding and the output layer are stored in 16 bits
(``HalfEmbedding`` / ``HalfLinear``, lorakit.quant.half). A LoRA layer around one of these
(``lorakit.quant.half.REDUCED_PRECISION``) is merged into a full-precision copy, never in place.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterator, Sequence

from torch import nn

from lorakit.adapters.layer import LoraLayer
from lorakit.adapters.modules_to_save import ModulesToSaveWrapper
from lorakit.quant.formats import check_bits
from lorakit.quant.half import HalfEmbedding, HalfLinear, check_embeddings
from lorakit.quant.linear import QuantLinear, is_conv1d


def quantize(
    model: nn.Module,
    bits: int = 4,
    skip: Sequence[str] = ("lm_head",),
    double_quant: bool = True,
    embeddings: str = "bf16",
) -> nn.Module:
    """Quantize the frozen base ``model`` in place and return it: every ``nn.Linear`` and GPT-2 ``Conv1D`` becomes a
    ``QuantLinear`` (NF4 for bits=4, int8 for bits=8); the input embedding and the output layer are stored as
    ``embeddings`` says.

    Linear layers kept as they are: modules named in ``skip`` (exact name or dotted suffix), the output layer
    (``get_output_embeddings()``), and any Linear whose weight is shared with another module (tied). Inside LoRA
    wrappers only the base layer is quantized (lora_A / lora_B stay fp32); modules_to_save copies are left alone.

    ``embeddings``: the storage of the input embedding (``get_input_embeddings()``) and of the output layer (lm_head),
    which are never quantized to ``bits`` (bitsandbytes / Unsloth QLoRA keep them in 16 bits too); see
    lorakit.quant.half.

    * ``"bf16"`` (default): their weights are kept in bfloat16, half the bytes of fp32 (SmolLM2-135M: the tied 49152 x
      576 embedding, 108 MiB in fp32, becomes 54 MiB), with an error of at most 2^-8 of each value. The model still
      computes in its own dtype (fp32): looked-up rows and the output layer's weight are cast on the fly. A tied
      embedding stays tied: one bf16 tensor serves both. LoRA on embed_tokens works as on any embedding, and
      ``merge_and_unload()`` gives it back as a full-precision nn.Embedding.
    * ``"fp16"``: the same in float16 (finer, 2^-11 of each value, but only from 6e-5 to 65504).
    * ``"keep"``: left as they are.

    Only plain ``nn.Embedding`` / ``nn.Linear`` modules in fp32 or fp64 are converted (a subclass, e.g. a scaled
    embedding, is kept with a warning; a model already in 16 bits has nothing to gain).

        model = lorakit.quantize(load_model(), bits=4)
        peft = lorakit.get_peft_model(model, LoraConfig(target_modules="all-linear"))   # QLoRA
    """
    check_bits(bits)
    check_embeddings(embeddings)
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    get_out = getattr(model, "get_output_embeddings", None)
    output = get_out() if callable(get_out) else None

    def kept(name: str, module: nn.Module, linear: nn.Module) -> bool:
        named = any(name == s or name.endswith(f".{s}") for s in skip)
        return named or module is output or linear is output or uses[id(linear.weight)] > 1

    def linear_like(module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) or is_conv1d(module)

    def visit(prefix: str, parent: nn.Module) -> int:
        count = 0
        for child_name, child in parent.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            if isinstance(child, ModulesToSaveWrapper):
                continue
            if isinstance(child, LoraLayer):
                base = child.base_layer
                if linear_like(base) and not kept(name, child, base):
                    child.base_layer = QuantLinear.from_linear(base, bits, double_quant)
                    child.fan_in_fan_out = False  # a QuantLinear holds (out, in), whatever the layout it replaced
                    count += 1
            elif linear_like(child):
                if not kept(name, child, child):
                    setattr(parent, child_name, QuantLinear.from_linear(child, bits, double_quant))
                    count += 1
            else:
                count += visit(name, child)
        return count

    if visit("", model) == 0:
        warnings.warn(
            f"lorakit.quantize: no nn.Linear or Conv1D to quantize in {type(model).__name__} (skip={tuple(skip)!r}); "
            "it is already quantized, or its layers are of other types",
            stacklevel=2,
        )
    store_embeddings(model, embeddings)
    return model


def store_embeddings(model: nn.Module, embeddings: str = "bf16") -> int:
    """Store the input embedding and the output layer of ``model`` in the dtype ``embeddings`` names ("bf16",
    "fp16"; "keep" does nothing), in place, looking through LoRA wrappers. Returns the number of modules replaced.

    Modules sharing one weight (a tied lm_head) are converted together onto one 16-bit Parameter. A weight also used
    elsewhere (e.g. by a modules_to_save copy's original) is left alone, so that no tie is broken."""
    dtype = check_embeddings(embeddings)
    if dtype is None:
        return 0
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    groups: dict[int, list[tuple[nn.Module, str, nn.Module]]] = {}
    for slot in _slots(model):
        groups.setdefault(id(slot[2].weight), []).append(slot)
    replaced = 0
    for group in groups.values():
        weight = group[0][2].weight
        if weight.element_size() <= 2 or uses[id(weight)] != len(group):
            continue  # already 16 bits or less, or shared with a module left as it is
        half = nn.Parameter(weight.detach().to(dtype), requires_grad=weight.requires_grad)
        for parent, attr, module in group:
            cls = HalfEmbedding if isinstance(module, nn.Embedding) else HalfLinear
            setattr(parent, attr, cls(module, half, weight.dtype))
            replaced += 1
    return replaced


def _slots(model: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, module) of the plain input embedding and output layer; for one wrapped by LoRA, the parent
    is the wrapper and the attribute ``base_layer``. Other module types are reported with a warning and skipped."""
    wanted = [_call(model, "get_input_embeddings"), _call(model, "get_output_embeddings")]
    wanted = [m for m in wanted if m is not None]
    for parent in model.modules():
        for name, child in parent.named_children():
            if not any(child is w for w in wanted):
                continue
            if isinstance(child, LoraLayer):
                owner, attr, module = child, "base_layer", child.base_layer
            else:
                owner, attr, module = parent, name, child
            if type(module) in (nn.Embedding, nn.Linear):
                yield owner, attr, module
            elif not isinstance(module, (HalfEmbedding, HalfLinear, ModulesToSaveWrapper, QuantLinear)):
                warnings.warn(
                    f"lorakit.quantize: {name} is a {type(module).__name__}, not a plain nn.Embedding / nn.Linear; it "
                    "is kept as it is (its forward may do more than a lookup or a matmul)",
                    stacklevel=4,
                )


def _call(model: nn.Module, method: str) -> nn.Module | None:
    fn = getattr(model, method, None)
    try:
        return fn() if callable(fn) else None
    except NotImplementedError:  # transformers' default when a model has no such layer
        return None
