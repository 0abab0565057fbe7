"""Mixed-adapter generation (issue 5, target 4): lorakit against HF PEFT on one batch whose rows use different adapters.

The default model (SmolLM2-135M-Instruct, fp32) gets 8 LoRA adapters (r=16, alpha 32, on q/k/v/o and the MLP's
gate/up/down, B random so that every adapter changes the output). lorakit saves them; PEFT loads the files onto a
second copy of the base. 32 plain-text prompts of 4 to ~25 tokens, left-padded into one batch, row i using adapter
``names[i]`` (shuffled, 4 rows per adapter), are decoded greedily for 16 new tokens by
``model.generate(..., adapter_names=names)`` in both libraries, alternately, in the same process. Each library's
time is the best of ``repeats`` runs after one warm-up; the tokens must be identical. For scale, the same generate
is also timed on the base model alone (lorakit with its adapters disabled, no adapter_names): both libraries pay for
the base model, so PEFT / lorakit can be at most about PEFT / base.

Torch runs on ``threads`` threads (default 1): the CPU cores of the development machine are shared, and more threads
than free cores make every small op wait. One thread also makes the base model's matmuls, which both libraries pay
alike, as slow as they get, so the ratio is a conservative one.

    PYTHONPATH=src python benchmarks/mixed_adapters.py [--repeats 2] [--threads 1] [--device cpu] [--rank 16]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import warnings
from pathlib import Path

import torch
from bench_device import check, timed

N_ADAPTERS, N_PROMPTS, MAX_NEW_TOKENS, RANK = 8, 32, 16, 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOPICS = ["the sea", "a small town", "prime numbers", "bread", "the moon", "trains", "a garden", "winter"]


def _prompts() -> list[str]:
    """32 plain-text prompts of varying length (4 to ~25 tokens)."""
    rng = random.Random(0)
    prompts = []
    for i in range(N_PROMPTS):
        detail = " ".join(rng.choice(["please", "briefly", "clearly", "with care", "in simple words"])
                          for _ in range(rng.randrange(0, 9)))
        prompts.append(f"Write about {TOPICS[i % len(TOPICS)]} {detail}".strip() + ":")
    return prompts


def _lorakit_model(folder: Path, rank: int = RANK) -> object:
    """The default model with adapters task0..task7 of rank ``rank`` (random B), saved to ``folder`` for PEFT."""
    import lorakit
    from lorakit.io.models import load_model

    model = None
    for i in range(N_ADAPTERS):
        config = lorakit.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS)
        if model is None:
            model = lorakit.get_peft_model(load_model(), config, "task0")
        else:
            model.add_adapter(f"task{i}", config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:  # B = 0 by default: make every adapter a real, different update
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    model.save_pretrained(folder)
    return model.eval()


def _peft_model(folder: Path) -> object:
    import peft

    from lorakit.io.models import load_model

    model = peft.PeftModel.from_pretrained(load_model(), folder / "task0", adapter_name="task0")
    for i in range(1, N_ADAPTERS):
        model.load_adapter(folder / f"task{i}", adapter_name=f"task{i}")
    return model.eval()


def _generate(
    model: object, batch: dict, names: list[str] | None, max_new_tokens: int, pad_id: int
) -> tuple[float, torch.Tensor]:
    """(seconds, tokens) of one greedy generate; ``names`` None: the base model (lorakit's adapters disabled)."""
    options = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id, temperature=None, top_p=None,
                   top_k=None)

    def generate() -> torch.Tensor:
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if names is None:
                with model.disable_adapter():
                    return model.generate(**batch, **options)
            return model.generate(**batch, **options, adapter_names=names)

    return timed(batch["input_ids"].device, generate)


def run(repeats: int = 2, threads: int = 1, device: str = "cpu", rank: int = RANK) -> dict:
    """Time both libraries on ``device``; returns seconds per generate (best of ``repeats``), the ratio PEFT / lorakit
    and the shape of the generated tokens. AssertionError if the two libraries generate different tokens."""
    from lorakit.io.models import load_tokenizer

    check(device)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tokenizer = load_tokenizer()
    tokenizer.padding_side = "left"
    with tempfile.TemporaryDirectory() as tmp:
        ours = _lorakit_model(Path(tmp), rank).to(device)
        theirs = _peft_model(Path(tmp)).to(device)
    names = [f"task{i % N_ADAPTERS}" for i in range(N_PROMPTS)]
    random.Random(1).shuffle(names)
    batch = tokenizer(_prompts(), return_tensors="pt", padding=True).to(device)
    pad = tokenizer.pad_token_id
    runs = {"lorakit": (ours, names), "peft": (theirs, names), "base": (ours, None)}
    times: dict[str, list[float]] = {library: [] for library in runs}
    outputs = {}
    for model, run_names in runs.values():  # warm-up (allocator, thread pool): the prompt pass only
        _generate(model, batch, run_names, 1, pad)
    for _ in range(repeats):
        for library, (model, run_names) in runs.items():
            seconds, outputs[library] = _generate(model, batch, run_names, MAX_NEW_TOKENS, pad)
            times[library].append(seconds)
    assert torch.equal(outputs["lorakit"], outputs["peft"]), "lorakit and PEFT generated different tokens"
    assert not torch.equal(outputs["lorakit"], outputs["base"]), "the adapters changed no token: they are not applied"
    ours_s, theirs_s, base_s = min(times["lorakit"]), min(times["peft"]), min(times["base"])
    return {
        "lorakit_s": ours_s,
        "peft_s": theirs_s,
        "base_s": base_s,
        "ratio_peft_over_lorakit": theirs_s / ours_s,
        "mixed / base": base_s / ours_s,  # lorakit's tokens per second with 8 adapters, over the base model's
        "batch": list(batch["input_ids"].shape),
        "new_tokens": outputs["lorakit"].shape[1] - batch["input_ids"].shape[1],
        "adapters": N_ADAPTERS,
        "rank": rank,
        "tokens_equal": True,
        "threads": threads,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="torch device of both libraries' models: cpu, cuda, mps")
    parser.add_argument("--rank", type=int, default=RANK, help=f"the adapters' rank (default {RANK})")
    args = parser.parse_args()
    r = run(args.repeats, args.threads, args.device, args.rank)
    print(
        f"mixed-adapter generate, {r['adapters']} adapters r={r['rank']}, batch {r['batch'][0]} x {r['batch'][1]} "
        f"prompt tokens + {r['new_tokens']} new (greedy), {r['threads']} thread(s): PEFT {r['peft_s']:.2f} s, lorakit "
        f"{r['lorakit_s']:.2f} s, PEFT/lorakit {r['ratio_peft_over_lorakit']:.2f}x, tokens equal; base model alone "
        f"{r['base_s']:.2f} s (PEFT/base {r['peft_s'] / r['base_s']:.2f}x, "
        f"lorakit/base {r['lorakit_s'] / r['base_s']:.2f}x)"
    )


if __name__ == "__main__":
    main()
