"""trainable_token_indices (lorakit.adapters.trainable_tokens): only the listed rows of an embedding train. Dense
references, merge round trip, several adapters, mixed batches, the errors, a tied tiny Llama whose lm_head stays equal
to its embedding through training and merging, and interop with HF PEFT both ways (files, config, logits)."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from helpers import _build, _llama_config, assert_same_adapter_config, input_ids, perturb_
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaForCausalLM

import lorakit
from lorakit.adapters.trainable_tokens import TokenError, TrainableTokensWrapper, with_rows

ATOL = 1e-5
IDS = [1, 2, 5]


def tiny_llama(seed: int = 0, tied: bool = False) -> LlamaForCausalLM:
    return _build(LlamaForCausalLM, _llama_config(tie_word_embeddings=tied), seed)


def _ids() -> torch.Tensor:
    x = input_ids()
    x[0, :3] = torch.tensor(IDS)  # the trained rows are looked up
    return x


def _logits(model: nn.Module, x: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_ids() if x is None else x).logits


class _Emb(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.emb1, self.lin0 = nn.Embedding(10, 4), nn.Embedding(10, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin0(self.emb(x) + self.emb1(x))


def _rows(model: nn.Module, module: str = "emb", adapter: str = "default") -> nn.Parameter:
    return model.base_model.model.get_submodule(module).token_adapter.trainable_tokens_delta[adapter]


# -- the maths -------------------------------------------------------------------------------------------------------
def test_with_rows_equals_a_row_by_row_copy():
    torch.manual_seed(0)
    weight, rows = torch.randn(7, 3), torch.randn(2, 3, requires_grad=True)
    out = with_rows(weight, torch.tensor([4, 1]), rows)
    expected = weight.clone()
    expected[4], expected[1] = rows[0].detach(), rows[1].detach()
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    torch.testing.assert_close(rows.grad, torch.ones(2, 3))


def test_forward_and_gradients_equal_the_dense_reference():
    torch.manual_seed(0)
    model = lorakit.get_peft_model(
        _Emb(), lorakit.LoraConfig(target_modules=["lin0"], trainable_token_indices={"emb": [0, 3]})
    )
    base = model.base_model.model
    E = base.emb.original_module.weight.detach().clone()
    with torch.no_grad():
        _rows(model).add_(1.0)
    x = torch.tensor([[0, 1, 3, 3], [9, 0, 2, 1]])
    expected_E = E.clone()
    expected_E[[0, 3]] = _rows(model).detach()
    torch.testing.assert_close(base.emb(x), expected_E[x])
    torch.testing.assert_close(base.emb.weight, expected_E)  # what modeling code reads as the weight
    base.emb(x).square().sum().backward()
    assert _rows(model).grad is not None and base.emb.original_module.weight.grad is None
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "base_model.model.emb.token_adapter.trainable_tokens_delta.default",
        "base_model.model.lin0.lora_A.default.weight",
        "base_model.model.lin0.lora_B.default.weight",
    ]


@pytest.mark.parametrize("init", [True, False], ids=["lora_init_true", "lora_init_false"])
def test_merge_writes_the_rows_and_unmerge_restores_the_base(init):
    torch.manual_seed(0)
    config = lorakit.LoraConfig(
        target_modules=["lin0"], trainable_token_indices={"emb": [0, 3]}, init_lora_weights=init
    )
    model = lorakit.get_peft_model(_Emb(), config)
    emb = model.base_model.model.emb
    E0 = emb.original_module.weight.detach().clone()
    torch.testing.assert_close(_rows(model), E0[[0, 3]])  # the rows start as they are, whatever the LoRA init
    with torch.no_grad():
        _rows(model).add_(0.5)
    x = torch.tensor([[0, 1, 3, 3]])
    expected = model(x).detach()
    model.merge_adapter()
    torch.testing.assert_close(emb.original_module.weight[[0, 3]], _rows(model).detach())
    torch.testing.assert_close(model(x), expected, atol=ATOL, rtol=0)
    model.unmerge_adapter()
    assert torch.equal(emb.original_module.weight, E0)
    with model.disable_adapter():
        torch.testing.assert_close(emb(x), E0[x])
    plain = model.merge_and_unload()
    assert isinstance(plain.emb, nn.Embedding)
    torch.testing.assert_close(plain(x), expected, atol=ATOL, rtol=0)


# -- several adapters ------------------------------------------------------------------------------------------------
def test_adapters_switch_delete_and_refuse_two_active_on_one_embedding():
    model = lorakit.get_peft_model(
        _Emb(), lorakit.LoraConfig(target_modules=["lin0"], trainable_token_indices={"emb": [0]})
    )
    model.add_adapter("other", lorakit.LoraConfig(target_modules=["lin0"], trainable_token_indices={"emb": [1, 2]}))
    model.add_adapter("third", lorakit.LoraConfig(target_modules=["lin0"], trainable_token_indices={"emb1": [0]}))
    emb = model.base_model.model.emb
    assert emb.active_adapters == ["default"] and not _rows(model, adapter="other").requires_grad
    model.set_adapter("other")
    assert emb.active_adapters == ["other"] and _rows(model, adapter="other").requires_grad
    assert not _rows(model).requires_grad
    with pytest.raises(ValueError, match="Only one adapter can be set at a time for TrainableTokensWrapper"):
        model.base_model.set_adapter(["default", "other"])
    model.base_model.set_adapter(["other", "third"])  # different embeddings: fine
    assert emb.active_adapters == ["other"] and model.base_model.model.emb1.active_adapters == ["third"]
    model.delete_adapter("other")
    assert set(emb.token_adapter.trainable_tokens_delta) == {"default"}
    assert set(emb.token_adapter.trainable_tokens_original) == {"default"}


def test_mixed_batch_uses_each_rows_adapter():
    torch.manual_seed(0)
    model = lorakit.get_peft_model(
        _Emb(), lorakit.LoraConfig(target_modules=["lin0"], trainable_token_indices={"emb": [0, 1]})
    )
    model.add_adapter("other", lorakit.LoraConfig(target_modules=["lin0"], trainable_token_indices={"emb": [1, 2]}))
    perturb_([p for n, p in model.named_parameters() if "lora_" in n or "trainable_tokens" in n], seed=1)
    for name in ("default", "other"):
        with torch.no_grad():
            _rows(model, adapter=name).add_(1.0)
    model.eval()
    x = torch.tensor([[0, 1, 2], [1, 2, 0], [2, 2, 1]])
    names = ["other", "__base__", "default"]
    rows = []
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                rows.append(model(x[i : i + 1]))
        else:
            model.set_adapter(name)
            rows.append(model(x[i : i + 1]))
    torch.testing.assert_close(model(x, adapter_names=names), torch.cat(rows), atol=ATOL, rtol=0)


# -- errors ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (
            dict(trainable_token_indices={"emb": [0, 10]}),
            TokenError,
            r"token id\(s\) \[10\] are outside the vocabulary",
        ),
        (dict(trainable_token_indices={"embed": [0]}), TokenError, "'embed', which matches no module"),
        (dict(trainable_token_indices={"emb": [0]}, modules_to_save=["emb"]), TokenError, "both in modules_to_save"),
        (dict(trainable_token_indices={"lin0": [0]}), TokenError, "it is a LoRA layer"),
        (dict(trainable_token_indices={"emb": [-1]}), lorakit.ConfigError, "integers >= 0"),
        (dict(trainable_token_indices={"emb": [3, 3]}), TokenError, "lists a token id twice"),
    ],
)
def test_errors_name_the_problem_and_the_fix(kwargs, error, message):
    with pytest.raises(error, match=message):
        lorakit.get_peft_model(_Emb(), lorakit.LoraConfig(target_modules=["lin0"], **kwargs))


# -- tied embeddings -------------------------------------------------------------------------------------------------
def test_tied_lm_head_stays_equal_to_the_embedding_through_training_and_merging():
    torch.manual_seed(0)
    model = lorakit.get_peft_model(
        tiny_llama(tied=True), lorakit.LoraConfig(target_modules=["q_proj"], trainable_token_indices=IDS)
    )
    inner = model.base_model.model
    assert isinstance(inner.lm_head, TrainableTokensWrapper)
    assert (
        inner.lm_head.token_adapter.trainable_tokens_delta
        is inner.model.embed_tokens.token_adapter.trainable_tokens_delta
    )
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x = _ids()
    for _ in range(3):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    rows = _rows(model, "model.embed_tokens").detach()
    E0 = inner.model.embed_tokens.original_module.weight.detach()
    assert (rows - E0[IDS]).abs().max() > 1e-3, "training moved the rows"
    torch.testing.assert_close(inner.lm_head.weight, inner.model.embed_tokens.weight)  # both read E'
    h = torch.randn(2, 32)
    torch.testing.assert_close(inner.lm_head(h), h @ inner.model.embed_tokens.weight.T)
    expected = _logits(model, x)
    merged = model.merge_and_unload()
    assert merged.lm_head.weight is merged.model.embed_tokens.weight  # still one Parameter
    torch.testing.assert_close(merged.model.embed_tokens.weight[IDS], rows)
    torch.testing.assert_close(_logits(merged, x), expected, atol=ATOL, rtol=0)


def test_tied_rows_are_saved_once(tmp_path):
    model = lorakit.get_peft_model(
        tiny_llama(tied=True), lorakit.LoraConfig(target_modules=["q_proj"], trainable_token_indices=IDS)
    )
    model.save_pretrained(tmp_path)
    keys = [k for k in load_file(tmp_path / "adapter_model.safetensors") if "token" in k]
    assert keys == ["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]


# -- interop with HF PEFT --------------------------------------------------------------------------------------------
CASES = [
    pytest.param(False, IDS, id="untied_list"),
    pytest.param(True, IDS, id="tied_list"),
    pytest.param(False, {"embed_tokens": [3, 4], "lm_head": [7]}, id="untied_dict_embedding_and_head"),
]


def _made(lib, tied: bool, indices, seed: int = 1) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = lib.LoraConfig(
            target_modules=["q_proj", "v_proj"], trainable_token_indices=indices, init_lora_weights=False
        )
        model = lib.get_peft_model(tiny_llama(0, tied), config)
    perturb_([p for p in model.parameters() if p.requires_grad], seed=seed, scale=0.5)
    return model.eval()


@pytest.mark.parametrize("tied, indices", CASES)
def test_lorakit_file_loads_in_peft(tied, indices, tmp_path):
    model = _made(lorakit, tied, indices)
    expected = _logits(model)
    with model.disable_adapter():
        assert (_logits(model) - expected).abs().max() > 1e-3
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(tiny_llama(0, tied), tmp_path)
    assert (_logits(loaded) - expected).abs().max() < ATOL
    assert (_logits(loaded.merge_and_unload()) - _logits(model.merge_and_unload())).abs().max() < ATOL


@pytest.mark.parametrize("tied, indices", CASES)
def test_peft_file_loads_in_lorakit(tied, indices, tmp_path):
    model = _made(peft, tied, indices)
    expected = _logits(model)
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = lorakit.PeftModel.from_pretrained(tiny_llama(0, tied), tmp_path)
    assert [str(w.message) for w in caught if issubclass(w.category, UserWarning)] == []
    assert (_logits(loaded) - expected).abs().max() < ATOL


@pytest.mark.parametrize("tied, indices", CASES)
def test_same_file_keys_config_and_trainable_parameters(tied, indices, tmp_path):
    ours, theirs = _made(lorakit, tied, indices), _made(peft, tied, indices)
    trainable = lambda m: {n: tuple(p.shape) for n, p in m.named_parameters() if p.requires_grad}  # noqa: E731
    assert trainable(ours) == trainable(theirs)
    ours.save_pretrained(tmp_path / "lorakit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path / "peft")
    shapes = lambda d: {k: tuple(v.shape) for k, v in load_file(d / "adapter_model.safetensors").items()}  # noqa: E731
    assert shapes(tmp_path / "lorakit") == shapes(tmp_path / "peft")
    assert_same_adapter_config(tmp_path / "lorakit", tmp_path / "peft")


def test_exports_refuse_what_they_would_drop():
    from lorakit.export.gguf_adapter import gguf_adapter_problems
    from lorakit.export.vllm import vllm_problems

    config = lorakit.LoraConfig(target_modules=["q_proj"], trainable_token_indices=IDS)
    assert any("trainable_token_indices" in p.rule for p in vllm_problems(config))
    assert any("trainable_token_indices" in p.rule for p in gguf_adapter_problems(config, {}, "unknown"))
    plain = lorakit.LoraConfig(target_modules=["q_proj"])
    assert not any("trainable_token_indices" in p.rule for p in vllm_problems(plain))


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_training_step_equals_peft(tied, tmp_path):
    """The same adapter (lorakit's, loaded into PEFT as trainable): equal loss and equal gradients of the rows."""
    model = _made(lorakit, tied, IDS).train()
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tiny_llama(0, tied), tmp_path, is_trainable=True).train()
    x = _ids()
    results = []
    for m in (model, theirs):
        loss = m(input_ids=x, labels=x).loss
        loss.backward()
        results.append((loss.detach(), _rows(m, "model.embed_tokens").grad.clone()))
    (ours_loss, ours_grad), (peft_loss, peft_grad) = results
    torch.testing.assert_close(ours_loss, peft_loss, atol=1e-6, rtol=0)
    assert ours_grad.abs().max() > 0
    torch.testing.assert_close(ours_grad, peft_grad, atol=1e-6, rtol=0)


def test_rows_on_a_16_bit_embedding_train_in_its_compute_dtype():
    """lorakit.quantize stores the embedding (and the tied lm_head) in bf16, computing in fp32: the rows are fp32
    Parameters, looked up as they are; merging writes them rounded to bf16."""
    model = lorakit.quantize(tiny_llama(0, tied=True), bits=4)
    model = lorakit.get_peft_model(model, lorakit.LoraConfig(target_modules=["q_proj"], trainable_token_indices=IDS))
    rows = _rows(model, "model.embed_tokens")
    assert rows.dtype == torch.float32
    with torch.no_grad():
        rows.add_(1e-3)  # below bf16's resolution near 1: lost if the rows were kept in bf16
    emb = model.base_model.model.model.embed_tokens
    torch.testing.assert_close(emb(torch.tensor([IDS])), rows.detach()[None], atol=0, rtol=0)
    loss = model(input_ids=_ids(), labels=_ids()).loss
    loss.backward()
    assert rows.grad is not None and torch.isfinite(rows.grad).all()
    merged = model.merge_and_unload()
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    torch.testing.assert_close(merged.model.embed_tokens.weight[IDS].float(), rows.detach(), atol=1e-2, rtol=1e-2)


def test_indices_naming_a_module_of_the_lora_layer_itself_are_refused_in_peft_s_words():
    """trainable_token_indices={'foobar': ...} with an adapter called 'foobar' names the LoRA embedding's own
    lora_dropout.foobar: refused as PEFT refuses it (the adapter name conflicts), not as 'a Identity'."""

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(10, 8)
            self.linear = torch.nn.Linear(8, 8)

    config = lorakit.LoraConfig(target_modules=["embed"], trainable_token_indices={"foobar": [1, 2, 3]})
    with pytest.raises(ValueError, match=r"that is a child of <class '\S+LoraEmbedding'>\. This is almost certainly "
                       r"not the intended behavior\. Please ensure that the adapter name, 'foobar', does not conflict"):
        lorakit.get_peft_model(Tiny(), config, adapter_name="foobar")
