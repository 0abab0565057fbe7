"""Which of PEFT's collected tests are LoRA tests of the public API, by rules on test ids and parameters.

The input is what ``plugin.py`` collected under real PEFT: each test's node id, markers and the PEFT config classes
among its parameters, and PEFT's list of methods (PeftType). A test is kept unless one rule below drops it; the
reason is recorded, so ``--explain`` can show why any test is out.
"""

from __future__ import annotations

import re

# The files holding PEFT's LoRA and generic tests (issue 14), in collection order: files added later go last, so
# that the tests of the files before keep their places (the --quick subset).
FILES = [
    "test_config.py",
    "test_custom_models.py",
    "test_initialization.py",
    "test_low_level_api.py",
    "test_lora_variants.py",
    "test_mapping.py",
    "test_other.py",
    "test_target_parameters.py",
    "test_tuners_utils.py",
    "test_lora_ga.py",
    "test_arrow.py",
]
# Words in a test's name that mean hardware or a quantization backend this machine has not got.
HARDWARE = {
    "gpu",
    "cuda",
    "xpu",
    "mps",
    "npu",
    "hpu",
    "fsdp",
    "deepspeed",
    "megatron",
    "bnb",
    "bitsandbytes",
    "4bit",
    "8bit",
    "gptq",
    "gptqmodel",
    "hqq",
    "eetq",
    "aqlm",
    "awq",
    "torchao",
    "optimum",
    "inc",
}
HARDWARE_MARKERS = {"single_gpu_tests", "multi_gpu_tests", "bitsandbytes", "regression"}


def is_lora_config(qualified_name: str) -> bool:
    """LoraConfig and its helpers (LoftQConfig, EvaConfig, ...: defined in peft.tuners.lora), or the base class."""
    return qualified_name.startswith("peft.tuners.lora.") or qualified_name == "peft.config.PeftConfig"


def words(name: str) -> list[str]:
    """``TestVBLoRAInit::test_ia3_merge`` -> ['test', 'vb', 'lo', 'ra', 'init', 'test', 'ia', '3', 'merge']."""
    return [w.lower() for w in re.findall(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+", name)]


def mentions(name_words: list[str], phrase: str) -> bool:
    """Whether consecutive words of a name spell ``phrase`` (``ada`` + ``lora`` spell ADALORA; ``missing`` no MISS)."""
    target = phrase.lower().replace("_", "")
    for start in range(len(name_words)):
        joined = ""
        for word in name_words[start : start + 6]:
            joined += word
            if joined == target:
                return True
            if not target.startswith(joined):
                break
    return False


def why_left_out(test: dict, other_methods: list[str]) -> str | None:
    """The rule that leaves a collected test out, or None for a selected one."""
    path, _, rest = test["id"].partition("::")
    name = re.sub(r"\[.*", "", rest)  # class and function, without the parameter ids
    name_words = words(name)
    if path.split("/")[-1] not in FILES:
        return "not a LoRA test file"
    if HARDWARE_MARKERS & set(test["markers"]):
        return "needs a GPU, bitsandbytes or the regression data"
    if HARDWARE & set(name_words):
        return "needs a GPU, FSDP or a quantization backend"
    others = [c for c in test["configs"] if not is_lora_config(c)]
    if others:
        return f"parametrized by another method ({others[0].rsplit('.', 1)[-1]})"
    method = next((m for m in other_methods if mentions(name_words, m)), None)
    if method:
        return f"about another method ({method})"
    return None


def select(collected: dict) -> tuple[list[str], dict[str, str]]:
    """(selected node ids in collection order, {left-out node id: reason})."""
    other_methods = [m for m in collected["methods"] if m != "LORA"]
    selected, left_out = [], {}
    for test in collected["tests"]:
        reason = why_left_out(test, other_methods)
        if reason is None:
            selected.append(test["id"])
        else:
            left_out[test["id"]] = reason
    return selected, left_out
