"""The 16-bit input embedding / output layer of a quantized base (lorakit.quant.half, ``quantize(embeddings=)``)
on tiny random llamas, lm_head tied and untied: outputs against a rounded reference and against fp32, the tie kept as
one storage, the bytes counted, LoRA on embed_tokens (train, save, load in PEFT, merge_and_unload), the options."""

import warnings

import pytest
import torch
from helpers import HIDDEN, VOCAB, check_against_dense, input_ids, tiny_llama
from torch import nn
from transformers import LlamaForCausalLM

from lorakit import LoraConfig, PeftModel, get_peft_model, quantize
from lorakit.adapters.embedding import LoraEmbedding
from lorakit.adapters.quantize import store_embeddings
from lorakit.quant.formats import dequantize, nbytes, quantize_weight, resident_bytes
from lorakit.quant.half import HalfEmbedding, HalfLinear
from lorakit.quant.linear import QuantLinear

TIED = [pytest.param(False, id="untied"), pytest.param(True, id="tied")]


def _llama(tied: bool, seed: int = 0) -> LlamaForCausalLM:
    """tiny_llama (eval mode, fp32) with tie_word_embeddings=``tied``."""
    config = tiny_llama(seed).config
    config.tie_word_embeddings = tied
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids()).logits


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("tied", TIED)
def test_embeddings_are_stored_in_bf16_and_the_model_computes_as_its_rounded_reference(tied):
    model, ref = quantize(_llama(tied)), _llama(tied)
    with torch.no_grad():  # the reference: dequantized Linear weights, bf16-rounded embedding / lm_head, all fp32
        for name, module in ref.named_modules():
            if isinstance(module, nn.Linear) and name != "lm_head":
                module.weight.copy_(dequantize(quantize_weight(module.weight)))
        for module in (ref.model.embed_tokens, ref.lm_head):
            module.weight.copy_(module.weight.bfloat16().float())
    embed, head = model.model.embed_tokens, model.lm_head
    assert type(embed) is HalfEmbedding and type(head) is HalfLinear
    assert embed.weight.dtype == head.weight.dtype == torch.bfloat16
    assert (head.weight is embed.weight) == tied  # tied: one Parameter, one storage
    assert (head.weight.data_ptr() == embed.weight.data_ptr()) == tied
    assert model.model(input_ids()).last_hidden_state.dtype == torch.float32  # computes in fp32 as before
    logits = _logits(model)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, _logits(ref), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tied", TIED)
def test_bf16_embeddings_round_each_value_by_at_most_2_to_the_minus_8_and_barely_move_the_logits(tied):
    full, model = _llama(tied), _llama(tied)
    W = full.model.embed_tokens.weight.detach()
    assert store_embeddings(model, "bf16") == 2  # embed_tokens and lm_head (sharing one weight if tied)
    stored = model.model.embed_tokens.weight.float()
    assert ((stored - W).abs() <= W.abs() * 2**-8).all()  # round to nearest with 8 significant bits
    rel = _relative(_logits(model), _logits(full))
    print(f"\nbf16 embeddings alone ({'tied' if tied else 'untied'}): relative logit error {rel:.5f}")
    assert rel < 0.01  # measured 0.0025 (untied), 0.0020 (tied)
    for bits, bound in [(8, 0.02), (4, 0.15)]:  # the whole quantized model (measured 0.004-0.005 and 0.064-0.074)
        assert _relative(_logits(quantize(_llama(tied), bits=bits)), _logits(full)) < bound


@pytest.mark.parametrize("tied", TIED)
def test_resident_bytes_count_a_tied_embedding_once(tied):
    fp32, model = _llama(tied), quantize(_llama(tied))
    rotary = sum(b.nbytes for b in fp32.model.rotary_emb.buffers())  # inv_freq: not weights, but resident
    assert resident_bytes(fp32) == 4 * sum(p.numel() for p in fp32.parameters()) + rotary  # parameters(): a tie once
    codes = sum(nbytes(m.quantized_weight()) for m in model.modules() if isinstance(m, QuantLinear))
    norms = 4 * sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    embeddings = 2 * VOCAB * HIDDEN * (1 if tied else 2)  # bf16; an untied lm_head has its own copy
    assert resident_bytes(model) == codes + norms + embeddings + rotary
    print(f"\nweights: fp32 {resident_bytes(fp32)} B, NF4 + bf16 embeddings {resident_bytes(model)} B")


@pytest.mark.parametrize("tied", TIED)
def test_lora_on_embed_tokens_of_a_quantized_base_trains_saves_loads_in_peft_and_merges(tmp_path, tied):
    import peft as hf_peft

    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False)
    model = get_peft_model(quantize(_llama(tied)), config)
    base = model.get_base_model()
    embed = base.model.embed_tokens
    assert isinstance(embed, LoraEmbedding) and type(embed.base_layer) is HalfEmbedding
    assert (base.lm_head.weight is embed.base_layer.weight) == tied
    model.train()
    model(input_ids(), labels=input_ids()).loss.backward()
    model.eval()
    A, B = embed.lora_weights("default")
    assert A.grad.abs().sum() > 0 and B.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if ".lora_" not in n)

    model.save_pretrained(tmp_path)
    trained = _logits(model)
    torch.testing.assert_close(_logits(PeftModel.from_pretrained(quantize(_llama(tied)), tmp_path)), trained)
    ours = _logits(PeftModel.from_pretrained(_llama(tied), tmp_path))  # onto the fp32 base
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's note about LoRA on a tied embedding
        theirs = _logits(hf_peft.PeftModel.from_pretrained(_llama(tied), tmp_path))
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    assert _relative(trained, ours) < 0.15  # NF4 + bf16: the quantization error only

    with pytest.warns(UserWarning, match="not quantized again"):
        merged = model.merge_and_unload()
    assert type(merged.model.embed_tokens) is nn.Embedding and merged.model.embed_tokens.weight.dtype == torch.float32
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    assert type(merged.lm_head) is HalfLinear  # no adapter on it: still the 16-bit output layer
    torch.testing.assert_close(_logits(merged), trained, atol=1e-5, rtol=1e-5)


def test_quantizing_after_wrapping_embed_tokens_keeps_the_tie():
    model = get_peft_model(_llama(True), LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    base = quantize(model.get_base_model())
    embed = base.model.embed_tokens
    assert type(embed.base_layer) is HalfEmbedding and base.lm_head.weight is embed.base_layer.weight


def test_half_linear_forward_and_input_gradient_equal_the_dense_reference():
    torch.manual_seed(0)
    linear = nn.Linear(40, 24)
    weight = nn.Parameter(linear.weight.detach().bfloat16(), requires_grad=False)
    layer = HalfLinear(linear, weight, torch.float32)
    layer.chunk_elements = 5 * 40  # five rows at a time
    W = weight.float()
    x = check_against_dense(layer, W, linear.bias)
    weight.requires_grad_(True)  # a trained 16-bit weight takes the plain path and gets its gradient
    layer(x).sum().backward()
    assert weight.grad is not None and weight.grad.dtype == torch.bfloat16


def test_embeddings_options():
    kept = quantize(_llama(True), embeddings="keep")
    assert type(kept.model.embed_tokens) is nn.Embedding and kept.lm_head.weight.dtype == torch.float32
    fp16 = quantize(_llama(True), embeddings="fp16")
    assert fp16.model.embed_tokens.weight.dtype == torch.float16
    assert fp16.lm_head.weight is fp16.model.embed_tokens.weight
    assert _relative(_logits(fp16), _logits(kept)) < 0.01
    with pytest.raises(ValueError, match="embeddings='int4'.*use one of"):
        quantize(_llama(True), embeddings="int4")
    assert store_embeddings(fp16) == 0  # already 16 bits: nothing to gain
    assert store_embeddings(_llama(True).to(torch.bfloat16)) == 0


def test_an_embedding_subclass_is_kept_with_a_warning():
    class Scaled(nn.Embedding):  # like Gemma's scaled word embedding: the forward does more than a lookup
        def forward(self, input: torch.Tensor) -> torch.Tensor:
            return super().forward(input) * 2.0

    model = _llama(False)
    model.model.embed_tokens = Scaled(VOCAB, HIDDEN)
    with pytest.warns(UserWarning, match="embed_tokens is a Scaled, not a plain nn.Embedding"):
        store_embeddings(model)
    assert type(model.model.embed_tokens) is Scaled and type(model.lm_head) is HalfLinear
