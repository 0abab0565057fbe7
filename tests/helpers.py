"""Tiny random transformers models for tests: built from configs (no downloads), deterministic, in eval mode.

Import from any test file (pytest puts ``tests/`` on ``sys.path`` via the rootdir conftest)::

    from helpers import input_ids, tiny_llama

    model = tiny_llama(seed=0)      # LlamaForCausalLM, hidden 32, 2 layers, vocab 100, eval mode
    logits = model(input_ids()).logits  # (2, 8, 100)

The same seed gives bit-identical weights, so ``tiny_llama(0)`` twice yields two independent copies of one base model
(the "fresh identical base" that an adapter is loaded onto). Every factory is also reachable through the ``tiny``
fixture of ``conftest.py`` (``tiny.llama(seed=1)``, ``tiny.input_ids()``).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

import lorakit
from lorakit import LoraConfig, get_peft_model

VOCAB = 100
HIDDEN = 32
LAYERS = 2
PAD_ID = 0  # pad token of tiny_llama_cls; input_ids() never produces it
# the devices torch reports available: the ``device`` fixture of conftest.py runs a test on each
DEVICES = ["cpu"] + ["cuda"] * torch.cuda.is_available() + ["mps"] * torch.backends.mps.is_available()


def _llama_config(**overrides: object) -> LlamaConfig:
    kwargs: dict = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    config = LlamaConfig(**kwargs)
    config._attn_implementation = "eager"
    return config


def _build(cls: type[nn.Module], config: object, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = cls(config)
    model.eval()
    return model


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """LlamaForCausalLM: hidden 32, 2 layers, 4 heads (2 kv), vocab 100, untied lm_head, no biases."""
    return _build(LlamaForCausalLM, _llama_config(), seed)


def tiny_llama_cls(seed: int = 0, num_labels: int = 3) -> LlamaForSequenceClassification:
    """LlamaForSequenceClassification (head ``score``, no bias) with pad_token_id = PAD_ID, so batches of any size
    pool the last non-pad token."""
    return _build(LlamaForSequenceClassification, _llama_config(num_labels=num_labels, pad_token_id=PAD_ID), seed)


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """GPT2LMHeadModel: n_embd 32, 2 layers, 4 heads, vocab 100; Conv1D layers (weights stored (in, out)) with
    biases; lm_head tied to wte."""
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=HIDDEN, n_layer=LAYERS, n_head=4, bos_token_id=1, eos_token_id=2
    )
    config._attn_implementation = "eager"
    return _build(GPT2LMHeadModel, config, seed)


def tiny_bert_cls(seed: int = 0, num_labels: int = 3) -> BertForSequenceClassification:
    """BertForSequenceClassification: hidden 32, 2 layers, 4 heads, vocab 100; head ``classifier`` (with bias);
    every Linear has a bias."""
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    config._attn_implementation = "eager"
    return _build(BertForSequenceClassification, config, seed)


def input_ids(batch: int = 2, seq: int = 8, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    """(batch, seq) int64 token ids in [1, vocab): deterministic from ``seed``, never the pad id 0."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (batch, seq), generator=gen)


def perturb_(params: list[nn.Parameter] | list[torch.Tensor], seed: int, scale: float = 0.1) -> None:
    """Add N(0, scale^2) noise to ``params`` in place (deterministic from ``seed``), e.g. to make zero-initialized
    biases or LoRA B matrices non-zero so that a test can tell them apart from a fresh model."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * scale)


# -- tokenizers and saved folders (for generate / eval / merge / CLI tests) ----------------------------------------
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# ids 0..5; bos 1, eos 2 as LlamaConfig
PROMPT_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
WORDS = "the cat sat on a mat what is two plus four six hello world user assistant system".split()


def tiny_tokenizer(chat: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over exactly the tiny llama's VOCAB ids. chat=True: ChatML template, eos <|im_end|>,
    no BOS (like SmolLM2); chat=False: no template, eos </s>, BOS prepended (like Llama)."""
    vocab = PROMPT_SPECIALS + WORDS + [f"w{i}" for i in range(VOCAB - len(PROMPT_SPECIALS) - len(WORDS))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if not chat:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="<|im_end|>" if chat else "</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    if chat:
        tokenizer.chat_template = CHATML
    return tokenizer


def silence_eos_(model: nn.Module) -> nn.Module:
    """Zero the lm_head rows of the special tokens: their logit is 0 while the best of ~94 random logits is > 0, so
    greedy decoding never stops early and outputs have exactly max_new_tokens words."""
    with torch.no_grad():
        model.get_output_embeddings().weight[: len(PROMPT_SPECIALS)] = 0
    return model


@contextlib.contextmanager
def mounted_tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (mount's syntax: "512k", "1m") mounted at the new folder ``folder`` for a real full disk;
    the calling test is skipped where the tests do not run as root or cannot mount."""
    folder.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)]
    if subprocess.run(mount, capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def save_word_data(path: Path, n: int = 24, seed: int = 0) -> Path:
    """``n`` prompt / completion records of WORDS as a .jsonl file: a task a tiny model learns in a few steps (the
    completion repeats the prompt's first word)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = " ".join(rng.choice(WORDS[:8]) for _ in range(rng.randint(2, 6)))
        rows.append({"prompt": prompt, "completion": f"{prompt.split()[0]} hello world"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def save_tiny_folder(folder: Path, seed: int = 0, chat: bool = True) -> Path:
    """A tiny llama (eos silenced) + tokenizer saved as a transformers folder."""
    silence_eos_(tiny_llama(seed)).save_pretrained(folder)
    tiny_tokenizer(chat).save_pretrained(folder)
    return folder


def save_tiny_adapter(base_dir: Path, adapter_dir: Path, seed: int = 1, **config: Any) -> Path:
    """A random (non-identity) LoRA adapter on q_proj / v_proj of the model in ``base_dir``, saved to ``adapter_dir``;
    its base_model_name_or_path is ``base_dir``."""
    torch.manual_seed(seed)
    options: dict[str, Any] = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(**{**options, **config}))
    peft.save_pretrained(adapter_dir)
    return adapter_dir


def check_against_dense(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Assert ``layer(x)`` and its input gradient equal ``x @ weight.T + bias`` for a random x (3, 5, in); returns x
    (its .grad set) for further checks."""
    x = torch.randn(3, 5, weight.shape[1], requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, ref = layer(x), x_ref @ weight.T + (0 if bias is None else bias)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    y.square().sum().backward()
    ref.square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-4, rtol=1e-5)
    return x


# -- adapter_config.json against PEFT's ------------------------------------------------------------------------------
# The keys whose values may differ between lorakit's and PEFT's adapter_config.json, each with the check that replaces
# equality, and why.
CONFIG_KEYS_THAT_DIFFER: dict[str, Any] = {
    # PEFT stores these as sets: the order of the JSON list is arbitrary (it changes with the string hash seed)
    "target_modules": lambda a, b: sorted(a) == sorted(b) if isinstance(b, list) else a == b,
    "exclude_modules": lambda a, b: sorted(a) == sorted(b) if isinstance(b, list) else a == b,
    # a set in PEFT too (a list for the MoE models of transformers 5 whose config it converts, [] if no expert is
    # targeted; None elsewhere), in arbitrary order
    "target_parameters": lambda a, b: sorted(a) == sorted(b) if isinstance(b, list) else a == b,
}


def assert_same_adapter_config(ours: Path, theirs: Path) -> None:
    """The adapter_config.json of folder ``ours`` (lorakit's) has exactly the keys of ``theirs`` (PEFT's), with
    equal values but for CONFIG_KEYS_THAT_DIFFER."""
    ours_c = json.loads((ours / "adapter_config.json").read_text())
    theirs_c = json.loads((theirs / "adapter_config.json").read_text())
    assert sorted(ours_c) == sorted(theirs_c), "both write every key"
    for key in sorted(theirs_c):
        a, b = ours_c[key], theirs_c[key]
        if key in CONFIG_KEYS_THAT_DIFFER:
            assert CONFIG_KEYS_THAT_DIFFER[key](a, b), f"{key}: lorakit {a!r} vs PEFT {b!r}"
        else:
            assert a == b, f"{key}: lorakit {a!r} != PEFT {b!r}"


# the two directions of an interop test: files written by one library, read by the other
def _peft() -> Any:
    import peft  # the reference library, imported only by the tests that use both_ways

    return peft


both_ways = pytest.mark.parametrize(
    "writer, reader", [(lorakit, _peft()), (_peft(), lorakit)], ids=["lorakit-to-peft", "peft-to-lorakit"]
)


def logits(model: nn.Module) -> torch.Tensor:
    """``model``'s logits for a fixed batch (input_ids(seed=1)), without gradients."""
    with torch.no_grad():
        return model(input_ids=input_ids(seed=1)).logits


def save_trained_and_converted(model: nn.Module, root: Path, seed: int = 3) -> torch.Tensor:
    """PEFT's documented workflow for an initializer that changes the base (PiSSA, CorDA, LoRA-GA, ...), on a fresh
    PeftModel ``model`` (either library): the initial adapter saved to ``root / 'init'`` with init_lora_weights=True,
    the LoRA weights perturbed (as if trained), then saved to ``root / <its init_lora_weights>`` as it is and to
    ``root / 'converted'`` with path_initial_model_for_weight_conversion. Returns the trained model's logits."""
    config = model.peft_config["default"]
    init = config.init_lora_weights
    config.init_lora_weights = True  # the initial adapter, saved as PEFT's docs say
    model.save_pretrained(root / "init")
    config.init_lora_weights = init
    perturb_([p for n, p in model.named_parameters() if "lora_" in n], seed=seed)  # as if trained
    expected = logits(model)
    model.save_pretrained(root / init)
    model.save_pretrained(root / "converted", path_initial_model_for_weight_conversion=str(root / "init"))
    return expected

