"""The README.md model card written beside a saved adapter, as PEFT writes one: YAML metadata the Hugging Face Hub
reads (``library_name: peft``, since the files are PEFT's format; ``base_model``; tags such as ``lora`` and
``base_model:adapter:<id>``; ``pipeline_tag`` for a causal LM) and a short text on how to load the adapter.

A card already in the folder keeps its text and its other metadata: only these keys are set, and a "lorakit <version>"
line is added under "### Framework versions" once.
"""

from __future__ import annotations

import importlib.metadata

from huggingface_hub import ModelCard, ModelCardData

FRAMEWORK_HEADING = "### Framework versions"


def card_text(
    existing: str | None,
    base_model: str | None,
    tags: list[str],
    pipeline_tag: str | None,
    lorakit_version: str | None = None,
) -> str:
    """The model card's content (front matter + text), from the card already there (``existing``) if any."""
    card = ModelCard(existing or f"---\nlibrary_name: peft\n---\n{_body(base_model, pipeline_tag)}")
    data: ModelCardData = card.data
    data.library_name = "peft"
    data.tags = sorted(set(data.tags or []) | set(tags)) or None
    if base_model:
        data.base_model = base_model
    if pipeline_tag and not data.pipeline_tag:
        data.pipeline_tag = pipeline_tag
    lines = card.text.splitlines()
    version_line = f"- lorakit {lorakit_version or _version()}"
    if version_line not in lines:
        if FRAMEWORK_HEADING in lines:
            lines.insert(lines.index(FRAMEWORK_HEADING) + 2, version_line)  # below the heading's blank line
        else:
            lines += ["", FRAMEWORK_HEADING, "", version_line]
    card.text = "\n".join(lines) + "\n"
    return str(card.content)


def _version() -> str:
    try:
        return importlib.metadata.version("lorakit")
    except importlib.metadata.PackageNotFoundError:  # a source tree that is not installed
        return "unknown"


def _body(base_model: str | None, pipeline_tag: str | None) -> str:
    base = f"`{base_model}`" if base_model else "its base model"
    auto = "AutoPeftModelForCausalLM" if pipeline_tag == "text-generation" else "AutoPeftModel"
    return (
        f"\n# LoRA adapter\n\nA LoRA adapter for {base}, in HF PEFT's format (adapter_config.json + "
        "adapter_model.safetensors), made with lorakit. It loads with lorakit or with PEFT:\n\n"
        f"```python\nfrom lorakit import {auto}  # or: from peft import {auto}\n\n"
        f'model = {auto}.from_pretrained("path/to/this/folder")\n```\n'
    )
