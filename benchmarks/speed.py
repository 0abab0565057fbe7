"""lorakit against HF PEFT, all four speed targets in one run, printed as a table of ratios (issue: speed).

1. train step (train_step.py): time and training memory against PEFT, and against 2 x a no-grad forward; fp32, bf16;
   the loss on the user's path on both sides, model(input_ids=ids, labels=ids).loss (lorakit's fused causal-LM loss)
2. end to end (end_to_end.py): ``lorakit train`` against transformers.Trainer + PEFT on variable-length chat data,
   three seeds
3. generation (generation.py): decoding with an unmerged and a merged adapter against the plain base model, end to
   end and as the median of per-step ratios with the models taken in turn at every step (generation.steps)
4. mixed-adapter batches (mixed_adapters.py): ``generate(adapter_names=...)``, 8 adapters over 32 prompts, vs PEFT

Each part runs in fresh processes, one after another; each part's own table is printed as it finishes, then the
summary. On this project's 2-core machine the whole run takes about 22 minutes (part 1 about 10, part 2 about 12).

    .venv/bin/python benchmarks/speed.py [--quick]
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


def summary_rows(step: dict, e2e: dict, gen: dict, mixed: dict) -> list[tuple[str, float, str, bool]]:
    """(what, measured, goal, met) for every target."""
    import end_to_end
    import train_step

    rows = []
    for precision in ("fp32", "bf16"):
        r = train_step.ratios(step, precision)
        rows += [(f"1. train step {precision}: time lorakit / PEFT", r["time vs PEFT"], "<= 0.70",
                  r["time vs PEFT"] <= 0.70),
                 (f"1. train step {precision}: memory lorakit / PEFT", r["memory vs PEFT"], "<= 0.60",
                  r["memory vs PEFT"] <= 0.60),
                 (f"1. train step {precision}: lorakit / (2 x no-grad forward)", r["step vs 2 x forward"], "<= 1.15",
                  r["step vs 2 x forward"] <= 1.15)]
    wall, gap = end_to_end.target(e2e["results"])
    seeds = f"means over {len(e2e['results'])} seeds"
    rows += [(f"2. end to end: total time lorakit train / (Trainer + PEFT), {seeds}", wall, "<= 0.50", wall <= 0.50),
             (f"2. end to end: eval loss lorakit - (Trainer + PEFT), {seeds}", gap, "<= 0", gap <= 0)]
    per_step = gen["lorakit unmerged / base, median per-step ratio"]
    merged_step = gen["lorakit merged / base, median per-step ratio"]
    rows += [("3. generation: unmerged / base tokens per s, end to end", gen["unmerged / base"], ">= 0.90",
              gen["unmerged / base"] >= 0.90),
             ("3. generation: unmerged / base, median of interleaved per-step ratios", per_step, ">= 0.90",
              per_step >= 0.90),
             ("3. generation: merged / base tokens per s, end to end", gen["merged / base"], "~ 1.00",
              abs(gen["merged / base"] - 1.0) <= 0.05),
             ("3. generation: merged / base, median of interleaved per-step ratios", merged_step, "~ 1.00",
              abs(merged_step - 1.0) <= 0.05)]
    ratio = mixed["ratio_peft_over_lorakit"]
    rows.append(("4. mixed adapters: PEFT time / lorakit time (tokens equal)", ratio, ">= 3.00",
                 ratio >= 3.0 and mixed["tokens_equal"]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats (a check that all parts run)")
    parser.add_argument("--train-step-results", metavar="JSON",
                        help="part 1's results from an earlier run (train_step.run() as JSON) instead of measuring")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    import end_to_end
    import train_step

    start = time.perf_counter()
    if args.train_step_results:
        step = json.loads(Path(args.train_step_results).read_text())
    else:
        step = train_step.run(steps=2 if args.quick else 5)
    print("## 1. train step (batch 4 x 256, r=16 all-linear, dropout 0.05, model(input_ids=, labels=).loss)\n\n"
          + train_step.table(step) + "\n", flush=True)
    e2e = in_subprocess("end_to_end", threads=0,  # the machine's threads, as in the other parts
                        **({"steps": 4, "n_eval": 8} if args.quick else {"seeds": (0, 1, 2)}))
    print("## 2. end to end\n\n" + end_to_end.table(e2e) + "\n", flush=True)
    gen = in_subprocess("generation", repeats=1 if args.quick else 3)
    gen.update(in_subprocess("generation", "steps", count=20 if args.quick else 150))  # the same, step by step
    print("## 3. generation (batch 1, greedy)\n\n" + json.dumps(gen, indent=1) + "\n", flush=True)
    mixed = in_subprocess("mixed_adapters", repeats=1 if args.quick else 2, threads=os.cpu_count() or 1)
    print("## 4. mixed-adapter batches\n\n" + json.dumps(mixed) + "\n", flush=True)

    print("## Summary: ratios measured in this run\n")
    print("| target | measured | goal | met |\n| --- | --- | --- | --- |")
    for what, value, goal, met in summary_rows(step, e2e, gen, mixed):
        print(f"| {what} | {value:.2f} | {goal} | {'yes' if met else 'no'} |")
    print(f"\nwhole run: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
