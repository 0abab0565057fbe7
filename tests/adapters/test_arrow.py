"""Arrow routing and GenKnowSub (lorakit.create_arrow_model, lorakit.adapters.variant_arrow): a layer's output against
a per-token dense reference; experts added or deleted later refresh the prototypes; prototypes built once;
GenKnowSub equal to the dense subtraction of the general adapters' mean, once per expert; merging refused; non-linear
targets refused; the errors; PEFT interop (the same saved adapters through PEFT's create_arrow_model and lorakit's
give the same logits, on GPT-2's Conv1D and Llama's Linear, with and without GenKnowSub, files written by either)."""

from __future__ import annotations

import warnings
from pathlib import Path
from unittest.mock import patch

import peft
import pytest
import torch
from helpers import input_ids, tiny_gpt2, tiny_llama
from safetensors.torch import load_file
from torch import nn

import lorakit
from lorakit.adapters.layer import LoraLayer
from lorakit.adapters.variant_arrow import ROUTER, ArrowRouter
from lorakit.api.arrow import resolve_adapter_source

ATOL = 1e-5
BASES = {"llama": tiny_llama, "gpt2": tiny_gpt2}
TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn", "c_proj"]}
LIBRARIES = {"lorakit": lorakit, "peft": peft}


def _save(library: object, kind: str, folder: Path, seed: int, r: int = 4, targets: list[str] | None = None) -> str:
    """A random LoRA adapter (init_lora_weights=False: B is not zero) on ``kind``'s tiny model, saved by ``library``."""
    base = BASES[kind](0)  # seeds torch itself: the adapter's seed comes after
    torch.manual_seed(seed)
    config = library.LoraConfig(r=r, lora_alpha=8, target_modules=targets or TARGETS[kind], init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's fan_in_fan_out warning for GPT-2's Conv1D
        library.get_peft_model(base, config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory):
    """(writer, kind) -> (3 task adapter folders, 2 general adapter folders), saved once per module."""
    made: dict[tuple[str, str], tuple[list[str], list[str]]] = {}

    def get(kind: str, writer: str = "lorakit") -> tuple[list[str], list[str]]:
        if (writer, kind) not in made:
            root = tmp_path_factory.mktemp(f"{writer}-{kind}")
            library = LIBRARIES[writer]
            tasks = [_save(library, kind, root / f"task{i}", seed=10 + i) for i in range(3)]
            general = [_save(library, kind, root / f"general{i}", seed=20 + i) for i in range(2)]
            made[(writer, kind)] = (tasks, general)
        return made[(writer, kind)]

    return get


def _arrow(library: str, kind: str, tasks: list[str], general: list[str] | None = None, **options: object):
    module = peft.tuners.lora if library == "peft" else lorakit
    config = module.ArrowConfig(**{"top_k": 2, "rng_seed": 42, "use_gks": general is not None, **options})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = module.create_arrow_model(BASES[kind](0), tasks, config, general_adapter_paths=general)
    return model.eval()


def _logits(model: nn.Module, **kw: object) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids(batch=2, seq=8, seed=1), **kw).logits


def _routers(model: nn.Module) -> list[tuple[LoraLayer, ArrowRouter]]:
    return [(m, m.lora_arrow[ROUTER]) for m in model.modules() if isinstance(m, LoraLayer) and hasattr(m, "lora_arrow")]


# -- PEFT interop ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("writer", ["lorakit", "peft"], ids=["lorakit-files", "peft-files"])
@pytest.mark.parametrize("gks", [False, True], ids=["arrow", "genknowsub"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_same_logits_as_peft(adapters, kind, gks, writer):
    tasks, general = adapters(kind, writer)
    general = general if gks else None
    ours, theirs = _arrow("lorakit", kind, tasks, general), _arrow("peft", kind, tasks, general)
    torch.testing.assert_close(_logits(ours), _logits(theirs), atol=ATOL, rtol=0)
    base = _logits(BASES[kind](0))
    assert not torch.allclose(_logits(ours), base, atol=1e-3)  # the routing does change the output
    assert ours.active_adapters == [ROUTER] and sorted(ours.peft_config) == sorted(theirs.peft_config)


# -- the layer against a dense reference -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_a_layer_mixes_its_experts_per_token(adapters, kind):
    tasks, _ = adapters(kind)
    model = _arrow("lorakit", kind, tasks)
    _logits(model)  # builds the prototypes
    layer, router = _routers(model)[0]
    assert router.task_adapter_names == ["task_0", "task_1", "task_2"]
    assert router.prototypes.shape == (3, layer.in_features)
    x = torch.randn(2, 5, layer.in_features)
    with torch.no_grad():
        out = layer(x)
        expected = layer.base_layer(x).reshape(-1, layer.out_features).clone()  # (t, out)
        for t, token in enumerate(x.reshape(-1, layer.in_features)):
            scores = (router.prototypes @ token).abs()  # (E,)
            chosen = scores.argsort(descending=True)[:2]
            coefficients = torch.softmax(scores[chosen], 0)
            for c, e in zip(coefficients, chosen.tolist()):
                A, B = layer.lora_weights(f"task_{e}")
                expected[t] += c * layer.scaling[f"task_{e}"] * (B @ A @ token)  # the dense update of expert e
    torch.testing.assert_close(out, expected.reshape(2, 5, -1), atol=ATOL, rtol=1e-5)


def test_dropout_applies_to_the_mixed_update_as_in_peft(adapters):
    tasks, _ = adapters("llama")
    model = _arrow("lorakit", "llama", tasks)
    config = lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.5,
                                arrow_config=lorakit.ArrowConfig(top_k=2, rng_seed=42))
    model.add_adapter("dropped", config)  # a second router: it routes over the task adapters, not the first router
    model.set_adapter("dropped")
    layer = next(m for m in model.modules() if isinstance(m, LoraLayer) and "dropped" in m.r)
    x = torch.randn(2, 5, layer.in_features)
    with torch.no_grad():
        base = layer.base_layer(x)
        update = layer.eval()(x) - base  # (2, 5, out)
        torch.manual_seed(0)
        dropped = layer.train()(x) - base
    assert layer.lora_arrow["dropped"].task_adapter_names == ["task_0", "task_1", "task_2"]
    kept = dropped.abs() > 1e-6  # dropout(mix): each output element 0 or 2 * the update (on the input, it would not)
    assert 0.3 < kept.float().mean() < 0.7
    torch.testing.assert_close(dropped[kept], 2 * update[kept], atol=1e-5, rtol=1e-4)


def test_a_quantized_base_routes_as_the_full_precision_one(adapters):
    tasks, _ = adapters("llama")
    full = _arrow("lorakit", "llama", tasks)
    config = lorakit.ArrowConfig(top_k=2, rng_seed=42)
    quantized = lorakit.create_arrow_model(lorakit.quantize(tiny_llama(0), bits=4), tasks, config).eval()
    (layer, _), (layer_q, _) = _routers(full)[0], _routers(quantized)[0]
    assert type(layer_q.base_layer).__name__ == "QuantLinear"
    x = torch.randn(2, 5, layer.in_features)
    with torch.no_grad():  # the update does not depend on the base weight
        torch.testing.assert_close(layer_q(x) - layer_q.base_layer(x), layer(x) - layer.base_layer(x), atol=ATOL,
                                   rtol=1e-5)


# -- the router's state: refreshed on a change of experts, built once --------------------------------------------------
def test_an_expert_added_later_is_routed_as_if_loaded_at_once(adapters):
    tasks, general = adapters("llama")
    at_once = _arrow("lorakit", "llama", tasks, general)
    later = _arrow("lorakit", "llama", tasks[:2], general)
    two = _logits(later)  # GenKnowSub on task_0, task_1 and their prototypes, before the third expert arrives
    assert not torch.allclose(two, _logits(at_once), atol=1e-3)
    later.load_adapter(tasks[2], adapter_name="new_expert")
    assert all(router.stale for _, router in _routers(later))
    torch.testing.assert_close(_logits(later), _logits(at_once), atol=ATOL, rtol=0)
    for _, router in _routers(later):
        assert router.task_adapter_names == ["task_0", "task_1", "new_expert"] and router.prototypes.shape[0] == 3
        assert router.subtracted == ["task_0", "task_1", "new_expert"] and not router.stale


def test_a_deleted_expert_is_no_longer_routed(adapters):
    tasks, general = adapters("llama")
    model = _arrow("lorakit", "llama", tasks, general)
    full = _logits(model)
    model.delete_adapter("task_2")
    assert model.active_adapters == [ROUTER]
    torch.testing.assert_close(_logits(model), _logits(_arrow("lorakit", "llama", tasks[:2], general)), atol=ATOL,
                               rtol=0)
    # loaded again under the same name, it is a new expert: subtracted again (once), routed again
    model.load_adapter(tasks[2], adapter_name="task_2")
    torch.testing.assert_close(_logits(model), full, atol=ATOL, rtol=0)


def test_prototypes_are_built_once(adapters):
    tasks, general = adapters("llama")
    model = _arrow("lorakit", "llama", tasks, general)
    layer, router = _routers(model)[0]
    with patch.object(router, "top_right_singular_vec_from_BA", wraps=router.top_right_singular_vec_from_BA) as spy:
        first = _logits(model)
        assert spy.call_count == 3  # one per expert
        weights = [w.clone() for name in router.task_adapter_names for w in layer.lora_weights(name)]
        second = _logits(model)
    assert spy.call_count == 3
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    after = [w for name in router.task_adapter_names for w in layer.lora_weights(name)]
    assert all(torch.equal(a, b) for a, b in zip(weights, after))  # GenKnowSub once


# -- GenKnowSub --------------------------------------------------------------------------------------------------------
def test_genknowsub_equals_the_dense_subtraction(adapters):
    tasks, general = adapters("llama")
    gks = _arrow("lorakit", "llama", tasks, general)
    subtracted = _logits(gks)
    assert not torch.allclose(subtracted, _logits(_arrow("lorakit", "llama", tasks)), atol=1e-3)
    plain = _arrow("lorakit", "llama", tasks)  # no forward yet: its prototypes come from the weights changed below
    files = [load_file(str(Path(folder) / "adapter_model.safetensors")) for folder in general]
    with torch.no_grad():  # the plain model's experts minus the mean of the general adapters' factors, by hand
        for name, layer in plain.named_modules():
            if isinstance(layer, LoraLayer) and "task_0" in layer.r:
                mean_A = sum(f[f"{name}.lora_A.weight"] for f in files) / len(files)  # (r, in)
                mean_B = sum(f[f"{name}.lora_B.weight"] for f in files) / len(files)  # (out, r)
                for task in ("task_0", "task_1", "task_2"):
                    layer.lora_A[task].weight -= mean_A
                    layer.lora_B[task].weight -= mean_B
                    torch.testing.assert_close(gks.get_submodule(name).lora_A[task].weight, layer.lora_A[task].weight)
    torch.testing.assert_close(_logits(plain), subtracted, atol=ATOL, rtol=0)


# -- what Arrow refuses ------------------------------------------------------------------------------------------------
def test_merging_the_router_is_refused(adapters):
    tasks, _ = adapters("gpt2")
    model = _arrow("lorakit", "gpt2", tasks)
    before = _logits(model)
    with pytest.raises(RuntimeError, match=r"Cannot merge an active Arrow router adapter.*merge_and_unload\(adapter_n"):
        model.merge_and_unload()
    with pytest.raises(RuntimeError, match=r"Cannot merge an active Arrow router adapter"):
        model.merge_adapter()
    with pytest.raises(RuntimeError, match=r"nor run as one adapter of a mixed batch"):
        _logits(model, adapter_names=[ROUTER, "task_0"])
    torch.testing.assert_close(_logits(model), before, atol=0, rtol=0)  # nothing changed


class _ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.lin = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.conv(x).mean((2, 3)))


def test_conv_targets_are_refused(tmp_path):
    lorakit.get_peft_model(_ConvNet(), lorakit.LoraConfig(r=2, target_modules=["conv", "lin"])).save_pretrained(
        tmp_path / "conv"
    )
    with pytest.raises(TypeError, match=r"(?s)LoRA adapters must only target Linear-like.*'task_0' on module 'conv' "
                                        r"of type Conv2d"):
        lorakit.create_arrow_model(_ConvNet(), [str(tmp_path / "conv")], lorakit.ArrowConfig(top_k=1))
    config = lorakit.LoraConfig(r=2, target_modules=["conv"], arrow_config=lorakit.ArrowConfig(top_k=1))
    with pytest.raises(TypeError, match=r"this target is a Conv2d: leave it out of target_modules"):
        lorakit.get_peft_model(_ConvNet(), config)


def test_adapters_that_do_not_fit_together_are_refused(adapters, tmp_path):
    tasks, _ = adapters("llama")
    rank8 = _save(lorakit, "llama", tmp_path / "rank8", seed=3, r=8)
    with pytest.raises(ValueError, match=r"\[task_1\] rank mismatch: 8 != 4 .*trained with the same r"):
        lorakit.create_arrow_model(tiny_llama(0), [tasks[0], rank8], lorakit.ArrowConfig(top_k=1))
    q_only = _save(lorakit, "llama", tmp_path / "q_only", seed=3, targets=["q_proj"])
    with pytest.raises(ValueError, match=r"\[task_1\] target_modules mismatch"):
        lorakit.create_arrow_model(tiny_llama(0), [tasks[0], q_only], lorakit.ArrowConfig(top_k=1))


def test_bad_arguments_name_the_fix(adapters, tmp_path):
    tasks, _ = adapters("llama")
    with pytest.raises(ValueError, match=r"at least one adapter path"):
        lorakit.create_arrow_model(tiny_llama(0), [], lorakit.ArrowConfig())
    with pytest.raises(ValueError, match=r"general LoRA paths if you want to use GenKnowSub.*general_adapter_paths"):
        lorakit.create_arrow_model(tiny_llama(0), tasks, lorakit.ArrowConfig(use_gks=True))
    with pytest.raises(ValueError, match=r"'user/repo/expert_0' is no local folder.*local folders only.*snapshot"):
        lorakit.create_arrow_model(tiny_llama(0), ["user/repo/expert_0"], lorakit.ArrowConfig())
    with pytest.raises(ValueError, match=r"task_specific_adapter_paths: '.*missing' does not exist"):
        lorakit.create_arrow_model(tiny_llama(0), [str(tmp_path / "missing")], lorakit.ArrowConfig())
    model = _arrow("lorakit", "llama", tasks[:2], top_k=3)
    with pytest.raises(ValueError, match=r"top_k=3 is more than the 2 task adapters"):
        _logits(model)


def test_resolve_adapter_source(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text("{}")
    assert resolve_adapter_source(str(tmp_path / "a")) == (str(tmp_path / "a"), None)
    assert resolve_adapter_source("user/repo") == ("user/repo", None)
    assert resolve_adapter_source("user/repo/sub/folder") == ("user/repo", "sub/folder")
    with pytest.raises(ValueError, match=r"does not contain 'adapter_config.json'"):
        resolve_adapter_source(str(tmp_path))
