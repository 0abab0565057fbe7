"""The architectures of the matrix (tests/api/test_matrix.py): one tiny model per transformers ``model_type``, with its
natural task class, built from a config (no download) so that the same seed gives the same weights.

Each ``Case`` names the model_type, the transformers class, the config values that make it tiny (on top of
``SMALL``), the task type both libraries are given, and how a batch for it looks. ``build(case, seed)`` makes the
model; ``batch(case)`` its inputs (with labels, so that the output has a loss, unless the task has none).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import transformers
from torch import nn
from transformers import AutoConfig

VOCAB = 100
SEQ = 8
BATCH = 2
IMAGE = 16  # pixels per side of the tiny vision models' images
IMAGE_TOKEN = VOCAB - 1  # BLIP-2's image placeholder id: the prompt starts with one per query token

# what makes a model tiny, in the names most configs accept (or map: GPT-2's n_embd is its hidden_size)
SMALL: dict[str, Any] = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=64, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
_TEXT = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings",
         "pad_token_id", "bos_token_id", "eos_token_id")  # the SMALL keys of a language model inside another model
_HEAD_DIM = dict(head_dim=8)  # configs whose head_dim is its own field (Gemma's 256 would make it 4 x 256 wide)
# a mixture of experts: 4 experts, 2 per token, small expert MLPs (names of Mixtral / Qwen2-MoE / OLMoE / ...)
_MOE = dict(num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
            shared_expert_intermediate_size=16)

# task -> the task_type both libraries are given (it picks the PeftModelFor* class)
TASK_TYPES: dict[str, str | None] = {
    "causal_lm": "CAUSAL_LM",
    "seq2seq": "SEQ_2_SEQ_LM",
    "seq_cls": "SEQ_CLS",
    "token_cls": "TOKEN_CLS",
    "qa": "QUESTION_ANS",
    "features": "FEATURE_EXTRACTION",
    "image_cls": None,  # PEFT has no task type for images: the head is listed in modules_to_save instead
    "image_text": None,  # vision-language (BLIP-2): no PEFT task class
}
GENERATES = {"causal_lm", "seq2seq", "image_text"}


@dataclasses.dataclass(frozen=True)
class Case:
    model_type: str
    cls: str  # the transformers class, by name
    task: str  # a key of TASK_TYPES
    config: dict[str, Any] = dataclasses.field(default_factory=dict)  # on top of SMALL (None removes a SMALL key)
    modules_to_save: tuple[str, ...] = ()  # for tasks without a PEFT task class (the image classifier's head)

    @property
    def name(self) -> str:
        """The test id: model_type-task."""
        return f"{self.model_type}-{self.task}"

    @property
    def task_type(self) -> str | None:
        return TASK_TYPES[self.task]

    @property
    def generates(self) -> bool:
        return self.task in GENERATES


def _case(model_type: str, cls: str, task: str = "causal_lm", **config: Any) -> Case:
    return Case(model_type, cls, task, config)


CASES: list[Case] = [
    # -- decoders (causal LM) ------------------------------------------------------------------------------------
    _case("llama", "LlamaForCausalLM"),
    _case("mistral", "MistralForCausalLM"),
    _case("qwen2", "Qwen2ForCausalLM"),
    _case("qwen3", "Qwen3ForCausalLM", **_HEAD_DIM),
    _case("gemma", "GemmaForCausalLM", **_HEAD_DIM),
    _case("gemma2", "Gemma2ForCausalLM", **_HEAD_DIM),
    _case("gemma3_text", "Gemma3ForCausalLM", **_HEAD_DIM),
    _case("stablelm", "StableLmForCausalLM"),
    _case("phi", "PhiForCausalLM"),
    _case("phi3", "Phi3ForCausalLM"),
    _case("gpt2", "GPT2LMHeadModel"),
    _case("gpt_bigcode", "GPTBigCodeForCausalLM"),
    _case("gpt_neo", "GPTNeoForCausalLM", attention_types=[[["global", "local"], 1]], num_layers=2),
    _case("gptj", "GPTJForCausalLM", rotary_dim=4),
    _case("gpt_neox", "GPTNeoXForCausalLM"),
    _case("codegen", "CodeGenForCausalLM", rotary_dim=4, n_ctx=64),
    _case("bloom", "BloomForCausalLM"),
    _case("falcon", "FalconForCausalLM", new_decoder_architecture=True, num_kv_heads=2),
    _case("mpt", "MptForCausalLM", expansion_ratio=2),
    _case("opt", "OPTForCausalLM", ffn_dim=64, word_embed_proj_dim=32),
    _case("nemotron_h", "NemotronHForCausalLM", layers_block_type=["mamba", "attention", "mlp"], num_hidden_layers=None,
          mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=8, n_groups=1, chunk_size=8, head_dim=8,
          use_mamba_kernels=False),
    _case("rwkv", "RwkvForCausalLM", attention_hidden_size=32),
    # -- mixtures of experts (transformers 5: experts as fused 3-D parameters in most) ----------------------------
    _case("mixtral", "MixtralForCausalLM", **_MOE),
    _case("qwen2_moe", "Qwen2MoeForCausalLM", **_MOE),
    _case("qwen3_moe", "Qwen3MoeForCausalLM", **_MOE, **_HEAD_DIM),
    _case("olmoe", "OlmoeForCausalLM", **_MOE),
    _case("granitemoe", "GraniteMoeForCausalLM", **_MOE),
    _case("phimoe", "PhimoeForCausalLM", **_MOE),
    _case("deepseek_v3", "DeepseekV3ForCausalLM", **_MOE, n_routed_experts=4, first_k_dense_replace=1,
          q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, n_group=1,
          topk_group=1, num_key_value_heads=4),
    _case("gpt_oss", "GptOssForCausalLM", **_MOE, **_HEAD_DIM),
    _case("deepseek_v2", "DeepseekV2ForCausalLM", **_MOE, n_routed_experts=4, first_k_dense_replace=1,
          q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, n_group=1,
          topk_group=1, num_key_value_heads=4),
    _case("dbrx", "DbrxForCausalLM", d_model=32, n_heads=4, n_layers=2,
          ffn_config=dict(ffn_hidden_size=16, moe_num_experts=4, moe_top_k=2),
          attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0)),
    _case("jamba", "JambaForCausalLM", **_MOE, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
          expert_layer_offset=1, mamba_d_state=8, mamba_dt_rank=4, use_mamba_kernels=False),
    _case("minimax", "MiniMaxForCausalLM", **_MOE, **_HEAD_DIM),
    _case("ernie4_5_moe", "Ernie4_5_MoeForCausalLM", **_MOE, moe_num_experts=4, moe_k=2, moe_layer_start_index=0),
    _case("glm4_moe", "Glm4MoeForCausalLM", **_MOE, n_routed_experts=4, first_k_dense_replace=1, n_group=1,
          topk_group=1, **_HEAD_DIM),
    _case("hunyuan_v1_moe", "HunYuanMoEV1ForCausalLM", **_MOE, moe_topk=2, **_HEAD_DIM),
    _case("dots1", "Dots1ForCausalLM", **_MOE, n_routed_experts=4, first_k_dense_replace=1, n_group=1, topk_group=1,
          n_shared_experts=1, **_HEAD_DIM),
    _case("flex_olmo", "FlexOlmoForCausalLM", **_MOE),
    _case("lfm2_moe", "Lfm2MoeForCausalLM", **_MOE, num_dense_layers=1, layer_types=["full_attention", "conv"]),
    _case("granitemoeshared", "GraniteMoeSharedForCausalLM", **_MOE),
    _case("llama4_text", "Llama4ForCausalLM", intermediate_size=16, intermediate_size_mlp=64, head_dim=8,
          num_local_experts=4, num_experts_per_tok=1),
    _case("qwen3_next", "Qwen3NextForCausalLM", **_MOE, **_HEAD_DIM, layer_types=["linear_attention", "full_attention"],
          linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8),
    _case("switch_transformers", "SwitchTransformersForConditionalGeneration", "seq2seq", d_model=32, d_kv=8, d_ff=64,
          num_layers=2, num_decoder_layers=2, num_heads=4, num_experts=4, decoder_start_token_id=0),
    # -- encoders (sequence classification; one of each other task) -----------------------------------------------
    _case("bert", "BertForSequenceClassification", "seq_cls", num_labels=3),
    _case("roberta", "RobertaForSequenceClassification", "seq_cls", num_labels=3),
    _case("xlm-roberta", "XLMRobertaForSequenceClassification", "seq_cls", num_labels=3),
    _case("electra", "ElectraForSequenceClassification", "seq_cls", num_labels=3, embedding_size=32),
    _case("deberta", "DebertaForSequenceClassification", "seq_cls", num_labels=3),
    _case("deberta-v2", "DebertaV2ForSequenceClassification", "seq_cls", num_labels=3),
    _case("layoutlm", "LayoutLMForSequenceClassification", "seq_cls", num_labels=3),
    _case("distilbert", "DistilBertForSequenceClassification", "seq_cls", num_labels=3, dim=32, n_layers=2,
          n_heads=4, hidden_dim=64),
    _case("bert", "BertForTokenClassification", "token_cls", num_labels=3),
    _case("roberta", "RobertaForQuestionAnswering", "qa"),
    _case("electra", "ElectraModel", "features", embedding_size=32),
    _case("llama", "LlamaForSequenceClassification", "seq_cls", num_labels=3),
    # -- encoder-decoders (seq2seq) -------------------------------------------------------------------------------
    _case("t5", "T5ForConditionalGeneration", "seq2seq", d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
          decoder_start_token_id=0, feed_forward_proj="gated-gelu"),
    _case("mt5", "MT5ForConditionalGeneration", "seq2seq", d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
          decoder_start_token_id=0),
    _case("bart", "BartForConditionalGeneration", "seq2seq", d_model=32, encoder_layers=2, decoder_layers=2,
          encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
          decoder_start_token_id=2, forced_eos_token_id=None),
    # -- multimodal ----------------------------------------------------------------------------------------------
    # Gemma 4's text-only model is a Gemma4ForConditionalGeneration without vision / audio towers: PEFT's default
    # (a regex) names the language model's layers
    _case("gemma4", "Gemma4ForConditionalGeneration", vision_config=None, audio_config=None, text_config=dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, head_dim=8, global_head_dim=8, vocab_size_per_layer_input=VOCAB,
        hidden_size_per_layer_input=8)),
    _case("blip-2", "Blip2ForConditionalGeneration", "image_text", num_query_tokens=2, image_token_index=IMAGE_TOKEN,
          vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                             image_size=IMAGE, patch_size=8),
          qformer_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                              encoder_hidden_size=32, vocab_size=VOCAB, max_position_embeddings=64),
          text_config=dict(model_type="opt", **{k: SMALL[k] for k in _TEXT}, ffn_dim=64, word_embed_proj_dim=32)),
    Case("vit", "ViTForImageClassification", "image_cls", dict(image_size=IMAGE, patch_size=8, num_labels=3),
         modules_to_save=("classifier",)),
]


# model types of PEFT's default target table that are not in the matrix, and why
NOT_BUILT: dict[str, str] = {
    **dict.fromkeys(["chatglm", "btlm", "rwkv7"], "not in transformers 5.24 (remote code on the hub)"),
    **dict.fromkeys(["RefinedWeb", "RefinedWebModel"], "Falcon's model types before transformers had it ('falcon' is "
                    "in the matrix)"),
    "llama4": "Llama4ForConditionalGeneration's forward fails in transformers 5.24 without an image "
              "(outputs.image_outputs); its text model, model type llama4_text, is in the matrix",
}


def config_for(case: Case) -> transformers.PretrainedConfig:
    kwargs = {k: v for k, v in {**SMALL, **case.config}.items() if v is not None}
    config = AutoConfig.for_model(case.model_type, **kwargs)
    config._attn_implementation = "eager"
    return config


def build(case: Case, seed: int = 0) -> nn.Module:
    """The tiny model of ``case`` with weights drawn from ``seed``, in eval mode."""
    config = config_for(case)
    torch.manual_seed(seed)
    model = getattr(transformers, case.cls)(config)
    return model.eval()


def _ids(seed: int, seq: int = SEQ) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, IMAGE_TOKEN, (BATCH, seq), generator=gen)  # no pad / bos / eos / image placeholder


def _pixels(seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, 3, IMAGE, IMAGE, generator=gen)  # (B, C, H, W)


def _image_prompt(seed: int, seq: int) -> dict[str, torch.Tensor]:
    """BLIP-2's inputs: one placeholder per query token (2), then text."""
    ids = _ids(seed, seq)
    ids[:, :2] = IMAGE_TOKEN
    return dict(input_ids=ids, pixel_values=_pixels(seed))


def batch(case: Case) -> dict[str, torch.Tensor]:
    """Inputs for one forward of ``case``, with the labels of its task."""
    ids = _ids(0)
    if case.task == "causal_lm":
        return dict(input_ids=ids, labels=ids)
    if case.task == "seq2seq":
        return dict(input_ids=ids, labels=_ids(1, seq=5))
    if case.task == "seq_cls":
        return dict(input_ids=ids, labels=torch.tensor([0, 2]))
    if case.task == "token_cls":
        return dict(input_ids=ids, labels=_ids(2) % 3)
    if case.task == "qa":
        return dict(input_ids=ids, start_positions=torch.tensor([1, 3]), end_positions=torch.tensor([4, 6]))
    if case.task == "features":
        return dict(input_ids=ids)
    if case.task == "image_cls":
        return dict(pixel_values=_pixels(0), labels=torch.tensor([0, 2]))
    if case.task == "image_text":
        inputs = _image_prompt(0, SEQ)
        return dict(**inputs, labels=inputs["input_ids"])
    raise ValueError(f"no batch for task {case.task!r}")


def prompt(case: Case) -> dict[str, torch.Tensor]:
    """The inputs greedy generation starts from."""
    inputs = _image_prompt(3, 5) if case.task == "image_text" else dict(input_ids=_ids(3, seq=5))
    return dict(**inputs, attention_mask=torch.ones_like(inputs["input_ids"]))
