"""The signatures transformers.Trainer reads off a PeftModel: the class's forward names its task's label parameters
(``declaring_labels``), the instance's forward carries the base model's own parameters (``ForwardWithBaseSignature``).
Trainer picks label columns and dataset columns by these names."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from torch import nn


def declaring_labels(forward: Callable[..., Any], *label_names: str) -> Callable[..., Any]:
    """``forward`` with a signature that names the task's label parameters. transformers.Trainer finds a model's
    label columns in the parameter names of its class's forward (transformers.utils.find_labels: names with
    'label', and start_positions / end_positions for QuestionAnswering classes), after unwrapping PEFT's classes to
    the base model's; a lorakit class is not unwrapped, so it declares the labels of its task's models. Without
    them Trainer has no label columns and evaluate() reports no eval_loss. The instance's forward keeps the base
    model's own signature (ForwardWithBaseSignature), which Trainer reads for the dataset columns."""

    @functools.wraps(forward)
    def declared(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return forward(self, *args, **kwargs)

    P = inspect.Parameter
    declared.__signature__ = inspect.Signature([  # type: ignore[attr-defined]
        P("self", P.POSITIONAL_OR_KEYWORD), P("args", P.VAR_POSITIONAL),
        *(P(name, P.KEYWORD_ONLY, default=None) for name in label_names),
        P("adapter_names", P.KEYWORD_ONLY, default=None), P("kwargs", P.VAR_KEYWORD),
    ])
    return declared


class ForwardWithBaseSignature:
    """``peft_model.forward`` with the base model's signature, so that ``transformers.Trainer`` (which keeps only
    dataset columns named in ``inspect.signature(model.forward)``) sees ``input_ids``, ``labels``, ``token_type_ids``
    ... as it would for the base model. Calls the class's forward."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.__signature__ = inspect.signature(model.get_base_model().forward)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return type(self.model).forward(self.model, *args, **kwargs)
