"""lorakit against HF PEFT: issue 19's speed targets (round 2) in one run, a table of ratios beside round 1's.

1. train step (train_step.py): time and training memory against PEFT, and against 2 x a no-grad forward; fp32, bf16;
   the loss on the user's path on both sides, model(input_ids=ids, labels=ids).loss (lorakit's fused causal-LM loss)
2. QLoRA step (qlora_step.py): the NF4 step against the bf16 LoRA step, NF4 training memory against fp32 LoRA's
2b. end to end (end_to_end.py): ``lorakit train`` against transformers.Trainer + PEFT, three seeds, on variable-length
   chat data and on short examples (``--data short``, ~50-90 tokens)
3. generation (generation.py): decoding with an unmerged and a merged adapter against the plain base model;
   mixed-adapter batches (mixed_adapters.py): ``generate(adapter_names=...)``, 8 adapters over 32 prompts, against
   the base model and PEFT

Each part runs in fresh processes, one after another; each part's own table is printed as it finishes, then the
summary. Run it alone on the machine: with two cores, any other job skews every ratio. ``--parts`` picks parts;
``--device cuda`` runs the parts that take a device there (4. any device).

    .venv/bin/python benchmarks/speed.py [--quick] [--parts step,qlora,e2e,e2e-short,gen,mixed] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def in_subprocess(module: str, function: str = "run", **kwargs: Any) -> Any:
    """``benchmarks/<module>.py``'s ``<function>(**kwargs)``, called in a fresh Python process (no shared allocator
    or thread state); its JSON result."""
    code = (f"import json, sys; sys.path.insert(0, {str(HERE)!r}); import {module}; "
            f"print('RESULT ' + json.dumps({module}.{function}(**{kwargs!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"benchmarks/{module}.py failed:\n{done.stderr[-3000:]}")
    line = [row for row in done.stdout.splitlines() if row.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


# Round 1's figures, as issue 19 records them (measured by earlier sessions on this machine), printed beside this
# run's: what the round-2 goals improve on.
ROUND_1 = {
    "fp32 time": "0.84 (user path)", "fp32 memory": "0.48", "fp32 floor": "1.15-1.31", "bf16 time": "0.71-0.78",
    "bf16 floor": "1.42-1.58", "bf16 memory": "0.50", "nf4 step": "1.12 (vs fp32 step)", "nf4 memory": "-",
    "e2e chat": "0.33", "e2e short": "0.74", "mixed": "0.78", "unmerged": "-",
}


def summary_rows(step: dict, e2e: dict, e2e_short: dict | None, gen: dict, mixed: dict,
                 qlora: dict | None) -> list[tuple[str, float, str, str, bool]]:
    """(what, measured, round 1, goal, met) for every target of issue 19 (round 2)."""
    import end_to_end
    import train_step

    rows = []
    fp32, bf16 = train_step.ratios(step, "fp32"), train_step.ratios(step, "bf16")
    rows += [("0. train step fp32: time lorakit / PEFT", fp32["time vs PEFT"], ROUND_1["fp32 time"], "<= 0.70"),
             ("0. train step fp32: memory lorakit / PEFT", fp32["memory vs PEFT"], ROUND_1["fp32 memory"], "<= 0.55"),
             ("1. train step fp32: lorakit / (2 x no-grad forward)", fp32["step vs 2 x forward"], ROUND_1["fp32 floor"],
              "<= 1.10"),
             ("1. train step bf16: time lorakit / PEFT", bf16["time vs PEFT"], ROUND_1["bf16 time"], "<= 0.65"),
             ("1. train step bf16: lorakit / (2 x no-grad forward)", bf16["step vs 2 x forward"], ROUND_1["bf16 floor"],
              "<= 1.25"),
             ("1. train step bf16: memory lorakit / PEFT", bf16["memory vs PEFT"], ROUND_1["bf16 memory"], "-")]
    if qlora is not None:
        rows += [("2. QLoRA: NF4 step / bf16 LoRA step", qlora["nf4 step / bf16 step"], ROUND_1["nf4 step"], "<= 1.05"),
                 ("2. QLoRA: NF4 training memory / fp32 LoRA's", qlora["nf4 memory / fp32 lora memory"],
                  ROUND_1["nf4 memory"], "<= 0.35")]
    for label, report, key in (("chat", e2e, "e2e chat"), ("short", e2e_short, "e2e short")):
        if report is None:
            continue
        wall, gap = end_to_end.target(report["results"])
        seeds = f"{label} data, means over {len(report['results'])} seeds"
        rows += [(f"2b. end to end: time lorakit train / (Trainer + PEFT), {seeds}", wall, ROUND_1[key], "<= 0.50"),
                 (f"2b. end to end: eval loss lorakit - (Trainer + PEFT), {seeds}", gap, "-", "<= 0")]
    rows += [("3. mixed adapters: lorakit mixed / base tokens per s (tokens equal)", mixed["mixed / base"],
              ROUND_1["mixed"], ">= 0.85"),
             ("3. generation: unmerged single adapter / base tokens per s", mixed.get("unmerged / base",
              gen["unmerged / base"]), ROUND_1["unmerged"], ">= 0.95"),
             ("3. generation: merged / base tokens per s, end to end", gen["merged / base"], "-", "~ 1.00"),
             ("3. mixed adapters: PEFT time / lorakit time (tokens equal)", mixed["ratio_peft_over_lorakit"], "1.50",
              "-")]
    return [(what, value, before, goal, _met(value, goal)) for what, value, before, goal in rows]


def _met(value: float, goal: str) -> bool:
    """Whether ``value`` meets ``goal`` ("<= x", ">= x", "~ x" within 0.05; "-": no goal, counted as met)."""
    if goal == "-":
        return True
    op, x = goal.split()
    return {"<=": value <= float(x), ">=": value >= float(x), "~": abs(value - float(x)) <= 0.05}[op]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats (a check that all parts run)")
    parser.add_argument("--device", default="cpu", help="torch device of the side-by-side parts (cpu, cuda, mps)")
    parser.add_argument("--parts", default="step,qlora,e2e,e2e-short,gen,mixed",
                        help="comma-separated parts to run (default: all)")
    parser.add_argument("--train-step-results", metavar="JSON",
                        help="part 1's results from an earlier run (train_step.run() as JSON) instead of measuring")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    sys.path.insert(0, str(HERE))
    import end_to_end
    import train_step

    device = {"device": args.device}  # the run(device=...) keyword of the parts that take one
    start = time.perf_counter()
    step = e2e = e2e_short = qlora = None
    gen: dict = {}
    mixed: dict = {}
    if args.train_step_results:
        step = json.loads(Path(args.train_step_results).read_text())
    elif "step" in parts:
        step = train_step.run(steps=2 if args.quick else 5, **device)
    if step is not None:
        print("## 1. train step (batch 4 x 256, r=16 all-linear, dropout 0.05, model(input_ids=, labels=).loss)\n\n"
              + train_step.table(step) + "\n", flush=True)
    if "qlora" in parts and (HERE / "qlora_step.py").exists():
        qlora = in_subprocess("qlora_step", **({"quick": True} if args.quick else {}), **device)
        print("## 2. QLoRA step\n\n" + json.dumps(qlora, indent=1) + "\n", flush=True)
    e2e_args = {"steps": 4, "n_eval": 8} if args.quick else {"seeds": (0, 1, 2)}
    if "e2e" in parts:
        e2e = in_subprocess("end_to_end", threads=0, **e2e_args)  # the machine's threads, as in the other parts
        print("## 2b. end to end, chat data\n\n" + end_to_end.table(e2e) + "\n", flush=True)
    if "e2e-short" in parts:
        e2e_short = in_subprocess("end_to_end", threads=0, data="short", **e2e_args)
        print("## 2b. end to end, short examples\n\n" + end_to_end.table(e2e_short) + "\n", flush=True)
    if "gen" in parts:
        gen = in_subprocess("generation", repeats=1 if args.quick else 3, **device)
        gen.update(in_subprocess("generation", "steps", count=20 if args.quick else 150))  # the same, step by step
        print("## 3. generation (batch 1, greedy)\n\n" + json.dumps(gen, indent=1) + "\n", flush=True)
    if "mixed" in parts:
        mixed = in_subprocess("mixed_adapters", repeats=1 if args.quick else 2, threads=os.cpu_count() or 1, **device)
        print("## 3. mixed-adapter batches\n\n" + json.dumps(mixed) + "\n", flush=True)

    if step is not None and gen and mixed:
        print("## Summary: ratios measured in this run (round 1: issue 19's record of earlier runs)\n")
        print("| target | measured | round 1 | goal | met |\n| --- | --- | --- | --- | --- |")
        for what, value, before, goal, met in summary_rows(step, e2e, e2e_short, gen, mixed, qlora):
            print(f"| {what} | {value:.2f} | {before} | {goal} | {'yes' if met else 'no'} |")
    print(f"\nwhole run: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
