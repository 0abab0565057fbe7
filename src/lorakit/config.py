"""LoraConfig and TaskType: what an adapter is, with HF PEFT's field names and defaults.

Each field's ``help`` metadata is the single description used by the docs and the CLI. The file itself is
lorakit.io.files' business; ``read_config`` / ``write_config`` here turn its JSON object into a LoraConfig and back.
The checks of the values are in lorakit.config_checks; the keys PEFT's file holds besides the fields, and the check of
a file's value types, in lorakit.config_json.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib.metadata
import json
import math
import os
import re
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.config_base import (  # noqa: F401 - re-exported: lorakit.config is where callers import them from
    VARIANT,
    ConfigError,
    ConfigTypeError,
    NotAPeftConfigError,
    PeftError,
    PeftWarning,
    described,
    requested_variants,
)
from lorakit.config_checks import BIAS_MODES, check_config  # noqa: F401 - BIAS_MODES re-exported
from lorakit.config_json import INFORMATIONAL_PEFT_KEYS, NEUTRAL_PEFT_KEYS, check_json_types, neutral, peft_file_keys
from lorakit.io.untrusted import AdapterFileError, read_small_text
from lorakit.sub_configs import (  # noqa: F401 - re-exported
    SUB_CONFIG_FIELDS,
    SUB_CONFIGS,
    ArrowConfig,
    BdLoraConfig,
    CordaConfig,
    EvaConfig,
    KasaConfig,
    LoftQConfig,
    LoraGAConfig,
    MontecloraConfig,
    VeloraConfig,
    as_sub_config,
)

# lorakit.io.files imports torch (safetensors); a LoraConfig is made and checked without it (``lorakit train`` checks
# its options before torch loads), so ``_files()`` imports it where a file is read or written.

ALL_LINEAR = "all-linear"


class TaskType(str, enum.Enum):
    """The task a model is tuned for; chooses the PeftModel subclass (as in PEFT)."""

    CAUSAL_LM = "CAUSAL_LM"
    SEQ_CLS = "SEQ_CLS"
    TOKEN_CLS = "TOKEN_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"
    QUESTION_ANS = "QUESTION_ANS"


class PeftType(str, enum.Enum):
    """The method an adapter_config.json names in ``peft_type``; lorakit implements LoRA (and DoRA, a LoRA option)."""

    LORA = "LORA"


@dataclass
class LoraConfig:
    """A LoRA adapter: which modules it wraps, its rank and scaling, and how it starts (PEFT-compatible)."""

    r: int = described("Rank of the update B @ A.", 8)
    target_modules: list[str] | str | None = described(
        "Modules to wrap: a list of names or dotted suffixes, a regex (str, full match), 'all-linear', "
        "or None for the architecture's default.",
    )
    exclude_modules: list[str] | str | None = described(
        "Modules never wrapped (same matching rules as target_modules)."
    )
    target_parameters: list[str] | None = described(
        "Parameters to adapt directly, by name or dotted suffix (e.g. 'mlp.experts.gate_up_proj'): for weights that no "
        "nn.Linear computes with, such as the fused 3-D expert stacks of transformers 5's mixtures of experts "
        "(one low-rank update per expert); see lorakit.adapters.parameter.",
    )
    lora_alpha: float = described("Scaling numerator: the update is multiplied by lora_alpha / r.", 8)
    lora_dropout: float = described("Dropout probability on the adapter's input, in [0, 1).", 0.0)
    fan_in_fan_out: bool = described(
        "True if the base weight is stored (in, out), as GPT-2's Conv1D (set automatically).", False
    )
    bias: str = described("Which biases train: 'none', 'all', or 'lora_only' (biases of wrapped modules).", "none")
    use_rslora: bool = described("Rank-stabilized scaling lora_alpha / sqrt(r) (Kalajdzievski 2023).", False)
    modules_to_save: list[str] | None = described("Modules trained in full and saved with the adapter (e.g. a head).")
    init_lora_weights: bool | str = described(
        "True: Kaiming-uniform A, zero B (identity at start); 'gaussian': normal A (std 1/r), zero B; "
        "False: random A and B (not an identity, for tests); see lorakit.ops.init for the full list.",
        True,
        lora_variants=("mica",),  # init_lora_weights='mica' is MiCA, a variant (lorakit.adapters.variant_mica)
    )
    layers_to_transform: list[int] | int | None = described("Only wrap modules in these layer indices.")
    layers_pattern: list[str] | str | None = described("Name of the layer list that layers_to_transform indexes.")
    rank_pattern: dict[str, int] = described("Per-module rank overrides: {name regex: r}.", factory=dict)
    alpha_pattern: dict[str, float] = described("Per-module alpha overrides: {name regex: alpha}.", factory=dict)
    task_type: TaskType | str | None = described("The task (CAUSAL_LM, SEQ_CLS, ...); picks the model wrapper.")
    base_model_name_or_path: str | None = described("The base model this adapter belongs to (set on save).")
    revision: str | None = described("Revision of the base model on the hub, if any.")
    inference_mode: bool = described("True when loaded for inference: adapter weights are frozen.", False)
    loftq_config: LoftQConfig | dict = described("LoftQ settings, used with init_lora_weights='loftq'.", factory=dict)
    use_dora: bool = described(
        "Weight-decomposed LoRA (DoRA, Liu et al. 2024): a learned magnitude per output row rescales W + s * B @ A.",
        False,
        **VARIANT,
    )
    lora_bias: bool = described(
        "Give each adapter's B a trainable bias b (out,): the update is s * (B @ A @ x + b), merged into the base "
        "layer's bias. For adapters extracted from fully fine-tuned weights; needs init_lora_weights True or False "
        "and no DoRA.",
        False,
    )
    velora_config: VeloraConfig | dict | None = described(
        "VeLoRA (a VeloraConfig, or its dict): A's backward pass keeps compressed inputs, to save activation memory; "
        "the forward and the merged weight are plain LoRA's (lorakit.adapters.variant_velora). nn.Linear / Conv1D "
        "targets only.",
        **VARIANT,
    )
    use_bdlora: BdLoraConfig | dict | None = described(
        "BD-LoRA (a BdLoraConfig, or its dict): A or B block-diagonal per target, for tensor-parallel serving "
        "(lorakit.adapters.variant_bdlora). nn.Linear / Conv1D targets only.",
        **VARIANT,
    )
    kasa_config: KasaConfig | dict | None = described(
        "KaSA (a KasaConfig, or its dict): the base weight loses its r smallest singular components (once, when the "
        "adapter is added) and the update is s * B @ diag(lora_diag) @ A, with lora_diag (r,) learned "
        "(lorakit.adapters.variant_kasa). nn.Linear targets only; not combined with adapters without KaSA.",
        **VARIANT,
    )
    monteclora_config: MontecloraConfig | dict | None = described(
        "MonteCLoRA (a MontecloraConfig, or its dict): in training, A is a learned mixture of noisy copies of itself, "
        "with a variational loss (LoraModel._get_monteclora_loss); evaluation and merging are plain LoRA's "
        "(lorakit.adapters.variant_monteclora). nn.Linear / Conv1D targets only.",
        **VARIANT,
    )
    corda_config: CordaConfig | dict | None = described(
        "CorDA settings (a CordaConfig, or its dict), used with init_lora_weights='corda' after "
        "lorakit.preprocess_corda.",
    )
    eva_config: EvaConfig | dict | None = described(
        "EVA settings (an EvaConfig, or its dict), used with init_lora_weights='eva' and "
        "lorakit.initialize_lora_eva_weights.",
    )
    lora_ga_config: LoraGAConfig | dict | None = described(
        "LoRA-GA settings (a LoraGAConfig, or its dict), used with init_lora_weights='lora_ga' after "
        "lorakit.preprocess_loraga.",
    )
    arrow_config: ArrowConfig | dict | None = described(
        "Arrow routing (an ArrowConfig, or its dict): the adapter mixes the loaded task adapters per token "
        "(lorakit.create_arrow_model, lorakit.adapters.variant_arrow). nn.Linear / Conv1D targets only.",
        **VARIANT,
    )
    trainable_token_indices: list[int] | dict[str, list[int]] | None = described(
        "Train only these rows of an embedding (token ids), the rest frozen: a list for the input embedding, or "
        "{module name: ids} for named embeddings (lorakit.adapters.trainable_tokens).",
    )
    ensure_weight_tying: bool = described(
        "With tie_word_embeddings: keep the output layer tied to the input embedding's adapter (LoRA factors, "
        "modules_to_save copy or trainable token rows shared between the two).",
        False,
    )
    alora_invocation_tokens: list[int] | None = described(
        "Activated LoRA (aLoRA, arXiv 2504.12397): the token ids of the invocation sequence. Each row gets the update "
        "from the last occurrence of this sequence on; earlier tokens see the base model, so its KV cache of the "
        "prefix can be reused (lorakit.adapters.variant_alora). Needs input_ids in forward / generate (the offsets "
        "are found there); no merging, no beam search. nn.Linear / Conv1D targets only.",
        **VARIANT,
    )
    layer_replication: list[list[int]] | None = described(
        "Grow (or shrink) the model by stacking ranges of its own layers: [start, end) pairs, e.g. [[0, 4], [2, 5]] "
        "on 5 layers gives the 7 layers 0 1 2 3 2 3 4. The copies share the base weights (no extra memory) and each "
        "gets its own LoRA adapter, so they can be tuned apart. Done once, when the model's first adapter is added "
        "(lorakit.adapters.replicate); Llama-style (model.layers), BERT-style (encoder.layer) and GPT-2 / "
        "Falcon-style (h) layer lists.",
    )
    auto_mapping: dict[str, str] | None = described(
        "Without a task_type: the base model's class and module (set on save, as PEFT does; PEFT's AutoPeftModel "
        "reads them to choose the class to load)."
    )
    peft_type: PeftType | str = described(
        "The method, as adapter_config.json names it: always 'LORA' for a LoraConfig (another value given here is "
        "replaced, with a warning; a file naming another method is refused).",
        PeftType.LORA,
    )
    peft_version: str | None = described(
        "The PEFT version whose adapter_config.json format the file follows; None (the default) fills in the one "
        "lorakit writes, lorakit.config.__version__. A loaded file keeps its own.",
    )

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.target_parameters, (set, tuple)):
            self.target_parameters = sorted(self.target_parameters)
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = list(self.modules_to_save)
        if isinstance(self.task_type, str) and not isinstance(self.task_type, TaskType):
            try:
                self.task_type = TaskType(self.task_type.upper())
            except ValueError:
                allowed = ", ".join(t.value for t in TaskType)
                raise ConfigError(  # PEFT's words
                    f"Invalid task type: {self.task_type!r}. Must be one of the following task types: {allowed}. "
                    f"(task_type={self.task_type!r})"
                ) from None
        if isinstance(self.layer_replication, (list, tuple)) and all(
            isinstance(pair, (list, tuple)) for pair in self.layer_replication
        ):
            self.layer_replication = [list(pair) for pair in self.layer_replication]  # JSON's form: lists, as PEFT's
        if isinstance(self.loftq_config, LoftQConfig):
            self.loftq_config = self.loftq_config.to_dict()
        for name, cls in SUB_CONFIG_FIELDS.items():
            setattr(self, name, as_sub_config(name, getattr(self, name), cls))
        if self.peft_type != PeftType.LORA:
            warnings.warn(f"LoraConfig(peft_type={self.peft_type!r}): a LoraConfig is always peft_type 'LORA'; the "
                          "value was replaced (leave peft_type out)", PeftWarning, stacklevel=3)
        self.peft_type = PeftType.LORA
        if self.peft_version is None:
            self.peft_version = _peft_version()
        self._custom_modules: dict[type, type] = {}  # _register_custom_module's; not a field: never saved
        self.validate()
        for method, title, cls in (("eva", "EVA", EvaConfig), ("corda", "CorDA", CordaConfig)):  # PEFT's words
            field_name, chosen = f"{method}_config", str(self.init_lora_weights).lower() == method
            if chosen and getattr(self, field_name) is None:
                warnings.warn(f"`init_lora_weights` is '{method}' but `{field_name}` is not specified. Using default "
                              f"{title} config.", UserWarning, stacklevel=3)
                setattr(self, field_name, cls())
            elif not chosen and getattr(self, field_name) is not None:
                warnings.warn(f"`{field_name}` specified but will be ignored when `init_lora_weights` is not "
                              f"'{method}'.", UserWarning, stacklevel=3)
        init = self.init_lora_weights
        if isinstance(init, str) and init.startswith(("pissa", "olora", "corda", "lora_ga")) and self.use_rslora and (
            self.rank_pattern or self.alpha_pattern
        ):
            warnings.warn(  # PEFT's words first: its tests match them
                "Using Rank-Stabilized LoRA with rank_pattern/alpha_pattern and post-training conversion of modified "
                "base weights (PiSSA, OLoRA, CorDA, LoRA-GA) means that you won't be able to pass "
                "`path_initial_model_for_weight_conversion` to `save_pretrained` to restore the initial values of "
                "the base weights (the rank-2r adapter would change their scaling); save without conversion, or drop "
                "use_rslora or the patterns",
                UserWarning,
                stacklevel=3,
            )

    def _register_custom_module(self, mapping: dict[type, type]) -> None:
        """Wrap modules of your own classes with LoRA layers of your own: ``mapping`` is {module class: LoraLayer
        subclass, built as ``cls(base_layer)``}, e.g. ``{MyLinearLike: MyLora}`` with ``class MyLora(LoraLinear)``
        (PEFT's experimental API of the name; lorakit.adapters.kinds says what such a layer needs). Registered
        classes are matched before lorakit's own kinds. This config object holds the mapping: it is not saved, so
        register it again on the config you pass to ``PeftModel.from_pretrained(..., config=config)``."""
        bad = {k: v for k, v in mapping.items() if not (isinstance(k, type) and isinstance(v, type))}
        if bad:
            raise ConfigError(f"_register_custom_module({bad!r}): map module classes to LoRA layer classes, e.g. "
                              "{MyModule: MyLora} with class MyLora(lorakit.LoraLinear)")
        self._custom_modules.update(mapping)

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid field and what it accepts (lorakit.config_checks)."""
        check_config(self)

    def variant_names(self) -> tuple[str, ...]:
        """The variants this config asks for (``requested_variants``: PEFT's names, sorted): () for plain LoRA, else
        one of 'use_dora', 'velora_config', 'use_bdlora', 'kasa_config', 'monteclora_config',
        'alora_invocation_tokens', 'arrow_config', 'mica' (init_lora_weights='mica'); the variant is built by
        lorakit.adapters.variants.for_config.
        ConfigError for two at once, which neither PEFT nor lorakit combines."""
        names = tuple(sorted(name for name, on in requested_variants(self).items() if on))
        if len(names) > 1:
            raise ConfigError(  # PEFT's wording, then the fix
                f"Invalid or unsupported variant combination: {names}: an adapter has one LoRA variant; keep one of "
                f"{', '.join(names)} and unset the others"
            )
        return names

    def rank_for(self, module_name: str) -> int:
        """The rank of the module called ``module_name`` (rank_pattern first, then r)."""
        key = pattern_key(self.rank_pattern, module_name)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_for(self, module_name: str) -> float:
        """The alpha of the module called ``module_name`` (alpha_pattern first, then lora_alpha)."""
        key = pattern_key(self.alpha_pattern, module_name)
        return self.alpha_pattern[key] if key is not None else self.lora_alpha

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict with every key PEFT writes: ``peft_type``, the fields, and PEFT's own keys (its
        features lorakit lacks, at their "off" value, and the keys that describe the file)."""
        out: dict[str, Any] = dict(peft_file_keys())
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, SUB_CONFIGS):
                value = dataclasses.asdict(value)
            out[f.name] = value.value if isinstance(value, enum.Enum) else value
        return out

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None,
                        **kwargs: Any) -> LoraConfig:
        """The config saved in an adapter folder (``subfolder`` of it, if given), as PEFT's
        ``PeftConfig.from_pretrained``; a local folder (lorakit reads no hub ids for adapters, so PEFT's hub
        arguments such as ``revision`` or ``token`` are accepted and unused)."""
        folder = Path(pretrained_model_name_or_path)
        return read_config(folder / subfolder if subfolder else folder)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Write this config as ``adapter_config.json`` in ``save_directory`` (created if missing), atomically."""
        write_config(save_directory, self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraConfig:
        """Build from a PEFT-style dict. Unknown keys (a newer PEFT) are ignored with a warning, as PEFT does; a dict
        with unknown keys and no ``peft_type`` is no PEFT config (NotAPeftConfigError); keys naming PEFT features
        lorakit lacks raise ConfigError unless they hold their neutral value."""
        data = dict(data)
        own = {f.name for f in dataclasses.fields(cls)}
        known = own | NEUTRAL_PEFT_KEYS.keys() | INFORMATIONAL_PEFT_KEYS
        unknown = sorted(k for k in data if k not in known)
        if unknown and "peft_type" not in data:
            raise NotAPeftConfigError(  # PEFT's words first (its tests match them)
                f"The {cls.__name__} config that is trying to be loaded is missing required keys: {{'peft_type'}}. "
                f"It holds keys no PEFT config has ({', '.join(unknown)}): pass an adapter_config.json that "
                "save_pretrained wrote"
            )
        if data.get("peft_type", "LORA") != "LORA":
            raise ConfigError(f"peft_type={data['peft_type']!r}: lorakit loads LoRA adapters only (peft_type 'LORA')")
        unsupported = {k: v for k, v in data.items() if k in NEUTRAL_PEFT_KEYS and not neutral(k, v)}
        if unsupported:
            names = ", ".join(f"{k}={v!r}" for k, v in unsupported.items())
            raise ConfigError(f"this adapter uses PEFT features lorakit does not support yet: {names}")
        if unknown:
            warnings.warn(  # PEFT's words first (its tests match them)
                f"Unexpected keyword arguments {unknown} for class {cls.__name__}, these are ignored. The adapter "
                "config was probably saved by a newer PEFT; lorakit writes PEFT "
                f"{PEFT_FORMAT_VERSION}'s format and loads the rest of it",
                PeftWarning,
                stacklevel=2,
            )
        return cls(**{k: v for k, v in data.items() if k in own})

    @classmethod
    def from_peft_type(cls, **kwargs: Any) -> LoraConfig:
        """A config from keyword arguments, PEFT's ``PeftConfig.from_peft_type``: the class is the one ``peft_type``
        names (lorakit has LoRA only: another one is a ConfigError) and unknown keywords are dropped with a
        warning, as ``from_dict``."""
        return cls.from_dict(kwargs)

    @classmethod
    def from_json_file(cls, path_json_file: str | os.PathLike, **kwargs: Any) -> dict[str, Any]:
        """The JSON object of a config file (not a LoraConfig: ``from_dict`` makes one), as PEFT's method of the
        name; a ``runtime_config`` key (PEFT's settings of one session, never meant for a file) is dropped with
        PEFT's warning. AdapterFileError if the file is too big to be a config, not JSON or not an object."""
        path = Path(path_json_file)
        try:
            data = json.loads(read_small_text(path, path.parent))
        except (ValueError, RecursionError) as e:
            if isinstance(e, AdapterFileError):
                raise
            raise AdapterFileError(f"{path} is not valid JSON ({e}); re-save the adapter") from None
        if not isinstance(data, dict):
            raise AdapterFileError(f"{path} must hold a JSON object, not {type(data).__name__}")
        if "runtime_config" in data:
            warnings.warn("The configuration file contains a `runtime_config` key. This is ignored. Runtime "
                          "configurations are only valid at runtime.", PeftWarning, stacklevel=2)
            del data["runtime_config"]
        return data


PeftConfig = LoraConfig  # PEFT's base class of configs; every lorakit adapter is a LoRA one


def get_peft_config(config_dict: dict[str, Any]) -> LoraConfig:
    """A config from a PEFT-style dict (``peft_type`` "LORA" or absent), as PEFT's ``get_peft_config``."""
    return LoraConfig.from_dict(config_dict)


# The PEFT version whose adapter_config.json lorakit writes, key for key (tests/api/test_interop.py compares them).
PEFT_FORMAT_VERSION = "0.21.2"
# What a new config's peft_version reads, as PEFT's peft.config.__version__: the format version (the file is PEFT
# 0.21.2's, key for key, so it says so, as PEFT 0.21.2 writes it). Not lorakit's own version: PEFT reads the part
# after an "@" as a commit of PEFT's (its dev builds write "<version>@<commit>"), which lorakit has none of.
__version__ = PEFT_FORMAT_VERSION


def _peft_version() -> str:
    """``__version__``, as PEFT's ``_get_peft_version``; a dev version (a format lorakit never ships, e.g. set by a
    test) gets "@<commit>" of the code that wrote the file (lorakit's, installed from git), or "@UNKNOWN"."""
    version = __version__
    if ".dev" not in version:  # PEP 440 dev releases: "0.15.0.dev7"
        return version
    try:
        commit = _get_commit_hash("lorakit")
    except Exception:  # noqa: BLE001 - a version string never breaks making a config (PEFT's rule)
        warnings.warn("A dev version of PEFT is used but there was an error while trying to determine the commit "
                      "hash; peft_version records '@UNKNOWN'", PeftWarning, stacklevel=4)
        commit = None
    return f"{version}@{commit or 'UNKNOWN'}"


def _get_commit_hash(package: str) -> str | None:
    """The git commit ``package`` was installed from (pip's direct_url.json), None if it was not (PEFT's name)."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in dist.files or []:
        if file.name == "direct_url.json":
            commit = json.loads(dist.locate_file(file).read_text()).get("vcs_info", {}).get("commit_id")
            return commit if isinstance(commit, str) else None
    return None


def pattern_key(patterns: dict[str, Any], module_name: str) -> str | None:
    """The first key of ``patterns`` (a regex) that matches the end of ``module_name`` at a dot boundary, as PEFT
    matches rank_pattern / alpha_pattern; None if none matches."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


def scaling_for(alpha: float, r: int, use_rslora: bool) -> float:
    """LoRA scaling: alpha / r (Hu et al. 2021, sec. 4.1), or alpha / sqrt(r) (rsLoRA, Kalajdzievski 2023)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _files() -> types.ModuleType:
    from lorakit.io import files  # imports torch (safetensors): see the note at the imports

    return files


def read_config(folder: str | os.PathLike) -> LoraConfig:
    """The LoraConfig saved in adapter folder ``folder``; AdapterFileError naming the file if it is missing or
    invalid (lorakit.io.files reads the file, this checks its fields)."""
    data, path = _files().read_config_json(folder)
    return config_from_json(path, data)


def config_from_json(path: Path, data: dict[str, Any]) -> LoraConfig:
    """The LoraConfig of the JSON object ``data`` read from ``path`` (lorakit.io.files.read_config_json's pair): its
    fields checked, AdapterFileError naming the file for a value lorakit cannot use."""
    check_json_types(path, data, LoraConfig)
    try:
        return LoraConfig.from_dict(data)
    except NotAPeftConfigError as e:
        raise NotAPeftConfigError(f"{path}: {e}") from None
    except (ConfigError, TypeError) as e:
        raise AdapterFileError(f"{path}: {e}") from None


def write_config(folder: str | os.PathLike, config: LoraConfig) -> None:
    """Write ``config`` as the adapter_config.json of ``folder`` (created if missing), atomically."""
    _files().write_config_json(folder, config.to_dict())


def base_model_id(
    adapter: str | os.PathLike[str], model: str | None = None, config: LoraConfig | None = None
) -> str:
    """The base model of the adapter in folder ``adapter``: ``model`` if given, else its base_model_name_or_path.
    ``config``: the adapter's config if the caller has read it already (it is not read again)."""
    config = read_config(adapter) if config is None else config
    if model is not None:
        return model
    if not config.base_model_name_or_path:
        raise AdapterFileError(
            f"{Path(adapter) / _files().CONFIG_NAME} names no base_model_name_or_path; pass the base model (--model)"
        )
    return config.base_model_name_or_path
