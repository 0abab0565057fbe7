"""Decoding speed with an unmerged adapter against the plain base model (issue: speed target 3), PEFT alongside.

Loads the default model (SmolLM2-135M-Instruct) four times in one process: the plain model, lorakit with an unmerged
LoRA adapter (r=16, all linear layers, non-zero B), the same adapter merged by lorakit, and the same adapter file
loaded by HF PEFT, unmerged. Each decodes the same prompts greedily for a fixed number of new tokens; the runs are
interleaved, repeated, and the fastest of each kept (the machine's other load only ever slows a run down). Also
checks that merged and unmerged lorakit produce the same tokens as PEFT.

    .venv/bin/python benchmarks/generation.py [--new-tokens 48] [--repeats 3] [--batch 1]
    .venv/bin/python benchmarks/generation.py --layers   # one decoding step of each layer shape: microseconds

``--layers`` times one decoding step (input (1, 1, in)) through a plain nn.Linear of each of the model's shapes and the
same Linear wrapped with an unmerged r=16 adapter, interleaved, fastest of several rounds: the per-layer overhead.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

PROMPTS = [
    "Rewrite the date Friday, March 5th, 2021 in ISO format.",
    "List three prime numbers greater than 100.",
    "What is the capital of Australia?",
    "Translate 'good morning' into French.",
]


def run(new_tokens: int = 48, repeats: int = 3, batch: int = 1) -> dict[str, float]:
    import torch

    import lorakit
    from lorakit.models import load_model, load_tokenizer

    torch.manual_seed(0)
    tokenizer = load_tokenizer()
    tokenizer.padding_side = "left"
    ids = tokenizer(PROMPTS[:batch], return_tensors="pt", padding=True)
    base = load_model().eval()
    config = lorakit.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")
    unmerged = lorakit.get_peft_model(load_model(), config).eval()
    with torch.no_grad():
        for name, param in unmerged.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    with tempfile.TemporaryDirectory() as folder:
        unmerged.save_pretrained(folder)
        merged = lorakit.PeftModel.from_pretrained(load_model(), folder).eval()
        merged.merge_adapter()
        import peft

        peft_model = peft.PeftModel.from_pretrained(load_model(), folder).eval()

    models = {"base": base, "lorakit unmerged": unmerged, "lorakit merged": merged, "PEFT unmerged": peft_model}
    pad = tokenizer.pad_token_id

    def decode(model: torch.nn.Module) -> tuple[float, torch.Tensor]:
        start = time.perf_counter()
        out = model.generate(**ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=pad)
        return time.perf_counter() - start, out

    best: dict[str, float] = {}
    outputs: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for model in models.values():
            decode(model)  # warm-up
        for _ in range(repeats):
            for name, model in models.items():
                seconds, outputs[name] = decode(model)
                best[name] = min(best.get(name, float("inf")), seconds)
    tokens = batch * new_tokens
    result = {f"{name} tok/s": tokens / s for name, s in best.items()}
    result["unmerged / base"] = best["base"] / best["lorakit unmerged"]
    result["merged / base"] = best["base"] / best["lorakit merged"]
    result["PEFT unmerged / base"] = best["base"] / best["PEFT unmerged"]
    result["tokens equal to PEFT"] = float(
        torch.equal(outputs["lorakit unmerged"], outputs["PEFT unmerged"])
        and torch.equal(outputs["lorakit merged"], outputs["PEFT unmerged"])
    )
    return result


def layers(rounds: int = 15, calls: int = 1000) -> dict[str, float]:
    import torch
    from torch import nn

    from lorakit.layers import LoraLinear

    result: dict[str, float] = {}
    with torch.inference_mode():
        for fan_in, fan_out in [(576, 576), (576, 192), (576, 1536), (1536, 576)]:  # q/o, k/v, gate/up, down
            torch.manual_seed(0)
            lora = LoraLinear(nn.Linear(fan_in, fan_out, bias=False))
            lora.update_layer("default", 16, 32, 0.05, init_lora_weights=False)
            lora.active_adapters = ["default"]
            lora.eval()
            base, x = lora.base_layer, torch.randn(1, 1, fan_in)
            best = {"base": float("inf"), "lora": float("inf")}
            for _ in range(rounds):
                for name, layer in (("base", base), ("lora", lora)):
                    start = time.perf_counter()
                    for _ in range(calls):
                        layer(x)
                    best[name] = min(best[name], (time.perf_counter() - start) / calls * 1e6)
            for name, us in best.items():
                result[f"{fan_in}x{fan_out} {name} us"] = us
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1, choices=range(1, len(PROMPTS) + 1))
    parser.add_argument("--layers", action="store_true", help="time one decoding step per layer shape instead")
    args = parser.parse_args()
    result = layers() if args.layers else run(args.new_tokens, args.repeats, args.batch)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
