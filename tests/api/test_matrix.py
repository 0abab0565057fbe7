"""The architecture matrix (issue 15): every model_type of PEFT's default LoRA target table that transformers builds
from a tiny config, the mixtures of experts of transformers 5, and a few more task classes, against HF PEFT on the
same weights.

For each case (tests/api/matrix_models.py) and each of ``target_modules=None`` (the default targets) and
``"all-linear"``:

1. both libraries train the same parameters (names and count); the default targets are PEFT's table's;
2. one training step (train mode, LoRA dropout 0, the base model's own dropout drawn from the same seed, lorakit's
   fast paths on) gives PEFT's loss and LoRA gradients; and under CPU bf16 autocast, where the fast paths differ,
   it runs where PEFT's runs, with PEFT's loss within bf16 rounding;
3. the files either library saves load in the other with the same outputs, and their adapter_config.json agree key
   by key (helpers.CONFIG_KEYS_THAT_DIFFER);
4. ``merge_and_unload()`` gives the unmerged outputs, and PEFT's merged weights;
5. greedy generation gives PEFT's tokens (models that generate).

Model types of PEFT's table that the matrix cannot build are listed with the reason in matrix_models.NOT_BUILT.

lorakit's random adapter weights are copied into PEFT's model, so that both start equal and B is not zero. Where
PEFT refuses a configuration that lorakit accepts (``PEFT_REFUSES``), PEFT is given the target list lorakit recorded
instead, so that the other checks still compare the two. Where lorakit cannot do what PEFT does yet (``GAPS``), the
check is an xfail(strict=True): it documents the gap and fails the day the gap is closed. PEFT is only the reference
here, imported in tests.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import matrix_models as mm
import peft
import pytest
import torch
from helpers import assert_same_adapter_config
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS
from torch import nn

import lorakit
from lorakit.adapters.linear import LoraLinear
from lorakit.adapters.targets import DEFAULT_TARGETS

ATOL = 1e-5
FILE_ATOL = 1e-4
TARGETS = {"default": None, "all_linear": "all-linear"}
NEW_TOKENS = 4

# (case name, targets) -> why PEFT refuses the configuration that lorakit accepts; PEFT then gets lorakit's list
PEFT_REFUSES: dict[tuple[str, str], str] = {
    ("phi3-causal_lm", "default"): "PEFT has no default for phi3; lorakit's is qkv_proj",
    ("distilbert-seq_cls", "default"): "PEFT has no default for distilbert; lorakit's is q_lin, v_lin",
    ("nemotron_h-causal_lm", "all_linear"): "PEFT refuses all-linear on Mamba models (it includes the mixers' "
    "out_proj, which the Mamba kernel reads as a plain weight); lorakit leaves out_proj out",
    ("mixtral-causal_lm", "default"): "PEFT 0.21.2 turns the config of a transformers-5 MoE into target_parameters "
    "before it fills in the default targets, and then finds no target (its table says q_proj, v_proj)",
    **{
        (name, "all_linear"): "PEFT's all-linear adapts a module that modules_to_save trains in full (the head of a "
        "token classifier or QA model; DistilBERT's pre_classifier, which 'classifier' names as a string suffix), then "
        "refuses it (modules_to_save cannot be applied to lora.Linear); lorakit leaves it to modules_to_save"
        for name in ("distilbert-seq_cls", "bert-token_cls", "roberta-qa")
    },
}
# (case name, targets) -> (why lorakit leaves out modules that PEFT adapts, their last name); PEFT then gets lorakit's
# list, and the parameters check pins what PEFT's own choice adds
LORAKIT_LEAVES_OUT: dict[tuple[str, str], tuple[str, str]] = {
    ("jamba-causal_lm", "all_linear"): (
        "Jamba's mixer reads dt_proj.weight itself (dt_proj.weight @ time_step) and never calls dt_proj, so a LoRA "
        "adapter there gets no gradient and changes the outputs only once merged (in PEFT, which adapts it, as in "
        "lorakit if named: lorakit warns then); lorakit's all-linear leaves it out (find.READ_AS_WEIGHT)",
        "dt_proj",
    ),
}
# model types for which neither library has default targets: both refuse target_modules=None
NO_DEFAULT = {c.model_type for c in mm.CASES if c.model_type not in PEFT_DEFAULTS | DEFAULT_TARGETS.keys()}

_ROUTER = (
    "PEFT and lorakit both fail: all-linear takes the MoE router (PhimoeTopKRouter, Llama4Router), an nn.Linear "
    "subclass whose forward returns a tuple (scores, logits), and LoRA adds to the layer's output; PEFT crashes in its "
    "addition, lorakit raises a TypeError naming the fix (test_a_tuple_returning_router_gets_an_error_naming_the_fix)"
)
# (case name, targets, check) -> why lorakit differs from PEFT there today (or both fail)
GAPS: dict[tuple[str, str, str], str] = {
    **{(f"{model_type}-causal_lm", "all_linear", check): _ROUTER
       for model_type in ("phimoe", "llama4_text") for check in ("step", "files", "merge", "generate")},
}


def _params(*checks: str, generating: bool = False) -> list:
    """pytest params (case, targets) for a check, with the xfail of each known gap."""
    out = []
    for case in mm.CASES:
        if generating and not case.generates:
            continue
        for targets in TARGETS:
            if targets == "default" and case.model_type in NO_DEFAULT:
                continue  # test_no_default_in_either_library
            reasons = [GAPS[(case.name, targets, c)] for c in checks if (case.name, targets, c) in GAPS]
            marks = [pytest.mark.xfail(strict=True, reason=reasons[0])] if reasons else []
            out.append(pytest.param(case, targets, id=f"{case.name}-{targets}", marks=marks))
    return out


# -- two libraries, one set of weights -------------------------------------------------------------------------------
def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _config_kwargs(case: mm.Case, targets: str) -> dict:
    kwargs = dict(r=4, lora_alpha=8, lora_dropout=0.0, task_type=case.task_type, target_modules=TARGETS[targets],
                  init_lora_weights=False)  # B random, not zero (PEFT's values are then set to lorakit's)
    if case.modules_to_save:
        kwargs["modules_to_save"] = list(case.modules_to_save)
    return kwargs


def _peft_model(case: mm.Case, kwargs: dict) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. PEFT's note that it switched fan_in_fan_out on for Conv1D
        return peft.get_peft_model(mm.build(case), peft.LoraConfig(**kwargs))


def _lorakit_model(case: mm.Case, targets: str) -> nn.Module:
    torch.manual_seed(1)
    config = lorakit.LoraConfig(**_config_kwargs(case, targets))
    return lorakit.get_peft_model(mm.build(case), config)


def _peft_kwargs(case: mm.Case, targets: str, ours: nn.Module) -> dict:
    kwargs = _config_kwargs(case, targets)
    if (case.name, targets) in PEFT_REFUSES or (case.name, targets) in LORAKIT_LEAVES_OUT:
        kwargs["target_modules"] = ours.peft_config["default"].target_modules
    return kwargs


def _twins(case: mm.Case, targets: str) -> tuple[nn.Module, nn.Module]:
    """(lorakit model, PEFT model) on two copies of one base, PEFT's trainable parameters set to lorakit's values."""
    ours = _lorakit_model(case, targets)
    theirs = _peft_model(case, _peft_kwargs(case, targets, ours))
    mine = _trainable(ours)
    with torch.no_grad():
        for name, param in _trainable(theirs).items():
            param.copy_(mine[name])  # a KeyError here: PEFT trains a parameter lorakit lacks (test_same_trainable_...)
    return ours, theirs


def _outputs(model: nn.Module, case: mm.Case) -> dict[str, torch.Tensor]:
    """The model's outputs (logits, span logits or hidden states) for the case's batch, in eval mode."""
    model.eval()
    with torch.no_grad():
        out = model(**mm.batch(case))  # labels too: a seq2seq decoder's inputs
    keys = ("logits", "start_logits", "end_logits", "last_hidden_state")
    return {k: out[k] for k in keys if k in out and out[k] is not None}


def _assert_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float) -> None:
    """Equal outputs within ``atol`` times their scale, if above 1 (mT5's logits reach ~23: fp32 rounding of a
    merged weight moves them by ~2e-5 in PEFT as in lorakit)."""
    assert got.keys() == expected.keys()
    for key in expected:
        tol = atol * max(1.0, expected[key].abs().max().item())
        diff = (got[key] - expected[key]).abs().max().item()
        assert diff <= tol, f"{key}: max difference {diff:.3g} > {tol:.3g}"


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


# -- 1. the same trainable parameters --------------------------------------------------------------------------------
@pytest.mark.parametrize("case, targets", _params("params"))
def test_same_trainable_parameters_as_peft(case, targets):
    ours = _lorakit_model(case, targets)
    kwargs = _config_kwargs(case, targets)
    if (case.name, targets) in PEFT_REFUSES:
        with pytest.raises((ValueError, TypeError)):  # still true of PEFT, or the entry is out of date
            _peft_model(case, kwargs)
        kwargs = _peft_kwargs(case, targets, ours)
    if (case.name, targets) in LORAKIT_LEAVES_OUT:  # PEFT's own choice adapts those modules too, and only those
        left_out = LORAKIT_LEAVES_OUT[(case.name, targets)][1]
        extra = set(_trainable(_peft_model(case, kwargs))) - set(_trainable(ours))
        assert extra and all(f".{left_out}.lora_" in n for n in extra), sorted(extra)
        kwargs = _peft_kwargs(case, targets, ours)
    theirs = _peft_model(case, kwargs)
    assert sorted(_trainable(ours)) == sorted(_trainable(theirs))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    if targets == "default" and case.model_type in PEFT_DEFAULTS:  # recorded as PEFT's table has it
        assert sorted(ours.peft_config["default"].target_modules) == sorted(PEFT_DEFAULTS[case.model_type])


def test_every_model_type_of_peft_s_table_is_in_the_matrix():
    assert PEFT_DEFAULTS.keys() - {c.model_type for c in mm.CASES} == mm.NOT_BUILT.keys()


@pytest.mark.parametrize("case", [c for c in mm.CASES if c.model_type in NO_DEFAULT], ids=lambda c: c.name)
def test_no_default_in_either_library(case):
    """Neither library has default targets for these model types: both ask for target_modules."""
    with pytest.raises(lorakit.TargetError, match="Please specify `target_modules`"):
        _lorakit_model(case, "default")
    with pytest.raises(ValueError):
        _peft_model(case, _config_kwargs(case, "default"))


# -- 2. a training step ----------------------------------------------------------------------------------------------
def _step(model: nn.Module, case: mm.Case) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, gradient of each trainable parameter) of one training-mode forward and backward; the base model's
    dropout draws from seed 0. A task without labels (feature extraction) is scored by the mean square output."""
    model.train()
    model.zero_grad()
    torch.manual_seed(0)
    out = model(**mm.batch(case))
    loss = out.loss if out.get("loss") is not None else out.last_hidden_state.square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in _trainable(model).items()}


@pytest.mark.parametrize("case, targets", _params("step"))
def test_training_step_like_peft(case, targets):
    ours, theirs = _twins(case, targets)
    layers = [m for m in ours.modules() if isinstance(m, LoraLinear)]
    assert layers and all(m._fast is not None for m in layers), "lorakit's fast path is what this test runs"
    loss, grads = _step(ours, case)
    ref_loss, ref_grads = _step(theirs, case)
    torch.testing.assert_close(loss, ref_loss, atol=ATOL, rtol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert grad is not None and ref_grads[name] is not None, name
        torch.testing.assert_close(grad, ref_grads[name], atol=ATOL, rtol=1e-4, msg=name)


@pytest.mark.parametrize("case, targets", _params("step"))
def test_training_step_under_bf16_autocast_like_peft(case, targets):
    """Under CPU bf16 autocast lorakit's fast paths change (one shared cast of a layer input, the fused node in bf16):
    they must run wherever PEFT's step runs, or fail as PEFT's does (DeBERTa's mask fill and DBRX's experts break
    under autocast in transformers itself), with the loss within bf16 rounding of PEFT's (measured up to 0.4%, mT5)."""
    ours, theirs = _twins(case, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        try:
            ref_loss, _ = _step(theirs, case)
        except RuntimeError as e:
            with pytest.raises(RuntimeError, match=re.escape(str(e))):
                _step(ours, case)
            return
        loss, grads = _step(ours, case)
    torch.testing.assert_close(loss, ref_loss, atol=0, rtol=1e-2)
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())


# -- 3. files both ways ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case, targets", _params("files"))
def test_files_load_in_the_other_library(case, targets, tmp_path: Path):
    ours, theirs = _twins(case, targets)
    expected = _outputs(ours, case)
    with ours.disable_adapter():
        assert _max_diff(_outputs(ours, case), expected) > 1e-4, "the adapter must matter, or the test is void"
    _assert_close(_outputs(theirs, case), expected, ATOL)
    ours.save_pretrained(tmp_path / "lorakit")
    theirs.save_pretrained(tmp_path / "peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        in_peft = peft.PeftModel.from_pretrained(mm.build(case), tmp_path / "lorakit")
    in_lorakit = lorakit.PeftModel.from_pretrained(mm.build(case), tmp_path / "peft")
    _assert_close(_outputs(in_peft, case), expected, FILE_ATOL)
    _assert_close(_outputs(in_lorakit, case), expected, FILE_ATOL)
    assert_same_adapter_config(tmp_path / "lorakit", tmp_path / "peft")


# -- 4. merge_and_unload ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case, targets", _params("merge"))
def test_merge_and_unload_gives_the_unmerged_outputs(case, targets):
    ours, theirs = _twins(case, targets)
    expected = _outputs(ours, case)
    merged = ours.merge_and_unload()
    _assert_close(_outputs(merged, case), expected, ATOL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = theirs.merge_and_unload().state_dict()
    got = merged.state_dict()
    assert sorted(got) == sorted(ref) == sorted(mm.build(case).state_dict()), "unloading restores the modules"
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], atol=ATOL, rtol=1e-5, msg=key)


# -- 5. greedy generation --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case, targets", _params("generate", generating=True))
def test_greedy_generation_like_peft(case, targets):
    ours, theirs = _twins(case, targets)
    options = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    tokens = []
    for model in (ours, theirs):
        model.eval()
        with torch.no_grad():
            tokens.append(model.generate(**mm.prompt(case), **options))
    assert tokens[0].shape[-1] >= NEW_TOKENS
    torch.testing.assert_close(tokens[0], tokens[1], atol=0, rtol=0)


# -- refusals that PEFT shares -----------------------------------------------------------------------------------------
def test_a_mamba_mixers_out_proj_is_refused_as_in_peft():
    """The Mamba kernel reads out_proj.weight itself (a LoRA wrapper would be bypassed): both libraries refuse it when
    named, and lorakit's all-linear leaves it out (test_same_trainable_parameters_as_peft[nemotron_h-...])."""
    case = next(c for c in mm.CASES if c.model_type == "nemotron_h")
    kwargs = dict(r=4, target_modules=["in_proj", "out_proj"])
    with pytest.raises(lorakit.TargetError, match=r"'model.layers.0.mixer.out_proj' .* exclude_modules=\['out_proj'\]"):
        lorakit.get_peft_model(mm.build(case), lorakit.LoraConfig(**kwargs))
    with pytest.raises(ValueError, match="out_proj"):
        _peft_model(case, kwargs)


@pytest.mark.parametrize("model_type", ["phimoe", "llama4_text"])
def test_a_tuple_returning_router_gets_an_error_naming_the_fix(model_type):
    """all-linear takes these routers (nn.Linear subclasses returning (scores, logits)): PEFT crashes in its addition,
    lorakit says what to do, and what it says works, in both libraries alike: the router left out of the targets and
    its weight adapted through target_parameters."""
    case = next(c for c in mm.CASES if c.model_type == model_type)
    ours = _lorakit_model(case, "all_linear")
    with pytest.raises(TypeError, match=r"returns a tuple, not a tensor.*exclude_modules=\['router'\]"):
        _step(ours, case)
    theirs = _peft_model(case, _config_kwargs(case, "all_linear"))
    with pytest.raises(Exception):  # noqa: B017 (PEFT's failure is whatever its addition raises)
        _step(theirs, case)
    fixed = dict(exclude_modules=["router"], target_parameters=["router.weight"])
    torch.manual_seed(1)
    ours = lorakit.get_peft_model(mm.build(case), lorakit.LoraConfig(**_config_kwargs(case, "all_linear"), **fixed))
    theirs = _peft_model(case, {**_config_kwargs(case, "all_linear"), **fixed})
    mine = _trainable(ours)
    assert sorted(mine) == sorted(_trainable(theirs)) and any(".router.lora_A." in n for n in mine)
    with torch.no_grad():
        for name, param in _trainable(theirs).items():
            param.copy_(mine[name])
    loss, grads = _step(ours, case)
    ref_loss, ref_grads = _step(theirs, case)
    torch.testing.assert_close(loss, ref_loss, atol=ATOL, rtol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=ATOL, rtol=1e-4, msg=name)


# -- configurations beyond the matrix's two ----------------------------------------------------------------------------
def _case(name: str) -> mm.Case:
    return next(c for c in mm.CASES if c.name == name)


def _saved_copies(model: nn.Module) -> set[str]:
    return {n.split(".modules_to_save.")[0] for n in _trainable(model) if ".modules_to_save." in n}


@pytest.mark.parametrize("targets", ["all-linear", ["q_lin", "pre_classifier"]], ids=["all_linear", "listed"])
def test_a_module_to_save_is_no_lora_target(targets):
    """A module that modules_to_save names stays a full copy even when the targets name it too (all-linear takes
    DistilBERT's pre_classifier, which PEFT's 'classifier' names as a string suffix). PEFT wraps it with LoRA first and
    then fails ("modules_to_save cannot be applied to modules of type lora.Linear"): a deliberate difference, lorakit
    trains it as PEFT would with targets that leave it out."""
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="SEQ_CLS")
    model = lorakit.get_peft_model(mm.build(_case("distilbert-seq_cls")), config)
    assert _saved_copies(model) == {"base_model.model.pre_classifier", "base_model.model.classifier"}
    assert not any("pre_classifier" in n and "lora_" in n for n in _trainable(model))


@pytest.mark.parametrize("name, kwargs", [
    pytest.param("t5-seq2seq", dict(target_modules="all-linear"), id="t5_all_linear_no_task"),  # auto_mapping
    pytest.param("distilbert-seq_cls", dict(target_modules=["q_lin"], modules_to_save=["classifier"],
                                            task_type="SEQ_CLS"), id="distilbert_head_listed_twice"),
])
def test_same_adapter_config_as_peft(name, kwargs, tmp_path: Path):
    case = _case(name)
    torch.manual_seed(1)
    ours = lorakit.get_peft_model(mm.build(case), lorakit.LoraConfig(r=4, lora_alpha=8, **kwargs))
    theirs = _peft_model(case, dict(r=4, lora_alpha=8, **kwargs))
    ours.save_pretrained(tmp_path / "lorakit")
    theirs.save_pretrained(tmp_path / "peft")
    assert_same_adapter_config(tmp_path / "lorakit", tmp_path / "peft")
