"""``lorakit.quantize`` on every causal-LM architecture of the matrix (tests/api/matrix_models.py): the quantized
model runs, its logits equal those of the fp32 model holding the rounded weights (each converted layer's dequantized
weight, the embedding / head in bf16), and stay close to the fp32 model's. Linear subclasses with a forward of their
own (MoE routers) stay in full precision; layers whose ``.weight`` the model reads directly (Jamba's dt_proj,
HunYuan-MoE's wg) read the dequantized weight."""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from lorakit import quantize
from lorakit.quant.half import HalfEmbedding, HalfLinear
from lorakit.quant.linear import QuantizedBaseError, QuantLinear

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "api"))
import matrix_models as mm  # noqa: E402

CAUSAL = [case for case in mm.CASES if case.task == "causal_lm"]
# case -> the Linear subclass with a forward of its own (a router returning a tuple) quantize must keep
ROUTERS = {"phimoe-causal_lm": "PhimoeTopKRouter", "llama4_text-causal_lm": "Llama4Router"}
# relative error of the logits vs fp32 (NF4 + bf16 embeddings on random tiny models): tests/quant/test_quant.py bounds
# GPT-2's by 0.1; measured here 0.003 to 0.095 for most, 0.105 GPT-J, 0.127 CodeGen; 0.21 to 0.33 for these (Gemma's
# scaled embeddings, RWKV's recurrence, FlexOlmo), bounded by 0.4. The exact check is the rounded reference.
REL_FP32 = 0.15
REL_FP32_LOOSER = {"gemma2-causal_lm", "gemma3_text-causal_lm", "gemma4-causal_lm", "rwkv-causal_lm",
                   "flex_olmo-causal_lm"}


def _rounded_reference(full: nn.Module, quantized: nn.Module) -> nn.Module:
    """A copy of the fp32 model ``full`` in which every layer ``quantized`` converted holds what the converted one
    computes with: a QuantLinear's dequantized weight, a 16-bit embedding / head's weight (rounded)."""
    ref = copy.deepcopy(full)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, QuantLinear):
                ref.get_submodule(name).weight.copy_(module.weight)  # in the layout of the layer it replaced
            elif isinstance(module, (HalfEmbedding, HalfLinear)):
                ref.get_submodule(name).weight.copy_(module.weight.float())
    return ref


@pytest.mark.parametrize("case", CAUSAL, ids=lambda c: c.name)
def test_quantized_causal_lm_runs_and_matches_its_rounded_reference(case):
    full = mm.build(case).eval()
    inputs = {k: v for k, v in mm.batch(case).items() if k != "labels"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = quantize(copy.deepcopy(full), bits=4)
    kept = [str(w.message) for w in caught if "forward of their own" in str(w.message)]
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) > 0
    if case.name in ROUTERS:
        routers = [m for m in model.modules() if type(m).__name__ == ROUTERS[case.name]]
        assert routers and all(isinstance(m, nn.Linear) and m.weight.dtype == torch.float32 for m in routers)
        assert len(kept) == 1 and ROUTERS[case.name] in kept[0]
    else:
        assert kept == []  # no warning on models without such layers
    ref = _rounded_reference(full, model)
    with torch.no_grad():
        logits, expected, fp32 = (m(**inputs).logits.float() for m in (model, ref, full))
    torch.testing.assert_close(logits, expected, atol=2e-4, rtol=1e-4)
    rel = ((logits - fp32).norm() / fp32.norm()).item()
    bound = 0.4 if case.name in REL_FP32_LOOSER else REL_FP32
    assert rel < bound, f"{case.name}: relative logit error vs fp32 {rel:.4f}"


def test_direct_weight_readers_read_the_dequantized_weight():
    """Jamba's Mamba mixer computes ``dt_proj.weight @ x``: quantized, dt_proj is a QuantLinear and the read gives its
    dequantized weight (fp32, in the replaced layer's layout); the weight cannot be assigned."""
    case = next(c for c in CAUSAL if c.name == "jamba-causal_lm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = quantize(mm.build(case), bits=4)
    dt = next(m for n, m in model.named_modules() if n.endswith("dt_proj"))
    assert isinstance(dt, QuantLinear)
    torch.testing.assert_close(dt.weight, dt.dequantize(), atol=0, rtol=0)
    assert dt.weight.dtype == torch.float32 and not dt.weight.requires_grad
    assert "weight" not in dict(dt.named_parameters()) and not any(k.endswith("weight") for k in dt.state_dict())
    with pytest.raises(QuantizedBaseError, match="requantize_"):
        dt.weight = torch.zeros(dt.out_features, dt.in_features)


class _Router(nn.Linear):
    def forward(self, x):  # a tuple, as Phi-MoE's / Llama 4's routers return
        logits = super().forward(x)
        return logits.softmax(-1), logits


class _Renamed(nn.Linear):  # nn.Linear's own forward: quantized like a plain Linear
    pass


class _OwnMatmul(nn.Linear):  # Falcon's FalconLinear: a forward of its own computing x @ W.T + b: quantized
    def forward(self, x):
        y = x @ self.weight.T
        return y if self.bias is None else y + self.bias


class _Scaled(nn.Linear):  # a tensor, but not nn.Linear's: kept
    def forward(self, x):
        return 2 * super().forward(x)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.router, self.proj, self.renamed = _Router(16, 4), nn.Linear(16, 16), _Renamed(16, 16)
        self.own, self.scaled = _OwnMatmul(16, 16), _Scaled(16, 16)

    def forward(self, x):
        scores, _ = self.router(x)
        return self.scaled(self.own(self.renamed(self.proj(x)))) * scores.sum(-1, keepdim=True)


def test_a_linear_subclass_with_its_own_forward_is_kept_with_one_warning():
    torch.manual_seed(0)
    block = _Block()
    x = torch.randn(3, 16)
    with pytest.warns(UserWarning, match=r"kept in full precision 1 _Router, 1 _Scaled"):
        quantize(block, bits=4, embeddings="keep")
    assert type(block.router) is _Router and type(block.scaled) is _Scaled
    assert all(isinstance(m, QuantLinear) for m in (block.proj, block.renamed, block.own))
    block(x)  # runs: the router still returns its tuple
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # named in skip: kept without a warning
        quantize(_Block(), bits=8, skip=("router", "scaled"), embeddings="keep")


def test_quant_linear_weight_of_a_conv1d_is_in_its_layout():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(12, 20)  # weight (in=20, out=12)
    layer = QuantLinear.from_linear(conv, bits=4)
    assert layer.weight.shape == conv.weight.shape
    torch.testing.assert_close(layer.weight, layer.dequantize().T, atol=0, rtol=0)
