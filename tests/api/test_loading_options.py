"""PEFT's keyword options of PeftModel.from_pretrained / load_adapter: ignore_mismatched_sizes."""

import pytest
import torch
from torch import nn

from lorakit import AdapterFileError, LoraConfig, PeftModel, get_peft_model


class Emb(nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, 5)
        self.lin0 = nn.Linear(5, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, 2)
        return self.lin0(self.emb(ids))


def test_ignore_mismatched_sizes_does_not_leave_misfits_out(tmp_path):
    get_peft_model(Emb(100), LoraConfig(target_modules=["emb", "lin0"])).save_pretrained(tmp_path)
    shapes = r"expects 'lora_embedding_A' of shape \(8, 105\).*holds \(8, 100\)"
    with pytest.raises(AdapterFileError, match=shapes + ".*ignore_mismatched_sizes=True does not leave"):
        PeftModel.from_pretrained(Emb(105), tmp_path, ignore_mismatched_sizes=True)  # a resized vocabulary
    with pytest.raises(AdapterFileError, match=shapes) as plain:
        PeftModel.from_pretrained(Emb(105), tmp_path)
    assert "does not leave" not in str(plain.value)
    resized = get_peft_model(Emb(105), LoraConfig(target_modules=["lin0"]))
    with pytest.raises(AdapterFileError, match="ignore_mismatched_sizes=True does not leave"):
        resized.load_adapter(tmp_path, adapter_name="other", ignore_mismatched_sizes=True)
    assert list(resized.peft_config) == ["default"]  # nothing added


def test_ignore_mismatched_sizes_loads_an_adapter_that_fits(tmp_path):
    source = get_peft_model(Emb(100), LoraConfig(target_modules=["emb", "lin0"], init_lora_weights=False))
    source.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(Emb(100), tmp_path, ignore_mismatched_sizes=True)
    ids = torch.arange(12).view(3, 4)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), source(ids))
    loaded.load_adapter(tmp_path, adapter_name="other", ignore_mismatched_sizes=True)
    loaded.set_adapter("other")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), source(ids))
