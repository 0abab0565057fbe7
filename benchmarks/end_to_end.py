"""End to end: ``lorakit train`` against ``transformers.Trainer`` + HF PEFT on variable-length chat data (issue 5,
speed target 2: wall time <= 0.5x at equal or lower eval loss).

The data is synthetic chat, made here from a seed: four task kinds whose exact answers the default model does not
know (a date rewritten as ISO 8601, a number written in words or in digits, a list sorted, a question about made-up
records, some with a follow-up turn), 20 to ~300 tokens each; `--data short`: made-up definitions, dates and
numbers in words, 49 to 86 tokens (median 56) with the chat template. The loss is on assistant turns only.

Each side runs in a fresh subprocess with the same hyperparameters (r, alpha, dropout, all-linear targets, AdamW,
learning rate, cosine schedule without warmup -- the two warmup formulas differ, HF's first step has lr 0 --,
clipping 1.0, batch size, optimizer steps = one epoch, max_length, seed), on the same tokens and labels (the
Trainer side tokenizes the way a PEFT user writes it; the benchmark checks it equals lorakit's tokenization). The
Trainer side is the usual setup: a ``datasets.Dataset`` with labels -100 on non-assistant tokens,
``DataCollatorForSeq2Seq`` padding, ``save_strategy="no"``, ``report_to=[]``, its default optimizer (fused AdamW)
and precision (fp32 on CPU unless ``--trainer-bf16``). lorakit runs with its defaults: fp32, padding-free
micro-batches. ``--levers`` adds lorakit with each other combination of padding-free and bf16, and the Trainer with
``bf16=True``.

``--seeds 0 1 2`` runs every side once per seed (default: seed 0 alone). The seed is lorakit's ``seed`` and the
Trainer side's ``set_seed`` before ``get_peft_model`` and ``TrainingArguments(seed=...)``: it drives the adapter
init, the dropout masks and the data order on both sides (at one seed both start from the same adapter and take the
rows in the same order -- HF's seeded sampler and lorakit both draw ``randperm(n)`` from a generator seeded with
seed + epoch --; only the dropout masks differ). The data (``--data-seed``) is the same for all seeds. With several
seeds the table ends with each side's mean and standard deviation, and the mean of the per-seed eval-loss
differences to the Trainer with its standard error.

Timed, the same way on both sides: **total** = the training process from launch to exit (Python imports, model and
tokenizer load, tokenization, training, adapter save); **load+** = the same without importing the libraries' top
modules; **loop** = the training loop alone (lorakit's ``wall_time_s``, the Trainer's ``train_runtime``). Eval loss:
every saved adapter is loaded onto the base by one function in a last subprocess and scored with
``lorakit.training.loss.loss_over_examples`` in fp32 on the held-out set. Jobs run one at a time with 1 OpenMP thread by
default (``--threads``); about 7 minutes per seed on 2 shared cores (``--levers``: about 20).

    HF_HUB_OFFLINE=1 PYTHONPATH=src python benchmarks/end_to_end.py [--steps 10] [--batch 8] [--levers]
        [--lorakit-bf16] [--trainer-bf16] [--threads 1] [--seeds 0 1 2] [--data-seed 0] [--data chat|short]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SYSTEMS = ["You are a precise assistant.", "Answer exactly as asked.", "Be brief."]
WORDS = (
    "apple river candle orbit maple tunnel violet copper lantern meadow pebble harbor falcon quartz saddle "
    "thistle walnut ember glacier hammock jasmine kettle lagoon mosaic nectar oyster prism quiver ribbon "
    "sparrow tundra umbra velvet willow yarrow zephyr anchor bramble cobalt dune"
).split()
SYLLABLES = "ka lo mir ven tas ul dra shi pon eth gar ino ral sef tum bri oda"
CITIES = "Tormund Alvesca Brinmoor Quelton Saradel Vostrik Heldane Ormsby Pellaro Zanthe".split()
PROFESSIONS = "welder botanist cartographer baker archivist pilot glazier surveyor luthier chemist".split()
PETS = "ferret parrot tortoise hamster iguana goat cat hedgehog axolotl rabbit".split()
ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen".split()
)
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


# -- the data --------------------------------------------------------------------------------------------------------
def number_words(n: int) -> str:
    """0 <= n < 1,000,000 in words, no "and": 42107 -> 'forty-two thousand one hundred seven'."""
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else "-" + ONES[n % 10])
    if n < 1000:
        return ONES[n // 100] + " hundred" + ("" if n % 100 == 0 else " " + number_words(n % 100))
    return number_words(n // 1000) + " thousand" + ("" if n % 1000 == 0 else " " + number_words(n % 1000))


def _name(rng: random.Random) -> str:
    syllables = SYLLABLES.split()
    return " ".join("".join(rng.choice(syllables) for _ in range(rng.randint(2, 3))).capitalize() for _ in "ab")


def _turn(user: str, assistant: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def _date_task(rng: random.Random) -> list[dict[str, str]]:
    from lorakit.commands.demo import spell_date

    day = dt.date(1950, 1, 1) + dt.timedelta(days=rng.randrange(36500))
    prompt = f"Rewrite this date as YYYY-MM-DD: {spell_date(day, rng.randrange(6))}"
    return _turn(prompt, day.isoformat())


def _number_task(rng: random.Random) -> list[dict[str, str]]:
    n = rng.randrange(10 ** rng.randint(2, 6))
    if rng.random() < 0.5:
        return _turn(f"Write {n} in words.", number_words(n))
    return _turn(f"Write in digits: {number_words(n)}", str(n))


def _sort_task(rng: random.Random) -> list[dict[str, str]]:
    if rng.random() < 0.5:
        items = rng.sample(WORDS, rng.randint(3, len(WORDS)))
        answer = sorted(items)
        prompt = "Sort these words alphabetically, comma-separated: "
    else:
        numbers = [rng.randrange(10 ** rng.randint(1, 4)) for _ in range(rng.randint(3, 30))]
        items, answer = [str(x) for x in numbers], [str(x) for x in sorted(numbers)]
        prompt = "Sort these numbers from smallest to largest, comma-separated: "
    return _turn(prompt + ", ".join(items), ", ".join(answer))


def _records_task(rng: random.Random) -> list[dict[str, str]]:
    people = [
        {"name": _name(rng), "city": rng.choice(CITIES), "job": rng.choice(PROFESSIONS), "pet": rng.choice(PETS),
         "born": str(rng.randint(1940, 2005))}
        for _ in range(rng.randint(1, 8))
    ]  # fmt: skip
    card = "\n".join("; ".join(f"{k}: {v}" for k, v in p.items()) for p in people)
    asked = {"city": "city", "job": "job", "pet": "pet", "born": "birth year"}
    who, field = rng.choice(people), rng.choice(list(asked))
    messages = _turn(f"Records:\n{card}\nWhat is the {asked[field]} of {who['name']}? One word.", who[field])
    if rng.random() < 0.4:  # a follow-up turn: the loss is on both assistant turns
        other = rng.choice([f for f in asked if f != field])
        messages += _turn(f"And the {asked[other]}?", who[other])
    return messages


def _definition_task(rng: random.Random) -> list[dict[str, str]]:
    """A made-up word and its made-up one-sentence definition (short: ~50-100 tokens with the chat template)."""
    word = _name(rng).lower()
    thing = f"{rng.choice(WORDS)} {rng.choice(['tool', 'dish', 'song', 'boat', 'game', 'cloth', 'tax', 'dance'])}"
    made_of = " and ".join(rng.sample(WORDS, 2))
    return _turn(f"Define '{word}' in two sentences.",
                 f"A {word} is a {thing} that {rng.choice(PROFESSIONS)}s of {rng.choice(CITIES)} use in winter. "
                 f"It is made of {made_of}, and it is named after {_name(rng)}.")


def _small_number_task(rng: random.Random) -> list[dict[str, str]]:
    numbers = [rng.randrange(10, 10_000) for _ in range(2)]
    return _turn(f"Write {numbers[0]} and {numbers[1]} in words, separated by a semicolon.",
                 "; ".join(number_words(n) for n in numbers))


TASKS = [_date_task, _number_task, _sort_task, _records_task]
SHORT_TASKS = [_definition_task, _date_task, _small_number_task]  # issue 19 goal 2b: short examples, batch 8
DATA_KINDS = {"chat": TASKS, "short": SHORT_TASKS}


def make_records(n: int, seed: int, data: str = "chat") -> list[dict[str, Any]]:
    """``n`` chat records ``{"messages": [system, user, assistant, ...]}``, the task kinds of ``data`` ("chat":
    20 to ~300 tokens; "short": ~50-100) in equal shares."""
    rng = random.Random(seed)
    tasks = DATA_KINDS[data]
    return [
        {"messages": [{"role": "system", "content": rng.choice(SYSTEMS)}, *tasks[i % len(tasks)](rng)]}
        for i in range(n)
    ]


def chat_tokens(tokenizer: Any, messages: list[dict[str, str]], max_length: int) -> dict[str, list[int]]:
    """The Trainer side's tokenization, as a PEFT user writes it: ``input_ids``, and ``labels`` that are -100 except
    on the assistant turns (their content and ``<|im_end|>``, not the newline the template puts after it)."""

    def encode(turns: list[dict[str, str]], generation_prompt: bool) -> list[int]:
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    ids = encode(messages, False)
    labels = [-100] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            start, end = len(encode(messages[:i], True)), len(encode(messages[: i + 1], False)) - 1
            labels[start:end] = ids[start:end]
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# -- the three jobs, each run in a fresh subprocess -------------------------------------------------------------------
def _lorakit_job(job: dict[str, Any]) -> dict[str, Any]:
    import lorakit
    import lorakit.io.models  # noqa: F401 - imported by lorakit.train; imported here like the Trainer side's modules

    start = time.perf_counter()
    summary = lorakit.train(
        data=job["train"], output=job["out"], overwrite=True, r=16, alpha=32, dropout=0.05, targets="all-linear",
        lr=job["lr"], lr_scheduler="cosine", warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=1.0,
        batch_size=job["batch"], grad_accum=1, max_steps=job["steps"], max_length=job["max_length"],
        seed=job["seed"], logging_steps=job["steps"], progress=False,
        **{k: job[k] for k in ("bf16", "padding_free") if k in job},  # else lorakit's defaults
    )  # fmt: skip
    wall = time.perf_counter() - start
    return {"wall_s": wall, "loop_s": summary["wall_time_s"], "train_loss": summary["train_loss"],
            "bf16": summary["bf16"], "padding_free": summary["padding_free"]}  # fmt: skip


def _trainer_job(job: dict[str, Any]) -> dict[str, Any]:
    import datasets
    import peft
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    from lorakit.io.models import resolve_model

    datasets.disable_progress_bars()
    folder = resolve_model(None)  # the local copy of the default model that lorakit loads
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    set_seed(job["seed"])  # the adapter's random init comes before the Trainer seeds anything
    config = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, config)
    data = datasets.Dataset.from_list(_read_jsonl(job["train"]))
    data = data.map(lambda r: chat_tokens(tokenizer, r["messages"], job["max_length"]), remove_columns=["messages"])
    args = TrainingArguments(
        output_dir=job["out"], per_device_train_batch_size=job["batch"], gradient_accumulation_steps=1,
        max_steps=job["steps"], learning_rate=job["lr"], lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, bf16=job["bf16"], logging_steps=job["steps"], save_strategy="no", report_to=[],
        seed=job["seed"], use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=DataCollatorForSeq2Seq(tokenizer))
    result = trainer.train()
    model.save_pretrained(job["out"])
    wall = time.perf_counter() - start
    return {"wall_s": wall, "loop_s": result.metrics["train_runtime"], "train_loss": result.training_loss,
            "bf16": job["bf16"], "padding_free": False, "optimizer": args.optim}  # fmt: skip


def _eval_job(job: dict[str, Any]) -> dict[str, Any]:
    """Eval loss of each adapter (and of the base model alone) on the held-out set: one function for all, fp32."""
    from lorakit import PeftModel
    from lorakit.data.records import load_records
    from lorakit.data.tokenize import tokenize_records
    from lorakit.io.models import load_model, load_tokenizer
    from lorakit.training.loss import loss_over_examples

    tokenizer = load_tokenizer()
    examples, _ = tokenize_records(load_records(job["eval"]), tokenizer, job["max_length"])
    out = {}
    for name, folder in job["adapters"].items():
        model = load_model() if folder is None else PeftModel.from_pretrained(load_model(), folder)
        total, count = loss_over_examples(model, examples, 8, tokenizer.pad_token_id, bf16=False)
        out[name] = total / count
    return out


JOBS = {"lorakit": _lorakit_job, "trainer": _trainer_job, "eval": _eval_job}


def _subprocess(kind: str, job: dict[str, Any], folder: Path, threads: int) -> dict[str, Any]:
    """Run one job in a fresh Python process; returns what the job returned."""
    job_file, result_file = folder / f"{job['name']}.job.json", folder / f"{job['name']}.result.json"
    job_file.write_text(json.dumps(job))
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root)])}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    argv = [sys.executable, str(Path(__file__).resolve()), "--job", kind, str(job_file), str(result_file)]
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    process_s = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{job['name']} failed:\n{done.stderr[-3000:]}")
    return {**json.loads(result_file.read_text()), "process_s": process_s}


def check_same_tokens(records: list[dict[str, Any]], max_length: int) -> dict[str, Any]:
    """Both sides train on the same token ids and labels: the Trainer side's ``chat_tokens`` equals lorakit's."""
    from lorakit.data.tokenize import tokenize_records
    from lorakit.io.models import load_tokenizer

    tokenizer = load_tokenizer()
    examples, _ = tokenize_records(records, tokenizer, max_length)
    for i, (record, example) in enumerate(zip(records, examples, strict=True)):
        theirs = chat_tokens(tokenizer, record["messages"], max_length)
        if theirs != {"input_ids": example.input_ids, "labels": example.labels}:
            raise AssertionError(f"record {i}: the Trainer side would train on other tokens or labels than lorakit")
    lengths = sorted(len(e) for e in examples)
    return {"min": lengths[0], "median": lengths[len(lengths) // 2], "max": lengths[-1], "tokens": sum(lengths),
            "labelled": sum(e.n_trainable for e in examples)}  # fmt: skip


REFERENCE, BASE = "Trainer + PEFT", "base model (no adapter)"


def run(
    steps: int = 10,
    batch: int = 8,
    lr: float = 1e-3,
    n_eval: int = 32,
    max_length: int = 512,
    lorakit_bf16: bool = False,
    trainer_bf16: bool = False,
    levers: bool = False,
    threads: int = 1,
    seeds: tuple[int, ...] = (0,),
    data_seed: int = 0,
    data: str = "chat",
) -> dict[str, Any]:
    """Train both sides on ``steps * batch`` examples (one epoch, so both see every example once), score both.

    ``lorakit_bf16``: run lorakit with ``--bf16`` instead of its defaults (fp32, padding-free). ``levers``: also run
    lorakit with the other lever combinations (padded fp32, padded bf16, padding-free bf16) and the Trainer with
    ``bf16=True``, which shows what bf16 costs in eval loss on either side. ``threads``: OMP_NUM_THREADS of the
    jobs (0: torch's default). ``seeds``: every side is trained once per seed (module docstring), on the data made
    from ``data_seed`` (``data``: "chat", or "short" for ~50-100-token examples). Returns the settings, the data
    statistics, the base model's eval loss and one result per seed and side (``results[seed][label]``).
    """
    records = make_records(steps * batch + n_eval, data_seed, data)
    train, held_out = records[:-n_eval], records[-n_eval:]
    data_stats = check_same_tokens(train, max_length)
    settings = {"steps": steps, "batch": batch, "lr": lr, "n_train": len(train), "n_eval": n_eval,
                "max_length": max_length, "threads": threads or "torch default", "data_seed": data_seed,
                "data": data}  # fmt: skip
    sides: list[tuple[str, str, dict[str, Any]]] = [("trainer", REFERENCE, {"bf16": trainer_bf16})]
    if levers:
        sides += [("trainer", "Trainer + PEFT, bf16=True", {"bf16": True}),
                  ("lorakit", "lorakit --no-padding-free", {"bf16": False, "padding_free": False}),
                  ("lorakit", "lorakit --no-padding-free --bf16", {"bf16": True, "padding_free": False}),
                  ("lorakit", "lorakit --bf16", {"bf16": True, "padding_free": True})]  # fmt: skip
    sides.append(("lorakit", "lorakit train --bf16" if lorakit_bf16 else "lorakit train (defaults)",
                  {"bf16": True} if lorakit_bf16 else {}))  # fmt: skip
    results: dict[int, dict[str, Any]] = {seed: {} for seed in seeds}
    adapters: dict[str, tuple[int, str]] = {}  # job name -> (seed, side label)
    with tempfile.TemporaryDirectory(prefix="lorakit-e2e-") as tmp:
        folder = Path(tmp)
        for name, rows in (("train", train), ("eval", held_out)):
            (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        common = {"train": str(folder / "train.jsonl"), "steps": steps, "batch": batch, "lr": lr,
                  "max_length": max_length}  # fmt: skip
        for seed in seeds:
            for i, (kind, label, options) in enumerate(sides):
                name = f"seed{seed}-side{i}"
                job = {**common, **options, "seed": seed, "name": name, "out": str(folder / name)}
                results[seed][label] = _subprocess(kind, job, folder, threads)
                adapters[name] = (seed, label)
        job = {"name": "eval", "eval": str(folder / "eval.jsonl"), "max_length": max_length,
               "adapters": {BASE: None, **{name: str(folder / name) for name in adapters}}}  # fmt: skip
        losses = _subprocess("eval", job, folder, threads)
    for name, (seed, label) in adapters.items():
        results[seed][label]["eval_loss"] = losses[name]
    return {"settings": settings, "data": data_stats, "base_eval_loss": losses[BASE], "results": results}


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else float("nan")


def target(results: dict[Any, dict[str, Any]]) -> tuple[float, float]:
    """Target 2's figures over the seeds of ``run()``'s results: (mean total time of ``lorakit train`` / mean of the
    Trainer's, mean eval loss of ``lorakit train`` - mean of the Trainer's)."""
    sides = list(results.values())
    mine = next(label for label in sides[0] if label.startswith("lorakit train"))
    total, loss = ({label: statistics.fmean(s[label][key] for s in sides) for label in (mine, REFERENCE)}
                   for key in ("process_s", "eval_loss"))  # fmt: skip
    return total[mine] / total[REFERENCE], loss[mine] - loss[REFERENCE]


def table(report: dict[str, Any]) -> str:
    s, d, results = report["settings"], report["data"], report["results"]
    lines = [
        f"SmolLM2-135M-Instruct, LoRA r=16 alpha=32 dropout 0.05 all-linear; {s['steps']} steps x batch {s['batch']} "
        f"= {s['n_train']} chat examples once ({d['min']}-{d['max']} tokens, median {d['median']}, {d['tokens']} "
        f"tokens, {d['labelled']} labelled; data seed {s['data_seed']}); AdamW lr {s['lr']:g}, cosine, no warmup, "
        f"clip 1.0, max_length {s['max_length']}; threads: {s['threads']}",
        f"eval loss: {s['n_eval']} held-out examples, fp32, training.loss.loss_over_examples for every adapter; "
        f"{BASE}: {report['base_eval_loss']:.4f}",
        "total: the whole training process, launch to exit (Python imports, model load, tokenization, training, "
        "adapter save); load+: total minus importing the libraries' top modules; loop: the training loop alone",
        "",
        f"{'seed':>4} {'side':34} {'precision':9} {'micro-batches':13} {'total s':>8} {'load+ s':>8} {'loop s':>8} "
        f"{'total x':>7} {'loop x':>7} {'eval loss':>9}",
    ]
    for seed, sides in results.items():
        ref = sides[REFERENCE]
        for label, r in sides.items():
            lines.append(
                f"{seed:4} {label:34} {'bf16' if r['bf16'] else 'fp32':9} "
                f"{'padding-free' if r['padding_free'] else 'padded':13} {r['process_s']:8.1f} {r['wall_s']:8.1f} "
                f"{r['loop_s']:8.1f} {r['process_s'] / ref['process_s']:7.2f} {r['loop_s'] / ref['loop_s']:7.2f} "
                f"{r['eval_loss']:9.4f}"
            )
    first = next(iter(results.values()))
    lines.append(f"(x: ratio to {REFERENCE} at the same seed; Trainer optimizer: {first[REFERENCE].get('optimizer')}, "
                 "lorakit: torch AdamW)")  # fmt: skip
    mean = {label: {key: statistics.fmean(sides[label][key] for sides in results.values())
                    for key in ("process_s", "loop_s", "eval_loss")} for label in first}  # fmt: skip
    if len(results) > 1:
        lines += ["", f"over {len(results)} seeds: means of total and loop; eval loss mean +- sd; diff: eval loss minus"
                  f" {REFERENCE}'s at the same seed, mean +- standard error",
                  f"{'side':39} {'total s':>8} {'loop s':>8} {'eval loss':>18} {'diff':>18}"]  # fmt: skip
        for label in first:
            loss, sd = _mean_sd([sides[label]["eval_loss"] for sides in results.values()])
            row = f"{label:39} {mean[label]['process_s']:8.1f} {mean[label]['loop_s']:8.1f} {loss:9.4f} +- {sd:.4f}"
            if label != REFERENCE:
                diff, sd = _mean_sd([sides[label]["eval_loss"] - sides[REFERENCE]["eval_loss"]
                                     for sides in results.values()])  # fmt: skip
                row += f" {diff:+9.4f} +- {sd / len(results) ** 0.5:.4f}"
            lines.append(row)
    ratio, gap = target(results)
    met = ratio <= 0.5 and gap <= 0
    lines.append(
        f"target (total <= 0.5x at equal or lower eval loss{', means over seeds' if len(results) > 1 else ''}): "
        f"{ratio:.2f}x, eval loss {gap:+.4f} -> " + ("met" if met else "not met")
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", nargs=3, metavar=("KIND", "JOB", "RESULT"), help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--n-eval", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--lorakit-bf16", action="store_true", help="lorakit with --bf16 (default: its defaults)")
    parser.add_argument("--trainer-bf16", action="store_true", help="Trainer with bf16=True (default: fp32)")
    parser.add_argument("--levers", action="store_true", help="also run lorakit with each speed lever alone")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="OMP_NUM_THREADS of the jobs (0: torch's default). Default 1: on a CPU shared with other jobs, 2 OpenMP "
        "threads on 2 busy cores made an elementwise op ~100x slower (spinning), skewing both sides",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="train every side once per seed")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic train and eval data")
    parser.add_argument("--data", choices=sorted(DATA_KINDS), default="chat",
                        help="chat: 20 to ~300 tokens per example; short: ~50-100 (issue 19 goal 2b)")
    args = parser.parse_args()
    if args.job:
        kind, job_file, result_file = args.job
        result = JOBS[kind](json.loads(Path(job_file).read_text()))
        Path(result_file).write_text(json.dumps(result))
        return
    start = time.perf_counter()
    report = run(args.steps, args.batch, args.lr, args.n_eval, args.max_length, args.lorakit_bf16, args.trainer_bf16,
                 args.levers, args.threads, tuple(args.seeds), args.data_seed, args.data)  # fmt: skip
    print(table(report))
    print(f"benchmark total: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
