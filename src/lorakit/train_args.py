"""TrainArgs: every option of a training run. The help texts are the single source for the CLI and the YAML file."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


def _opt(default: Any, text: str) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass
class TrainArgs:
    """Options of ``lorakit train`` / ``lorakit.train(...)``. Field names are the CLI flags (``--grad-accum``)."""

    data: str | None = _opt(
        None, "Training data: .jsonl, .json, .csv, .parquet or .txt (text, prompt/completion, or messages records)."
    )
    output: str = _opt("runs/lorakit", "Output folder: adapter, checkpoints, metrics.jsonl, summary.json, loss.png.")
    model: str | None = _opt(
        None,
        "Base model: a local transformers folder, a hub id (online only), or the bundled "
        "default (SmolLM2-135M-Instruct) when omitted.",
    )
    eval_data: str | None = _opt(None, "Evaluation data file (same formats as --data).")
    eval_fraction: float = _opt(0.0, "Without --eval-data: fraction of --data held out for evaluation.")
    r: int = _opt(16, "LoRA rank.")
    alpha: float = _opt(32.0, "LoRA alpha (the update is scaled by alpha / r).")
    dropout: float = _opt(0.05, "LoRA dropout on the adapter input.")
    targets: str = _opt("all-linear", "Modules to adapt: 'all-linear' or a comma list such as q_proj,v_proj.")
    use_rslora: bool = _opt(False, "Scale by alpha / sqrt(r) (rsLoRA).")
    lr: float = _opt(2e-4, "Peak learning rate (AdamW).")
    weight_decay: float = _opt(0.0, "AdamW weight decay.")
    batch_size: int = _opt(4, "Rows per micro-batch (per process).")
    grad_accum: int = _opt(1, "Micro-batches per optimizer step (per process).")
    epochs: float = _opt(1.0, "Passes over the training data (ignored if --max-steps > 0).")
    max_steps: int = _opt(0, "Optimizer steps to run; 0: derived from --epochs.")
    max_length: int = _opt(512, "Examples longer than this many tokens are truncated.")
    packing: bool = _opt(False, "Pack several examples per row (they never attend to each other).")
    completion_only_loss: bool = _opt(True, "Loss on completions / assistant turns only (else on every token).")
    warmup_ratio: float = _opt(0.05, "Fraction of steps with linear learning-rate warmup.")
    lr_scheduler: str = _opt("cosine", "Learning-rate schedule after warmup: cosine, linear or constant.")
    max_grad_norm: float = _opt(1.0, "Gradient clipping norm (0: no clipping).")
    logging_steps: int = _opt(1, "Write a metrics.jsonl line every this many steps.")
    eval_steps: int = _opt(0, "Evaluate every this many steps (0: only at the end).")
    save_steps: int = _opt(0, "Write a resumable checkpoint every this many steps (0: none).")
    save_total_limit: int = _opt(2, "Checkpoints kept (the newest).")
    resume: bool = _opt(False, "Continue from the newest checkpoint in --output.")
    overwrite: bool = _opt(False, "Allow writing into an --output that holds another run.")
    seed: int = _opt(0, "Random seed (adapter init, data order, dropout).")
    bf16: bool = _opt(False, "bfloat16 autocast for the forward/backward (adapter weights stay fp32).")
    gradient_checkpointing: bool = _opt(False, "Recompute activations in the backward pass to save memory.")
    trust_remote_code: bool = _opt(False, "Allow the base model's own Python code (off unless you trust it).")
    progress: bool = _opt(True, "Show a progress bar.")

    def __post_init__(self) -> None:
        positive = ("r", "batch_size", "grad_accum", "max_length", "logging_steps", "save_total_limit")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("max_steps", "eval_steps", "save_steps", "epochs", "lr", "max_grad_norm", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        if self.lr_scheduler not in ("cosine", "linear", "constant"):
            raise ValueError(f"--lr-scheduler {self.lr_scheduler!r} is unknown; use cosine, linear or constant")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")

    def target_modules(self) -> list[str] | str:
        return "all-linear" if self.targets == "all-linear" else [t.strip() for t in self.targets.split(",") if t]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "the config") -> TrainArgs:
        names = {f.name for f in dataclasses.fields(cls)}
        clean = {k.replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(set(clean) - names)
        if unknown:
            raise ValueError(f"{source} has unknown options {unknown}; valid ones: {sorted(names)}")
        return cls(**clean)
