"""The suite's pytest plugin (``-p peft_suite_plugin``), the same under PEFT and under the lorakit shim.

Environment:
  PEFT_SUITE_MODE    "collect": write every collected test with what the selection rules need, then stop;
                     "run": keep only the tests listed in PEFT_SUITE_SELECT and write each one's outcome.
  PEFT_SUITE_SELECT  a file of node ids, one a line (run mode)
  PEFT_SUITE_OUT     where to write: collect mode a JSON list, run mode JSON lines (one per finished phase), so
                     results survive an interrupted run and come back from every xdist worker through the controller
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import types
from typing import Any

import pytest

MODE = os.environ.get("PEFT_SUITE_MODE", "run")
OUT = os.environ.get("PEFT_SUITE_OUT", "peft-suite-out.json")


def pytest_configure(config: pytest.Config) -> None:
    """No pauses between the hub client's retries: a test that reaches for the hub (PEFT's hub_online_once turns
    HF_HUB_OFFLINE off for a first download) fails at once instead of after 5 retries and ~30 s of sleeping."""
    try:
        from huggingface_hub.utils import _http
    except ImportError:
        return
    _http.time = types.SimpleNamespace(**{name: getattr(time, name) for name in dir(time) if not name.startswith("_")})
    _http.time.sleep = lambda seconds: None


def _peft_configs(params: dict[str, Any]) -> list[str]:
    """Qualified names of PEFT config classes among a test's parameters (a class, or an instance of one)."""
    names = []
    for value in params.values():
        cls = value if isinstance(value, type) else type(value)
        if cls.__module__.split(".")[0] == "peft" and cls.__name__.endswith("Config"):
            names.append(f"{cls.__module__}.{cls.__name__}")
    return names


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    if MODE == "collect":
        rows = [
            {
                "id": item.nodeid,
                "markers": sorted({mark.name for mark in item.iter_markers()}),
                "configs": _peft_configs(item.callspec.params) if hasattr(item, "callspec") else [],
            }
            for item in items
        ]
        import peft  # collect mode runs under real PEFT only

        methods = [method.value for method in peft.PeftType]
        with open(OUT, "w") as f:
            json.dump({"methods": methods, "public": sorted(peft.__all__), "tests": rows}, f)
        return
    with open(os.environ["PEFT_SUITE_SELECT"]) as f:
        wanted = set(f.read().split("\n"))
    _align_positional_ids(items, wanted)
    keep = [item for item in items if _peft_id(item) in wanted]
    config.hook.pytest_deselected(items=[item for item in items if _peft_id(item) not in wanted])
    items[:] = keep


def _positional(item: pytest.Item) -> str:
    """The node id with each pytest auto-id ``<argname><index>`` (a value pytest cannot name, numbered by its position
    in the parameter list) reduced to ``<argname>#``."""
    names = getattr(getattr(item, "callspec", None), "params", {})
    if not names:
        return item.nodeid
    return re.sub(r"(?<=[\[-])(" + "|".join(map(re.escape, names)) + r")\d+(?=[\]-])", r"\1#", item.nodeid)


def _align_positional_ids(items: list[pytest.Item], wanted: set[str]) -> None:
    """Give PEFT's node id to a test whose auto-id index differs under the shim only because its parameter list was
    filtered on PEFT's own classes (test_config's LAYER_INDEXING_CONFIG_CLASSES keeps the configs whose signature has
    layers_to_transform: under PEFT LoraConfig is the 14th, under the shim, whose other configs are placeholders, the
    first). Only a one-to-one match is renamed: the same test function and the same named parameters. The PEFT id
    goes into the item's stash; its reports carry it (``peft_suite_id``, back from xdist workers too)."""
    ids = {item.nodeid for item in items}
    free: dict[str, list[str]] = {}
    for test_id in wanted - ids:
        key = re.sub(r"(?<=[\[-])([A-Za-z_]\w*?)\d+(?=[\]-])", r"\1#", test_id)
        free.setdefault(key, []).append(test_id)
    strays: dict[str, list[pytest.Item]] = {}
    for item in items:
        if item.nodeid not in wanted and (key := _positional(item)) != item.nodeid:
            strays.setdefault(key, []).append(item)
    for key, group in strays.items():
        if len(group) == 1 and len(free.get(key, [])) == 1:
            group[0].stash[PEFT_ID] = free[key][0]


PEFT_ID = pytest.StashKey[str]()  # an item's node id under PEFT, where it differs (_align_positional_ids)


def _peft_id(item: pytest.Item) -> str:
    return item.stash.get(PEFT_ID, item.nodeid)


def _write(row: dict[str, Any]) -> None:
    with open(OUT, "a") as f:
        f.write(json.dumps(row) + "\n")


def pytest_runtest_logstart(nodeid: str, location: tuple) -> None:
    """Forget the placeholder uses before this test (module-level ones at import, the previous test's)."""
    used = getattr(sys.modules.get("peft"), "USED", None)
    if used is not None:
        used.clear()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    """Attach the shim's placeholder uses of this phase to the report (they travel back from xdist workers)."""
    shim = sys.modules.get("peft")
    used = getattr(shim, "USED", None) if MODE == "run" else None
    outcome = yield
    if PEFT_ID in item.stash:
        outcome.get_result().user_properties.append(("peft_suite_id", item.stash[PEFT_ID]))
    if used:
        outcome.get_result().user_properties.append(("peft_suite_used", list(dict.fromkeys(used))))
        used.clear()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if MODE != "run" or os.environ.get("PYTEST_XDIST_WORKER"):  # under xdist, the controller writes
        return
    if report.passed and report.when != "call":
        return
    message, text = "", ""
    if report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        message = crash.message if crash is not None else str(report.longrepr).strip().splitlines()[-1]
        text = "\n".join(line for line in str(report.longrepr).splitlines() if line.startswith("E "))
    elif report.skipped:
        message = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    used = [name for key, names in report.user_properties if key == "peft_suite_used" for name in names]
    outcome = "xfailed" if hasattr(report, "wasxfail") and report.skipped else report.outcome
    test_id = next((value for key, value in report.user_properties if key == "peft_suite_id"), report.nodeid)
    row = {"id": test_id, "when": report.when, "outcome": outcome, "message": message[:2000]}
    _write(row | {"errors": text[-4000:], "used": used, "seconds": round(report.duration, 3)})


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if MODE == "run" and report.failed:  # a test module that did not import: its tests never run
        _write({"id": report.nodeid, "when": "collect", "outcome": "failed", "message": str(report.longrepr)[-2000:]})
