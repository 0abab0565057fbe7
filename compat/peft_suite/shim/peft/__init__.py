"""A package named ``peft`` that is lorakit: PEFT's tests import it unchanged when this folder is first on PYTHONPATH.

Top-level names are lorakit's own (``from peft import LoraConfig`` gives ``lorakit.LoraConfig``). A ``peft.*``
submodule is made on import; its names are looked up in EQUIVALENTS (PEFT internals lorakit has an obvious counterpart
of) and PROBES (PEFT's environment checks, answered here). Any other name is a placeholder class: importing it works,
so a test module loads; calling it is recorded in USED and gives a placeholder value; using either (reading an
attribute, indexing, calling the value) raises UnsupportedImport and is recorded too. The suite's pytest plugin reads
USED per test. Placeholders for top-level names are PEFT public
names lorakit lacks ("public"); for submodule names, PEFT internals with no lorakit equivalent ("private").
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import types
from typing import Any

import lorakit

__version__ = os.environ.get("PEFT_SUITE_VERSION", "0.21.2")  # the PEFT version whose tests are run

# peft module -> {name: "lorakit.module:attribute"}; resolved on first use, so a moved lorakit name becomes a
# placeholder instead of breaking the import of every test module.
EQUIVALENTS: dict[str, dict[str, str]] = {
    "peft.tuners.lora": {
        "LoraConfig": "lorakit:LoraConfig",
        "LoftQConfig": "lorakit:LoftQConfig",
        "VeloraConfig": "lorakit:VeloraConfig",
        "BdLoraConfig": "lorakit:BdLoraConfig",
        "KasaConfig": "lorakit:KasaConfig",
        "MontecloraConfig": "lorakit:MontecloraConfig",
        "CordaConfig": "lorakit:CordaConfig",
        "EvaConfig": "lorakit:EvaConfig",
        "LoraGAConfig": "lorakit:LoraGAConfig",
        "preprocess_loraga": "lorakit:preprocess_loraga",
        "ArrowConfig": "lorakit:ArrowConfig",
        "create_arrow_model": "lorakit:create_arrow_model",
        "LoraModel": "lorakit:LoraModel",
        "LoraLayer": "lorakit:LoraLayer",
        "Linear": "lorakit:LoraLinear",
        "Embedding": "lorakit:LoraEmbedding",
        "ParamWrapper": "lorakit.adapters.parameter:LoraParameter",
        **dict.fromkeys(("Conv1d", "Conv2d", "Conv3d", "_ConvNd"), "lorakit.adapters.conv:LoraConv"),
    },
    "peft.tuners.tuners_utils": {
        "BaseTunerLayer": "lorakit:LoraLayer",
        "BaseTuner": "lorakit:LoraModel",
        "check_target_module_exists": "lorakit.adapters.targets:check_target_module_exists",
        "_ExcludedModule": "lorakit.adapters.targets:Excluded",
        "_find_minimal_target_modules": "lorakit.adapters.targets:minimal_suffixes",
        "_get_tuner_state_dict_key_prefixes": "lorakit.adapters.state:tuner_key_prefixes",
        "_filter_state_dict_by_key_prefixes": "lorakit.adapters.state:keys_under",
    },
    "peft.utils": {
        "get_peft_model_state_dict": "lorakit:get_peft_model_state_dict",
        "set_peft_model_state_dict": "lorakit:set_peft_model_state_dict",
        "PeftType": "lorakit:PeftType",
        "TaskType": "lorakit:TaskType",
        "ModulesToSaveWrapper": "lorakit.adapters.modules_to_save:ModulesToSaveWrapper",
        "TrainableTokensWrapper": "lorakit.adapters.trainable_tokens:TrainableTokensWrapper",
        "prepare_model_for_kbit_training": "lorakit:prepare_model_for_kbit_training",
        "_get_submodules": "lorakit.adapters.inject:parent_and_module",
    },
    "peft.mapping": {
        "get_peft_config": "lorakit:get_peft_config",
        "inject_adapter_in_model": "lorakit:inject_adapter_in_model",
        "PEFT_TYPE_TO_TUNER_MAPPING": "lorakit:PEFT_TYPE_TO_TUNER_MAPPING",
        "PEFT_TYPE_TO_CONFIG_MAPPING": "lorakit:PEFT_TYPE_TO_CONFIG_MAPPING",
    },
    "peft.mapping_func": {"get_peft_model": "lorakit:get_peft_model"},
    "peft.peft_model": {
        name: f"lorakit:{name}"
        for name in (
            "PeftModel",
            "PeftModelForCausalLM",
            "PeftModelForFeatureExtraction",
            "PeftModelForSeq2SeqLM",
            "PeftModelForSequenceClassification",
            "PeftModelForTokenClassification",
        )
    },
    "peft.auto": {
        name: f"lorakit:{name}"
        for name in (
            "AutoPeftModel",
            "AutoPeftModelForCausalLM",
            "AutoPeftModelForSequenceClassification",
            "AutoPeftModelForTokenClassification",
        )
    },
}
# The same names under the submodules PEFT defines them in.
EQUIVALENTS["peft.tuners.lora.config"] = EQUIVALENTS["peft.tuners.lora"]
EQUIVALENTS["peft.tuners.lora.layer"] = EQUIVALENTS["peft.tuners.lora"]
EQUIVALENTS["peft.tuners.lora.model"] = EQUIVALENTS["peft.tuners.lora"]
EQUIVALENTS["peft.tuners"] = EQUIVALENTS["peft.tuners.lora"]
EQUIVALENTS["peft.utils.save_and_load"] = EQUIVALENTS["peft.utils"]
EQUIVALENTS["peft.utils.peft_types"] = EQUIVALENTS["peft.utils"]
EQUIVALENTS["peft.utils.other"] = EQUIVALENTS["peft.utils"]
# LoRA's trainable_token_indices layer (the TrainableTokens method itself is not LoRA: its tests are not selected)
EQUIVALENTS["peft.tuners.trainable_tokens"] = {
    "TrainableTokensLayer": "lorakit.adapters.trainable_tokens:TrainableTokensLayer"
}
EQUIVALENTS["peft.tuners.trainable_tokens.layer"] = EQUIVALENTS["peft.tuners.trainable_tokens"]
EQUIVALENTS["peft.utils.constants"] = {
    "DUMMY_MODEL_CONFIG": "lorakit.adapters.model:CUSTOM_MODEL_CONFIG",
    "MIN_TARGET_MODULES_FOR_OPTIMIZATION": "lorakit.adapters.targets:CONDENSE_FROM",
}
EQUIVALENTS["peft.utils.error"] = {name: f"lorakit:{name}" for name in ("PeftError", "NoMatchingPeftModuleError")}
EQUIVALENTS["peft.utils.hotswap"] = {
    name: f"lorakit:{name}"
    for name in ("hotswap_adapter", "hotswap_adapter_from_state_dict", "prepare_model_for_compiled_hotswap",
                 "check_hotswap_configs_compatible")
}
EQUIVALENTS["peft.helpers"] = {"MontecloraTrainerMixin": "lorakit.api.helpers:MontecloraTrainerMixin"}
EQUIVALENTS["peft.tuners.lora.corda"] = {"preprocess_corda": "lorakit:preprocess_corda"}
EQUIVALENTS["peft.tuners.lora.loraga"] = {"preprocess_loraga": "lorakit:preprocess_loraga"}
EQUIVALENTS["peft.tuners.lora.eva"] = {
    name: f"lorakit.adapters.eva:{name}"
    for name in ("get_eva_state_dict", "initialize_lora_eva_weights", "forward_fn_dict",
                 "prepare_model_inputs_fn_language_modeling", "prepare_layer_inputs_fn_language_modeling")
}
EQUIVALENTS["peft.tuners.lora.arrow"] = {
    "create_arrow_model": "lorakit:create_arrow_model",
    "_resolve_adapter_source": "lorakit.api.arrow:resolve_adapter_source",
}
EQUIVALENTS["peft.tuners.lora.monteclora"] = {
    "MontecloraSampler": "lorakit.adapters.variant_monteclora:MontecloraSampler"
}
EQUIVALENTS["peft.tuners.lora.variants"] = {
    "BlockDiagonalLinear": "lorakit.adapters.variant_bdlora:BlockDiagonalLinear",
    "ALoraLinearVariant": "lorakit.adapters.variant_alora:ALora",
    "KasaLinearVariant": "lorakit.adapters.variant_kasa:Kasa",
    **{
        f"Dora{kind}Variant": "lorakit.adapters.variants:Dora"  # one DoRA class for every module kind
        for kind in ("Linear", "Embedding", "Conv1d", "Conv2d", "Conv3d")
    },
    **{
        name: f"lorakit.adapters.variant_alora:{name}"
        for name in ("calculate_alora_offsets", "get_alora_offsets_for_forward", "get_alora_offsets_for_generate")
    },
}


# PEFT modules that are one lorakit module as a whole: the module itself is lorakit's, so that a test setting one of
# its attributes (monkeypatching peft.config.__version__, PEFT's format version) changes what lorakit reads.
MODULE_EQUIVALENTS = {"peft.config": "lorakit.config"}
for _module, _target in MODULE_EQUIVALENTS.items():
    sys.modules[_module] = importlib.import_module(_target)


def _available(package: str) -> Any:
    return lambda: importlib.util.find_spec(package) is not None


def _transformers_ge(version: str) -> Any:
    def check() -> bool:
        import transformers
        from packaging.version import Version

        return Version(transformers.__version__) >= Version(version)

    return check


def _infer_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# PEFT's questions about the environment (which optional packages exist, the transformers version, the device).
PROBES: dict[str, Any] = {
    "is_transformers_ge_v5": _transformers_ge("5.0.0"),
    "infer_device": _infer_device,
    **{
        f"is_{name}_available": _available(package)
        for name, package in (
            ("bnb", "bitsandbytes"),
            ("bnb_4bit", "bitsandbytes"),
            ("aqlm", "aqlm"),
            ("auto_awq", "awq"),
            ("eetq", "eetq"),
            ("gptqmodel", "gptqmodel"),
            ("hqq", "hqq"),
            ("optimum", "optimum"),
            ("torchao", "torchao"),
            ("inc", "neural_compressor"),
            ("xpu", "intel_extension_for_pytorch"),
            ("diffusers", "diffusers"),
        )
    },
}


def _public_names() -> set[str]:
    """PEFT's public names (its __all__, written by the suite when it collects under real PEFT): one imported from a
    submodule (``from peft.tuners.lora.config import EvaConfig``) is still a public name lorakit lacks."""
    path = os.environ.get("PEFT_SUITE_PUBLIC")
    return set(open(path).read().split()) if path and os.path.exists(path) else set()


PUBLIC = _public_names()

USED: list[str] = []  # "public:peft.X" / "private:peft.m.X" for each placeholder used, in order; the plugin clears it


class UnsupportedImport(Exception):
    """A test used a PEFT name lorakit has no equivalent of."""


def _refuse(name: str, action: str) -> UnsupportedImport:
    USED.append(name)
    kind, dotted = name.split(":", 1)
    what = "a PEFT public name lorakit lacks" if kind == "public" else "a PEFT internal lorakit lacks"
    return UnsupportedImport(f"{dotted} ({what}): {action}")


class _Refusing:
    """What a placeholder, class or value, does when used: raise UnsupportedImport naming the PEFT name."""

    _peft_suite_name: str

    def __getattr__(self, attribute: str) -> Any:
        if attribute.startswith("_"):  # pytest, inspect and functools probing the object
            raise AttributeError(attribute)
        raise _refuse(self._peft_suite_name, f"asked for .{attribute}")

    def __getitem__(self, key: Any) -> Any:
        raise _refuse(self._peft_suite_name, "indexed")

    def __iter__(self) -> Any:
        raise _refuse(self._peft_suite_name, "iterated")

    def __contains__(self, item: Any) -> bool:
        raise _refuse(self._peft_suite_name, "searched")

    def __len__(self) -> int:
        raise _refuse(self._peft_suite_name, "measured")


class _PlaceholderMeta(_Refusing, type):
    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        """A call is recorded and gives a placeholder value, so module-level ``KasaConfig(...)`` still imports."""
        USED.append(cls._peft_suite_name)
        return _PlaceholderValue(cls._peft_suite_name)


class _PlaceholderValue(_Refusing):
    def __init__(self, name: str) -> None:
        self._peft_suite_name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise _refuse(self._peft_suite_name, "its result was called")


def _placeholder(kind: str, module: str, name: str) -> type:
    """A class standing for ``module.name``: isinstance / issubclass answer False, its __name__ is the PEFT name. An
    ``...Error`` or ``...Warning`` is an exception class, so ``pytest.raises(NoMatchingPeftModuleError)`` still runs
    (and fails with whatever lorakit raised instead)."""
    base = (Warning,) if name.endswith("Warning") else (Exception,) if name.endswith(("Error", "Exception")) else ()
    return _PlaceholderMeta(name, base, {"_peft_suite_name": f"{kind}:{module}.{name}", "__module__": module})


# Modules PEFT's modules import, so that their globals hold them: asked for through a shim module, each is itself
# (torch.compile's generated code reads e.g. ``peft.torch.contiguous_format`` through the module a function is from).
IMPORTED = ("torch", "math", "os", "re", "copy", "warnings", "inspect", "json", "transformers", "safetensors")


def _resolve(module: str, name: str) -> Any:
    if name in PROBES:
        return PROBES[name]
    if name in IMPORTED and name in sys.modules:
        return sys.modules[name]
    target = EQUIVALENTS.get(module, {}).get(name)
    if target is not None:
        source, attribute = target.split(":")
        try:
            return getattr(importlib.import_module(source), attribute)
        except (ImportError, AttributeError):
            pass
    return _placeholder("public" if name in PUBLIC else "private", module, name)


class _ShimModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        submodule = f"{self.__name__}.{name}"
        if submodule in EQUIVALENTS and name not in EQUIVALENTS.get(self.__name__, {}):
            # a PEFT submodule the shim maps, asked for as an attribute first (``from peft.tuners import lora``)
            value = importlib.import_module(submodule)
        else:
            value = _resolve(self.__name__, name)
        setattr(self, name, value)
        return value


class _ShimFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes every ``peft.<anything>`` submodule on import, as a _ShimModule (a package, so deeper names work)."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith("peft."):
            return None
        parent, _, leaf = fullname.rpartition(".")
        if leaf in EQUIVALENTS.get(parent, {}):  # a class or function of its parent ("peft.tuners.lora.layer.Linear",
            return None  # as mock.patch's name resolution tries it), not a module
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _ShimModule(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        module.__path__ = []


sys.meta_path.insert(0, _ShimFinder())


# PEFT's own submodules, reached as attributes (``peft.tuners.lora``) without an import statement.
SUBMODULES = {
    "auto",
    "config",
    "functional",
    "helpers",
    "import_utils",
    "mapping",
    "mapping_func",
    "mixed_model",
    "optimizers",
    "peft_model",
    "tuners",
    "utils",
}


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    if name in SUBMODULES:
        return importlib.import_module(f"peft.{name}")
    value = getattr(lorakit, name, None)
    if value is None:
        value = PROBES.get(name) or (sys.modules.get(name) if name in IMPORTED else None)
        value = value or _placeholder("public", "peft", name)
    globals()[name] = value
    return value
