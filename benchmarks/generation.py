"""Decoding speed with an unmerged adapter against the plain base model (issue: speed target 3), PEFT alongside.

Loads the default model (SmolLM2-135M-Instruct) four times in one process: the plain model, lorakit with an unmerged
LoRA adapter (r=16, all linear layers, non-zero B), the same adapter merged by lorakit, and the same adapter file
loaded by HF PEFT, unmerged. Each decodes the same prompts greedily for a fixed number of new tokens; the runs are
interleaved, repeated, and the fastest of each kept (the machine's other load only ever slows a run down). Also
checks that merged and unmerged lorakit produce the same tokens as PEFT.

    .venv/bin/python benchmarks/generation.py [--new-tokens 48] [--repeats 3] [--batch 1] [--device cpu]
    .venv/bin/python benchmarks/generation.py --steps 150   # per-step interleaved timing against the base
    .venv/bin/python benchmarks/generation.py --layers   # one decoding step of each layer shape: microseconds

``--steps N`` times N single decoding steps (one new token on the prompt's KV cache, cropped back after each step) of
the base model, lorakit unmerged, lorakit merged and PEFT unmerged, taking the models in turn at every step: each
step's ratio is measured under the same machine load, so the median of the per-step ratios drifts far less between
runs than the end-to-end ratio (on the project's noisy 2-core machine: about +-1 point instead of +-3).

``--layers`` times one decoding step (input (1, 1, in)) through a plain nn.Linear of each of the model's shapes and the
same Linear wrapped with an unmerged r=16 adapter, interleaved, fastest of several rounds: the per-layer overhead.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from bench_device import check, timed

PROMPTS = [
    "Rewrite the date Friday, March 5th, 2021 in ISO format.",
    "List three prime numbers greater than 100.",
    "What is the capital of Australia?",
    "Translate 'good morning' into French.",
]


def _models(merged: bool = True, device: str = "cpu") -> dict:
    """The plain model, lorakit with an unmerged adapter (r=16, all linear layers, B ~ N(0, 0.02)), optionally the
    same adapter merged by lorakit, and the same adapter file loaded by PEFT, unmerged; all in eval mode."""
    import torch

    import lorakit
    from lorakit.io.models import load_model

    torch.manual_seed(0)
    base = load_model().eval()
    config = lorakit.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")
    unmerged = lorakit.get_peft_model(load_model(), config).eval()
    with torch.no_grad():
        for name, param in unmerged.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    models = {"base": base, "lorakit unmerged": unmerged}
    with tempfile.TemporaryDirectory() as folder:
        unmerged.save_pretrained(folder)
        if merged:
            models["lorakit merged"] = lorakit.PeftModel.from_pretrained(load_model(), folder).eval()
            models["lorakit merged"].merge_adapter()
        import peft

        models["PEFT unmerged"] = peft.PeftModel.from_pretrained(load_model(), folder).eval()
    return {name: model.to(device) for name, model in models.items()}


def run(new_tokens: int = 48, repeats: int = 3, batch: int = 1, device: str = "cpu") -> dict[str, float]:
    """Tokens per second of each model (fastest of ``repeats``) and the ratios to the base, on ``device``."""
    import torch

    from lorakit.io.models import load_tokenizer

    check(device)
    tokenizer = load_tokenizer()
    tokenizer.padding_side = "left"
    ids = tokenizer(PROMPTS[:batch], return_tensors="pt", padding=True).to(device)
    models = _models(device=device)
    pad = tokenizer.pad_token_id

    def decode(model: torch.nn.Module) -> tuple[float, torch.Tensor]:
        return timed(device, model.generate, **ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                     do_sample=False, pad_token_id=pad)

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


def steps(count: int = 150) -> dict[str, float]:
    import statistics

    import torch

    from lorakit.io.models import load_tokenizer

    ids = load_tokenizer()(PROMPTS[:1], return_tensors="pt").input_ids  # (1, T)
    models = _models()
    token = torch.tensor([[42]])  # (1, 1): the step's new token; its value does not change the work
    seconds: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        caches = {name: model(input_ids=ids, use_cache=True).past_key_values for name, model in models.items()}
        for _ in range(count):
            for name, model in models.items():
                start = time.perf_counter()
                model(input_ids=token, past_key_values=caches[name], use_cache=True)
                seconds[name].append(time.perf_counter() - start)
                caches[name].crop(-1)  # back to the prompt: every step attends over the same length
    result = {f"{name} median ms": statistics.median(s) * 1e3 for name, s in seconds.items()}
    for name in ("lorakit unmerged", "lorakit merged", "PEFT unmerged"):
        ratios = [b / t for b, t in zip(seconds["base"], seconds[name])]
        result[f"{name} / base, median per-step ratio"] = statistics.median(ratios)
    return result


def layers(rounds: int = 15, calls: int = 1000) -> dict[str, float]:
    import torch
    from torch import nn

    from lorakit.adapters.linear import LoraLinear

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
    parser.add_argument("--steps", type=int, default=0, help="time this many interleaved single decoding steps instead")
    parser.add_argument("--layers", action="store_true", help="time one decoding step per layer shape instead")
    parser.add_argument("--device", default="cpu", help="torch device of the end-to-end decoding run: cpu, cuda, mps")
    args = parser.parse_args()
    if args.layers:
        result = layers()
    else:
        result = steps(args.steps) if args.steps else run(args.new_tokens, args.repeats, args.batch, args.device)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
