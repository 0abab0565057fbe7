"""The settings of LoRA's variants and initializers, each a small dataclass nested in a LoraConfig (``velora_config``,
``use_bdlora``, ``kasa_config``, ``monteclora_config``, ``corda_config``, ``eva_config``, ``lora_ga_config``,
``arrow_config``, ``loftq_config``), with PEFT's class names, fields and defaults; adapter_config.json holds each as a
dict (``as_sub_config`` turns it back)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from lorakit.config_base import ConfigError, described


@dataclass
class LoftQConfig:
    """Settings of the LoftQ initializer (quantize / low-rank alternation), as in PEFT."""

    loftq_bits: int = described("Bits of the quantized base the adapter compensates for (4 or 8).", 4)
    loftq_iter: int = described("Alternating quantize / SVD iterations.", 1)

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


_VELORA_INIT_TYPES = ("batch_average_once", "batch_average", "random")  # lorakit.ops.velora.INIT_TYPES


@dataclass
class VeloraConfig:
    """Settings of VeLoRA (Miles et al. 2024): A's backward pass keeps each input token as G rank-1 sub-token
    coefficients instead of the token itself (lorakit.ops.velora), as PEFT's ``VeloraConfig``."""

    num_groups: int = described(
        "Sub-tokens G per input token: more groups reconstruct the input better and keep more memory.", 64
    )
    scale: float = described("Factor on the reconstructed input in the backward pass.", 1.0)
    init_type: str = described(
        "The projection vector: 'batch_average' (mean sub-token of each training batch), 'batch_average_once' (of "
        "the first one only), or 'random' (drawn once).",
        "batch_average",
    )

    def __post_init__(self) -> None:  # PEFT's wording (its tests match it), then the fix
        if isinstance(self.num_groups, bool) or not isinstance(self.num_groups, int) or self.num_groups <= 0:
            raise ConfigError(f"`num_groups` should be positive, got {self.num_groups}. Pass e.g. num_groups=64")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not self.scale > 0:
            raise ConfigError(f"`scale` should be positive, got {self.scale}. Pass e.g. scale=1.0")
        if self.init_type not in _VELORA_INIT_TYPES:
            raise ConfigError(
                f"Unsupported `init_type` {self.init_type!r}. Supported values are 'batch_average_once', "
                "'batch_average', and 'random'."
            )


@dataclass
class BdLoraConfig:
    """Settings of BD-LoRA (block-diagonal LoRA): per target, A or B is block-diagonal with ``nblocks`` blocks, so
    that a tensor-parallel engine with ``nblocks`` shards serves the adapter without extra communication (modules
    sharded by rows, e.g. o_proj / down_proj: A; by columns, e.g. q/k/v/up/gate_proj: B). PEFT's ``BdLoraConfig``."""

    target_modules_bd_a: list[str] | None = described(
        "Targets whose A is block-diagonal: a target matches when one of these strings is part of its name."
    )
    target_modules_bd_b: list[str] | None = described(
        "Targets whose B is block-diagonal: a target matches when one of these strings is part of its name."
    )
    nblocks: int = described("Blocks of each block-diagonal factor (the serving engine's tensor-parallel degree).", 1)
    match_strict: bool = described(
        "True: every target must match target_modules_bd_a or _bd_b (an error otherwise); False: the others get "
        "plain LoRA.",
        True,
    )

    def __post_init__(self) -> None:
        overlap = set(self.target_modules_bd_a or []) & set(self.target_modules_bd_b or [])
        if overlap:  # PEFT's wording (its tests match it), then the fix
            raise ConfigError(
                f"Found overlapping modules in target_modules_bd lists: {self.target_modules_bd_a} (A) and "
                f"{self.target_modules_bd_b} (B). Name each module in one list only"
            )
        if isinstance(self.nblocks, bool) or not isinstance(self.nblocks, int) or self.nblocks <= 0:
            raise ConfigError(f"nblocks={self.nblocks!r} must be a positive integer, e.g. 2")


@dataclass
class KasaConfig:
    """Settings of KaSA (knowledge-aware singular-value adaptation, Wang et al. 2024, arXiv 2412.06071): the
    coefficients of its two auxiliary losses, which ``LoraModel._get_kasa_loss`` returns for the caller to add to the
    task loss (lorakit.ops.kasa.regularization). PEFT's ``KasaConfig``. Adding a KaSA adapter truncates the base
    weight (its r smallest singular components removed): disabling or unloading the adapter does not undo that."""

    beta: float = described(
        "Coefficient of the L2 penalty sum(lora_diag ** 2) on the learned singular values (paper eq. 9-10).", 1e-4
    )
    gamma: float = described(
        "Coefficient of the orthogonality penalty ||B^T B - I||_F + ||A A^T - I||_F (paper eq. 11).", 1e-3
    )

    def __post_init__(self) -> None:  # PEFT's wording (its tests match it), then the fix
        for name in ("beta", "gamma"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ConfigError(f"`{name}` must be non-negative, got {value}. Pass e.g. {name}=0.0 to turn it off")


@dataclass
class MontecloraConfig:
    """Settings of MonteCLoRA (Monte Carlo LoRA, Sengupta et al. 2024, arXiv 2411.04358): in training, A is the
    mixture of ``num_samples`` noisy copies A + N_k (Gaussian noise whose per-rank variance is a Wishart-style draw
    around learned scales), mixed by Dirichlet-style weights; evaluation and merging use A itself. Its variational loss
    comes from ``LoraModel._get_monteclora_loss`` (lorakit.ops.monteclora). PEFT's ``MontecloraConfig``."""

    num_samples: int = described("Noisy copies of A mixed in each training forward.", 8)
    use_entropy: bool = described("Add the sum of the squared mixture weights to the variational loss.", False)
    dirichlet_prior: float = described("Concentration of the Dirichlet prior of the mixture weights (> 0).", 0.1)
    sample_scaler: float = described("Factor on the noise N_k (near 0: plain LoRA).", 1e-4)
    kl_loss_weight: float = described("Weight of the KL terms in the variational loss.", 1e-5)
    buffer_size: int = described("Training forwards whose random draws are made at once, ahead of time.", 150)

    def __post_init__(self) -> None:  # PEFT's wording (its tests match it), then the fix
        if isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int) or self.num_samples <= 0:
            raise ConfigError(f"`num_samples` must be greater than 0, got {self.num_samples}. Pass e.g. num_samples=8")
        if not isinstance(self.dirichlet_prior, (int, float)) or not self.dirichlet_prior > 0:
            raise ConfigError(
                f"`dirichlet_prior` must be greater than 0, got {self.dirichlet_prior}. Pass e.g. dirichlet_prior=0.1"
            )
        if isinstance(self.buffer_size, bool) or not isinstance(self.buffer_size, int) or self.buffer_size <= 0:
            raise ConfigError(f"buffer_size={self.buffer_size!r} must be a positive integer, e.g. 150")


_CORDA_METHODS = ("ipm", "kpm")  # lorakit.ops.corda.METHODS


@dataclass
class CordaConfig:
    """Settings of CorDA (context-oriented decomposition, Yang et al. 2024, arXiv 2406.05223), used with
    init_lora_weights='corda': lorakit.preprocess_corda collects each target's input covariance C from sample data
    and the adapter starts from the SVD of W @ C (lorakit.ops.corda); the base keeps the residual. PEFT's
    ``CordaConfig``."""

    cache_file: str | None = described(
        "File of the decompositions (U, S, V per target, after the rank cut): written by preprocess_corda when it is "
        "missing, read instead of collecting when it exists; much smaller than the residual model, which it rebuilds "
        "from the original weights."
    )
    covariance_file: str | None = described(
        "File of the input covariances (one (in, in) matrix per target): written when missing, read instead of "
        "running the model when it exists, so that adapters of other ranks can be made from the same data. About the "
        "size of the model."
    )
    corda_method: str = described(
        "'ipm' (instruction-previewed): the adapter takes the r largest components, for the fastest fine-tuning; "
        "'kpm' (knowledge-preserved): the r smallest, run on the knowledge to keep, to limit forgetting it.",
        "ipm",
    )
    verbose: bool = described("Print the progress of the decompositions.", False)
    use_float16_for_covariance: bool = described(
        "Accumulate the covariances in the inputs' own dtype (half the memory for a half-precision model, less "
        "accurate) instead of fp32.",
        False,
    )
    prune_temporary_fields: bool = described(
        "Delete the covariance_matrix and sample_count preprocess_corda leaves on each target module.", True
    )

    def __post_init__(self) -> None:
        for name in ("cache_file", "covariance_file"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                setattr(self, name, os.fspath(value))  # a path as JSON saves it
            elif value is not None and not isinstance(value, str):
                raise ConfigError(f"{name}={value!r} must be a file path or None, e.g. {name}='corda/{name}.pt'")
        if self.corda_method not in _CORDA_METHODS:
            raise ConfigError(f"corda_method={self.corda_method!r} is unknown; use 'ipm' or 'kpm'")


@dataclass
class EvaConfig:
    """Settings of EVA (explained variance adaptation, Paischer et al. 2024, arXiv 2410.07170), used with
    init_lora_weights='eva': lorakit.initialize_lora_eva_weights sets each A to the top right-singular vectors of its
    layer's inputs (an incremental SVD over batches) and moves rank between layers by explained variance
    (lorakit.ops.eva). PEFT's ``EvaConfig``."""

    rho: float = described(
        "Rank redistribution (>= 1): a layer may get up to round(r * rho) components; 1 keeps r everywhere.", 2.0
    )
    tau: float = described(
        "Convergence threshold in [0, 1]: a layer stops when the cosine similarity of its components between two "
        "consecutive batches reaches tau.",
        0.99,
    )
    use_label_mask: bool = described("Leave out the token positions whose label is label_mask_value.", True)
    label_mask_value: int = described("The label of ignored positions (with use_label_mask).", -100)
    whiten: bool = described("Divide each component by the square root of its singular value.", False)
    adjust_scaling_factors: bool = described(
        "Scale lora_alpha with a layer's new rank (alpha * new_r / r), so that its scaling stays alpha / r.", True
    )

    def __post_init__(self) -> None:  # PEFT's wording (its tests match it), then the fix
        if isinstance(self.rho, bool) or not isinstance(self.rho, (int, float)) or not self.rho >= 1.0:
            raise ConfigError(f"`rho` must be >= 1.0, got {self.rho!r}; pass e.g. rho=2.0 (1.0: no redistribution)")
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not 0.0 <= self.tau <= 1.0:
            raise ConfigError(f"`tau` must be between 0.0 and 1.0. Got {self.tau!r}; pass e.g. tau=0.99")


_LORA_GA_DIRECTIONS = ("ArBr", "A2rBr", "ArB2r", "random")  # lorakit.ops.lora_ga
_LORA_GA_SCALES = ("stable", "weight_svd", "gd_scale", "unit")


@dataclass
class LoraGAConfig:
    """Settings of LoRA-GA (low-rank gradient approximation, Wang et al. 2024, arXiv 2407.05000), used with
    init_lora_weights='lora_ga' after lorakit.preprocess_loraga: the adapter starts from the top 2r singular vectors
    of each target's full fine-tuning gradient (lorakit.ops.lora_ga), so its first steps follow that gradient; the base
    keeps W - s * B @ A, so the model starts unchanged. PEFT's ``LoraGAConfig``."""

    direction: str = described(
        "Which of the gradient's top 2r singular vectors A and B take: 'ArB2r' (A the first r, B the next r), "
        "'A2rBr' (the reverse), 'ArBr' (alternating), or 'random' (r of the 2r at random, the same for both).",
        "ArB2r",
    )
    scale: str = described(
        "How B is scaled: 'stable' (by out_features^(1/4) / sqrt(stable_gamma)), 'weight_svd' (its first singular "
        "value to the weight's), 'gd_scale' (A and B divided by the adapter's scaling), or 'unit' (as is).",
        "stable",
    )
    stable_gamma: int = described("The gamma of scale='stable'.", 16)

    def __post_init__(self) -> None:
        if self.direction not in _LORA_GA_DIRECTIONS:
            raise ConfigError(f"direction={self.direction!r} is unknown; use one of {', '.join(_LORA_GA_DIRECTIONS)}")
        if self.scale not in _LORA_GA_SCALES:
            raise ConfigError(f"scale={self.scale!r} is unknown; use one of {', '.join(_LORA_GA_SCALES)}")
        if isinstance(self.stable_gamma, bool) or not isinstance(self.stable_gamma, (int, float)) or (
            not self.stable_gamma > 0
        ):
            raise ConfigError(f"stable_gamma={self.stable_gamma!r} must be a positive number, e.g. 16")


@dataclass
class ArrowConfig:
    """Settings of Arrow routing (Ostapenko et al. 2024, arXiv 2405.11157) and GenKnowSub (Belofsky et al., ACL
    2025): lorakit.create_arrow_model loads task LoRA adapters as experts; per layer and token the ``top_k`` experts
    whose prototype (the top right-singular vector of B @ A) is most aligned with the token are mixed, softmax-weighted
    (lorakit.ops.arrow). GenKnowSub first subtracts the mean of general adapters from every expert. PEFT's
    ``ArrowConfig``."""

    top_k: int = described("Experts mixed per token.", 3)
    router_temperature: float = described("Temperature of the softmax over the chosen experts' scores (> 0).", 1.0)
    use_gks: bool = described("GenKnowSub: subtract the mean of the general adapters from each task adapter.", False)
    task_adapter_names: list[str] | None = dataclasses.field(
        default=None, init=False, metadata={"help": "The experts' adapter names (set by create_arrow_model)."}
    )
    gks_adapter_names: list[str] | None = dataclasses.field(
        default=None, init=False, metadata={"help": "The general adapters' names (set by create_arrow_model)."}
    )
    rng_seed: int | None = described(
        "Seed of the power iteration's start vector (the prototypes); None draws from torch's global generator."
    )

    def __post_init__(self) -> None:  # PEFT's wording first (its tests match it), then the fix
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k <= 0:
            raise ConfigError(f"top_k cannot be negative. top_k={self.top_k!r} must be a positive integer, e.g. 3")
        if isinstance(self.router_temperature, bool) or not isinstance(self.router_temperature, (int, float)) or (
            not self.router_temperature > 0
        ):
            raise ConfigError(f"router_temperature must be greater than 0, got {self.router_temperature!r}; e.g. 1.0")


# written to adapter_config.json as dicts
# The LoraConfig field holding each (LoraConfig.__post_init__ turns a dict into its class)
SUB_CONFIG_FIELDS: dict[str, type] = {
    "velora_config": VeloraConfig,
    "use_bdlora": BdLoraConfig,
    "kasa_config": KasaConfig,
    "monteclora_config": MontecloraConfig,
    "corda_config": CordaConfig,
    "eva_config": EvaConfig,
    "lora_ga_config": LoraGAConfig,
    "arrow_config": ArrowConfig,
}
SUB_CONFIGS = tuple(SUB_CONFIG_FIELDS.values())


def as_sub_config(name: str, value: Any, cls: type) -> Any:
    """None, a ``cls``, or its dict (as adapter_config.json holds it) -> None or a ``cls``; keys ``cls`` lacks are
    dropped, as PEFT does (PEFT also drops the fields that are no __init__ argument; lorakit sets them back)."""
    if value is None or isinstance(value, cls):
        return value
    if isinstance(value, dict):
        fields = dataclasses.fields(cls)
        made = cls(**{f.name: value[f.name] for f in fields if f.init and f.name in value})
        for f in fields:  # the fields set after creation (ArrowConfig's adapter names), kept as written
            if not f.init and f.name in value:
                setattr(made, f.name, value[f.name])
        return made
    raise TypeError(  # PEFT's wording first (its tests match it)
        f"`{cls.__name__}` must be a `{cls.__name__}`, a dict, or None. Got {type(value).__name__}: {name} must be "
        f"a `{cls.__name__}`, a dict, or None, e.g. {name}={cls.__name__}()"
    )
