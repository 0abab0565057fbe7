"""What stops an adapter from going to an engine as it is: a rule of that engine, broken, and the fix.

Every exporter checks its engine's rules before it writes anything, and reports all broken rules at once, each with
the fix; ``lorakit info`` shows the same checks, so a user learns before exporting which engine takes the adapter.

Example::

    problems = vllm_problems(read_config("runs/x"), tensors)
    if problems:
        raise ExportError("vLLM", problems)     # "cannot export runs/x for vLLM: 1. DoRA ...; fix: --to merged."
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lorakit.config import LoraConfig


@dataclass(frozen=True)
class Problem:
    """One broken rule. ``rule``: what the engine requires, as the engine's users know it; ``fix``: what to do.
    ``convertible``: lorakit can convert the adapter itself when given what ``fix`` names."""

    rule: str
    fix: str
    convertible: bool = False

    def __str__(self) -> str:
        return f"{self.rule}; fix: {self.fix}"


class ExportError(ValueError):
    """An adapter an engine would reject: the message lists every broken rule with its fix."""

    def __init__(self, engine: str, problems: Sequence[Problem], source: str = "the adapter") -> None:
        self.engine, self.problems = engine, list(problems)
        listed = " ".join(f"{i}. {p}." for i, p in enumerate(self.problems, 1))
        super().__init__(f"cannot export {source} for {engine}: {listed}")  # one line: the CLI's error line


# an aLoRA adapter: refused by the GGUF exporters (lorakit.export.gguf_adapter, .gguf_merged) and --to merged
ALORA = Problem(
    "an aLoRA adapter (alora_invocation_tokens) adds its update only from its invocation tokens on; lorakit writes it "
    "into no llama.cpp file (the update would apply to every token there), and no merged weight computes it",
    "serve it unmerged with lorakit or PEFT (PeftModel.generate finds the invocation in each prompt)",
)

# an Arrow router (arrow_config): it mixes other adapters per token, its own A and B unused; every exporter refuses it
ARROW = Problem(
    "an Arrow router adapter (arrow_config) mixes its model's task adapters per token; its own A and B are unused, "
    "so no engine file or merged weight computes it",
    "serve it with lorakit or PEFT (create_arrow_model), or export each task adapter by itself",
)


def unmergeable(config: LoraConfig) -> list[Problem]:
    """The problems of a LoraConfig whose update no single merged weight computes (an aLoRA or an Arrow router
    adapter): what the GGUF exporters and --to merged refuse, [] for the others."""
    return [problem for problem, asked in ((ALORA, config.alora_invocation_tokens), (ARROW, config.arrow_config))
            if asked]
