"""Text generation with a base model or a PeftModel: prompt formatting, batched greedy / sampled decoding, streaming.

Prompts are formatted the way training formats them (``data_tokenize.py``): with a chat template, a prompt becomes
one user turn followed by the assistant header (``add_generation_prompt=True``) and is tokenized without extra
special tokens (the template writes them); without one, the prompt text is tokenized with the tokenizer's own
special tokens (e.g. Llama's BOS). Batches are left-padded so that every row's new tokens start at the same column.

Example::

    model, tokenizer = load_pretrained("runs/lorakit/adapter")     # base named in the adapter + the adapter
    generate(model, tokenizer, ["What is 2 + 4?"], max_new_tokens=16)  # -> ["6"]
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase, TextStreamer

from lorakit.api.peft_model import PeftModel
from lorakit.config import base_model_id
from lorakit.io import files
from lorakit.io.models import load_model, load_tokenizer
from lorakit.io.progress import progress as show_progress

Messages = list[dict[str, Any]]
Prompt = str | Messages  # a plain prompt, or a conversation to continue with an assistant turn


def format_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Prompt, chat: bool | None = None) -> str:
    """The text the model sees for ``prompt``.

    A string becomes a user turn + generation prompt if the tokenizer has a chat template (``chat=None``, the
    default) or ``chat=True``; with ``chat=False`` it is returned unchanged. A list of ``{"role", "content"}``
    messages is always rendered with the chat template, ending in the assistant header.

    Raises:
        ValueError: a chat rendering is needed but the tokenizer has no chat template.
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if isinstance(prompt, str):
        if chat is False or (chat is None and not has_template):
            return prompt
        prompt = [{"role": "user", "content": prompt}]
    if not has_template:
        raise ValueError(
            f"{type(tokenizer).__name__} has no chat_template, so chat prompts cannot be rendered; use plain-text "
            "prompts with chat=False (CLI: --no-chat), or a tokenizer that ships a template (e.g. an -Instruct model)"
        )
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def uses_chat(tokenizer: PreTrainedTokenizerBase, prompt: Prompt, chat: bool | None = None) -> bool:
    """True if ``format_prompt`` renders ``prompt`` with the chat template."""
    if not isinstance(prompt, str):
        return True
    return chat is True or (chat is None and bool(getattr(tokenizer, "chat_template", None)))


class _CallbackStreamer(TextStreamer):
    """A TextStreamer that hands each finished piece of text to ``callback`` instead of printing it."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, callback: Callable[[str], Any]) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.callback = callback

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.callback(text)


def _eos_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Stop tokens: the model's generation-config eos id(s) and the tokenizer's (e.g. ChatML's <|im_end|>)."""
    ids: list[int] = []
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for eos in [*(config_eos if isinstance(config_eos, list) else [config_eos]), tokenizer.eos_token_id]:
        if eos is not None and eos not in ids:
            ids.append(int(eos))
    return ids


def generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    max_new_tokens: int = 128,
    do_sample: bool = False,
    temperature: float = 0.7,
    top_p: float = 0.9,
    top_k: int | None = None,
    batch_size: int = 8,
    stream: Callable[[str], Any] | Any | None = None,
    chat: bool | None = None,
    progress: str | None = None,
) -> list[str]:
    """Complete each prompt; returns only the new text of each, without special tokens, in prompt order.

    Args:
        model: a transformers causal LM or a PeftModel around one (it is run in eval mode, then restored).
        tokenizer: its tokenizer; a missing pad token is set to the eos token.
        prompts: strings (see ``format_prompt``) or message lists to continue.
        do_sample: sample with ``temperature`` / ``top_p`` / ``top_k``; otherwise greedy (those are ignored).
        batch_size: prompts decoded together (left-padded).
        stream: for a single prompt only: a callback receiving text pieces as they are decoded, or a transformers
            streamer (an object with ``put`` / ``end``, e.g. ``TextStreamer(tokenizer, skip_prompt=True)``).
        chat: force (True) or disable (False) the chat template for string prompts; None: use it if present.
        progress: the name of a progress display over the prompts (``lorakit.io.progress``); None: none.

    Raises:
        ValueError: bad sizes, streaming several prompts, or a chat prompt without a chat template.
    """
    if max_new_tokens <= 0 or batch_size <= 0:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) and batch_size ({batch_size}) must be positive")
    if stream is not None and len(prompts) != 1:
        raise ValueError(f"streaming needs exactly one prompt, got {len(prompts)}; drop the stream for a batch")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}; omit sampling for greedy")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
        tokenizer.pad_token = tokenizer.eos_token
    streamer = _CallbackStreamer(tokenizer, stream) if callable(stream) and not hasattr(stream, "put") else stream
    options: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": do_sample,
        # None clears sampling settings a model's generation_config may carry, which greedy decoding warns about
        "temperature": temperature if do_sample else None,
        "top_p": top_p if do_sample else None,
        "top_k": top_k if do_sample else None,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": _eos_ids(model, tokenizer),
        "streamer": streamer,
    }
    device = next(model.parameters()).device
    outputs: list[str] = []
    was_training, padding_side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    try:
        with torch.inference_mode(), show_progress(progress or "", len(prompts), "prompt", show=bool(progress)) as bar:
            for start in range(0, len(prompts), batch_size):
                outputs += _generate_batch(model, tokenizer, prompts[start : start + batch_size], chat, device, options)
                bar.update(len(prompts[start : start + batch_size]))
    finally:
        model.train(was_training)
        tokenizer.padding_side = padding_side
    return outputs


def _generate_batch(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    chat: bool | None,
    device: torch.device,
    options: dict[str, Any],
) -> list[str]:
    # A rendered template already holds its special tokens; plain text gets the tokenizer's own (e.g. BOS).
    ids = [
        tokenizer(format_prompt(tokenizer, p, chat), add_special_tokens=not uses_chat(tokenizer, p, chat))["input_ids"]
        for p in prompts
    ]
    batch = tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt").to(device)  # left-padded (B, T)
    out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **options)  # (B, T+N)
    new_tokens = out[:, batch["input_ids"].shape[1] :]  # left padding: every prompt ends at the same column
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


# -- loading and prompt files (used by the CLI) ------------------------------------------------------------------
def load_pretrained(
    model: str | None = None, adapter: str | os.PathLike[str] | None = None, trust_remote_code: bool = False
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """(model, tokenizer) for inference: the base ``model`` (default: the adapter's base, else the bundled default
    model) with the adapter in folder ``adapter`` on top, if given. A tokenizer saved with the adapter wins."""
    base_id = model
    if adapter is not None:  # a missing or corrupt adapter fails here, before the (slow) base model load
        base_id = base_model_id(adapter, model)
        files.read_weights(adapter)
    if adapter is not None and (Path(adapter) / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(adapter)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    else:
        tokenizer = load_tokenizer(base_id, trust_remote_code=trust_remote_code)
    base = load_model(base_id, trust_remote_code=trust_remote_code)
    if adapter is None:
        return base.eval(), tokenizer
    return PeftModel.from_pretrained(base, adapter).eval(), tokenizer
