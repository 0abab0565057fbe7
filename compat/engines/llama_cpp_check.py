"""lorakit's GGUF exports against llama.cpp itself (llama-cpp-python, built from source in its own venv).

On the bundled default model (SmolLM2-135M-Instruct, Q4_1 GGUF): an adapter made with lorakit (all-linear, rsLoRA,
an alpha_pattern and a rank_pattern, random non-zero B), exported as a llama.cpp LoRA file and as a merged GGUF;
llama.cpp then generates greedily from the same token ids as lorakit does on transformers' dequantized copy of the
same file. Printed: for the base, the adapter (base GGUF + --lora) and the merged file, how many prompts give the
same greedy tokens, and the top-1 agreement (llama.cpp's argmax after each prefix of lorakit's own continuation).
llama.cpp computes with the Q4_1 weights and 8-bit activations, lorakit in float32, so the base alone is the floor:
the adapter passes when its agreement is within 2 points of the base's and it changes llama.cpp's output. A control
adapter exported with a broken layout (a llama's q / k rows left in transformers' order) must score below the floor.

Run: ./run engines llama-cpp      (sets up .engines/llama-cpp on first use; compiling takes tens of minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from unittest import mock

import torch

from lorakit import LoraConfig, get_peft_model
from lorakit.export import gguf_names
from lorakit.export.gguf_adapter import export_gguf_adapter
from lorakit.export.gguf_merged import export_merged_gguf
from lorakit.io.models import bundled_gguf, load_default_model

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence what a neural network is.",
    "List three fruits.",
    "How do I boil an egg?",
    "What is 12 times 7?",
    "Give me a name for a pet turtle.",
    "Translate 'good morning' into Spanish.",
]
HERE = Path(__file__).resolve().parent
CONTROL = "control: q/k rows not reordered"


def make_adapter(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """A LoRA on every linear layer with random B (a trained-looking update, no training run needed)."""
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules="all-linear",
        use_rslora=True,
        alpha_pattern={"v_proj": 32},
        rank_pattern={"o_proj": 4},
    )
    peft = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    return peft.eval()


def lorakit_greedy(model: torch.nn.Module, prompts: list[list[int]], n: int) -> list[list[int]]:
    out = []
    for ids in prompts:
        with torch.no_grad():
            generated = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
        out.append(generated[0, len(ids) :].tolist())
    return out


def run_llama_cpp(python: str, job: dict) -> dict:
    done = subprocess.run(
        [python, str(HERE / "llama_cpp_run.py")], input=json.dumps(job), capture_output=True, text=True, check=False
    )
    if done.returncode:
        sys.exit(f"llama.cpp failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def agreement(reference: list[list[int]], top1: list[list[int]]) -> float:
    pairs = [(a, b) for ref, got in zip(reference, top1, strict=True) for a, b in zip(ref, got, strict=True)]
    return sum(a == b for a, b in pairs) / len(pairs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--python", default=str(HERE.parents[1] / ".engines/llama-cpp/bin/python"))
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_default_model()
    chats = [[{"role": "user", "content": p}] for p in PROMPTS]
    texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    peft = make_adapter(model)
    with peft.disable_adapter():
        base_tokens = lorakit_greedy(peft, prompts, args.max_new_tokens)
    tuned_tokens = lorakit_greedy(peft, prompts, args.max_new_tokens)
    base_gguf = os.path.join(*bundled_gguf())
    with tempfile.TemporaryDirectory() as tmp:
        adapter_dir = Path(tmp) / "adapter"
        peft.save_pretrained(adapter_dir)
        lora = export_gguf_adapter(adapter_dir, Path(tmp) / "adapter.gguf").output
        merged = export_merged_gguf(adapter_dir, Path(tmp) / "merged.gguf", outtype="f32").output
        with mock.patch.dict(gguf_names.ARCHITECTURES, {"llama": ("llama", False)}):  # a broken layout, as a control
            control = export_gguf_adapter(adapter_dir, Path(tmp) / "control.gguf").output
        runs = {
            "base": (dict(model=base_gguf, lora=None), base_tokens),
            "base + --lora adapter.gguf": (dict(model=base_gguf, lora=str(lora)), tuned_tokens),
            "merged.gguf (f32 changes)": (dict(model=str(merged), lora=None), tuned_tokens),
            CONTROL: (dict(model=base_gguf, lora=str(control)), tuned_tokens),
        }
        results = {}
        for label, (job, reference) in runs.items():
            job.update(prompts=prompts, continuations=reference, max_new_tokens=args.max_new_tokens)
            results[label] = (run_llama_cpp(args.python, job), reference)
    print(f"{'llama.cpp run':32} {'same greedy tokens':>20} {'top-1 agreement':>16}")
    scores = {}
    for label, (got, reference) in results.items():
        same = sum(g == r for g, r in zip(got["greedy"], reference, strict=True))
        scores[label] = agreement(reference, got["top1"])
        print(f"{label:32} {f'{same}/{len(reference)}':>20} {scores[label]:>16.3f}")
    changed = sum(
        a != b
        for a, b in zip(results["base"][0]["greedy"], results["base + --lora adapter.gguf"][0]["greedy"], strict=True)
    )
    print(f"prompts whose llama.cpp output the adapter changes: {changed}/{len(prompts)}")
    floor = scores["base"]
    ok = changed > 0 and all(scores[k] >= floor - 0.02 for k in scores if k != CONTROL) and scores[CONTROL] < floor
    print(
        "PASS" if ok else "FAIL",
        f"(floor: the base's own agreement {floor:.3f}; each export must be within 0.02 of it, the control below it)",
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
