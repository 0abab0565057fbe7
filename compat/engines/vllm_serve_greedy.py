"""Greedy tokens from the real vLLM, with and without a LoRA adapter: run by vllm_check.py with vLLM's own Python
(which has no lorakit: this file imports vLLM and the standard library only).

    python vllm_serve_greedy.py --base DIR --adapter DIR --max-lora-rank R --prompts IN.json --out OUT.json

IN.json: a list of prompts, each a list of token ids. OUT.json: {"version": vLLM's, "adapter": [[ids], ...],
"base": [[ids], ...]}, the new tokens of each prompt (temperature 0) with the adapter as a LoRARequest and without
it. vLLM logs to stdout and stderr, so the result goes to a file.
"""

from __future__ import annotations

import argparse
import json


def greedy(args: argparse.Namespace) -> dict:
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    llm = LLM(
        model=args.base,
        enable_lora=True,
        max_lora_rank=args.max_lora_rank,
        max_loras=1,
        max_model_len=512,
        dtype="float32",
        seed=0,
    )
    prompts = [{"prompt_token_ids": ids} for ids in json.loads(open(args.prompts).read())]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    lora = LoRARequest("adapter", 1, args.adapter)
    runs = {"adapter": llm.generate(prompts, params, lora_request=lora), "base": llm.generate(prompts, params)}
    tokens = {name: [list(out.outputs[0].token_ids) for out in outputs] for name, outputs in runs.items()}
    return {"version": vllm.__version__, **tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the base model folder")
    parser.add_argument("--adapter", required=True, help="the PEFT adapter folder (export_vllm's output)")
    parser.add_argument("--max-lora-rank", type=int, required=True)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--prompts", required=True, help="JSON file: a list of token id lists")
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args()
    result = greedy(args)
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":  # vLLM starts its engine in a spawned process, which re-imports this file
    main()
