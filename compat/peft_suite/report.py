"""Per-test outcomes -> the summary line, the failures grouped by cause, and the JSON report."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path

# An error under PEFT that means the test wanted to download (HF_HUB_OFFLINE=1 is set for every run).
HUB_ERROR = re.compile(
    r"OfflineModeIsEnabled|LocalEntryNotFoundError|offline mode|HF_HUB_OFFLINE|couldn't connect to|"
    r"not a valid model identifier|outgoing traffic has been disabled|cannot find the requested files|"
    r"huggingface\.co|Connection ?Error|ConnectError|ProxyError|MaxRetryError|Name or service not known",
    re.IGNORECASE,
)


def combine(rows: list[dict]) -> dict[str, dict]:
    """JSON lines of the plugin (one per test phase, plus collection errors) -> {node id: final result}."""
    results: dict[str, dict] = {}
    for row in rows:
        old = results.get(row["id"])
        if old is None or old["outcome"] == "passed" or (old["outcome"] != "failed" and row["outcome"] == "failed"):
            results[row["id"]] = row | {
                "outcome": "error" if row["when"] == "setup" and row["outcome"] == "failed" else row["outcome"]
            }
    return results


def read(path: Path, ids: list[str]) -> dict[str, dict]:
    """Each selected test's result; one that never ran says why (its file did not import, or it was not collected)."""
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    results = combine(rows)
    out = {}
    for test_id in ids:
        file = test_id.split("::")[0]
        if test_id in results:
            out[test_id] = results[test_id]
        elif file in results:
            lines = [line for line in results[file]["message"].splitlines() if line.startswith("E ")]
            message = lines[-1][1:].strip() if lines else results[file]["message"].strip().splitlines()[-1]
            out[test_id] = {"outcome": "not run", "message": f"{file} did not import: {message}", "used": []}
        else:
            out[test_id] = {"outcome": "not run", "message": "not collected (or the run stopped early)", "used": []}
    return out


def needs_hub(result: dict) -> bool:
    return result["outcome"] in ("failed", "error") and bool(
        HUB_ERROR.search(result.get("message", "") + "\n" + result.get("errors", ""))
    )


def cause(result: dict) -> str:
    """Why a test did not pass under lorakit: the PEFT name it missed, or the exception type and first line."""
    used = result.get("used") or []
    private = [name for name in used if name.startswith("private:")]
    if private:
        return f"unsupported import: {private[0].split(':', 1)[1]}"
    if used:
        return f"missing public name: {used[0].split(':', 1)[1]}"
    first = (result.get("message") or result["outcome"]).strip().splitlines()
    line = first[0] if first else result["outcome"]
    line = re.sub(r"0x[0-9a-f]+", "0x#", line)  # addresses
    return re.sub(r"(?<![\w.])-?\d+(\.\d+)?(e-?\d+)?", "#", line)[:160]  # numbers, not the 2 of Conv2d


def summarize(ids: list[str], peft: dict[str, dict], lorakit: dict[str, dict], label: str) -> dict:
    """Counts, causes and per-test rows. M: the tests PEFT ran here (not skipped, no hub) that use no PEFT internal
    lorakit lacks; K of them pass under PEFT, N under lorakit."""
    groups: dict[str, list[str]] = defaultdict(list)
    for test_id in ids:
        base, ours = peft[test_id], lorakit[test_id]
        if needs_hub(base):
            groups["hub"].append(test_id)
        elif base["outcome"] in ("skipped", "xfailed"):
            groups["skipped by PEFT"].append(test_id)
        elif ours["outcome"] != "passed" and cause(ours).startswith("unsupported import"):
            groups["unsupported import"].append(test_id)
        else:
            groups["M"].append(test_id)
    m = groups["M"]
    k = [t for t in m if peft[t]["outcome"] == "passed"]
    n = [t for t in m if lorakit[t]["outcome"] == "passed"]
    causes = Counter(cause(lorakit[t]) for t in m if lorakit[t]["outcome"] != "passed")
    causes_unsupported = Counter(cause(lorakit[t]) for t in groups["unsupported import"])
    return {
        "label": label,
        "N": len(n),
        "M": len(m),
        "K": len(k),
        "selected": len(ids),
        "hub": len(groups["hub"]),
        "skipped_by_peft": len(groups["skipped by PEFT"]),
        "unsupported_import": len(groups["unsupported import"]),
        "unsupported_import_peft_passes": sum(peft[t]["outcome"] == "passed" for t in groups["unsupported import"]),
        "causes": causes.most_common(),
        "unsupported_causes": causes_unsupported.most_common(),
        "tests": {
            t: {
                "peft": peft[t]["outcome"],
                "lorakit": lorakit[t]["outcome"],
                "cause": cause(lorakit[t]) if lorakit[t]["outcome"] != "passed" else "",
            }
            for t in ids
        },
    }


def print_summary(s: dict, top: int = 25) -> None:
    print(f"peft-suite{s['label']}: {s['N']}/{s['M']} public-API LoRA tests pass (PEFT itself: {s['K']}/{s['M']})")
    print(
        f"  of {s['selected']} selected: {s['hub']} need the hub (fail offline under PEFT), {s['skipped_by_peft']} "
        f"skipped by PEFT here, {s['unsupported_import']} use a PEFT internal lorakit has no equivalent of "
        f"(unsupported import; PEFT passes {s['unsupported_import_peft_passes']} of them)"
    )
    for title, causes in (("failures by cause", s["causes"]), ("unsupported imports", s["unsupported_causes"])):
        if causes:
            print(f"  {title} (tests, cause), most frequent first:")
            for text, count in causes[:top]:
                print(f"    {count:5d}  {text}")
            if len(causes) > top:
                print(f"    ... {len(causes) - top} more causes in the JSON report")
