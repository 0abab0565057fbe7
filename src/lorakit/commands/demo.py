"""``lorakit demo``: fine-tune the bundled default model on a task it gets wrong, and show before / after.

The task: rewrite a date written in words ("Friday, 5 March 2021", "Mar 5, 2021", ...) into ISO 8601
("2021-03-05"). The examples are generated here, from a seed; the held-out examples are dates the training set
does not contain. Exact-match accuracy of greedy answers is measured before and after fine-tuning.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from lorakit.commands.evaluate import exact_match_score
from lorakit.commands.generate import generate
from lorakit.io.models import load_model, load_tokenizer
from lorakit.training.args import TrainArgs
from lorakit.training.trainer import train

MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
INSTRUCTION = "Rewrite this date in ISO format (YYYY-MM-DD). Answer with the date only."


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def spell_date(day: dt.date, style: int) -> str:
    """One of six ways people write a date in words."""
    month, short = MONTHS[day.month - 1], MONTHS[day.month - 1][:3]
    weekday = WEEKDAYS[day.weekday()]
    return [
        f"{month} {day.day}, {day.year}",
        f"{day.day} {month} {day.year}",
        f"{weekday}, {month} {_ordinal(day.day)}, {day.year}",
        f"{short} {day.day}, {day.year}",
        f"the {_ordinal(day.day)} of {month}, {day.year}",
        f"{weekday} {day.day} {short} {day.year}",
    ][style]


def make_examples(n: int, seed: int, exclude: set[dt.date] | None = None) -> list[dict[str, str]]:
    """``n`` prompt/completion records with distinct random dates in 1950-2049 (none in ``exclude``)."""
    rng = random.Random(seed)
    start, span = dt.date(1950, 1, 1), (dt.date(2049, 12, 31) - dt.date(1950, 1, 1)).days
    seen = set(exclude or ())
    out = []
    while len(out) < n:
        day = start + dt.timedelta(days=rng.randrange(span))
        if day in seen:
            continue
        seen.add(day)
        prompt = f"{INSTRUCTION}\nDate: {spell_date(day, rng.randrange(6))}"
        out.append({"prompt": prompt, "completion": day.isoformat()})
    return out


def accuracy(model: Any, tokenizer: Any, records: list[dict[str, str]], name: str) -> tuple[float, list[str]]:
    prompts = [r["prompt"] for r in records]
    answers = generate(model, tokenizer, prompts, max_new_tokens=12, batch_size=16, progress=f"{name} answers")
    return exact_match_score(answers, [r["completion"] for r in records]), answers


def run(
    output: str = "runs/demo",
    n_train: int = 400,
    n_test: int = 50,
    steps: int = 40,
    seed: int = 0,
    model: str | None = None,
) -> dict[str, Any]:
    """Generate the task, score the base model, fine-tune, score again; returns and writes demo.json."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    train_rows = make_examples(n_train, seed)
    test_rows = make_examples(n_test, seed + 1, exclude={dt.date.fromisoformat(r["completion"]) for r in train_rows})
    for name, rows in (("train.jsonl", train_rows), ("test.jsonl", test_rows)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    started = time.perf_counter()
    tokenizer = load_tokenizer(model)
    base = load_model(model)
    before, before_answers = accuracy(base, tokenizer, test_rows, "base model")
    print(
        f"base model: exact match {before:.0%} on {n_test} held-out dates "
        f"(e.g. {test_rows[0]['prompt'].splitlines()[-1]!r} -> {before_answers[0]!r})"
    )
    del base
    args = TrainArgs(
        data=str(out / "train.jsonl"),
        eval_data=str(out / "test.jsonl"),
        output=str(out / "adapter"),
        model=model,
        r=16,
        alpha=32,
        dropout=0.0,
        lr=1e-3,
        batch_size=8,
        max_steps=steps,
        max_length=128,
        warmup_ratio=0.05,
        seed=seed,
        overwrite=True,
        logging_steps=1,
        eval_steps=10,
    )
    summary = train(args)
    tuned = summary.pop("model")
    tuned.eval()
    after, after_answers = accuracy(tuned, tokenizer, test_rows, "fine-tuned")
    print(
        f"fine-tuned: exact match {after:.0%} (e.g. {test_rows[0]['prompt'].splitlines()[-1]!r} -> "
        f"{after_answers[0]!r})"
    )
    result = {
        "accuracy_before": before,
        "accuracy_after": after,
        "n_test": n_test,
        "n_train": n_train,
        "steps": steps,
        "train_wall_time_s": summary["wall_time_s"],
        "total_wall_time_s": round(time.perf_counter() - started, 1),
        "eval_loss": summary["eval_loss"],
        "eval_loss_start": summary["eval_loss_start"],
        "adapter": str(out / "adapter"),
        "plot": summary["plot"],
    }
    (out / "demo.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def run_from_args(ns: argparse.Namespace) -> int:
    """``lorakit demo`` with the options parsed by ``lorakit.cli`` (which declares them, so that its parser needs
    no torch)."""
    steps = ns.steps or (15 if ns.quick else 40)
    n_test = ns.test_examples or (20 if ns.quick else 50)
    r = run(ns.output, ns.train_examples, n_test, steps, ns.seed, ns.model)
    gain = (r["accuracy_after"] - r["accuracy_before"]) * 100
    print(
        f"\naccuracy {r['accuracy_before']:.0%} -> {r['accuracy_after']:.0%} ({gain:+.0f} points) on {n_test} "
        f"held-out dates, {steps} training steps, {r['total_wall_time_s']:.0f} s in all"
    )
    cli, adapter = cli_command(), shlex.quote(r["adapter"])
    prompt = "$'" + f"{INSTRUCTION}\\nDate: July 4, 1976".replace("'", "\\'") + "'"  # bash: \n is a newline
    print(f"adapter:   {r['adapter']}\nloss plot: {r['plot']}")
    print(f"try it:    {cli} generate --adapter {adapter} {prompt}")
    print(f"           {cli} eval --adapter {adapter} --data {shlex.quote(str(Path(ns.output) / 'test.jsonl'))}")
    print(f"           {cli} info {adapter}")
    return 0


def cli_command() -> str:
    """How to run ``lorakit`` again from where the user stands: ``./run lorakit`` under the repository's ``run``
    script (it exports LORAKIT_RUN, the script as invoked), the script's own path if it is not on PATH
    (``.venv/bin/lorakit``), else ``lorakit``."""
    if os.environ.get("LORAKIT_RUN"):
        return f"{shlex.quote(os.environ['LORAKIT_RUN'])} lorakit"
    script = sys.argv[0] if sys.argv else ""
    if Path(script).name == "lorakit" and shutil.which("lorakit") != os.path.abspath(script):
        return shlex.quote(script)
    return "lorakit"

