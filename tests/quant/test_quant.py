"""NF4 / int8 quantization against its format bounds, QuantLinear against the dense reference, and QLoRA (LoRA on a
quantized base): gradients, save / load, merge_and_unload, unload, the trainer's --quantize."""

import dataclasses
import json
import math
import warnings

import pytest
import torch
from helpers import check_against_dense, input_ids, perturb_, save_tiny_folder, tiny_gpt2, tiny_llama
from torch import nn
from transformers import LlamaForCausalLM

from lorakit import LoraConfig, PeftModel, get_peft_model, quantize
from lorakit.adapters.linear import LoraLinear
from lorakit.quant.formats import (
    DQ_BLOCK,
    NF4_BLOCK,
    NF4_CODES,
    dequantize,
    dequantize_int8,
    dequantize_nf4,
    dequantize_scales,
    nbytes,
    quantize_int8,
    quantize_nf4,
    quantize_weight,
)
from lorakit.quant.half import HalfLinear
from lorakit.quant.linear import QuantizedBaseError, QuantLinear
from lorakit.training.args import TrainArgs

HALF_GAP = float((NF4_CODES[1:] - NF4_CODES[:-1]).max()) / 2  # worst rounding error of a value in [-1, 1]


def _weight(shape: tuple[int, int] = (48, 100), seed: int = 0) -> torch.Tensor:
    """Heavy-tailed (Student-t, 3 dof) like LLM weights; 4800 values = 75 blocks of 64."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen) / torch.rand(shape, generator=gen).clamp(0.05).sqrt() * 0.02


def _nf4_codes(q) -> torch.Tensor:
    """The unpacked 4-bit codes (numel,) of an NF4Tensor."""
    return torch.stack([q.packed >> 4, q.packed & 15], dim=1).flatten()[: math.prod(q.shape)]


# -- NF4 ---------------------------------------------------------------------------------------------------------
def test_nf4_table_is_the_papers_normal_quantiles():
    """QLoRA sec. 3: 8 positive and 7 negative quantiles of N(0, 1) between offset = 1 - (1/32 + 1/30) / 2 and 1/2,
    plus 0, normalized to [-1, 1]."""
    offset = 1 - 0.5 * (1 / 32 + 1 / 30)
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    table = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    torch.testing.assert_close(NF4_CODES.double(), table / table.abs().max(), atol=2e-7, rtol=0)


def test_nf4_code_values_round_trip_exactly():
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    index = torch.arange(16).repeat(4)[perm].view(1, 64)  # every code 4 times in one block (so absmax = 1 * 0.37)
    index = torch.cat([index, index.flip(1)])  # (2, 64)
    W = NF4_CODES[index] * 0.37
    q = quantize_nf4(W, double_quant=False)
    assert torch.equal(_nf4_codes(q).long(), index.flatten())
    assert torch.equal(dequantize_nf4(q), W)
    q2 = quantize_nf4(W, double_quant=True)  # two blocks of equal absmax: the double-quantized scale is exact too
    assert torch.equal(_nf4_codes(q2).long(), index.flatten())
    assert torch.equal(dequantize_nf4(q2), W)


@pytest.mark.parametrize("shape", [(48, 100), (7, 9), (64, 64)])
def test_nf4_error_per_block_within_half_the_largest_code_gap(shape):
    W = _weight(shape)
    q = quantize_nf4(W, double_quant=False)
    err = (W - dequantize_nf4(q)).flatten()
    pad = -err.numel() % NF4_BLOCK
    err_blocks = torch.cat([err, torch.zeros(pad)]).view(-1, NF4_BLOCK).abs().amax(1)
    absmax = torch.cat([W.flatten(), torch.zeros(pad)]).view(-1, NF4_BLOCK).abs().amax(1)
    assert (err_blocks <= HALF_GAP * absmax * (1 + 1e-6)).all()


def test_nf4_error_bound_is_tight():
    worst = float(NF4_CODES[0] + NF4_CODES[1]) / 2 + 1e-5  # just right of the midpoint of the largest gap
    W = torch.tensor([[1.0, worst] * 32]) * 3.0
    err = (W - dequantize_nf4(quantize_nf4(W, double_quant=False))).abs().max()
    assert HALF_GAP * 3.0 * 0.999 < err <= HALF_GAP * 3.0 * (1 + 1e-6)


def test_double_quantized_scales_are_close_to_the_single_ones():
    W = _weight((300, 256))  # 1200 blocks of 64 -> 5 double-quantization blocks of 256 absmax values
    single = quantize_nf4(W, double_quant=False)
    double = quantize_nf4(W, double_quant=True)
    scales = dequantize_scales(double.absmax_codes, double.absmax_step, double.absmax_offset)
    groups = single.absmax.split(DQ_BLOCK)
    bounds = torch.cat([(g.max() - g.min()).expand(len(g)) / 508 for g in groups])  # step / 2 per block of 256
    assert ((scales - single.absmax).abs() <= bounds * (1 + 1e-5)).all()
    assert double.absmax_codes.dtype == torch.int8 and double.absmax_step.numel() == 5
    err_single = (W - dequantize_nf4(single)).norm()
    err_double = (W - dequantize_nf4(double)).norm()
    print(f"NF4 relative error: single {err_single / W.norm():.4f}, double-quantized {err_double / W.norm():.4f}")
    assert err_double <= 1.01 * err_single


def test_nf4_rows_decode_only_their_blocks_and_match_the_full_weight():
    q = quantize_nf4(_weight((30, 50)))  # rows of 50 do not align with blocks of 64
    full = dequantize_nf4(q)
    for start, stop in [(0, 1), (3, 17), (29, 30), (0, 30)]:
        assert torch.equal(dequantize_nf4(q, start, stop), full[start:stop])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bits, double_quant", [(4, True), (4, False), (8, True)])
def test_dequantizing_into_a_dtype_is_the_fp32_weight_rounded_once(bits, double_quant, dtype):
    """dequantize(q, dtype=...) writes code * scale (computed in fp32) straight into ``dtype``: bit for bit the fp32
    weight's .to(dtype), rows too (what a bf16 step's matmuls read, without an fp32 copy in memory)."""
    torch.manual_seed(0)
    q = quantize_weight(_weight((30, 50)) * 3, bits, double_quant)
    full = dequantize(q)
    got = dequantize(q, dtype=dtype)
    assert got.dtype == dtype and torch.equal(got, full.to(dtype))
    for start, stop in [(0, 1), (3, 17), (29, 30)]:
        assert torch.equal(dequantize(q, start, stop, dtype), full[start:stop].to(dtype))


def test_a_quant_linear_under_bf16_autocast_computes_with_the_rounded_fp32_weight():
    """The layer's bf16 forward and input gradient are F.linear's with dequantize().to(bf16), bit for bit."""
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(nn.Linear(40, 24), 4)
    layer.chunk_elements = 7 * 40  # several chunks
    x = torch.randn(3, 5, 40, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    grad = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, grad)
    W = layer.dequantize().to(torch.bfloat16)
    expected = torch.cat([nn.functional.linear(x.to(torch.bfloat16), W[i : i + 7]) for i in range(0, 24, 7)], -1)
    assert torch.equal(y, expected + layer.bias.to(torch.bfloat16))
    expected_gx = sum(grad[..., i : i + 7] @ W[i : i + 7] for i in range(0, 24, 7))
    assert torch.equal(gx, expected_gx.to(x.dtype))


# -- int8 --------------------------------------------------------------------------------------------------------
def test_int8_error_per_row_within_absmax_over_254():
    W = _weight()
    q = quantize_int8(W)
    err = (W - dequantize_int8(q)).abs().amax(1)
    assert (err <= W.abs().amax(1) / 254 * (1 + 1e-6)).all()
    assert q.codes.dtype == torch.int8 and q.codes.abs().max() == 127


# -- both ----------------------------------------------------------------------------------------------------------
def test_packed_storage_sizes():
    W = torch.randn(256, 512)  # 131072 weights = 2048 NF4 blocks = 8 double-quantization blocks
    n = W.numel()
    single, double, int8 = quantize_nf4(W, double_quant=False), quantize_nf4(W), quantize_int8(W)
    assert single.packed.dtype == torch.uint8 and single.packed.numel() == n // 2
    assert nbytes(single) == n // 2 + 4 * n // 64  # 0.5625 byte per weight
    assert nbytes(double) == n // 2 + n // 64 + 2 * 4 * 8  # ~0.516 byte per weight
    assert nbytes(int8) == n + 4 * 256
    print(f"bytes per weight: nf4 {nbytes(single) / n:.4f}, nf4+dq {nbytes(double) / n:.4f}, int8 {nbytes(int8) / n}")


@pytest.mark.parametrize("bits,double_quant", [(4, False), (4, True), (8, True)])
def test_quantizing_a_dequantized_weight_again_is_lossless(bits, double_quant):
    q = quantize_weight(_weight((40, 96)), bits, double_quant)
    W1 = dequantize(q)
    q2 = quantize_weight(W1, bits, double_quant)
    for f in dataclasses.fields(q):
        a, b = getattr(q, f.name), getattr(q2, f.name)
        if isinstance(a, torch.Tensor) and a.dtype in (torch.uint8, torch.int8):
            assert torch.equal(a, b), f.name  # the same codes
    torch.testing.assert_close(dequantize(q2), W1, rtol=1e-6, atol=1e-9)


def test_bad_inputs_say_what_to_do():
    with pytest.raises(ValueError, match="use 4 .NF4. or 8"):
        quantize_weight(torch.randn(4, 4), bits=3)
    with pytest.raises(ValueError, match="NaN/inf"):
        quantize_nf4(torch.tensor([[1.0, float("nan")]]))


# -- QuantLinear ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [4, 8])
def test_quant_linear_forward_and_input_gradient_equal_the_dense_reference(bits):
    torch.manual_seed(0)
    linear = nn.Linear(40, 24)
    layer = QuantLinear.from_linear(linear, bits)
    W = layer.dequantize()
    assert W.shape == (24, 40) and layer.in_features == 40 and layer.out_features == 24
    x = check_against_dense(layer, W, linear.bias)
    y, grad = layer(x).detach(), x.grad.clone()
    layer.chunk_elements = 5 * 40  # five rows at a time: the chunked forward and backward give the same
    x.grad = None
    y2 = layer(x)
    y2.square().sum().backward()
    torch.testing.assert_close(y2, y, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(x.grad, grad, atol=1e-4, rtol=1e-5)
    assert [n for n, _ in layer.named_parameters()] == ["bias"]
    assert all(not b.is_floating_point() or not b.requires_grad for b in layer.buffers())


def test_quantize_model_replaces_linears_except_the_output_and_tied_layers():
    model = tiny_llama(0)
    ref = tiny_llama(0)
    with torch.no_grad():  # the reference: each Linear holds its dequantized weight
        for name, module in ref.named_modules():
            if isinstance(module, nn.Linear) and name != "lm_head":
                module.weight.copy_(dequantize(quantize_weight(module.weight)))
    assert quantize(model, embeddings="keep") is model  # the embeddings' storage: tests/test_quant_embeddings.py
    kinds = {n: type(m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear))}
    assert kinds["lm_head"] is nn.Linear and kinds["model.layers.0.self_attn.q_proj"] is QuantLinear
    assert sum(k is QuantLinear for k in kinds.values()) == 14  # 2 layers x (4 attention + 3 mlp)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids()).logits, ref(input_ids()).logits, atol=1e-5, rtol=1e-5)

    config = tiny_llama(0).config
    config.tie_word_embeddings = True
    tied = LlamaForCausalLM(config)
    quantize(tied, skip=(), embeddings="keep")  # lm_head is the output embedding and tied to embed_tokens: kept
    assert type(tied.lm_head) is nn.Linear and tied.lm_head.weight is tied.model.embed_tokens.weight


# -- QLoRA -----------------------------------------------------------------------------------------------------------
def _qlora(seed: int = 0, bits: int = 4, init: bool = True) -> PeftModel:
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=init)
    return get_peft_model(quantize(tiny_llama(seed), bits=bits), config)


def test_lora_on_a_quantized_base_trains_only_the_adapter():
    peft = _qlora()
    base = quantize(tiny_llama(0))
    layer = peft.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoraLinear) and isinstance(layer.base_layer, QuantLinear) and layer.quantized
    torch.testing.assert_close(layer.weight_out_in(), layer.base_layer.dequantize())
    with torch.no_grad():  # B = 0: the model is the quantized base
        torch.testing.assert_close(peft(input_ids()).logits, base(input_ids()).logits, atol=1e-6, rtol=1e-6)
    peft.train()
    peft(input_ids(), labels=input_ids()).loss.backward()
    with_grad = {n for n, p in peft.named_parameters() if p.grad is not None}
    trainable = {n for n, p in peft.named_parameters() if p.requires_grad}
    assert with_grad == trainable and len(trainable) == 2 * 14
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all(p.grad.abs().sum() > 0 for n, p in peft.named_parameters() if ".lora_B." in n)


@pytest.mark.parametrize("bits", [4, 8])
def test_saved_qlora_adapter_loads_onto_a_freshly_quantized_base(tmp_path, bits):
    peft = _qlora(bits=bits, init=False)
    fp32 = get_peft_model(tiny_llama(0), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    peft.save_pretrained(tmp_path / "q")
    fp32.save_pretrained(tmp_path / "f")
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "q" / "adapter_model.safetensors"))
    assert keys == set(load_file(tmp_path / "f" / "adapter_model.safetensors"))  # the PEFT key layout, unchanged
    loaded = PeftModel.from_pretrained(quantize(tiny_llama(0), bits=bits), tmp_path / "q")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids()).logits, peft(input_ids()).logits, atol=1e-6, rtol=1e-6)


def test_merge_adapter_on_a_quantized_base_raises_and_merge_and_unload_dequantizes():
    peft = _qlora(init=False)
    with torch.no_grad():
        unmerged = peft(input_ids()).logits
    with pytest.raises(QuantizedBaseError, match="merge_and_unload"):
        peft.merge_adapter()
    with pytest.warns(UserWarning, match="not quantized again"):
        merged = peft.merge_and_unload()
    q_proj = merged.model.layers[1].self_attn.q_proj
    assert type(q_proj) is nn.Linear and q_proj.weight.dtype == torch.float32
    assert not any(isinstance(m, QuantLinear) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids()).logits, unmerged, atol=1e-5, rtol=1e-5)


def test_unload_gives_back_the_quant_linear():
    model = quantize(tiny_llama(0))
    q_proj = model.model.layers[0].self_attn.q_proj
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))
    base = peft.unload()
    assert base.model.layers[0].self_attn.q_proj is q_proj


def test_quantizing_after_wrapping_quantizes_the_base_layers_only():
    torch.manual_seed(1)
    peft = get_peft_model(tiny_llama(0), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    quantize(peft.get_base_model())
    layer = peft.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(layer.base_layer, QuantLinear)
    assert type(layer.lora_A["default"]) is nn.Linear and type(layer.lora_B["default"]) is nn.Linear
    assert type(peft.get_base_model().model.layers[0].mlp.up_proj) is QuantLinear  # not a target: quantized too


def test_trainer_quantize_option(tmp_path):
    with pytest.raises(ValueError, match="--quantize must be 0"):
        TrainArgs(quantize=3)
    from lorakit.training.trainer import build_model

    folder = save_tiny_folder(tmp_path / "base")
    peft, _ = build_model(TrainArgs(model=str(folder), quantize=4, r=4))
    layers = [m for m in peft.modules() if isinstance(m, LoraLinear)]
    assert layers and all(m.quantized for m in layers)
    assert type(peft.get_base_model().lm_head) is HalfLinear  # quantize's default embeddings="bf16"


def test_perturbed_adapter_changes_the_quantized_forward():
    """A test that can fail: the QLoRA forward does include the adapter."""
    peft = _qlora()
    with torch.no_grad():
        before = peft(input_ids()).logits
    perturb_([p for n, p in peft.named_parameters() if ".lora_B." in n], seed=0)
    with torch.no_grad():
        assert not torch.allclose(peft(input_ids()).logits, before, atol=1e-3)


# -- GPT-2 Conv1D (weight stored (in, out)) ------------------------------------------------------------------------
def test_conv1d_is_quantized_as_its_transpose():
    conv = tiny_gpt2(0).transformer.h[0].attn.c_attn  # Conv1D: weight (in 32, out 96), bias (96,)
    layer = QuantLinear.from_linear(conv, bits=4)
    assert layer.from_conv1d and (layer.in_features, layer.out_features) == (32, 96)
    W = layer.dequantize()  # (out, in)
    assert torch.equal(W, dequantize(quantize_weight(conv.weight.T)))
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ W.T + conv.bias, atol=1e-5, rtol=1e-5)
        back = layer.full_precision()  # a Conv1D again, weight (in, out) = W.T
        assert type(back) is type(conv) and back.weight.shape == (32, 96) and back.weight.is_contiguous()
        torch.testing.assert_close(back(x), layer(x), atol=1e-5, rtol=1e-5)


def test_quantized_gpt2_matches_its_rounded_reference_and_stays_close_to_fp32():
    model, ref, full = tiny_gpt2(0), tiny_gpt2(0), tiny_gpt2(0)
    with torch.no_grad():  # the reference: each Conv1D holds its dequantized weight, the tied wte its bf16 rounding
        for module in ref.modules():
            if type(module).__name__ == "Conv1D":
                module.weight.copy_(dequantize(quantize_weight(module.weight.T)).T)
        ref.transformer.wte.weight.copy_(ref.transformer.wte.weight.bfloat16().float())
    quantize(model)
    conv = [n for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.from_conv1d]
    assert len(conv) == 8  # 2 blocks x (c_attn, c_proj, c_fc, mlp.c_proj)
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied (one bf16 tensor)
    with torch.no_grad():
        logits, expected, fp32 = (m(input_ids()).logits for m in (model, ref, full))
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    rel = ((logits - fp32).norm() / fp32.norm()).item()
    print(f"\nGPT-2 NF4: relative logit error vs fp32 {rel:.4f}")
    assert rel < 0.1  # measured 0.046 (NF4 on a random tiny model)


def test_lora_on_a_quantized_gpt2_trains_saves_and_loads_in_peft_on_the_fp32_base(tmp_path):
    import peft as hf_peft

    torch.manual_seed(1)
    model = get_peft_model(quantize(tiny_gpt2(0)), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"]))
    layer = model.get_base_model().transformer.h[0].attn.c_attn
    assert isinstance(layer.base_layer, QuantLinear) and not layer.fan_in_fan_out  # the codes are (out, in)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(5):
        loss = model(input_ids(), labels=input_ids()).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    assert losses[-1] < losses[0]
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True  # the layout of the model the file is for (Conv1D), as PEFT writes it

    with torch.no_grad():
        trained = model(input_ids()).logits
        requantized = PeftModel.from_pretrained(quantize(tiny_gpt2(0)), tmp_path)(input_ids()).logits
        ours = PeftModel.from_pretrained(tiny_gpt2(0), tmp_path)(input_ids()).logits  # fp32 base
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            theirs = hf_peft.PeftModel.from_pretrained(tiny_gpt2(0), tmp_path)(input_ids()).logits
    torch.testing.assert_close(requantized, trained, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    assert not [str(w.message) for w in caught if "fan_in_fan_out" in str(w.message)]
    assert ((ours - trained).norm() / ours.norm()) < 0.1  # the quantization error only

    with pytest.warns(UserWarning, match="not quantized again"):
        merged = model.merge_and_unload()
    c_attn = merged.transformer.h[0].attn.c_attn
    assert type(c_attn).__name__ == "Conv1D" and c_attn.weight.shape == (32, 96)  # (in, out), as GPT-2 stores it
    assert c_attn.weight.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids()).logits, trained, atol=1e-5, rtol=1e-5)
