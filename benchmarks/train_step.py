"""Train-step time and memory, lorakit against HF PEFT, measured in the same run (issue: speed target 1).

For each (library, precision) a fresh subprocess loads the default model (SmolLM2-135M-Instruct), wraps it with LoRA
r=16 on all linear layers, dropout 0.05, and runs forward + backward + optimizer step on the same padded batch
(4 x 256 random tokens, loss on every token). Both libraries compute the loss on the user's path,
``model(input_ids=ids, labels=ids).loss`` (what transformers.Trainer calls; lorakit's fused causal-LM loss,
lorakit.fast.causal_lm_loss, and the step checks that it ran); ``--lorakit-loss unfused`` is the same call with
``model.fused_loss = False`` (transformers' full logits), ``--lorakit-loss train`` lorakit's own trainer loss
(``lorakit.training.loss.lm_loss_sum``). Memory is the model's tensors (``bench_device.model_mb``: weights,
LoRA's included) plus the peak resident set size during the steps above the process with those tensors resident
(VmHWM after a reset, minus VmRSS before the steps, read after ``model_mb`` paged the weights in). Times come from
one more process per precision holding three copies of the model, taking a no-grad forward (the floor a LoRA step
is compared with), a PEFT step and a lorakit step in turn: this virtual machine's speed drifts by up to ~30% between
minutes, which sequential runs mistook for library differences (fp32 lorakit/PEFT 0.77 to 1.01 over four sequential
runs). ``alone_step_s`` keeps each library's time from its own process.

``--device cuda`` (``run(device="cuda")``; or mps) runs the models and batches there, autocast on that device, timers
read after ``torch.cuda.synchronize()``, memory as the model's tensors plus the allocator's peak above them
(``torch.cuda.max_memory_allocated``; benchmarks/bench_device.py).

    .venv/bin/python benchmarks/train_step.py [--steps 5] [--batch 4] [--seq 256] [--lorakit-loss user|unfused|train]
                                              [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from bench_device import PeakMemory, check, model_mb, timed

LIBRARIES = ("none", "peft", "lorakit")  # "none": the no-grad forward of the plain model


def _step_fn(library: str, model, ids, bf16: bool, lorakit_loss: str = "user"):
    """One timed unit of work on ``model`` (changed in place): a training step (forward, backward, AdamW) of PEFT or
    lorakit LoRA r=16 all-linear dropout 0.05, or for library "none" a no-grad forward of the plain model.
    ``lorakit_loss``: "user" (``model(input_ids=, labels=).loss``, as PEFT's), "unfused" (the same with
    ``fused_loss = False``) or "train" (lorakit's trainer loss)."""
    import torch

    autocast = torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16)  # the batch's (model's) device
    if library == "none":  # the floor: no-grad forward
        model.eval()

        def forward() -> float:
            with torch.no_grad(), autocast:
                model(input_ids=ids)
            return float("nan")

        return forward
    if library == "peft":
        import peft

        config = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")
        wrapped = peft.get_peft_model(model, config)

        def loss_fn() -> torch.Tensor:
            return wrapped(input_ids=ids, labels=ids).loss
    elif lorakit_loss in ("user", "unfused"):
        import lorakit
        from lorakit.fast.causal_lm_loss import is_fused

        config = lorakit.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")
        wrapped = lorakit.get_peft_model(model, config)
        wrapped.fused_loss = lorakit_loss == "user"

        def loss_fn() -> torch.Tensor:
            out = wrapped(input_ids=ids, labels=ids)
            if is_fused(out) != wrapped.fused_loss:  # the path this benchmark is about
                raise RuntimeError(f"lorakit took the other loss path: {wrapped.fused_loss_refusal(labels=ids)}")
            return out.loss
    else:
        import lorakit
        from lorakit.training.loss import lm_loss_sum

        config = lorakit.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")
        wrapped = lorakit.get_peft_model(model, config)
        batch_inputs = {"input_ids": ids, "labels": ids}

        def loss_fn() -> torch.Tensor:
            total, n = lm_loss_sum(wrapped, batch_inputs)
            return total / n

    wrapped.train()
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-4)

    def step() -> float:
        with autocast:
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    return step


def _setup(batch: int, seq: int, device: str = "cpu"):
    import torch

    from lorakit.io.models import load_model

    torch.manual_seed(0)
    model = load_model()
    model.config.use_cache = False
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))  # drawn on the CPU: the same batch on any device
    return model.to(device), ids.to(device)


def measure(
    library: str, precision: str, steps: int, batch: int, seq: int, lorakit_loss: str = "user", device: str = "cpu"
) -> dict[str, float]:
    """Memory (and time) of one library alone, in this process (run it in a fresh subprocess so that peaks do not
    mix)."""
    model, ids = _setup(batch, seq, device)
    step = _step_fn(library, model, ids, precision == "bf16", lorakit_loss)
    weights_mb = model_mb(model)
    memory = PeakMemory(device)
    memory.start()
    times = []
    for _ in range(steps + 1):
        seconds, loss = timed(device, step)
        times.append(seconds)
    result = {"step_s": statistics.median(times[1:]), "loss": loss}
    if library != "none":
        peak = memory.peak_mb()
        result["train_mem_mb"] = float("nan") if peak is None else weights_mb + peak  # None: no counter (MPS)
    return result


def measure_interleaved(
    precision: str, steps: int, batch: int, seq: int, lorakit_loss: str = "user", device: str = "cpu"
) -> dict[str, float]:
    """Median times of the no-grad forward, the PEFT step and the lorakit step taken in turn in one process (each on
    its own copy of the model), so that a slow minute of the (virtual) machine falls on all three alike."""
    import torch

    torch.manual_seed(0)
    fns = {}
    for library in LIBRARIES:
        model, ids = _setup(batch, seq, device)
        fns[library] = _step_fn(library, model, ids, precision == "bf16", lorakit_loss)
    times: dict[str, list[float]] = {library: [] for library in LIBRARIES}
    for _ in range(steps + 1):
        for library, fn in fns.items():
            times[library].append(timed(device, fn)[0])
    return {library: statistics.median(t[1:]) for library, t in times.items()}


def run(
    steps: int = 5, batch: int = 4, seq: int = 256, lorakit_loss: str = "user", device: str = "cpu"
) -> dict[str, dict[str, float]]:
    """{"<library> <precision>": {"step_s", "train_mem_mb"}} for library none (no-grad forward) / peft / lorakit, fp32
    and bf16, on ``device`` (cpu, cuda, mps). Memory comes from each library alone in a fresh process; time from one
    process per precision that takes the three in turn (``measure_interleaved``), since this machine's speed drifts
    by tens of percent between minutes."""
    check(device)
    results: dict[str, dict[str, float]] = {}
    common = ["--lorakit-loss", lorakit_loss, "--device", device]
    for precision in ("fp32", "bf16"):
        for library in LIBRARIES:
            results[f"{library} {precision}"] = _subprocess(["--one", library, precision, *common], steps, batch, seq)
        times = _subprocess(["--interleaved", precision, *common], steps, batch, seq)
        for library in LIBRARIES:
            results[f"{library} {precision}"]["alone_step_s"] = results[f"{library} {precision}"]["step_s"]
            results[f"{library} {precision}"]["step_s"] = times[library]
            print(f"{precision} {library:8s} {results[f'{library} {precision}']}", file=sys.stderr)
    return results


def _subprocess(args: list[str], steps: int, batch: int, seq: int) -> dict:
    cmd = [sys.executable, __file__, *args, "--steps", str(steps), "--batch", str(batch), "--seq", str(seq)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    return json.loads(out)


def ratios(results: dict[str, dict[str, float]], precision: str) -> dict[str, float]:
    """Target 1's three ratios for one precision: time and memory against PEFT, time against 2 x no-grad forward."""
    fwd = results[f"none {precision}"]["step_s"]
    p, k = results[f"peft {precision}"], results[f"lorakit {precision}"]
    return {"time vs PEFT": k["step_s"] / p["step_s"], "memory vs PEFT": k["train_mem_mb"] / p["train_mem_mb"],
            "step vs 2 x forward": k["step_s"] / (2 * fwd)}


def table(results: dict[str, dict[str, float]]) -> str:
    lines = ["| precision | no-grad fwd (s) | PEFT step (s) | lorakit step (s) | time lorakit/PEFT | "
             "lorakit / (2 x fwd) | train mem PEFT (MB) | lorakit (MB) | mem lorakit/PEFT |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for precision in ("fp32", "bf16"):
        fwd = results[f"none {precision}"]["step_s"]
        p, k, r = results[f"peft {precision}"], results[f"lorakit {precision}"], ratios(results, precision)
        lines.append(f"| {precision} | {fwd:.2f} | {p['step_s']:.2f} | {k['step_s']:.2f} | {r['time vs PEFT']:.2f} | "
                     f"{r['step vs 2 x forward']:.2f} | {p['train_mem_mb']:.0f} | {k['train_mem_mb']:.0f} | "
                     f"{r['memory vs PEFT']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--lorakit-loss", choices=("user", "unfused", "train"), default="user",
                        help="lorakit's loss: model(input_ids=, labels=).loss as PEFT's (default), the same with "
                        "fused_loss = False, or lorakit train's")
    parser.add_argument("--device", default="cpu", help="torch device of the models and batches: cpu, cuda, mps")
    parser.add_argument("--one", nargs=2, metavar=("LIBRARY", "PRECISION"), help=argparse.SUPPRESS)
    parser.add_argument("--interleaved", metavar="PRECISION", help=argparse.SUPPRESS)
    args = parser.parse_args()
    check(args.device)
    if args.one:
        print(json.dumps(measure(*args.one, args.steps, args.batch, args.seq, args.lorakit_loss, args.device)))
        return
    if args.interleaved:
        print(json.dumps(measure_interleaved(args.interleaved, args.steps, args.batch, args.seq, args.lorakit_loss,
                                             args.device)))
        return
    results = run(args.steps, args.batch, args.seq, args.lorakit_loss, args.device)
    path = {"user": "model(input_ids=, labels=).loss on both sides", "unfused": "the same, lorakit fused_loss = False",
            "train": "lorakit: lm_loss_sum"}[args.lorakit_loss]
    print(f"\nbatch {args.batch} x {args.seq} tokens, r=16 all-linear, dropout 0.05, median of {args.steps} steps, "
          f"{path}, on {args.device}\n")
    print(table(results))


if __name__ == "__main__":
    main()
