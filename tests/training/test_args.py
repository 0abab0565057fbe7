"""TrainArgs: the adapter options are LoraConfig's fields (help, type, check), with the run defaults of RUN_DEFAULTS;
a YAML config may name them as LoraConfig does."""

import dataclasses
import typing
from pathlib import Path

import pytest

from lorakit.config import ConfigError, LoraConfig, TaskType
from lorakit.training.args import RUN_DEFAULTS, TrainArgs, lora_options, read_train_config, train_fields

LORA_FIELDS = {f.name: f for f in dataclasses.fields(LoraConfig)}


def test_adapter_options_take_help_type_and_default_from_lora_config():
    options = lora_options()
    assert options == {"r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "targets": "target_modules",
                       "use_rslora": "use_rslora", "use_dora": "use_dora", "bias": "bias"}  # fmt: skip
    assert RUN_DEFAULTS.keys() <= set(options.values())
    train_hints, lora_hints = typing.get_type_hints(TrainArgs), typing.get_type_hints(LoraConfig)
    fields = train_fields()
    for name, lora in options.items():
        field, source = fields[name][0], LORA_FIELDS[lora]
        assert field.metadata["help"].startswith(source.metadata["help"]), name
        assert field.default == RUN_DEFAULTS.get(lora, source.default), name
        if name != "targets":  # targets: target_modules spelled as one string (a comma list)
            assert train_hints[name] == lora_hints[lora], name
    # where the run's default differs from PEFT's (kept by LoraConfig), it is the RUN_DEFAULTS one
    args = TrainArgs()
    assert (args.r, args.alpha, args.dropout, args.targets) == (16, 32.0, 0.05, "all-linear")
    assert (LoraConfig().r, LoraConfig().lora_alpha, LoraConfig().lora_dropout) == (8, 8, 0.0)


def test_lora_config_of_a_run():
    assert TrainArgs().lora_config() == LoraConfig(
        r=16, lora_alpha=32.0, lora_dropout=0.05, target_modules="all-linear", task_type=TaskType.CAUSAL_LM
    )
    args = TrainArgs(r=4, alpha=8, dropout=0.0, targets="q_proj, v_proj", use_rslora=True, use_dora=True, bias="all")
    config = args.lora_config()
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 8, 0.0)
    assert (config.target_modules, config.use_rslora, config.use_dora, config.bias) == (
        ["q_proj", "v_proj"], True, True, "all"
    )  # fmt: skip
    assert config.task_type is TaskType.CAUSAL_LM
    assert TrainArgs(targets=["q_proj", "v_proj"]).targets == "q_proj,v_proj"  # a list, as from a YAML file


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (dict(r=0), r"^--r: r=0 must be a positive integer rank"),
        (dict(r=2.5), r"^--r: r=2.5 must be a positive integer rank"),
        (dict(alpha=-1.0), r"^--alpha: lora_alpha=-1.0 must be a positive number"),
        (dict(dropout=1.0), r"^--dropout: lora_dropout=1.0 must be a number in \[0, 1\)"),
        (dict(bias="some"), r"^--bias: bias='some' is unknown; use one of: none, all, lora_only"),
        (dict(targets=","), r"^--targets: target_modules=\[\] wraps nothing"),
    ],
)
def test_bad_adapter_options_are_refused_by_lora_config_naming_the_flag(options, match):
    with pytest.raises(ConfigError, match=match):
        TrainArgs(**options)


def test_config_file_may_use_lora_config_names(tmp_path: Path):
    (tmp_path / "c.yaml").write_text("lora_alpha: 16\nlora_dropout: 0\ntarget_modules: [q_proj, v_proj]\nbias: all\n")
    values = read_train_config(str(tmp_path / "c.yaml"))
    assert values == {"alpha": 16.0, "dropout": 0.0, "targets": "q_proj,v_proj", "bias": "all"}
    assert TrainArgs(**values).lora_config().lora_alpha == 16.0
    (tmp_path / "twice.yaml").write_text("alpha: 16\nlora_alpha: 32\n")
    with pytest.raises(ValueError, match=r"'alpha' and 'lora_alpha' both set option 'alpha'; keep one"):
        read_train_config(str(tmp_path / "twice.yaml"))
    (tmp_path / "hf.yaml").write_text("lora_r: 8\n")
    with pytest.raises(ValueError, match=r"unknown option 'lora_r'; did you mean 'r'\?"):
        read_train_config(str(tmp_path / "hf.yaml"))
