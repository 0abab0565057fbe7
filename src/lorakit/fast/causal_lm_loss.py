"""``model(input_ids=..., labels=...).loss`` of a transformers causal LM without the (B, T, V) logits.

A transformers ``*ForCausalLM.forward`` ends with

    logits = self.lm_head(hidden_states)                              # (B, T, V), V = 49,152 for SmolLM2
    loss = self.loss_function(logits, labels, vocab_size, **kwargs)   # ForCausalLMLoss: logits.float(), shift, CE

so a training step holds the logits, their fp32 copy and the saved softmax. ``forward`` runs the model's own forward
with two stand-ins for the duration of the call: the output layer returns a ``DeferredLogits`` (its input, kept)
instead of computing logits, and the loss function is ``causal_lm_loss``, ForCausalLMLoss's arithmetic (label shift
or ``shift_labels``, ``ignore_index``, mean or sum / ``num_items_in_batch``) over ``fast.fused_ce``'s chunked output
layer + cross-entropy, on the labelled positions only. Everything else (the body's arguments, MoE auxiliary losses)
is the model's own code.

The stand-ins are only exact when the forward passes the output layer's result, untouched, to ``loss_function`` and
to the output; ``forward_refusal`` proves that from the forward's source (``ast``): one ``logits = self.<head>(x)``,
``logits`` never reassigned (Gemma 2/3's soft-capping, Cohere's ``logit_scale`` reassign it) and read only as
``loss_function``'s logits and the output's ``logits=`` field. ``call_refusal`` checks the call: training mode,
``labels`` given, a dict output, no ``logits_to_keep``, the standard ``ForCausalLMLoss``, a head without hooks that
is a plain ``nn.Linear`` or a quantized model's 16-bit ``HalfLinear`` (``head_refusal``: its frozen bf16 / fp16
weight cast to the input's dtype, chunk by chunk, as its forward does), on a device the fast paths run on
(lorakit.fast.devices). Any refusal means the caller runs the reference (the model's own forward).

``outputs.logits`` of a fused call are computed on first read (``outputs.logits``, ``outputs["logits"]``,
``outputs.get("logits")``, integer indexing, ``to_tuple()``) from the kept head input, under the grad mode and
autocast state of the forward, as the head would have computed them; ``items()`` / ``values()`` hold the
``DeferredLogits`` itself (so accelerate's fp32 conversion of outputs does not compute them).
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lorakit.fast.devices import runs_fast
from lorakit.fast.fused_ce import DEFAULT_CHUNK, linear_cross_entropy
from lorakit.quant.half import HalfLinear

IGNORE_INDEX = -100
# decorators of transformers 5's causal-LM forwards that leave the outputs' logits as the forward made them
SAFE_DECORATORS = frozenset({"can_return_tuple", "auto_docstring", "deprecate_kwarg", "merge_with_config_defaults",
                             "add_start_docstrings_to_model_forward", "replace_return_docstrings"})


# -- the decision -----------------------------------------------------------------------------------------------
def forward_refusal(cls: type, head_attr: str) -> str | None:
    """Why ``cls.forward`` is not ``logits = self.<head_attr>(x)`` passed untouched to ``self.loss_function`` and
    the output (None when it is). Pure: reads the source only (once per function: a class whose forward is replaced
    later, as Liger's patches do, is read again)."""
    return _function_refusal(cls.forward, head_attr)


@functools.cache
def _function_refusal(fn: Callable[..., Any], head_attr: str) -> str | None:
    try:
        source = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError) as e:
        return f"{getattr(fn, '__qualname__', fn)} has no readable source ({e})"
    return source_refusal(source, head_attr)


def source_refusal(source: str, head_attr: str) -> str | None:
    """``forward_refusal`` on the source text of one ``def forward``."""
    fn = ast.parse(source).body[0]
    if not isinstance(fn, ast.FunctionDef):
        return "the forward is not a plain function"
    for d in fn.decorator_list:
        name = _name(d.func if isinstance(d, ast.Call) else d)
        if name not in SAFE_DECORATORS:
            return f"forward has decorator {name!r}, which may change its outputs"
    parents = {child: node for node in ast.walk(fn) for child in ast.iter_child_nodes(node)}
    head_calls = [n for n in ast.walk(fn) if isinstance(n, ast.Call) and _is_self_attr(n.func, head_attr)]
    if len(head_calls) != 1 or len(head_calls[0].args) != 1 or head_calls[0].keywords:
        return f"forward calls self.{head_attr} {len(head_calls)} times, or with more than one argument"
    node = head_calls[0]
    while (call := _value_preserving_call(node, parents)) is not None:  # self.lm_head(x).contiguous(), .float()
        node = call
    assign = parents[node]
    if not (isinstance(assign, ast.Assign) and len(assign.targets) == 1 and isinstance(assign.targets[0], ast.Name)):
        return f"forward does more with self.{head_attr}(...) than 'logits = self.{head_attr}(...)'"
    var = assign.targets[0].id  # "logits"; Falcon's "lm_logits"
    names = [n for n in ast.walk(fn) if isinstance(n, ast.Name) and n.id == var]
    stores = [n for n in names if not isinstance(n.ctx, ast.Load)]
    if len(stores) != 1:
        return f"forward assigns {var!r} {len(stores)} times (post-processing such as soft-capping or scaling)"
    loss_calls = [n for n in ast.walk(fn) if isinstance(n, ast.Call) and _is_self_attr(n.func, "loss_function")]
    if len(loss_calls) != 1:
        return f"forward calls self.loss_function {len(loss_calls)} times"
    for node in names:
        if isinstance(node.ctx, ast.Load) and not _plain_use(node, parents, loss_calls[0]):
            return f"forward reads {var!r} at line {node.lineno} other than as the loss's and output's logits"
    return None


def _value_preserving_call(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> ast.Call | None:
    """The call ``node.contiguous()`` or ``node.float()`` around ``node``, if it is one (DeferredLogits has both)."""
    attr = parents.get(node)
    call = parents.get(attr)  # type: ignore[arg-type]
    if isinstance(attr, ast.Attribute) and attr.attr in DeferredLogits.METHODS and isinstance(call, ast.Call):
        if call.func is attr and not call.args and not call.keywords:
            return call
    return None


def _plain_use(node: ast.Name, parents: dict[ast.AST, ast.AST], loss_call: ast.Call) -> bool:
    """The logits variable read as loss_function's first argument or ``logits=`` keyword, as a ``logits=`` field of a
    returned constructor, or inside an ``if not return_dict:`` branch (dead: call_refusal requires a dict output)."""
    parent = parents[node]
    if parent is loss_call and loss_call.args[:1] == [node]:
        return True
    if isinstance(parent, ast.keyword) and parent.arg == "logits":
        call = parents[parent]
        if call is loss_call or isinstance(parents.get(call), ast.Return):
            return True
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and ast.dump(node.test) == _NOT_RETURN_DICT:
            return True
    return False


_NOT_RETURN_DICT = ast.dump(ast.parse("not return_dict", mode="eval").body)


def _name(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ast.dump(node)


def _is_name(node: ast.AST, name: str) -> bool:
    return isinstance(node, ast.Name) and node.id == name


def _is_self_attr(node: ast.AST, attr: str) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == attr and _is_name(node.value, "self")


def head_attribute(model: nn.Module) -> str | None:
    """The attribute name of ``model``'s output layer (``lm_head``, GPT-NeoX's ``embed_out``, RWKV's ``head``)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return next((name for name, module in model.named_children() if head is not None and module is head), None)


def call_refusal(model: nn.Module, linear: nn.Module | None, kwargs: dict[str, Any]) -> str | None:
    """Why the fused loss may not replace ``model(**kwargs)`` (None when it may): ``model`` is the transformers
    model, ``linear`` the layer its head computes with (None: the head does more, e.g. LoRA on it)."""
    if not model.training:
        return "eval mode: the reference forward returns the logits"
    if kwargs.get("labels") is None:
        return "no labels: the caller wants the logits"
    config = getattr(model, "config", None)
    if kwargs.get("return_dict") is False or getattr(config, "return_dict", True) is False:
        return "return_dict=False: a tuple output holds the logits"
    if getattr(config, "torchscript", False):
        return "config.torchscript: the output is a tuple"
    if not _keeps_all(kwargs.get("logits_to_keep", 0)):
        return "logits_to_keep is set"
    if torch.compiler.is_compiling():
        return "torch.compile is tracing"
    if "forward" in vars(model):  # e.g. TRL's add_fused_lm_head, accelerate's device-map hooks
        return f"{type(model).__name__}.forward is replaced on the instance: its class's source is not what runs"
    head_attr = head_attribute(model)
    if head_attr is None:
        return f"{type(model).__name__} has no output layer among its children"
    head = getattr(model, head_attr)
    if _hooked(head) or "forward" in vars(head):
        return "the output layer has hooks or a replaced forward"
    if linear is None:
        return f"the output layer {type(head).__name__} is not a plain nn.Linear or HalfLinear"
    if (refusal := head_refusal(linear)) is not None:
        return refusal
    if "_loss_function" in vars(model) or not _is_causal_lm_loss(getattr(model, "loss_function", None)):
        return f"{type(model).__name__}'s loss function is not transformers' ForCausalLMLoss"
    return forward_refusal(type(model), head_attr)


def head_refusal(linear: nn.Module) -> str | None:
    """Why ``head_cross_entropy(linear, ...)`` may differ from ``linear``'s forward + cross-entropy (None when it
    is exact): ``linear`` must be a plain ``nn.Linear``, or a ``HalfLinear`` (not a subclass) whose 16-bit weight is
    frozen (its forward casts a trained one whole), without hooks, on a device the fast paths run on."""
    if _hooked(linear) or "forward" in vars(linear):
        return "the output layer has hooks or a replaced forward"
    if type(linear) is HalfLinear:
        if linear.weight.dtype not in (torch.bfloat16, torch.float16):
            return f"the output layer HalfLinear stores its weight in {linear.weight.dtype}, not bf16 / fp16"
        if linear.weight.requires_grad:
            return "the output layer HalfLinear's 16-bit weight requires grad (freeze it for the fused loss)"
    elif type(linear) is not nn.Linear:
        return f"the output layer {type(linear).__name__} is not a plain nn.Linear or HalfLinear"
    if not runs_fast(linear.weight):
        return f"the output layer is on {linear.weight.device}, where the fast paths do not run (lorakit.fast.devices)"
    return None


def head_cross_entropy(linear: nn.Linear, hidden: Tensor, target: Tensor, chunk: int = DEFAULT_CHUNK) -> Tensor:
    """Sum over rows of cross_entropy(linear(hidden), target) by ``fused_ce`` (``head_refusal(linear)`` must be
    None): hidden (N, H), target (N,). A HalfLinear's matmuls run in the dtype its forward uses, the input's (its
    weight cast to it) or autocast's, and its bias is added to their result, as its forward adds it."""
    half = type(linear) is HalfLinear
    return linear_cross_entropy(hidden, linear.weight, target, linear.bias, chunk, half_linear=half)


def _is_causal_lm_loss(fn: Any) -> bool:
    """Whether ``fn`` is transformers' ForCausalLMLoss (by name: importing transformers here would slow startup)."""
    return getattr(fn, "__module__", None) == "transformers.loss.loss_utils" and fn.__name__ == "ForCausalLMLoss"


def _keeps_all(logits_to_keep: Any) -> bool:
    return logits_to_keep is None or (isinstance(logits_to_keep, int) and logits_to_keep == 0)


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


# -- the deferred logits ----------------------------------------------------------------------------------------
class DeferredLogits:
    """The logits of a fused call, not computed yet: the head's input (B, T, H) and how the head ran."""

    METHODS = ("contiguous", "float")  # what forwards call on the head's output (OPT, Nemotron-H); value unchanged

    def __init__(self, head: nn.Module, hidden: Tensor, upcast: bool = False) -> None:
        self.head, self.hidden, self.upcast = head, hidden, upcast  # hidden (B, T, H)
        device = hidden.device.type
        self.grad = torch.is_grad_enabled()
        self.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        self._value: Tensor | None = None

    def contiguous(self) -> DeferredLogits:
        return self  # the head's output is contiguous

    def float(self) -> DeferredLogits:
        return self if self.upcast else DeferredLogits(self.head, self.hidden, upcast=True)

    def compute(self) -> Tensor:
        """``head(hidden)`` (B, T, V) as the forward would have computed it (once; later calls return it)."""
        if self._value is None:
            device, dtype, enabled = self.autocast
            with torch.set_grad_enabled(self.grad), torch.autocast(device, dtype=dtype, enabled=enabled):
                value = self.head(self.hidden)
                self._value = value.float() if self.upcast else value
        return self._value

    def __repr__(self) -> str:
        return (f"DeferredLogits(hidden {tuple(self.hidden.shape)}): lorakit's fused loss did not compute the logits; "
                "read outputs.logits to compute them")


class _DeferredLogitsOutput:
    """Mixin before a transformers ModelOutput class: ``logits`` computed on first read (module docstring)."""

    def _materialize(self) -> None:
        value = OrderedDict.get(self, "logits")  # type: ignore[arg-type]
        if isinstance(value, DeferredLogits):
            tensor = value.compute()
            OrderedDict.__setitem__(self, "logits", tensor)  # type: ignore[index]; keeps the key's place
            self.__dict__["logits"] = tensor

    @property
    def logits(self) -> Tensor | None:
        self._materialize()
        return self.__dict__.get("logits")

    @logits.setter
    def logits(self, value: Tensor | DeferredLogits | None) -> None:
        self.__dict__["logits"] = value

    def __getitem__(self, key: Any) -> Any:
        if not isinstance(key, str) or key == "logits":
            self._materialize()
        return super().__getitem__(key)  # type: ignore[misc]

    def get(self, key: str, default: Any = None) -> Any:
        if key == "logits":
            self._materialize()
        return super().get(key, default)  # type: ignore[misc]

    def to_tuple(self) -> tuple:
        self._materialize()
        return super().to_tuple()  # type: ignore[misc]


@functools.cache
def _deferred_class(cls: type) -> type:
    """``cls`` (a ModelOutput dataclass) with ``_DeferredLogitsOutput`` in front; same name, fields and pytree."""
    return type(cls)(cls.__name__, (_DeferredLogitsOutput, cls), {"__module__": cls.__module__,
                                                                  "__qualname__": cls.__qualname__})


def is_fused(outputs: Any) -> bool:
    """Whether ``outputs`` came from the fused path (their logits deferred, computed or not)."""
    return isinstance(outputs, _DeferredLogitsOutput)


# -- the loss ---------------------------------------------------------------------------------------------------
def causal_lm_loss(
    logits: DeferredLogits,
    labels: Tensor,
    vocab_size: int,
    num_items_in_batch: Tensor | int | None = None,
    ignore_index: int = IGNORE_INDEX,
    shift_labels: Tensor | None = None,
    *,
    linear: nn.Linear,
    chunk: int = DEFAULT_CHUNK,
    **kwargs: Any,
) -> Tensor:
    """transformers' ForCausalLMLoss(head(hidden), labels, ...) with the head fused into the cross-entropy:
    ``logits`` is the deferred head input (B, T, H), ``linear`` the head's Linear (or HalfLinear). Position t
    predicts label t + 1 (or ``shift_labels[t]``); positions labelled ``ignore_index`` are left out; the sum over
    the rest is divided by ``num_items_in_batch`` when given (what transformers.Trainer passes under gradient
    accumulation), else by their count (the mean). Other keyword arguments are ignored, as ForCausalLMLoss ignores
    them."""
    if not isinstance(logits, DeferredLogits):
        raise TypeError(f"causal_lm_loss got {type(logits).__name__} logits; it only runs inside the fused forward")
    hidden = logits.hidden  # (B, T, H)
    if shift_labels is None:  # pad one ignored label at the end, then shift: position t -> label t + 1
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    shift_labels = shift_labels.to(hidden.device)
    if shift_labels.shape != hidden.shape[:-1] or vocab_size != linear.out_features:
        raise ValueError(f"labels {tuple(shift_labels.shape)} do not match the head input {tuple(hidden.shape)} "
                         f"(vocab_size {vocab_size}, head {linear.out_features}); set model.fused_loss = False")
    keep = shift_labels != ignore_index  # (B, T)
    total = head_cross_entropy(linear, hidden[keep], shift_labels[keep], chunk)  # (N, H) -> ()
    total = total.float()  # the reference's dtype (it upcasts the logits to fp32)
    if num_items_in_batch is None:
        return total / keep.sum()  # the mean over labelled positions (nan when there are none, as the reference)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


# -- the call ---------------------------------------------------------------------------------------------------
def forward(model: nn.Module, linear: nn.Linear, call: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
    """``call(*args, **kwargs)`` (the model's forward, possibly under a caller's context) with the head and the loss
    function replaced for its duration (module docstring); ``call_refusal`` must have returned None. The output's
    class gains deferred logits (``is_fused`` tells)."""
    head = getattr(model, head_attribute(model))  # type: ignore[arg-type]
    heads: list[DeferredLogits] = []

    def deferred_head(hidden: Tensor) -> DeferredLogits:  # (B, T, H)
        heads.append(DeferredLogits(head, hidden))
        return heads[-1]

    head.forward = deferred_head  # instance attributes, removed below: the class's forward and property return
    model._loss_function = functools.partial(causal_lm_loss, linear=linear)
    try:
        outputs = call(*args, **kwargs)
    finally:
        del head.forward
        del model._loss_function
    if not heads:  # the forward that ran never called the head (nor, then, our loss): its outputs are its own
        return outputs
    if not isinstance(outputs, OrderedDict) or not isinstance(OrderedDict.get(outputs, "logits"), DeferredLogits):
        raise RuntimeError(f"{type(model).__name__}'s forward returned {type(outputs).__name__} without deferred "
                           "logits; set model.fused_loss = False and report this model")
    outputs.__class__ = _deferred_class(type(outputs))
    return outputs
