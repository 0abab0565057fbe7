"""Rewiring a model onto the storage formats of lorakit.quant, in place: ``quantize(model, bits)``.

Every ``nn.Linear`` and GPT-2 ``Conv1D`` computing as such (also the base layer inside a LoRA wrapper) becomes a
``QuantLinear`` (NF4 or int8 codes, lorakit.quant.linear), and the input embedding and the output layer are stored in
16 bits (``HalfEmbedding`` / ``HalfLinear``, lorakit.quant.half). A LoRA layer around one of these
(``lorakit.quant.half.REDUCED_PRECISION``) is merged into a full-precision copy, never in place.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from lorakit.adapters.layer import LoraLayer
from lorakit.adapters.modules_to_save import ModulesToSaveWrapper
from lorakit.quant.formats import check_bits
from lorakit.quant.half import REDUCED_PRECISION, HalfEmbedding, HalfLinear, check_embeddings
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
    (``get_output_embeddings()``), any Linear whose weight is shared with another module (tied), and any subclass of
    nn.Linear / Conv1D whose forward computes something else than ``x @ W.T + b`` (a MoE router such as Phi-MoE's or
    Llama 4's, which returns a tuple): a QuantLinear computes only that matmul, so these stay in full precision,
    listed in one warning. A subclass that keeps nn.Linear's forward is quantized, and so is one whose own forward
    gives nn.Linear's result on a probe input (Falcon's FalconLinear; ``plain_forward``). Inside LoRA wrappers only
    the base layer is quantized (lora_A / lora_B stay fp32); modules_to_save copies are left alone.

    Modeling code that reads a layer's ``.weight`` instead of calling it (Jamba's ``dt_proj.weight @ x``) reads the
    dequantized weight (``QuantLinear.weight``, a new fp32 tensor at each read), so such models run quantized too.

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

    own_forward: Counter[str] = Counter()  # class name -> Linear subclasses kept for their forward

    def linear_like(module: nn.Module) -> bool:
        return (isinstance(module, nn.Linear) or is_conv1d(module)) and not isinstance(module, REDUCED_PRECISION)

    def converted(name: str, module: nn.Module, linear: nn.Module) -> bool:
        if not linear_like(linear) or kept(name, module, linear):
            return False
        if not plain_forward(linear):
            own_forward[type(linear).__name__] += 1
            return False
        return True

    def visit(prefix: str, parent: nn.Module) -> int:
        count = 0
        for child_name, child in parent.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            if isinstance(child, ModulesToSaveWrapper):
                continue
            if isinstance(child, LoraLayer):
                base = child.base_layer
                if converted(name, child, base):
                    child.base_layer = QuantLinear.from_linear(base, bits, double_quant)
                    child.fan_in_fan_out = False  # a QuantLinear holds (out, in), whatever the layout it replaced
                    count += 1
            elif linear_like(child):
                if converted(name, child, child):
                    setattr(parent, child_name, QuantLinear.from_linear(child, bits, double_quant))
                    count += 1
            else:
                count += visit(name, child)
        return count

    count = visit("", model)
    if own_forward:
        kinds = ", ".join(f"{k} {n}" for n, k in sorted(own_forward.items()))
        warnings.warn(
            f"lorakit.quantize: kept in full precision {kinds}: Linear subclasses with a forward of their own, which a "
            "QuantLinear (nn.Linear's matmul only) would not compute; they run as before, their memory is not reduced "
            "(pass their names in skip= to silence this)",
            stacklevel=2,
        )
    if count == 0:
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


def plain_forward(module: nn.Module) -> bool:
    """Whether ``module`` (an nn.Linear or a GPT-2 Conv1D, or a subclass) computes what nn.Linear's / Conv1D's own
    forward does, so that a QuantLinear computes the same: its class keeps that forward, or its own forward (Falcon's
    FalconLinear: ``x @ W.T + b``) gives, on a fixed random probe of two rows, a tensor equal to ``x @ W.T + b``. A
    forward that returns anything else (a router's tuple), fails on a lone input, or computes another function is
    not plain. The probe calls the class's forward directly (no hooks), without gradients."""
    conv1d = not isinstance(module, nn.Linear)
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        base_forward = Conv1D.forward
    else:
        base_forward = nn.Linear.forward
    if type(module).forward is base_forward:
        return True
    weight, bias = module.weight, getattr(module, "bias", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.is_meta:
        return False
    in_features = weight.shape[0] if conv1d else weight.shape[1]
    probe = torch.randn(2, in_features, generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype)
    try:
        with torch.no_grad():
            got = type(module).forward(module, probe)
            expected = nn.functional.linear(probe, weight.T if conv1d else weight, bias)
    except Exception:  # noqa: BLE001 - a forward that needs more than a lone input is not a plain linear one
        return False
    return isinstance(got, torch.Tensor) and got.shape == expected.shape and torch.allclose(got, expected, 1e-4, 1e-5)
