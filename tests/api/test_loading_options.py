"""PEFT's keyword options of PeftModel.from_pretrained / load_adapter that lorakit refuses, and how."""

import pytest
import torch
from torch import nn

from lorakit import LoraConfig, PeftModel, get_peft_model


class Emb(nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, 5)
        self.lin0 = nn.Linear(5, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, 2)
        return self.lin0(self.emb(ids))


def test_ignore_mismatched_sizes_is_refused_before_anything_loads(tmp_path):
    get_peft_model(Emb(100), LoraConfig(target_modules=["emb", "lin0"])).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="ignore_mismatched_sizes=True is not supported"):
        PeftModel.from_pretrained(Emb(105), tmp_path, ignore_mismatched_sizes=True)  # a resized vocabulary
    with pytest.raises(ValueError, match=r"expects 'lora_embedding_A' of shape \(8, 105\).*holds \(8, 100\)"):
        PeftModel.from_pretrained(Emb(105), tmp_path)
    model = PeftModel.from_pretrained(Emb(100), tmp_path, ignore_mismatched_sizes=False)
    with pytest.raises(ValueError, match="ignore_mismatched_sizes=True is not supported"):
        model.load_adapter(tmp_path, adapter_name="other", ignore_mismatched_sizes=True)
    assert list(model.peft_config) == ["default"]
