"""QLoRA step (issue 19, goal 2): the NF4-base LoRA step against the bf16 LoRA step on the same model, and NF4 + LoRA
training memory against fp32 LoRA's.

On the default model (SmolLM2-135M-Instruct), lorakit LoRA r=16 all-linear, dropout 0.05, batch 4 x 256 random
tokens, the user's path ``model(input_ids=ids, labels=ids).loss``, AdamW:

- time: "bf16" is the fp32 model under bf16 autocast (train_step.py's bf16 lorakit step); "nf4" is QLoRA's default,
  ``lorakit.quantize(model, bits=4)``: every Linear but the tied lm_head in NF4, the tied embedding / lm_head stored
  in bf16 (a HalfLinear head, which the fused causal-LM loss takes as it takes the bf16 step's nn.Linear: both steps
  compute no full logits, and the step fails if either takes the other path), under the same autocast.
  Both steps are taken in turn in one process, median of ``steps`` after one warm-up round.
- memory: each kind alone in a fresh process, fp32 LoRA (no autocast) and NF4 LoRA (bf16 autocast): the bytes of
  the model's parameters and buffers (``bench_device.model_mb``, each storage once: the weights, the point of a
  4-bit base, the embedding included: fp32 on one side, bf16 on the other) plus the peak resident memory during the
  steps above the memory before them (activations, gradients, AdamW state), read after ``model_mb`` paged the
  weights in (the fp32 ones are mapped from the checkpoint file: unread, the first step's page-in counted them a
  second time). Weights are counted from the tensors, not from the process: the process keeps pages of the fp32
  copy NF4 is quantized from, which the model no longer holds.

``--kept`` adds a third model to the interleaved steps, "nf4-kept": the NF4 model with each weight decoded once
beforehand and kept, so that its step pays no decoding (a measurement of what the decode costs, not a mode of
lorakit: it holds the full bf16 weights QLoRA is there to avoid).

    .venv/bin/python benchmarks/qlora_step.py [--steps 5] [--batch 4] [--seq 256] [--device cpu] [--kept]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
from pathlib import Path

from bench_device import PeakMemory, check, model_mb, timed
from train_step import _step_fn

HERE = Path(__file__).resolve().parent


def _model(kind: str, batch: int, seq: int, device: str):
    """(model, ids): the default model, fp32 or quantized as QLoRA's default (NF4 Linears, bf16 embedding / head),
    and a random batch, on ``device``."""
    import torch

    import lorakit
    from lorakit.io.models import load_model

    torch.manual_seed(0)
    model = load_model()
    model.config.use_cache = False
    if kind in ("nf4", "nf4-kept"):
        model = lorakit.quantize(model, bits=4)
        gc.collect()
    model = model.to(device)
    if kind == "nf4-kept":
        _keep_decoded(model, torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    return model, ids.to(device)


def _keep_decoded(model, dtype) -> None:
    """Give every QuantLinear of ``model`` its weight decoded once into ``dtype`` and kept, in place of decoding at
    each call (``--kept``)."""
    from lorakit.quant.linear import QuantLinear

    for layer in [m for m in model.modules() if isinstance(m, QuantLinear)]:
        kept = list(layer.weight_chunks(dtype))

        def weight_chunks(want, kept=kept):
            if want != dtype:
                raise RuntimeError(f"--kept holds {dtype} weights, the step asked for {want}")
            return iter(kept)

        layer.weight_chunks = weight_chunks


def interleaved(steps: int, batch: int, seq: int, device: str = "cpu", kept: bool = False) -> dict[str, float]:
    """Median step seconds of the bf16 LoRA step and the NF4 LoRA step (bf16 autocast), taken in turn; ``kept``:
    and of the NF4 step with its weights decoded once and kept ("nf4-kept")."""
    kinds = ("bf16", "nf4", "nf4-kept") if kept else ("bf16", "nf4")
    fns = {kind: _step_fn("lorakit", *_model(kind, batch, seq, device), bf16=True) for kind in kinds}
    times: dict[str, list[float]] = {kind: [] for kind in fns}
    for _ in range(steps + 1):
        for kind, fn in fns.items():
            times[kind].append(timed(device, fn)[0])
    return {kind: statistics.median(t[1:]) for kind, t in times.items()}


def memory(kind: str, steps: int, batch: int, seq: int, device: str = "cpu") -> dict[str, float]:
    """MB of the model's tensors plus the steps' peak above their start (activations, gradients, AdamW state), and
    the loss."""
    model, ids = _model(kind, batch, seq, device)
    step = _step_fn("lorakit", model, ids, bf16=kind == "nf4")
    weights_mb = model_mb(model)  # before the step adds LoRA's optimizer state: that is in the peak
    peak = PeakMemory(device)
    peak.start()
    losses = [timed(device, step)[1] for _ in range(steps)]
    above = peak.peak_mb()
    return {"train_mem_mb": float("nan") if above is None else weights_mb + above, "weights_mb": weights_mb,
            "loss": losses[-1]}


def _subprocess(args: list[str]) -> dict:
    done = subprocess.run([sys.executable, str(HERE / "qlora_step.py"), *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"qlora_step.py {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(steps: int = 5, batch: int = 4, seq: int = 256, quick: bool = False, device: str = "cpu") -> dict[str, float]:
    """The ratios of goal 2 and the figures behind them (seconds, MB); ``quick``: 2 steps."""
    check(device)
    steps = 2 if quick else steps
    common = ["--steps", str(steps), "--batch", str(batch), "--seq", str(seq), "--device", device]
    times = _subprocess(["--interleaved", *common])
    mem = {kind: _subprocess(["--memory", kind, *common]) for kind in ("fp32", "nf4")}
    return {
        "bf16 step_s": times["bf16"], "nf4 step_s": times["nf4"],
        "fp32 lora train_mem_mb": mem["fp32"]["train_mem_mb"], "nf4 lora train_mem_mb": mem["nf4"]["train_mem_mb"],
        "fp32 weights_mb": mem["fp32"]["weights_mb"], "nf4 weights_mb": mem["nf4"]["weights_mb"],
        "nf4 step / bf16 step": times["nf4"] / times["bf16"],
        "nf4 memory / fp32 lora memory": mem["nf4"]["train_mem_mb"] / mem["fp32"]["train_mem_mb"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, mps")
    parser.add_argument("--kept", action="store_true",
                        help="also time the NF4 step with its weights decoded once and kept (what decoding costs)")
    parser.add_argument("--interleaved", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memory", choices=("fp32", "nf4"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    check(args.device)
    sizes = (args.steps, args.batch, args.seq, args.device)
    if args.interleaved or args.kept:
        times = interleaved(*sizes, kept=args.kept)
        if args.kept:
            times |= {f"{kind} step / bf16 step": t / times["bf16"] for kind, t in list(times.items())
                      if kind != "bf16"}
        print(json.dumps(times))
    elif args.memory:
        print(json.dumps(memory(args.memory, *sizes)))
    else:
        print(json.dumps(run(*sizes[:3], device=args.device), indent=1))


if __name__ == "__main__":
    main()
