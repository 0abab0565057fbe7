"""Runs inside llama.cpp's own venv (llama-cpp-python), never with lorakit: greedy tokens and teacher-forced top-1
tokens of a GGUF model, with or without a GGUF LoRA adapter.

Reads a JSON job on stdin: {"model": PATH, "lora": PATH or null, "prompts": [[ids]], "continuations": [[ids]],
"max_new_tokens": N}; writes {"greedy": [[ids]], "top1": [[ids]]} on stdout. Greedy is argmax of the logits at each
step (no sampler); top1[i][j] is the argmax after prompt i + continuation i's first j tokens.
The logits are read after each single-token decode (llama.cpp keeps the last position's), not with logits_all.
"""

from __future__ import annotations

import json
import sys

import numpy as np
from llama_cpp import Llama


def last_logits(llm: Llama) -> np.ndarray:
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))


def follow(llm: Llama, prompt: list[int], forced: list[int] | None, n: int) -> list[int]:
    """The argmax after the prompt and after each next token: the model's own argmax (greedy, ``forced`` None) or
    the forced continuation's token (teacher forcing: the top-1 of each prefix)."""
    llm.reset()
    llm.eval(prompt)
    out: list[int] = []
    for j in range(n if forced is None else len(forced)):
        token = int(np.argmax(last_logits(llm)))
        out.append(token)
        if forced is None and token == llm.token_eos():
            break
        llm.eval([token if forced is None else forced[j]])
    return out


def main() -> None:
    job = json.load(sys.stdin)
    kwargs = {"lora_path": job["lora"]} if job.get("lora") else {}
    # n_batch=1: one token per decode. On this machine (AMX-capable Xeon, in a sandbox) llama.cpp's batched CPU path
    # crashes (SIGSEGV in llama_decode for any batch of 2+ tokens); single-token decodes run.
    llm = Llama(job["model"], n_ctx=512, n_batch=1, n_ubatch=1, n_threads=2, verbose=False, **kwargs)
    result = {
        "greedy": [follow(llm, p, None, job["max_new_tokens"]) for p in job["prompts"]],
        "top1": [follow(llm, p, c, 0) for p, c in zip(job["prompts"], job["continuations"], strict=True)],
    }
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
