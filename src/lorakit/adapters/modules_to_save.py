"""Fully trained copies of whole modules (``modules_to_save``, e.g. a classification head), one per adapter."""

from __future__ import annotations

import copy

from torch import nn

from lorakit.adapters import mixed_batch


class ModulesToSaveWrapper(nn.Module):
    """Keeps ``original_module`` untouched and routes the forward through the active adapter's trainable copy."""

    adapter_layer_names = ("modules_to_save",)  # PEFT's attribute: the container of the adapters' weights
    other_param_names: tuple[str, ...] = ()  # PEFT's attribute: no per-adapter settings besides the copies

    def __init__(self, original_module: nn.Module) -> None:
        containers = (nn.ModuleDict, nn.ModuleList, nn.ParameterDict, nn.ParameterList)
        if isinstance(original_module, containers):  # no forward of their own: a trained copy would never run
            raise TypeError(
                f"modules_to_save cannot be applied to modules of type {type(original_module)}: it holds modules "
                "but has no forward; name the modules inside it in modules_to_save instead"
            )
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disable_adapters = False
        self.routing: mixed_batch.Routing | None = None  # set while a batch runs one adapter per row (adapter_names)
        self.train(original_module.training)

    def update(self, name: str) -> None:
        """Add a trainable copy for adapter ``name`` (a copy of the original, so it starts equal)."""
        module = copy.deepcopy(self.original_module)
        module.requires_grad_(True)
        self.modules_to_save[name] = module

    def check_names(self, names: list[str]) -> None:
        """ValueError if two of ``names`` have a copy here: copies replace the module, they do not add up."""
        mine = [n for n in names if n in self.modules_to_save]
        if len(mine) > 1:
            raise ValueError(  # PEFT's words first
                f"Only one adapter can be set at a time for ModulesToSaveWrapper: adapters {mine} each have a trained "
                "copy of this module; activate one of them, or give them modules_to_save on different modules"
            )

    def set_adapter(self, names: list[str]) -> None:
        """Make the one of ``names`` that has a copy the active one (None: the original); see check_names."""
        self.check_names(names)
        self.active_adapter = next((n for n in names if n in self.modules_to_save), None)

    @property
    def active_adapters(self) -> list[str]:
        return [] if self.active_adapter is None else [self.active_adapter]

    def delete_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = next(iter(self.modules_to_save), None)

    @property
    def _active_adapter(self) -> str | None:
        """PEFT's private name of ``active_adapter`` (code written for PEFT reads or sets it)."""
        return self.active_adapter

    @_active_adapter.setter
    def _active_adapter(self, name: str | None) -> None:
        self.active_adapter = name

    @property
    def current(self) -> nn.Module:
        if self.disable_adapters or self.active_adapter is None:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    @property
    def runs_as_current(self) -> nn.Module | None:
        """``current`` when a call of this wrapper is exactly a call of it (no per-row routing, no hooks on the
        wrapper), else None: what fast paths that compute the wrapped layer themselves may use (the fused loss)."""
        if self.routing is not None or self._forward_hooks or self._forward_pre_hooks:
            return None
        return self.current

    def __getattr__(self, name: str) -> object:
        """What code reads from the wrapped module (``weight``, ``bias``, ``in_features``, ...): the module that runs
        now (the active trained copy, else the original), as PEFT's wrapper answers."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save") or "original_module" not in self._modules:
                raise
            active = self.active_adapter
            if not self.disable_adapters and active is not None and active not in self.modules_to_save:
                raise AttributeError(  # a state set_adapter never makes (a direct assignment of active_adapter)
                    f"'{type(self).__name__}' object has no attribute '{name}': its active adapter {active!r} has no "
                    f"trained copy here (copies: {list(self.modules_to_save)}); call set_adapter with one of them"
                ) from None
            return getattr(self.current, name)

    def forward(self, *args: object, **kwargs: object) -> object:
        if self.routing is not None:  # a mixed-adapter batch: one adapter per row
            return mixed_batch.modules_to_save_forward(self, *args, **kwargs)
        return self.current(*args, **kwargs)
