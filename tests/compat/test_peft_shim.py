"""The peft-suite's ``peft`` shim (compat/peft_suite/shim/peft): PEFT's names resolve to lorakit's, in a fresh
interpreter where the shim is the only ``peft`` (the real one stays installed beside lorakit for interop tests)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SHIM = Path(__file__).resolve().parents[2] / "compat" / "peft_suite" / "shim"


def _run(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SHIM), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_mapped_submodule_asked_for_as_an_attribute_is_the_submodule() -> None:
    out = _run(
        "import lorakit\n"
        "from peft.tuners import lora\n"  # the first thing asked: the attribute 'lora' of peft.tuners
        "import peft.tuners.lora.layer as layer\n"
        "print(type(lora).__name__, lora.__name__, lora.LoraLayer is lorakit.LoraLayer, layer.Linear is "
        "lorakit.LoraLinear)"
    )
    assert out == "_ShimModule peft.tuners.lora True True"


def test_a_name_lorakit_lacks_is_a_placeholder_that_refuses_when_used() -> None:
    out = _run(
        "import peft\n"
        "from peft.tuners.lora import SomethingPeftHas\n"
        "try:\n"
        "    SomethingPeftHas.attribute\n"
        "except peft.UnsupportedImport as e:\n"
        "    print(e)\n"
    )
    assert out == "peft.tuners.lora.SomethingPeftHas (a PEFT internal lorakit lacks): asked for .attribute"


def test_an_imported_top_level_module_is_itself_in_every_shim_module() -> None:
    # torch.compile's generated code reads globals through the module a function came from: peft.torch.<name>
    out = _run(
        "import torch, math, peft\n"
        "import peft.tuners.lora.layer as layer\n"
        "print(peft.torch is torch, layer.torch.contiguous_format is torch.contiguous_format, layer.math is math)"
    )
    assert out == "True True True"
