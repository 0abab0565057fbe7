"""LoraModel: a transformers model with LoRA wrappers injected, and the verbs that manage its adapters.

It holds the wrapped model as ``self.model`` (so parameter names read ``base_model.model.<path>`` under a PeftModel,
exactly as in HF PEFT) and one LoraConfig per adapter in ``peft_config``. Every state change is an explicit call:
add / set / delete / disable / merge / unmerge / unload.

One change to the base model itself, said here and logged when it happens: with ``fast_mlp=True`` (the default of
get_peft_model) the model's gated MLPs (Llama-family ``down(silu(gate(x)) * up(x))``) compute their activation with
lorakit.fast.swiglu, the same values with less memory kept for backward; ``fast_mlps`` counts them, and
``merge_and_unload()`` / ``unload()`` give the model back with its own MLP forwards.

Another, asked for by the config: a first adapter with ``layer_replication`` rebuilds the model's layer list from
copies of its layers that share their weights (lorakit.adapters.replicate), once; later adapters must name the same
replication. ``unload()`` leaves the replicated layers in place (as PEFT); ``merge_and_unload()`` keeps them too, each
with weights of its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from lorakit.adapters import combine, replicate
from lorakit.adapters.find import targeted_parameters
from lorakit.adapters.inject import inject, unmanaged, unwrap, wrappers
from lorakit.adapters.layer import LoraLayer
from lorakit.adapters.modules_to_save import ModulesToSaveWrapper
from lorakit.adapters.parameter import LoraParameter
from lorakit.adapters.trainable_tokens import TrainableTokensWrapper
from lorakit.config import ConfigError, LoraConfig
from lorakit.fast import swiglu
from lorakit.io.files import AdapterError, check_adapter_name

logger = logging.getLogger(__name__)


CUSTOM_MODEL_CONFIG = {"model_type": "custom"}  # get_model_config of a model without a config (PEFT's)


class LoraModel(nn.Module):
    """The base model with LoRA wrappers; one entry in ``peft_config`` per adapter."""

    prefix = "lora_"  # what every adapter parameter's name contains (PEFT's attribute of the name)
    uses_shared_state = False  # PEFT's attribute: no tensor shared by layers (as VeRA's): direct injection works

    def __init__(self, model: nn.Module, config: LoraConfig, adapter_name: str = "default",
                 fast_mlp: bool = True, autocast_adapter_dtype: bool = True) -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, LoraConfig] = {}
        self.active_adapters: list[str] = []
        self.layer_replication: list[list[int]] | None = None  # set once the first adapter replicated the layers
        for param in model.parameters():  # the base model is frozen once, here: a weight the user unfreezes later
            param.requires_grad_(False)  # keeps its requires_grad through add / set / load of adapters (as PEFT)
        self.add_adapter(adapter_name, config, autocast_adapter_dtype=autocast_adapter_dtype)
        self.fast_mlps = swiglu.patch_mlps(model) if fast_mlp else 0
        if self.fast_mlps:
            logger.info("lorakit: %d gated MLPs of %s compute silu(g) * u with lorakit.fast.swiglu (same values, "
                        "less memory for backward) until merge_and_unload() / unload()", self.fast_mlps,
                        type(model).__name__)

    def __getattr__(self, name: str) -> object:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def forward(self, *args: object, **kwargs: object) -> object:
        """The wrapped model's forward (``peft_model.base_model(**batch)`` works as in PEFT)."""
        return self.model(*args, **kwargs)

    @property
    def active_adapter(self) -> str:
        return self.active_adapters[0] if len(self.active_adapters) == 1 else self.active_adapters  # type: ignore

    @staticmethod
    def get_model_config(model: nn.Module) -> dict[str, Any]:
        """``model.config`` as a dict, as PEFT's ``BaseTuner.get_model_config``: its ``to_dict()`` (a transformers
        config), a dataclass's fields, a dict as it is, and ``{"model_type": "custom"}`` for a model without one."""
        config = getattr(model, "config", None)
        if config is None:
            return dict(CUSTOM_MODEL_CONFIG)
        if hasattr(config, "to_dict"):
            return config.to_dict()
        if dataclasses.is_dataclass(config) and not isinstance(config, type):
            return dataclasses.asdict(config)
        return config

    @property
    def targeted_module_names(self) -> list[str]:
        """The names of the modules LoRA wraps (target_modules), each once, as PEFT lists them: those of the first
        adapter in model order, then those the next adapter adds, and so on; a layer a wrapper holds inside
        (MultiheadAttention's out_proj) and parameter targets (targeted_parameter_names) aside."""
        layers = [(name, m) for name, m in self._lora_layers() if not isinstance(m, LoraParameter)]
        names: dict[str, None] = {}
        for adapter in [*self.peft_config, None]:  # None: layers of no listed adapter, last
            names.update((n, None) for n, m in layers if adapter is None or adapter in m.r)
        return list(names)

    @property
    def targeted_parameter_names(self) -> list[str]:
        """'<module>.<parameter>' of each parameter adapted through target_parameters (PEFT's attribute)."""
        return targeted_parameters(self.model)

    # -- adapters ------------------------------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, config: LoraConfig, autocast_adapter_dtype: bool = True) -> None:
        """Inject adapter ``adapter_name`` (inactive unless it is the first; activate with set_adapter). Its weights
        are float32 (``autocast_adapter_dtype``, PEFT's default: a 16-bit base still trains its adapter in float32),
        or, with ``autocast_adapter_dtype=False``, in the dtype of the layer they adapt."""
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise AdapterError(
                f"Adapter with name {adapter_name!r} already exists; pick another name or delete_adapter it"
            )
        with_bias = [name for name, c in self.peft_config.items() if c.bias != "none"]
        if config.bias != "none" and with_bias:  # two adapters would both own (and save) the same base biases
            raise AdapterError(
                f"LoraModel supports only 1 adapter with bias. When using multiple adapters, set bias to 'none' for "
                f"all adapters but one (adapter {with_bias[0]!r} has bias={self.peft_config[with_bias[0]].bias!r}; "
                f"add {adapter_name!r} with bias='none')"
            )
        _check_kasa_mix(self.peft_config, config)
        config, given = dataclasses.replace(config), config
        config._register_custom_module(given._custom_modules)  # the caller's custom kinds (not a field: not copied)
        undo = self._replicate_layers(adapter_name, config)
        self.peft_config[adapter_name] = config
        try:
            inject(self.model, config, adapter_name)
        except Exception:
            del self.peft_config[adapter_name]
            if undo is not None:  # the model gets its own layers back
                undo()
                self.layer_replication = None
            raise
        if not autocast_adapter_dtype:
            self._to_base_dtype(adapter_name)
        if not self.active_adapters:  # the first adapter: active, and it trains unless inference_mode
            self.set_adapter([adapter_name])
            return
        # a further adapter: inactive and frozen; what trains already (adapters, base weights) stays as it is (PEFT)
        self._activate(self.active_adapters)
        for param in self._adapter_parameters([adapter_name]):
            param.requires_grad_(False)

    def _replicate_layers(self, adapter_name: str, config: LoraConfig) -> Callable[[], None] | None:
        """Apply ``config.layer_replication`` (lorakit.adapters.replicate) if it is the model's first adapter; returns
        the undo, None if nothing changed. A later adapter must ask for the replication the model has: its layers are
        the replicated ones, and a file saved without the same layer_replication would not fit the base model."""
        wanted, done = config.layer_replication or None, self.layer_replication
        if wanted == done:
            return None
        if done is not None:
            first = next(iter(self.peft_config), "an earlier adapter")
            raise ConfigError(
                f"adapter {adapter_name!r} has layer_replication={wanted!r}, but this model's layers were replicated "
                f"by adapter {first!r} with layer_replication={done!r}, and they are replicated once: give "
                f"{adapter_name!r} layer_replication={done!r}, or add it to a fresh base model"
            )
        held = list(self.peft_config) or [name for name, _ in wrappers(self.model)][:3]  # or an earlier PeftModel's
        if held:
            raise ConfigError(
                f"adapter {adapter_name!r} has layer_replication={wanted!r}, but the model already holds adapters "
                f"({', '.join(map(repr, held))}) on its original layers; layers are replicated when the first adapter "
                "is added: give that adapter the layer_replication, or add this one to a fresh base model"
            )
        undo = replicate.replicate_layers(self.model, wanted)
        self.layer_replication = [list(pair) for pair in wanted]
        logger.info("lorakit: layers of %s replicated as %s (layer_replication; copies share their base weights)",
                    type(self.model).__name__, wanted)
        return undo

    def _to_base_dtype(self, adapter_name: str) -> None:
        """Cast adapter ``adapter_name``'s parameters to the floating dtype of each wrapped layer's weight (a
        quantized layer's: float32, the dtype it computes in)."""
        for _, module in wrappers(self.model):
            if isinstance(module, LoraLayer) and adapter_name in module.r:
                dtype = torch.float32 if module.quantized else module.base_weight().dtype
                if dtype.is_floating_point:
                    for p in module.adapter_parameters(adapter_name):
                        p.data = p.data.to(dtype)
                    module._refresh()

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Activate ``adapter_name`` (or several, whose updates add up); of the adapters, only active ones train
        (the ones not loaded for inference)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        self._activate(names)
        self._set_trainable()

    def _activate(self, names: list[str]) -> None:
        """Make ``names`` the active adapters of the model and of every wrapper; trainability is left as it is."""
        for name in names:
            self._check_exists(name)
        for _, module in wrappers(self.model):  # before anything changes
            if isinstance(module, ModulesToSaveWrapper):
                module.check_names(names)
        self.active_adapters = names
        for _, module in wrappers(self.model):
            if isinstance(module, LoraLayer):
                module.active_adapters = names  # names it lacks are kept and ignored, as in PEFT (layer.set_adapter)
            else:
                module.set_adapter(names)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove adapter ``adapter_name`` everywhere; if it was active, the first remaining adapter becomes active.
        A merged adapter is refused before anything changes."""
        self._check_exists(adapter_name)
        if any(adapter_name in m.merged_adapters for _, m in self._lora_layers()):
            raise AdapterError(
                f"Cannot delete adapter(s) [{adapter_name!r}] while they are merged. Please unmerge them first. "
                "model.unmerge_adapter() unmerges them"
            )
        if self.peft_config[adapter_name].bias != "none":  # the base biases it trained are frozen again
            owned = self._owned_parameters()
            for name, param in self.model.named_parameters():
                if name.endswith("bias") and id(param) not in owned:
                    param.requires_grad_(False)
        for _, module in wrappers(self.model):
            if isinstance(module, LoraLayer) and adapter_name not in module.r:
                continue
            module.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]
        remaining = [a for a in self.active_adapters if a != adapter_name] or list(self.peft_config)[:1]
        if remaining:
            self.set_adapter(remaining)
        else:
            self.active_adapters = []

    def _check_exists(self, name: str) -> None:
        if name not in self.peft_config:
            raise AdapterError(f"Adapter {name} does not exist; existing adapters: {list(self.peft_config)}")

    def _set_trainable(self) -> None:
        """Of the adapters' parameters, exactly the active adapters' train; the base model's biases follow the
        active configs' ``bias`` mode where an adapter has one. Other base parameters keep their requires_grad
        (frozen by the constructor; one the user unfroze stays trainable, as in PEFT)."""
        configs = [self.peft_config[a] for a in self.active_adapters]
        trainable = [a for a, c in zip(self.active_adapters, configs) if not c.inference_mode]
        owned = self._owned_parameters()
        for param in owned.values():
            param.requires_grad_(False)
        for _, module in wrappers(self.model):
            if isinstance(module, ModulesToSaveWrapper):
                for name, copy in module.modules_to_save.items():
                    copy.requires_grad_(name in trainable and name == module.active_adapter)
                continue
            if isinstance(module, TrainableTokensWrapper):  # its active adapter's rows (a tied one shares them)
                for name in module.adapter_names:
                    for p in module.adapter_parameters(name):
                        p.requires_grad_(name in trainable and name == module.active_adapter)
                continue
            for name in trainable:
                if name in module.r:
                    for p in module.trainable_parameters(name):  # MiCA's B stays frozen
                        p.requires_grad_(True)
        if all(c.bias == "none" for c in self.peft_config.values()):
            return  # no adapter trains base biases: they are the user's
        modes = {c.bias for a, c in zip(self.active_adapters, configs) if a in trainable}
        for name, param in self.model.named_parameters():
            if not name.endswith("bias") or id(param) in owned:
                continue
            param.requires_grad_("all" in modes or ("lora_only" in modes and name.endswith("base_layer.bias")))

    def _owned_parameters(self) -> dict[int, nn.Parameter]:
        """{id: parameter} of every parameter the adapters own (not the base model's): each adapter's own
        (_adapter_parameters) and anything else a LoRA layer holds beside its ``base_layer``."""
        owned = {id(p): p for p in self._adapter_parameters(list(self.peft_config))}
        for _, module in wrappers(self.model):
            if isinstance(module, LoraLayer):
                owned.update({id(p): p for n, p in module.named_parameters() if not n.startswith("base_layer.")})
        return owned

    def disable_adapter_layers(self) -> None:
        """Adapters off until ``enable_adapter_layers()``: the model computes as the base model, merged adapters are
        unmerged first (they stay unmerged), and adapter parameters stop training (as in PEFT)."""
        for _, module in wrappers(self.model):
            if _mergeable(module):
                module.unmerge()
            module.disable_adapters = True
        for param in self._adapter_parameters(list(self.peft_config)):
            param.requires_grad_(False)

    def enable_adapter_layers(self) -> None:
        """Undo ``disable_adapter_layers()``: the active adapters compute and train again."""
        for _, module in wrappers(self.model):
            module.disable_adapters = False
        self._set_trainable()

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Make the parameters of ``adapter_names`` (active or not) trainable or frozen, as PEFT's method of the name;
        the next set_adapter / add_adapter resets trainability to the active adapters."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            self._check_exists(name)
        for param in self._adapter_parameters(names):
            param.requires_grad_(requires_grad)
        for _, module in self._lora_layers():  # what a variant freezes stays frozen (MiCA's B), as in PEFT
            for name in names:
                if name in module.r:
                    for param in module.variants[name].frozen(module, name):
                        param.requires_grad_(False)

    def _adapter_parameters(self, names: list[str]) -> Iterator[nn.Parameter]:
        """The parameters of adapters ``names`` in every wrapper: A, B, DoRA magnitudes, modules_to_save copies."""
        for _, module in wrappers(self.model):
            for name in names:
                if isinstance(module, ModulesToSaveWrapper):
                    if name in module.modules_to_save:
                        yield from module.modules_to_save[name].parameters()
                elif isinstance(module, TrainableTokensWrapper):
                    yield from module.adapter_parameters(name)
                elif name in module.r:
                    yield from module.adapter_parameters(name)

    @property
    def has_active_enabled_adapter(self) -> bool:
        """True if some layer computes an adapter now: one of its active adapters exists there and it is enabled."""
        return any(
            not m.disable_adapters and any(a in m.r for a in m.active_adapters) for _, m in self._lora_layers()
        )

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the model is the base model: adapters off (merged ones unmerged, then merged back) and,
        as in PEFT, their parameters frozen (each gets its own requires_grad back after the block). Each wrapper
        leaves the block as it entered it: one disabled before stays disabled; blocks nest."""
        merged = {name: list(m.merged_adapters) for name, m in wrappers(self.model) if _mergeable(m)}
        modules = dict(wrappers(self.model))
        disabled = {name: m.disable_adapters for name, m in modules.items()}
        trainable = {p: p.requires_grad for p in self._adapter_parameters(list(self.peft_config))}
        for module in modules.values():
            if _mergeable(module):
                module.unmerge()
            module.disable_adapters = True
        for param in trainable:
            param.requires_grad_(False)
        try:
            yield
        finally:
            for name, module in modules.items():
                module.disable_adapters = disabled[name]
                if merged.get(name):
                    module.merge(merged[name])
            for param, was in trainable.items():
                param.requires_grad_(was)

    # -- merging -------------------------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Add the active (or named) adapters into the base weights (trainable token rows: written into their
        embedding); the forward then costs what the base costs. Refused on replicated layers (layer_replication),
        as PEFT refuses it: the copies share one base weight, which cannot hold the updates of all of them."""
        if self.layer_replication is not None:
            raise ConfigError(  # PEFT's words first
                "Cannot merge LORA layers when base model layers are replicated (layer_replication="
                f"{self.layer_replication}): the copies share one base weight. Use the adapters unmerged, or "
                "merge_and_unload(), which gives each copy its own merged weights"
            )
        for _, module in self._lora_layers():
            module.merge(adapter_names, safe_merge=safe_merge)
        for _, module in self._token_wrappers():
            module.merge(adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        """Undo merge_adapter: subtract every merged update from the base weights (put original token rows back)."""
        for _, module in self._lora_layers():
            module.unmerge()
        for _, module in self._token_wrappers():
            module.unmerge()

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """Merge the active (or named) adapters and return the plain transformers model, wrappers removed. Layers on
        a quantized base come back as full-precision nn.Linear / Conv1D / nn.Embedding (see inject.unwrap).

        With layer_replication the replicated layers stay (the model keeps its new depth), and each copy first gets
        tensors of its own (replicate.unshare), so each takes its own update: the result is an ordinary model of
        that depth, as large as one, which saves and loads as such. PEFT refuses this merge."""
        if self.layer_replication is not None:
            copied = replicate.unshare(self.model)
            logger.info("lorakit: merge_and_unload gave the replicated layers their own tensors (%d copied)", copied)
        model = unwrap(self.model, merge=True, adapter_names=adapter_names, safe_merge=safe_merge)
        swiglu.unpatch_mlps(model)
        return model

    def unload(self) -> nn.Module:
        """Return the plain base model with every wrapper removed and nothing merged (merged adapters are undone).
        Replicated layers (layer_replication) stay in place, sharing their weights, as PEFT leaves them."""
        self.unmerge_adapter()
        model = unwrap(self.model, merge=False)
        swiglu.unpatch_mlps(model)
        return model

    def _token_wrappers(self) -> Iterator[tuple[str, TrainableTokensWrapper]]:
        """The trainable-token wrappers (trainable_token_indices)."""
        for name, module in wrappers(self.model):
            if isinstance(module, TrainableTokensWrapper):
                yield name, module

    def _lora_layers(self) -> Iterator[tuple[str, LoraLayer]]:
        """The LoRA layers, but for those a layer around them manages (``manages_inner``: MultiheadAttention's
        out_proj; a LoraParameter around another parameter's wrapper manages only its own parameter)."""
        for name, module in unmanaged(wrappers(self.model)):
            if isinstance(module, LoraLayer):
                yield name, module

    # -- auxiliary losses of variants (PEFT's method names): the caller adds them to the task loss ------------------
    def _get_kasa_loss(self, adapter_names: str | list[str] | None = None) -> torch.Tensor | float:
        """KaSA's regularization summed over its layers, for ``adapter_names`` (default: the active adapters):
        beta * sum(d ** 2) + gamma * (||B.T B - I||_F + ||A A.T - I||_F) with each adapter's KasaConfig
        (lorakit.ops.kasa.regularization); 0.0 if no such layer. ``loss = task_loss + model._get_kasa_loss()``."""
        names = self._names_or_active(adapter_names)
        total: torch.Tensor | float = 0.0
        for _, module in self._lora_layers():
            for name in names:
                if name in module.r and module.variants[name].name == "kasa":
                    options = self.peft_config[name].kasa_config
                    total = total + module.variants[name].regularization(module, name, options.beta, options.gamma)
        return total

    def _get_monteclora_loss(self, adapter_names: str | list[str] | None = None) -> torch.Tensor | float:
        """MonteCLoRA's variational loss for ``adapter_names`` (default: the active adapters): the mean over its
        layers of kl_loss_weight * KL + entropy (lorakit.ops.monteclora), as PEFT; 0.0 if no such layer, and each
        layer's term is 0 outside training mode. ``loss = task_loss + model._get_monteclora_loss()``."""
        names = self._names_or_active(adapter_names)
        total: torch.Tensor | float = 0.0
        layers = 0
        for _, module in self._lora_layers():
            for name in names:
                if name in module.r and module.variants[name].name == "monteclora":
                    kl, entropy = module.variants[name].variational_loss(module, name)
                    total, layers = total + kl + entropy, layers + 1
        return total / layers if layers else 0.0

    def _names_or_active(self, adapter_names: str | list[str] | None) -> list[str]:
        if adapter_names is None:
            return list(self.active_adapters)
        return [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)

    # -- combining -----------------------------------------------------------------------------------------------
    # add_weighted_adapter(adapters, weights, adapter_name, combination_type="svd", ...): a new adapter made of
    # weighted existing ones; the method is defined in lorakit.adapters.combine, beside the maths it runs
    add_weighted_adapter = combine.add_weighted_adapter


def _check_kasa_mix(configs: dict[str, LoraConfig], config: LoraConfig) -> None:
    """ConfigError, in PEFT's words (its tests match them), if a KaSA adapter would sit beside one without KaSA:
    KaSA truncates the base weight every other adapter of the model computes with."""
    new = config.kasa_config is not None
    for name, other in configs.items():
        if (other.kasa_config is not None) is not new:
            raise ConfigError(
                "KaSA cannot be combined with adapters that don't use KaSA, since KaSA modifies the base weights: the "
                f"new adapter {'uses' if new else 'does not use'} KaSA but adapter '{name}' "
                f"{'does not' if new else 'does'}. Give both a kasa_config, or use a model without KaSA adapters"
            )


def _mergeable(module: nn.Module) -> bool:
    """A wrapper that merge_adapter writes into its base layer: LoRA layers and trainable token rows."""
    return isinstance(module, (LoraLayer, TrainableTokensWrapper))
