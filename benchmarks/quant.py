"""A quantized base on the CPU (lorakit.quant, LoftQ): weight memory, QLoRA step time, quality after tuning.

On the default model (SmolLM2-135M-Instruct, ``lorakit.io.models.load_model()``), in one process:

1. memory: bytes of parameters + buffers (shared storages once, ``quant.formats.resident_bytes``) of the fp32 model
   and of the model with every Linear except the tied lm_head quantized to int8 / NF4 / NF4 with double-quantized
   scales, the tied embedding / lm_head in bf16 (quantize's default) or left in fp32 (``embeddings="keep"``);
2. one layer (up_proj, 1536 x 576): forward time of nn.Linear vs QuantLinear (whole weight dequantized per call, and
   in row chunks), median of --repeat;
3. train step (forward + backward + AdamW) of LoRA r=16 on all linear layers, fp32 base vs NF4 / int8 base, on the
   same batch of 8 examples; the models take turns, median of --timing-steps after one warm-up round;
4. eval loss on 50 held-out examples of the demo's date task (``lorakit.commands.demo.make_examples``) before and after
   --steps optimizer steps (batch 8, lr 1e-3, warmup + cosine, same data order) for fp32 LoRA, QLoRA (NF4),
   QLoRA + LoftQ (NF4, 1 iteration) and QLoRA (int8).

    PYTHONPATH=src HF_HUB_OFFLINE=1 python benchmarks/quant.py [--steps 30] [--timing-steps 5]

Times depend on the machine's load: run it on an idle machine, or read them as rough.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from lorakit import LoraConfig, TaskType, get_peft_model, quantize
from lorakit.commands.demo import make_examples
from lorakit.data.pack import collate
from lorakit.data.tokenize import tokenize_records
from lorakit.io.models import load_model, load_tokenizer
from lorakit.quant.formats import resident_bytes
from lorakit.quant.linear import QuantLinear
from lorakit.training.args import TrainArgs
from lorakit.training.loss import lm_loss_sum, loss_over_examples
from lorakit.training.plan import lr_lambda, make_plan

R, ALPHA, LR, BATCH, MAX_LENGTH = 16, 32, 1e-3, 8, 128


def lora_config(init: bool | str = True) -> LoraConfig:
    return LoraConfig(
        r=R,
        lora_alpha=ALPHA,
        lora_dropout=0.0,
        target_modules="all-linear",
        task_type=TaskType.CAUSAL_LM,
        init_lora_weights=init,
        loftq_config={"loftq_bits": 4, "loftq_iter": 1} if init == "loftq" else {},
    )


def build(kind: str) -> tuple[nn.Module, float]:
    """A fresh PeftModel of ``kind`` and the seconds its set-up took (quantization, LoftQ)."""
    model = load_model()
    model.config.use_cache = False
    torch.manual_seed(0)  # the same A for every kind that starts with Kaiming A
    start = time.perf_counter()
    if kind == "fp32 LoRA":
        peft = get_peft_model(model, lora_config())
    elif kind == "QLoRA NF4":
        peft = get_peft_model(quantize(model, bits=4), lora_config())
    elif kind == "QLoRA int8":
        peft = get_peft_model(quantize(model, bits=8), lora_config())
    elif kind == "QLoRA NF4 + LoftQ":
        peft = get_peft_model(model, lora_config("loftq"))
        quantize(peft.get_base_model(), bits=4)
    else:
        raise ValueError(kind)
    return peft, time.perf_counter() - start


def memory_table() -> list[tuple[str, int]]:
    fp32 = load_model()
    rows = [("fp32", resident_bytes(fp32))]
    configurations = [
        ("int8, embedding bf16", 8, False, "bf16"),
        ("NF4, embedding bf16", 4, False, "bf16"),
        ("NF4 + DQ, embedding bf16", 4, True, "bf16"),  # quantize(model, bits=4): the defaults
        ("NF4 + DQ, embedding fp32", 4, True, "keep"),
    ]
    for name, bits, dq, embeddings in configurations:
        model = quantize(copy.deepcopy(fp32), bits=bits, double_quant=dq, embeddings=embeddings)
        rows.append((name, resident_bytes(model)))
        del model
    linear = sum(m.weight.numel() * 4 for m in fp32.modules() if isinstance(m, nn.Linear) and m is not fp32.lm_head)
    rows.append(("(of fp32: Linear weights)", linear))
    rows.append(("(of fp32: tied embedding)", fp32.get_input_embeddings().weight.numel() * 4))
    return rows


def layer_times(repeat: int) -> list[tuple[str, float]]:
    """Median ms of each layer's no-grad forward, the layers timed in turn (a load change hits them all alike)."""
    torch.manual_seed(0)
    linear = nn.Linear(576, 1536, bias=False)
    x = torch.randn(8, 48, 576)
    nf4, int8, chunked = (QuantLinear.from_linear(linear, b) for b in (4, 8, 4))
    chunked.chunk_elements = linear.weight.numel() // 8
    calls = {
        "nn.Linear fp32": lambda: linear(x),
        "QuantLinear NF4, whole weight": lambda: nf4(x),
        "QuantLinear NF4, 8 row chunks": lambda: chunked(x),
        "QuantLinear int8, whole weight": lambda: int8(x),
        "NF4 dequantize() alone": nf4.dequantize,
    }
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in calls}
    with torch.no_grad():
        for _ in range(repeat + 2):
            for name, call in calls.items():
                times[name].append(timed(call))
    return [(name, *median_pair(t[2:], 1e3)) for name, t in times.items()]


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads) of one call. On a shared machine the CPU time is the
    steadier measure of the work done (it still includes the time OpenMP threads spin while waiting)."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def median_pair(pairs: list[tuple[float, float]], unit: float = 1.0) -> tuple[float, float]:
    return statistics.median(p[0] for p in pairs) * unit, statistics.median(p[1] for p in pairs) * unit


def train_step(peft: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> float:
    loss, n = lm_loss_sum(peft, batch)
    (loss / max(n, 1)).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item() / max(n, 1)


def step_times(
    models: dict[str, nn.Module], batch: dict[str, torch.Tensor], repeat: int
) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) seconds of one train step (forward, backward, AdamW with lr 0, which leaves the adapters as
    they are) per model; the models take turns, so a change of the machine's load hits them alike."""
    optimizers = {
        k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.0) for k, m in models.items()
    }
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in models}
    for _ in range(repeat + 1):  # the first round warms up
        for kind, peft in models.items():
            peft.train()
            times[kind].append(timed(lambda peft=peft, kind=kind: train_step(peft, optimizers[kind], batch)))
    return {k: median_pair(t[1:]) for k, t in times.items()}


def fine_tune(peft: nn.Module, train: list, pad: int, args: TrainArgs) -> dict[str, float]:
    """``args.max_steps`` optimizer steps (the trainer's data order and schedule); final train loss and seconds."""
    plan = make_plan(len(train), args, world=1)
    optimizer = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=args.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args, plan.total_steps))
    peft.train()
    started, cpu, loss = time.perf_counter(), time.process_time(), float("nan")
    for step in range(plan.total_steps):
        loss = train_step(peft, optimizer, collate([train[i] for i in plan.rows_for_step(step)], pad))
        scheduler.step()
    return {"train_loss": loss, "tune_s": time.perf_counter() - started, "tune_cpu_s": time.process_time() - cpu}


def run(kinds: list[str], steps: int, timing_steps: int) -> dict[str, dict[str, float]]:
    tokenizer = load_tokenizer()
    pad = tokenizer.pad_token_id
    train_rows = make_examples(400, 0)
    test_rows = make_examples(50, 1, exclude={dt.date.fromisoformat(r["completion"]) for r in train_rows})
    train, _ = tokenize_records(train_rows, tokenizer, MAX_LENGTH)
    test, _ = tokenize_records(test_rows, tokenizer, MAX_LENGTH)
    args = TrainArgs(lr=LR, batch_size=BATCH, max_steps=steps, max_length=MAX_LENGTH, warmup_ratio=0.05)
    models: dict[str, nn.Module] = {}
    results: dict[str, dict[str, float]] = {}
    for kind in kinds:
        models[kind], setup_s = build(kind)
        total, count = loss_over_examples(models[kind], test, 16, pad)
        results[kind] = {"setup_s": setup_s, "weight_MiB": resident_bytes(models[kind]) / 2**20}
        results[kind]["eval_loss_start"] = total / count
    for kind, (wall, cpu) in step_times(models, collate(train[:BATCH], pad), timing_steps).items():
        results[kind].update(step_s=wall, step_cpu_s=cpu)
    for kind, peft in models.items():
        results[kind].update(fine_tune(peft, train, pad, args))
        total, count = loss_over_examples(peft, test, 16, pad)
        results[kind]["eval_loss_end"] = total / count
        print(f"  {kind}: " + ", ".join(f"{k} {v:.4g}" for k, v in results[kind].items()), flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="Fine-tuning steps per configuration.")
    parser.add_argument("--timing-steps", type=int, default=5, help="Timed train steps (median).")
    parser.add_argument("--repeat", type=int, default=20, help="Timed single-layer forwards (median).")
    parser.add_argument(
        "--kinds", default="fp32 LoRA,QLoRA NF4,QLoRA NF4 + LoftQ,QLoRA int8", help="Comma list of configurations."
    )
    ns = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")

    rows = memory_table()
    fp32 = rows[0][1]
    print(f"{'weights (parameters + buffers)':<34}{'MiB':>9}{'x fp32':>9}")
    for name, n in rows:
        print(f"{name:<34}{n / 2**20:>9.1f}{n / fp32:>9.3f}")

    print(f"\n{'one layer 1536x576, x (8, 48, 576)':<34}{'wall ms':>9}{'CPU ms':>9}")
    for name, wall, cpu in layer_times(ns.repeat):
        print(f"{name:<34}{wall:>9.2f}{cpu:>9.2f}")

    print(f"\nfine-tune: {ns.steps} steps, batch {BATCH}, LoRA r={R} alpha={ALPHA} all-linear, lr {LR}")
    results = run([k.strip() for k in ns.kinds.split(",") if k.strip()], ns.steps, ns.timing_steps)
    base = results.get("fp32 LoRA")
    print("\nstep: median of the timed steps; tune: all fine-tuning steps; CPU = process CPU time (all threads)")
    columns = ["MiB", "setup s", "step s", "step CPU", "x fp32", "tune s", "tune CPU", "x fp32", "eval 0", "eval end"]
    print(f"{'configuration':<19}" + "".join(f"{c:>9}" for c in columns))
    for kind, r in results.items():
        ratios = [r[k] / base[k] if base else float("nan") for k in ("step_cpu_s", "tune_cpu_s")]
        values = [r["weight_MiB"], r["setup_s"], r["step_s"], r["step_cpu_s"], ratios[0], r["tune_s"],
                  r["tune_cpu_s"], ratios[1], r["eval_loss_start"], r["eval_loss_end"]]  # fmt: skip
        print(f"{kind:<19}" + "".join(f"{v:>9.4f}" if v < 1 else f"{v:>9.2f}" for v in values))


if __name__ == "__main__":
    main()
