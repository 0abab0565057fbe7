"""Shared test setup: offline Hugging Face hub, and the ``tiny`` fixture (tiny random models from tests/helpers.py).

Usage in a test::

    def test_something(tiny):
        model = tiny.llama(seed=0)               # LlamaForCausalLM, eval mode
        out = model(tiny.input_ids()).logits     # (2, 8, 100)

Factories: ``tiny.llama``, ``tiny.gpt2``, ``tiny.bert_cls``, ``tiny.llama_cls``, ``tiny.input_ids``, ``tiny.perturb_``
(or import them directly: ``from helpers import tiny_llama, input_ids``).

``device``: a test taking it runs once per device torch reports available (``helpers.DEVICES``: cpu always, cuda and
mps when present), with the ``torch.device`` as its value; the fast paths' equality tests take it (lorakit.fast's
device rule).
"""

from __future__ import annotations

import os
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # one thread per worker: 2 workers x 2 threads on 2 cores thrash
    import torch

    torch.set_num_threads(1)

import helpers  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(params=helpers.DEVICES)
def device(request: pytest.FixtureRequest) -> object:
    """Each device torch reports available, as a ``torch.device`` (see the module docstring)."""
    import torch

    return torch.device(request.param)


@pytest.fixture
def tiny() -> types.SimpleNamespace:
    """Factories of tiny deterministic models (see tests/helpers.py)."""
    return types.SimpleNamespace(
        llama=helpers.tiny_llama,
        llama_cls=helpers.tiny_llama_cls,
        gpt2=helpers.tiny_gpt2,
        bert_cls=helpers.tiny_bert_cls,
        input_ids=helpers.input_ids,
        perturb_=helpers.perturb_,
    )
