"""Dataset files -> records: loading, format detection and validation, eval holdout.

A *record* is one example as a plain dict, in one of three formats (the names TRL users know):

- ``"text"``:              ``{"text": "..."}``; the loss is on every token.
- ``"prompt_completion"``: ``{"prompt": "...", "completion": "..."}``; the loss is on the completion only.
  The conversational variant has lists of messages on both sides: ``{"prompt": [{"role": "user", ...}],
  "completion": [{"role": "assistant", ...}]}``.
- ``"messages"``:          ``{"messages": [{"role": "user", "content": "..."}, ...]}``, rendered with the
  tokenizer's chat template; the loss is on the assistant turns only.

Turning records into token ids and label masks lives in ``data_tokenize.py``; packing and batching in ``data_pack.py``.

Example::

    records = load_records("train.jsonl")
    fmt = detect_dataset_format(records)  # "text" | "prompt_completion" | "messages"
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

FORMATS: tuple[str, ...] = ("text", "prompt_completion", "messages")
SUPPORTED_EXTENSIONS: tuple[str, ...] = (".jsonl", ".json", ".csv", ".parquet", ".txt")

_FORMAT_HELP = (
    'the supported formats are {"text": ...}, {"prompt": ..., "completion": ...} '
    'and {"messages": [{"role": ..., "content": ...}, ...]}'
)

T = TypeVar("T")


class DataError(ValueError):
    """A dataset file or record cannot be used; the message names the file/row and the fix."""


# --------------------------------------------------------------------------------------------------------- loading


def load_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Load a local dataset file into a list of record dicts, chosen by the file extension.

    - ``.jsonl``: one JSON object per non-empty line.
    - ``.json``: a list of objects, or an object holding exactly one list of objects (e.g. ``{"data": [...]}``).
    - ``.csv``: a header row, then one record per row (all values are strings).
    - ``.parquet``: one record per row (needs ``pyarrow``).
    - ``.txt``: one ``{"text": line}`` record per non-empty line.

    Raises:
        DataError: the file is missing, empty, malformed, or has an unsupported extension.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(
            f"data file '{path}' does not exist; pass the path of a local file "
            f"({', '.join(SUPPORTED_EXTENSIONS)}); Hugging Face Hub dataset names are not supported"
        )
    if path.is_dir():
        raise DataError(f"data path '{path}' is a directory; pass one file ({', '.join(SUPPORTED_EXTENSIONS)})")
    loaders = {
        ".jsonl": _load_jsonl,
        ".json": _load_json,
        ".csv": _load_csv,
        ".parquet": _load_parquet,
        ".txt": _load_txt,
    }
    suffix = path.suffix.lower()
    if suffix not in loaders:
        raise DataError(
            f"data file '{path}' has unsupported extension '{path.suffix}'; "
            f"use one of {', '.join(SUPPORTED_EXTENSIONS)} (convert the file or rename it if the content matches)"
        )
    records = loaders[suffix](path)
    if not records:
        raise DataError(f"data file '{path}' contains no records; add at least one example")
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(
                f"data file '{path}': record {i + 1} is a {type(record).__name__}, not an object; "
                f'each record must be a JSON object such as {{"text": ...}}'
            )
    return records


def _load_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    with path.open(encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"data file '{path}' line {line_no}: invalid JSON ({e.msg} at column {e.colno}); "
                    "each line must be one complete JSON object; fix or remove that line"
                ) from e
            if not isinstance(record, dict):
                raise DataError(
                    f"data file '{path}' line {line_no}: expected a JSON object, got a {type(record).__name__}; "
                    'each line must be one object such as {"text": ...}'
                )
            records.append(record)
    return records


def _load_json(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8-sig")
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        hint = " (this looks like JSON Lines: rename the file to .jsonl)" if e.msg == "Extra data" else ""
        raise DataError(
            f"data file '{path}': invalid JSON at line {e.lineno} column {e.colno} (char {e.pos}): {e.msg}{hint}"
        ) from e
    if isinstance(data, dict):
        lists = [key for key, value in data.items() if isinstance(value, list)]
        if len(lists) != 1:
            raise DataError(
                f"data file '{path}': the top-level object has {len(lists)} list values (keys: {sorted(data)}); "
                'expected a list of records, or an object with exactly one list of records such as {"data": [...]}'
            )
        data = data[lists[0]]
    if not isinstance(data, list):
        raise DataError(f"data file '{path}': top-level JSON is a {type(data).__name__}; expected a list of records")
    return data


def _load_csv(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        try:
            records = [dict(row) for row in reader]
        except csv.Error as e:
            raise DataError(f"data file '{path}' line {reader.line_num}: malformed CSV ({e}); fix the quoting") from e
    for i, record in enumerate(records):
        if None in record:  # csv puts surplus cells of a row under the key None
            raise DataError(
                f"data file '{path}' row {i + 1}: more cells than header columns {reader.fieldnames}; "
                "quote values that contain commas"
            )
    return records


def _load_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(f"reading '{path}' needs pyarrow; install it with `pip install pyarrow`") from e
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types (ArrowInvalid, OSError) for a corrupt file
        raise DataError(f"data file '{path}' is not a readable Parquet file ({e}); re-export it") from e


def _load_txt(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8-sig") as f:
        return [{"text": line.rstrip("\r\n")} for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------------------- formats


def detect_format(record: dict[str, Any], row: int | None = None) -> str:
    """Return the format of one record from its keys: ``"messages"``, ``"prompt_completion"`` or ``"text"``.

    Extra keys (``"id"``, ``"source"``...) are ignored. If several formats' keys are present, the first of
    messages > prompt/completion > text wins. ``row`` (1-based) is only used in the error message.

    Raises:
        DataError: the record has none of the formats' keys.
    """
    if "messages" in record:
        return "messages"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "text" in record:
        return "text"
    where = f"row {row}" if row is not None else "record"
    raise DataError(f"{where} is in no known format: it has keys {sorted(record)}; {_FORMAT_HELP}")


def detect_dataset_format(records: Sequence[dict[str, Any]]) -> str:
    """Detect the format from the first record and check that every record has it, with values of the right type.

    Raises:
        DataError: no records, a record in no/another format, or a value of the wrong type (naming the 1-based row).
    """
    if not records:
        raise DataError("the dataset has no records; add at least one example")
    fmt = detect_format(records[0], row=1)
    for i, record in enumerate(records):
        row_fmt = detect_format(record, row=i + 1)
        if row_fmt != fmt:
            raise DataError(
                f"row {i + 1} is in format '{row_fmt}' (keys {sorted(record)}) but row 1 is in format '{fmt}'; "
                "a dataset must use one format: convert the rows or split them into separate files"
            )
        _validate(record, fmt, i + 1)
    return fmt


def is_conversational(value: Any) -> bool:
    """True if ``value`` is a list of ``{"role": ..., "content": ...}`` messages (the conversational variant)."""
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value)


def _validate(record: dict[str, Any], fmt: str, row: int) -> None:
    if fmt == "text":
        _require_str(record, "text", row)
    elif fmt == "messages":
        _require_messages(record["messages"], "messages", row)
    else:
        prompt, completion = record["prompt"], record["completion"]
        if is_conversational(prompt) or is_conversational(completion):
            _require_messages(prompt, "prompt", row, allow_empty=True)
            _require_messages(completion, "completion", row)
        else:
            _require_str(record, "prompt", row)
            _require_str(record, "completion", row)


def _require_str(record: dict[str, Any], key: str, row: int) -> None:
    if not isinstance(record[key], str):
        raise DataError(
            f"row {row}: '{key}' must be a string, got {type(record[key]).__name__} ({str(record[key])[:60]!r}); "
            "fix the value or drop the row"
        )


def _require_messages(messages: Any, key: str, row: int, allow_empty: bool = False) -> None:
    if not isinstance(messages, list) or (not messages and not allow_empty):
        raise DataError(
            f'row {row}: \'{key}\' must be a non-empty list of {{"role": ..., "content": ...}} messages, '
            f"got {str(messages)[:60]!r}"
        )
    for j, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            keys = sorted(message) if isinstance(message, dict) else type(message).__name__
            raise DataError(
                f"row {row}: '{key}'[{j}] must be a dict with 'role' and 'content' keys, got {keys}; "
                "rename the keys (e.g. ShareGPT's 'from'/'value' -> 'role'/'content')"
            )


# ------------------------------------------------------------------------------------------------------ eval split


def split_eval(items: Sequence[T], fraction: float, seed: int = 0) -> tuple[list[T], list[T]]:
    """Deterministically hold out ``round(fraction * len(items))`` items (at least 1 if fraction > 0) for evaluation.

    The same ``items``, ``fraction`` and ``seed`` always give the same split; both parts keep the input order.

    Raises:
        DataError: ``fraction`` is outside [0, 1), or leaves no training item.
    """
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"eval fraction must be in [0, 1), got {fraction}; use e.g. 0.05 for a 5% holdout")
    n_eval = max(1, round(fraction * len(items))) if fraction > 0 else 0
    if n_eval >= len(items):
        raise DataError(
            f"eval fraction {fraction} of {len(items)} examples leaves no training example; "
            "use a smaller fraction or more data"
        )
    eval_idx = set(random.Random(seed).sample(range(len(items)), n_eval))
    train = [item for i, item in enumerate(items) if i not in eval_idx]
    held_out = [item for i, item in enumerate(items) if i in eval_idx]
    return train, held_out


def read_prompts(path: str | os.PathLike[str]) -> list[str]:
    """Prompts from a file: ``.jsonl`` lines with a "prompt" string, otherwise one prompt per non-empty line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file '{path}' does not exist; pass a .txt (one prompt a line) or .jsonl file")
    prompts = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix.lower() != ".jsonl":
            prompts.append(line)
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"prompts file '{path}' line {line_no}: invalid JSON ({e.msg}); fix that line") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise ValueError(f"prompts file '{path}' line {line_no}: expected an object with a \"prompt\" string")
        prompts.append(record["prompt"])
    if not prompts:
        raise ValueError(f"prompts file '{path}' holds no prompt; add one per line")
    return prompts
