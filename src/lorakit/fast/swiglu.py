"""The gated MLP of Llama-family models, ``down(silu(gate(x)) * up(x))``, with an activation that keeps less for
backward.

For ``h = silu(g) * u`` (g, u: the gate and up projections' outputs, (tokens, intermediate) each) autograd's
composition keeps g (for silu's backward), silu(g) and u (for the product's backward): three tensors of the MLP's
widest shape per layer. ``SwiGLU`` keeps g and u and recomputes silu(g) in backward (one elementwise pass), so a
training step holds one (tokens, intermediate) tensor less per layer. Its backward, for the upstream gradient d,

    d loss / d u = d * silu(g)
    d loss / d g = silu'(g) * (d * u),     silu'(g) = sigmoid(g) * (1 + g * (1 - sigmoid(g)))

is computed with the same aten kernels autograd uses (``silu_backward`` for silu'(g) * (.)), so gradients equal
autograd's, in fp32 and in bf16 autocast alike.

The product h itself is kept by whatever reads it for backward: down's LoRA branch, for A's gradient. While down
runs, a saved-tensor hook stores g and u (already kept by SwiGLU) in place of h, and h is recomputed from them when
backward asks for it, bit-identical (same kernels, same inputs): one more (tokens, intermediate) tensor less per
layer, for one silu and one multiply in backward. The recompute hands its silu(g) to SwiGLU's node, whose backward
runs next and would compute the same silu(g) again; it takes the tensor (once) instead. The hook stands aside when
other saved-tensor hooks are active (activation checkpointing, ``save_on_cpu``): theirs apply unchanged.

``patch_mlps(model)`` makes each gated MLP of a known class use it, on the module instances (their class is not
touched); ``unpatch_mlps(model)`` restores them. lorakit's LoraModel patches when adapters are added and unpatches
when the model is unloaded; the values are the same either way (tests/test_swiglu.py). On a device the fast paths
do not run on (lorakit.fast.devices) a patched MLP runs its class's forward.
"""

from __future__ import annotations

import types

import torch
from torch import Tensor, nn

from lorakit.fast.devices import runs_fast

# transformers MLP classes whose forward is exactly ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``
GATED_MLP_CLASSES = frozenset(
    {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "Olmo2MLP", "GraniteMLP", "SmolLM3MLP", "GemmaMLP"}
)
# activation modules that compute exactly ``nn.functional.silu`` (transformers' ACT2FN["silu"] is SiLUActivation)
SILU_CLASSES = frozenset({"SiLU", "SiLUActivation"})


def reference(g: Tensor, u: Tensor) -> Tensor:
    """The definition, autograd's own composition: ``silu(g) * u``."""
    return nn.functional.silu(g) * u


class SwiGLU(torch.autograd.Function):
    """``silu(g) * u``, keeping g and u (not silu(g)) for backward; gradients as in the module doc."""

    @staticmethod
    def forward(ctx, g: Tensor, u: Tensor) -> Tensor:
        ctx.save_for_backward(g, u)
        return nn.functional.silu(g).mul_(u)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        g, u = ctx.saved_tensors
        silu_g = ctx.__dict__.pop("silu_g", None)  # handed over by the recompute of h (_Recompute), else None
        if ctx.needs_input_grad[1]:
            grad_u = (nn.functional.silu(g) if silu_g is None else silu_g).mul_(grad)
        else:
            grad_u = None
        grad_g = torch.ops.aten.silu_backward(grad * u, g) if ctx.needs_input_grad[0] else None
        return grad_g, grad_u


def swiglu(g: Tensor, u: Tensor) -> Tensor:
    """``silu(g) * u``: through ``SwiGLU`` when a gradient may be needed, else in place on silu(g)'s buffer."""
    if torch.is_grad_enabled() and (g.requires_grad or u.requires_grad):
        return SwiGLU.apply(g, u)
    return nn.functional.silu(g).mul_(u)


def _gated_forward(self: nn.Module, x: Tensor) -> Tensor:
    if not runs_fast(x):  # the device rule (lorakit.fast.devices): the class's own forward, the reference
        return type(self).forward(self, x)
    g, u = self.gate_proj(x), self.up_proj(x)
    h = swiglu(g, u)
    if h.grad_fn is None or _other_saved_tensor_hooks():
        return self.down_proj(h)
    with torch.autograd.graph.saved_tensors_hooks(*_recompute_hooks(h, g, u)):
        return self.down_proj(h)


class _Recompute:
    """What is saved in place of ``h = silu(g) * u``: g and u (kept by SwiGLU's node anyway), and that node, which
    takes the recomputed silu(g) for its own backward."""

    __slots__ = ("g", "u", "node")

    def __init__(self, g: Tensor, u: Tensor, node: object) -> None:
        self.g, self.u, self.node = g.detach(), u.detach(), node

    def value(self) -> Tensor:
        silu_g = nn.functional.silu(self.g)
        h = silu_g * self.u  # the forward's ops on the same inputs: h bit for bit
        if self.node is not None:
            self.node.silu_g = silu_g  # SwiGLU.backward (next in the backward pass) uses it instead of a new silu(g)
        return h


def _recompute_hooks(h: Tensor, g: Tensor, u: Tensor) -> tuple:
    """Saved-tensor hooks that store h as a ``_Recompute`` and pass every other tensor through."""
    key = (h.data_ptr(), h.shape, h.stride(), h.dtype)
    node = h.grad_fn if isinstance(h.grad_fn, SwiGLU._backward_cls) else None  # the ctx SwiGLU.backward receives

    def pack(t: Tensor) -> Tensor | _Recompute:
        return _Recompute(g, u, node) if (t.data_ptr(), t.shape, t.stride(), t.dtype) == key else t

    def unpack(saved: Tensor | _Recompute) -> Tensor:
        return saved.value() if isinstance(saved, _Recompute) else saved

    return pack, unpack


def _other_saved_tensor_hooks() -> bool:
    """True if saved-tensor hooks are active here (checkpointing, offloading), or if torch cannot tell."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None


def is_gated_mlp(module: nn.Module) -> bool:
    """True for a known gated-MLP class (``GATED_MLP_CLASSES``) whose activation is SiLU (Gemma's is GELU: no)."""
    return type(module).__name__ in GATED_MLP_CLASSES and type(getattr(module, "act_fn", None)).__name__ in SILU_CLASSES


def patch_mlps(model: nn.Module) -> int:
    """Make every gated MLP in ``model`` compute its activation with ``swiglu``; returns how many were patched
    (already patched ones are not counted again)."""
    count = 0
    for module in model.modules():
        if is_gated_mlp(module) and "forward" not in module.__dict__:
            module.forward = types.MethodType(_gated_forward, module)
            count += 1
    return count


def unpatch_mlps(model: nn.Module) -> None:
    """Undo ``patch_mlps``: the MLPs run their class's own forward again."""
    for module in model.modules():
        forward = module.__dict__.get("forward")
        if isinstance(forward, types.MethodType) and forward.__func__ is _gated_forward:
            del module.forward
