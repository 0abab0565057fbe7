"""TrainArgs: every option of a training run. The help texts are the single source for the CLI and the YAML file.

The adapter options (``r``, ``alpha``, ...) are LoraConfig's fields: their help text and check come from
``lorakit.config.LoraConfig``; only their run defaults are said here, in ``RUN_DEFAULTS``.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lorakit.config import ALL_LINEAR, ConfigError, LoraConfig, TaskType

# Where a training run wants another default than PEFT's. LoraConfig keeps PEFT's (r=8, lora_alpha=8, no dropout,
# the architecture's q / v projections) so that it stays a drop-in; a run starts from a usual fine-tuning recipe:
RUN_DEFAULTS: dict[str, Any] = {
    "r": 16,  # the rank of Unsloth's fine-tuning notebooks (PEFT's r=8 comes with adapters on q / v alone)
    "lora_alpha": 32.0,  # alpha = 2 r (scaling 2), the ratio of litgpt's defaults (finetune/lora.py: r 8, alpha 16)
    "lora_dropout": 0.05,  # litgpt's default, and QLoRA's for its larger models (Dettmers et al. 2023, appendix B)
    # QLoRA (Dettmers et al. 2023, sec. 4): LoRA on all linear layers of the blocks is what matches full fine-tuning
    "target_modules": ALL_LINEAR,
}

_LORA_FIELDS = {f.name: f for f in dataclasses.fields(LoraConfig)}


def _opt(default: Any, text: str) -> Any:
    return field(default=default, metadata={"help": text})


def _lora_opt(name: str, note: str = "") -> Any:
    """The TrainArgs field that sets LoraConfig's field ``name``: its help text (and ``note``), its default unless
    RUN_DEFAULTS says otherwise. The metadata ``lora_field`` names it for ``TrainArgs.lora_config``."""
    source = _LORA_FIELDS[name]
    text = f"{source.metadata['help']} {note}".strip()
    return field(default=RUN_DEFAULTS.get(name, source.default), metadata={"help": text, "lora_field": name})


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
    # the adapter: LoraConfig's fields (types as there; targets is target_modules as one string)
    r: int = _lora_opt("r")
    alpha: float = _lora_opt("lora_alpha")
    dropout: float = _lora_opt("lora_dropout")
    targets: str = _lora_opt("target_modules", "As a train option: 'all-linear' or a comma list such as q_proj,v_proj.")
    use_rslora: bool = _lora_opt("use_rslora")
    use_dora: bool = _lora_opt("use_dora")
    bias: str = _lora_opt("bias")
    lr: float = _opt(2e-4, "Peak learning rate (AdamW).")
    weight_decay: float = _opt(0.0, "AdamW weight decay.")
    batch_size: int = _opt(4, "Rows per micro-batch (per process).")
    grad_accum: int = _opt(1, "Micro-batches per optimizer step (per process).")
    epochs: float = _opt(1.0, "Passes over the training data (ignored if --max-steps > 0).")
    max_steps: int = _opt(0, "Optimizer steps to run; 0: derived from --epochs.")
    max_length: int = _opt(512, "Examples longer than this many tokens are truncated.")
    packing: bool = _opt(False, "Pack several examples per row (they never attend to each other).")
    padding_free: bool = _opt(
        True,
        "Put each micro-batch's examples back to back in rows as long as its longest example instead of padding "
        "every example to that length: the same loss and gradients (up to float rounding) for fewer computed tokens. "
        "Automatically off for models that would let the examples attend to each other.",
    )
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
    bf16: bool | None = _opt(
        False,
        "bfloat16 autocast for the forward/backward and evaluation (adapter weights stay fp32). Faster on CPUs with "
        "native bf16 (avx512_bf16, amx_bf16, ARM bf16), but what is learned changes: measured 1.1-1.6x faster runs "
        "with a 0.009-0.019 higher eval loss (benchmarks/end_to_end.py). null in a config file: on exactly when the "
        "CPU has native bf16.",
    )
    gradient_checkpointing: bool = _opt(False, "Recompute activations in the backward pass to save memory.")
    fsdp: bool = _opt(
        False,
        "Under torchrun: shard the frozen base model across the processes with PyTorch FSDP2 (one unit per decoder "
        "block), so that each holds about 1/N of its weights; the adapter stays whole on every process and the "
        "result equals an unsharded run's.",
    )
    quantize: int = _opt(
        0,
        "Quantize the base model's linear layers before adding the adapter (QLoRA, lorakit.quantize): 0 off, 4 NF4, "
        "8 int8. The adapter trains in fp32 and loads onto any base, best onto one quantized the same way.",
    )
    trust_remote_code: bool = _opt(False, "Allow the base model's own Python code (off unless you trust it).")
    progress: bool = _opt(True, "Show a progress bar.")

    def __post_init__(self) -> None:
        if isinstance(self.targets, (list, tuple)):  # lorakit.train(targets=["q_proj", "v_proj"]), as in YAML
            self.targets = ",".join(self.targets)
        self._check_adapter()
        positive = ("batch_size", "grad_accum", "max_length", "logging_steps", "save_total_limit")
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
        if self.quantize not in (0, 4, 8):
            raise ValueError(f"--quantize must be 0 (off), 4 (NF4) or 8 (int8), got {self.quantize}")

    def _check_adapter(self) -> None:
        """LoraConfig checks the adapter options (before anything loads); its message gets the flag in front."""
        try:
            self.lora_config()
        except ConfigError as e:
            flags = [f"--{n.replace('_', '-')}" for n, lora in lora_options().items() if str(e).startswith(f"{lora}=")]
            raise ConfigError(f"{flags[0]}: {e}" if flags else str(e)) from None

    def target_modules(self) -> list[str] | str:
        if self.targets == ALL_LINEAR:
            return ALL_LINEAR
        names = [t.strip() for t in self.targets.split(",") if t.strip()]
        if not names:  # LoraConfig takes [] (target_parameters may name the targets); a train run needs a module
            raise ConfigError("target_modules=[] wraps nothing; list module names such as q_proj,v_proj, or use "
                              "'all-linear'")
        return names

    def lora_config(self) -> LoraConfig:
        """The adapter this run trains: its LoRA options as a LoraConfig for a causal LM."""
        values = {lora: getattr(self, name) for name, lora in lora_options().items()}
        values["target_modules"] = self.target_modules()
        return LoraConfig(**values, task_type=TaskType.CAUSAL_LM)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- reading options from a YAML file ----------------------------------------------------------------------------------
def _field_type(annotation: Any) -> type:
    """``int`` for ``int``, ``str`` for ``str | None``."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def lora_options() -> dict[str, str]:
    """{TrainArgs field: the LoraConfig field it sets}: ``{"r": "r", "alpha": "lora_alpha", ...}``."""
    return {f.name: f.metadata["lora_field"] for f in dataclasses.fields(TrainArgs) if "lora_field" in f.metadata}


def train_fields() -> dict[str, tuple[dataclasses.Field, type]]:
    hints = typing.get_type_hints(TrainArgs)
    return {f.name: (f, _field_type(hints[f.name])) for f in dataclasses.fields(TrainArgs)}


def _coerce(name: str, value: Any, typ: type, source: str) -> Any:
    """A config-file value as the field's type (YAML reads ``1e-4`` as a string, ``[q_proj, v_proj]`` as a list)."""
    if value is None or (isinstance(value, typ) and not (typ is int and isinstance(value, bool))):
        return value
    if typ is str and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ",".join(value)
    if typ in (int, float) and not isinstance(value, bool):
        try:
            number = typ(value)
            if typ is int and isinstance(value, float) and number != value:
                raise ValueError
            return number
        except (TypeError, ValueError):
            pass
    if typ is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"{source}: option '{name}' must be {typ.__name__}, got {value!r}; fix its value")


# Names from HF TrainingArguments that people write in configs -> the TrainArgs field (named in the error). The
# LoraConfig names of the adapter options (lora_alpha, lora_dropout, target_modules) are accepted as they are.
HF_NAMES = {
    "learning_rate": "lr", "lora_r": "r", "rank": "r", "num_train_epochs": "epochs",
    "gradient_accumulation_steps": "grad_accum", "per_device_train_batch_size": "batch_size",
    "output_dir": "output", "model_name_or_path": "model", "lr_scheduler_type": "lr_scheduler",
}  # fmt: skip


def read_train_config(path: str) -> dict[str, Any]:
    """The options in a YAML ``--config`` file, keyed by TrainArgs field names and converted to their types."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file '{path}' does not exist; pass a YAML file of train options")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"config file '{path}' is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file '{path}' must hold a mapping such as 'r: 8', not a {type(data).__name__}")
    fields = train_fields()
    aliases = {lora: name for name, lora in lora_options().items()}  # lora_alpha: 16 sets alpha
    out: dict[str, Any] = {}
    keys: dict[str, Any] = {}
    for key, value in data.items():
        spelled = str(key).replace("-", "_")
        name = aliases.get(spelled, spelled)
        if name in keys:
            raise ValueError(f"config file '{path}': '{keys[name]}' and '{key}' both set option '{name}'; keep one")
        keys[name] = key
        if name not in fields:
            close = [HF_NAMES[name]] if name in HF_NAMES else difflib.get_close_matches(name, list(fields), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ValueError(f"config file '{path}': unknown option '{key}'; {hint}valid options: {', '.join(fields)}")
        out[name] = _coerce(name, value, fields[name][1], f"config file '{path}'")
    return out
