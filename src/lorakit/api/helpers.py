"""Helpers of PEFT's ``peft.helpers`` module that lorakit offers: ``MontecloraTrainerMixin``.

    class MontecloraTrainer(MontecloraTrainerMixin, transformers.Trainer):
        pass

trains a MonteCLoRA adapter with its variational loss added to the task loss (lorakit.adapters.variant_monteclora).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lorakit.adapters.model import LoraModel


class MontecloraTrainerMixin:
    """A ``transformers.Trainer`` mixin (PEFT's name): ``compute_loss`` returns the task loss plus
    ``LoraModel._get_monteclora_loss()`` (averaged over the model's LoraModels if it has several, as PEFT), which is
    0.0 for models without MonteCLoRA adapters and outside training mode."""

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, **kwargs: Any
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        task_loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)  # type: ignore[misc]
        tuners = [m for m in model.modules() if isinstance(m, LoraModel)]
        extra = sum((m._get_monteclora_loss() for m in tuners), 0.0)
        loss = task_loss + (extra / len(tuners) if len(tuners) > 1 else extra)
        return (loss, outputs) if return_outputs else loss
