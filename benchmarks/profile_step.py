"""Where a lorakit LoRA train step's time goes (issue 19, goals 1 and 2: the step against its floor), by phases.

The same model, batch and step as train_step.py (SmolLM2-135M-Instruct, LoRA r=16 all-linear, dropout 0.05, 4 x 256
tokens, ``model(input_ids=ids, labels=ids).loss``, AdamW), timed cumulatively, each phase adding one piece of the
step to the one before:

1. the plain model's no-grad forward (the floor is twice this)
2. the adapted model's no-grad forward in eval mode (no dropout): + the LoRA branches
3. the same in training mode: + dropout on every adapted layer's input
4. + the labels (the fused causal-LM loss instead of the full logits)
5. with gradients recorded: + what the forward saves for backward
6. + backward
7. + the optimizer step (the whole train step)

The phases are taken in turn, median of ``--repeats`` rounds after one warm-up round (this machine's speed drifts
between minutes). torch.profiler's per-op self times were tried first and are not used: on this 2-core VM they read
several times the ops' own time measured in place (a (1024, 1536) multiply: ~10 ms profiled, ~0.7 ms timed).
``--base nf4``: the QLoRA model of qlora_step.py (lorakit.quantize(model, bits=4)), under bf16 autocast like
``--precision bf16``, to compare with it (goal 2). Run it alone on the machine.

    .venv/bin/python benchmarks/profile_step.py [--precision fp32|bf16] [--base fp32|nf4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import qlora_step  # noqa: E402 - the benchmarks' own models and batch
import train_step  # noqa: E402


def phases(base: str, bf16: bool, batch: int, seq: int) -> dict[str, object]:
    """{phase name: a function running it once} on two fresh models (the plain one, the adapted one)."""
    import torch

    import lorakit

    def model_and_ids():
        return qlora_step._model("nf4", batch, seq, "cpu") if base == "nf4" else train_step._setup(batch, seq)

    plain, ids = model_and_ids()
    plain.eval()
    model, _ = model_and_ids()
    config = lorakit.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")
    adapted = lorakit.get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=1e-4)

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    def no_grad(module, mode: bool, **kwargs):
        def run():
            module.train(mode)
            with torch.no_grad(), autocast():
                module(input_ids=ids, **kwargs)
        return run

    def with_grad(backward: bool, step: bool):
        def run():
            adapted.train()
            with autocast():
                loss = adapted(input_ids=ids, labels=ids).loss
            if backward:
                loss.backward()
            if step:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return run

    return {
        "1. plain model, no-grad forward": no_grad(plain, False),
        "2. + LoRA branches (eval, no-grad)": no_grad(adapted, False),
        "3. + dropout (train mode)": no_grad(adapted, True),
        "4. + labels (fused loss)": no_grad(adapted, True, labels=ids),
        "5. + gradients recorded": with_grad(False, False),
        "6. + backward": with_grad(True, False),
        "7. + optimizer (the step)": with_grad(True, True),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--base", default="fp32", choices=("fp32", "nf4"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()
    bf16 = args.precision == "bf16" or args.base == "nf4"
    runs = phases(args.base, bf16, args.batch, args.seq)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run()  # warm-up
    for _ in range(args.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    floor = 2 * medians["1. plain model, no-grad forward"]
    print(f"{args.base} base, {'bf16 autocast' if bf16 else 'fp32'}; floor (2 x no-grad forward) {floor:.2f} s\n")
    print("| phase | time (s) | added (s) | added / floor |\n| --- | --- | --- | --- |")
    before = 0.0
    for name, seconds in medians.items():
        print(f"| {name} | {seconds:.2f} | {seconds - before:+.2f} | {(seconds - before) / floor:+.2f} |")
        before = seconds
    print(f"\nstep / floor = {medians['7. + optimizer (the step)'] / floor:.2f}")


if __name__ == "__main__":
    main()
