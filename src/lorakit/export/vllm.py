"""Export an adapter for vLLM: check the rules vLLM applies when it loads a PEFT adapter, convert what lorakit can
convert, and write a PEFT folder that ``vllm serve --enable-lora`` takes as it is.

The rules are vLLM 0.32's: ``vllm/lora/peft_helper.py`` (``PEFTHelper._validate_features``, ``validate_legal``),
``vllm/lora/lora_model.py`` (one classification head) and ``vllm/config/lora.py`` (the ``--max-lora-rank`` values).
vLLM reads rank_pattern, alpha_pattern and use_rslora itself (``PEFTHelper.get_rank_and_scaling``), so they stay in
the config. An initializer that changed the base weight (PiSSA, OLoRA, LoftQ) is turned into a plain LoRA on the
original base by lorakit.adapters.convert, given the adapter saved before training.

Example::

    export = export_vllm("runs/x", "runs/x-vllm")
    print(export.serve_command)
    # vllm serve /path/to/base --enable-lora --lora-modules x-vllm=/abs/runs/x-vllm --max-lora-rank 16
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from lorakit.adapters.convert import converted_config, to_original_base
from lorakit.config import LoraConfig, base_model_id, read_config
from lorakit.export.output import check_output
from lorakit.export.problems import ARROW, ExportError, Problem
from lorakit.io import files
from lorakit.io.models import ModelNotFoundError, resolve_model
from lorakit.io.untrusted import inside_folder
from lorakit.io.writes import publish_folder

ENGINE = "vLLM"
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what --max-lora-rank accepts (vllm/config/lora.py)
SERVED_INITS = ("gaussian", "eva", "orthogonal", "mica")  # string inits that leave the base unchanged (vLLM takes them)
HEADS = ("classifier", "score")  # the only modules_to_save vLLM loads: a classification model's head
# PEFT features vLLM refuses that have no LoraConfig field (read_config refuses them too): found in the JSON itself
PEFT_ONLY_FEATURES = {
    "use_qalora": "QALoRA (use_qalora)",
}
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
    "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja", "chat_template.json",
)  # fmt: skip
MERGED = "export the merged model instead (--to merged), which vLLM serves without --enable-lora"


@dataclass(frozen=True)
class VllmExport:
    """What export_vllm wrote and how to serve it."""

    output: Path  # the PEFT folder vLLM loads
    max_lora_rank: int  # the --max-lora-rank vLLM needs: the smallest allowed value >= the adapter's largest rank
    base: str  # the base model id or folder the adapter belongs to
    serve_command: str  # a `vllm serve` line serving the base with this adapter


# -- the rules ---------------------------------------------------------------------------------------------------
def vllm_problems(
    config: LoraConfig, tensors: dict[str, Tensor] | None = None, *, initial_dir: str | os.PathLike | None = None
) -> list[Problem]:
    """Every rule of vLLM 0.32's adapter loader that the adapter breaks, each with its fix (empty: vLLM takes it).

    Pure: ``tensors`` (the adapter file's, if given) add the ranks they hold and the heads they save;
    ``initial_dir`` is not read: given, a PiSSA / OLoRA / LoftQ adapter is fine, since lorakit converts it (the
    rank rule counts the ranks of the converted adapter, twice the trained ones, either way).
    """
    found = [
        _dora(config),
        _bias(config),
        _lora_bias(config),
        _layer_replication(config),
        _bdlora(config),
        _kasa(config),
        _alora(config),
        _arrow(config),
        _token_rows(config),
        _parameters(config),
        _modules_to_save(config),
        _initializer(config, initial_dir),
        _rank(config, tensors, converting=needs_conversion(config)),
        _heads(tensors or {}),
        _convs(tensors or {}),
    ]
    return [problem for problem in found if problem is not None]


def peft_feature_problems(config_json: dict[str, Any]) -> list[Problem]:
    """The vLLM problems of an adapter_config.json's PEFT features that lorakit has no LoraConfig field for (and
    that read_config refuses): QALoRA."""
    return [
        Problem(
            f"vLLM does not support {name}",
            f"lorakit cannot load or convert such an adapter either: merge it with PEFT (merge_and_unload) and serve "
            f"the merged model, or retrain without {key}",
        )
        for key, name in PEFT_ONLY_FEATURES.items()
        if config_json.get(key)
    ]


def needs_conversion(config: LoraConfig) -> bool:
    """True if vLLM refuses the adapter's initializer: a string other than vLLM's list of inits that leave the base
    unchanged and lorakit's 'kaiming' (the default init, exported as True)."""
    init = config.init_lora_weights
    return isinstance(init, str) and init.lower() not in (*SERVED_INITS, "kaiming")


def largest_rank(config: LoraConfig, tensors: dict[str, Tensor] | None = None) -> int:
    """The adapter's largest rank: r, the values of rank_pattern, and the rank of each LoRA pair in ``tensors``."""
    ranks = [config.r, *config.rank_pattern.values()]
    ranks += [A.shape[0] for A, _ in files.lora_pairs(tensors or {}).values()]
    return max(ranks)


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest --max-lora-rank vLLM accepts that holds ``rank`` (12 -> 16, 300 -> 320); ValueError above 512."""
    for allowed in MAX_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"rank {rank} is above vLLM's largest --max-lora-rank {MAX_LORA_RANKS[-1]}; {MERGED}")


def _dora(config: LoraConfig) -> Problem | None:
    return Problem("vLLM does not support DoRA (use_dora=True)", MERGED) if config.use_dora else None


def _bias(config: LoraConfig) -> Problem | None:
    if config.bias == "none":
        return None
    return Problem(f"vLLM does not load adapter biases (bias={config.bias!r}; it takes bias='none' only)", MERGED)


def _lora_bias(config: LoraConfig) -> Problem | None:
    if not config.lora_bias:
        return None
    return Problem(
        "vLLM does not support LoRA bias (lora_bias)",
        "export the merged model instead (--to merged: merge_and_unload adds s * b to the base layer's bias), or "
        "retrain without lora_bias",
    )


def _layer_replication(config: LoraConfig) -> Problem | None:
    if not config.layer_replication:
        return None
    return Problem(
        "vLLM does not support layer_replication",
        "export the merged model instead (--to merged: merge_and_unload gives each replicated layer its own merged "
        "weights, a model of the new depth), or retrain without layer_replication",
    )


def _bdlora(config: LoraConfig) -> Problem | None:
    if not config.use_bdlora:
        return None
    return Problem(
        "vLLM does not support block-diagonal LoRA (BD-LoRA, use_bdlora): its file holds one factor per module "
        "packed as (r, in / nblocks) or (out, r / nblocks)",
        MERGED,
    )


def _kasa(config: LoraConfig) -> Problem | None:
    if not config.kasa_config:
        return None
    return Problem(
        "vLLM does not support KaSA (kasa_config): its update s * B @ diag(lora_diag) @ A has learned singular values "
        "between B and A, and its base weight is truncated, while vLLM serves the base unchanged",
        MERGED,
    )


def _alora(config: LoraConfig) -> Problem | None:
    if not config.alora_invocation_tokens:
        return None
    return Problem(
        "lorakit exports no Activated LoRA (aLoRA, alora_invocation_tokens) adapter for vLLM: its update applies only "
        "from the invocation tokens on, which vLLM's plain LoRA does not do, and no merged model computes it",
        "serve it unmerged with lorakit or PEFT (PeftModel.generate finds the invocation in each prompt)",
    )


def _arrow(config: LoraConfig) -> Problem | None:
    return ARROW if config.arrow_config else None


def _token_rows(config: LoraConfig) -> Problem | None:
    if not config.trainable_token_indices:
        return None
    return Problem(
        f"vLLM does not load trained embedding rows (trainable_token_indices={config.trainable_token_indices})", MERGED
    )


def _parameters(config: LoraConfig) -> Problem | None:
    if not config.target_parameters:
        return None
    return Problem(
        f"lorakit does not write vLLM's format for LoRA on parameters (target_parameters={config.target_parameters}: "
        "e.g. fused MoE experts)", MERGED
    )


def _modules_to_save(config: LoraConfig) -> Problem | None:
    others = [name for name in config.modules_to_save or [] if name not in HEADS]
    if not others:
        return None
    return Problem(
        f"vLLM loads modules_to_save only for a classification head ('classifier' or 'score'), not {others}", MERGED
    )


def _initializer(config: LoraConfig, initial_dir: str | os.PathLike | None) -> Problem | None:
    if not needs_conversion(config) or config.use_dora:  # DoRA: _dora says it (and its fix covers this one)
        return None
    rule = (
        f"vLLM does not support init_lora_weights={config.init_lora_weights!r}: PiSSA, OLoRA, CorDA, LoRA-GA and LoftQ "
        "change the base weights, and vLLM serves the base unchanged"
    )
    try:
        converted_config(config)
    except ValueError as e:
        return Problem(f"{rule}; and lorakit cannot convert it: {str(e).split('; ')[0]}", MERGED)
    if initial_dir is None:
        return Problem(
            rule,
            "pass the adapter saved right after get_peft_model, before training, as --initial DIR (initial_dir=DIR): "
            "lorakit converts the adapter into a plain LoRA on the original base",
            convertible=True,
        )
    return None


def _rank(config: LoraConfig, tensors: dict[str, Tensor] | None, converting: bool) -> Problem | None:
    factor = 2 if converting else 1  # the conversion stacks the initial factors beside the trained ones
    largest, top = largest_rank(config, tensors) * factor, MAX_LORA_RANKS[-1]
    if largest <= top:
        return None
    doubled = " (doubled by the conversion to the original base)" if converting else ""
    return Problem(
        f"vLLM's --max-lora-rank is at most {top}; this adapter's largest rank is {largest}{doubled}",
        f"{MERGED}, or retrain with r and rank_pattern at most {top // factor}",
    )


def _convs(tensors: dict[str, Tensor]) -> Problem | None:
    convs = files.conv_modules(tensors)
    if not convs:
        return None
    listed = f"{', '.join(convs[:3])}{' ...' if len(convs) > 3 else ''}"
    return Problem(f"vLLM's LoRA layers are linear; this adapter adapts conv layers (nn.Conv1d / 2d / 3d: {listed})",
                   MERGED)


def _heads(tensors: dict[str, Tensor]) -> Problem | None:
    saved = sorted({head for key in tensors for head in HEADS if key.rsplit(".", 2)[-2:-1] == [head]})
    if len(saved) < 2:
        return None
    return Problem(
        f"vLLM loads one classification head per adapter; this one saves {saved}",
        "keep only the head the model has in modules_to_save, and save the adapter again",
    )


# -- the export --------------------------------------------------------------------------------------------------
def export_vllm(
    adapter_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    initial_dir: str | os.PathLike | None = None,
    model: str | None = None,
    overwrite: bool = False,
) -> VllmExport:
    """Write the adapter in ``adapter_dir`` to ``output_dir`` as a PEFT folder vLLM 0.32 loads (adapter_config.json,
    adapter_model.safetensors, and the adapter's tokenizer files if it has them), and say how to serve it.

    A PiSSA / OLoRA / LoftQ adapter needs ``initial_dir``, the adapter saved right after get_peft_model (before
    training): it is converted into a plain LoRA of twice the rank on the original base. ``model``: the base model
    id or folder, default the adapter's base_model_name_or_path. The folder is written whole or not at all.

    Raises:
        ExportError: the adapter breaks vLLM's rules; the message lists each with its fix. Nothing is written.
        FileExistsError: ``output_dir`` is a file, the adapter folder, or a non-empty folder and not ``overwrite``.
        AdapterFileError: the adapter or initial adapter folder is missing, corrupt, or names no base model.
    """
    adapter_dir, output = Path(adapter_dir), Path(output_dir)
    check_output(adapter_dir, output, overwrite)
    problems = peft_feature_problems(files.read_config_json(adapter_dir)[0])
    if problems:  # read_config would refuse these keys with lorakit's message, not vLLM's
        raise ExportError(ENGINE, problems, str(adapter_dir))
    config, (tensors, _) = read_config(adapter_dir), files.read_weights(adapter_dir)
    problems = vllm_problems(config, tensors, initial_dir=initial_dir)
    if problems:
        raise ExportError(ENGINE, problems, str(adapter_dir))
    base = base_model_id(adapter_dir, model)
    tensors, config = _served(tensors, config, initial_dir)
    needed = sum(t.numel() * t.element_size() for t in tensors.values())  # the weights file, about
    publish_folder(output, lambda folder: _write(folder, config, tensors, adapter_dir), needed=needed)
    rank = vllm_max_lora_rank(largest_rank(config, tensors))
    return VllmExport(output, rank, base, serve_command(_local_folder(base), output, rank))


def _served(
    tensors: dict[str, Tensor], config: LoraConfig, initial_dir: str | os.PathLike | None
) -> tuple[dict[str, Tensor], LoraConfig]:
    """(tensors, config) as vLLM takes them: converted onto the original base if the initializer changed it; the
    string 'kaiming' (lorakit's name for the default init, which vLLM refuses) written as True; a MonteCLoRA adapter
    as the plain LoRA it is outside training."""
    if needs_conversion(config):
        assert initial_dir is not None  # vllm_problems said so otherwise
        return to_original_base(tensors, config, initial_dir, "default")
    if initial_dir is not None:
        warnings.warn(
            f"initial_dir={str(initial_dir)!r} is not used: init_lora_weights={config.init_lora_weights!r} leaves the "
            "base unchanged, so the adapter goes to vLLM as it is",
            stacklevel=3,
        )
    if isinstance(config.init_lora_weights, str) and config.init_lora_weights.lower() == "kaiming":
        config = dataclasses.replace(config, init_lora_weights=True)
    if config.monteclora_config:  # outside training MonteCLoRA is its plain LoRA: its sampler's tensors stay behind
        tensors = {k: v for k, v in tensors.items() if ".lora_monteclora_sampler." not in k}
        config = dataclasses.replace(config, monteclora_config=None)
    return tensors, config


def _write(folder: Path, config: LoraConfig, tensors: dict[str, Tensor], adapter_dir: Path) -> None:
    files.write_adapter(folder, config.to_dict(), tensors)
    for name in TOKENIZER_FILES:
        source = adapter_dir / name
        if source.is_file():
            shutil.copyfile(inside_folder(adapter_dir, source), folder / name)


def serve_command(base_folder: str, output: Path, max_lora_rank: int) -> str:
    """The ``vllm serve`` line serving ``base_folder`` with the adapter in ``output``, named after that folder."""
    lora = f"{output.name}={output.resolve()}"
    return shlex.join(
        ["vllm", "serve", base_folder, "--enable-lora", "--lora-modules", lora, "--max-lora-rank", str(max_lora_rank)]
    )


def _local_folder(base: str) -> str:
    """The local folder of model ``base`` (resolve_model, looked up offline: showing a command never downloads a
    model), else ``base`` as it is (a hub id, which vLLM fetches itself)."""
    with _hub_offline():
        try:
            return resolve_model(base)
        except ModelNotFoundError:
            return base


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """HF_HUB_OFFLINE=1 in this process's environment while the block runs, restored after."""
    before = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["HF_HUB_OFFLINE"]
        else:
            os.environ["HF_HUB_OFFLINE"] = before
