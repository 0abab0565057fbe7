"""The peft-suite harness's own rules (compat/peft_suite: selection.py, report.py), on made-up collection data and
outcomes: which tests are selected, what counts as needing the hub, and how N, M and K are counted."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "compat" / "peft_suite"))
import report  # noqa: E402
import selection  # noqa: E402


def _test(test_id: str, markers: tuple[str, ...] = (), configs: tuple[str, ...] = ()) -> dict:
    return {"id": test_id, "markers": list(markers), "configs": list(configs)}


def test_selection_keeps_lora_tests_and_says_why_others_are_left_out() -> None:
    lora = "peft.tuners.lora.config.LoraConfig"
    collected = {
        "methods": ["LORA", "ADALORA", "IA3", "MISS"],
        "tests": [
            _test(
                "tests/test_custom_models.py::TestPeftCustomModel::test_merge[Vanilla MLP-LoraConfig]", configs=(lora,)
            ),
            _test(
                "tests/test_custom_models.py::TestPeftCustomModel::test_merge[IA3-IA3Config]",
                configs=("peft.tuners.ia3.config.IA3Config",),
            ),
            _test("tests/test_other.py::TestAdaLoraInit::test_init"),
            _test("tests/test_other.py::test_missing_keys_are_reported"),  # "missing" is not MISS
            _test("tests/test_gpu_examples.py::test_x"),
            _test("tests/test_other.py::test_bnb_merge", markers=("bitsandbytes",)),
            _test("tests/test_other.py::test_gptqmodel_load"),
            _test("tests/test_config.py::test_from_peft_config", configs=("peft.config.PeftConfig",)),
        ],
    }
    selected, left_out = selection.select(collected)
    assert selected == [
        "tests/test_custom_models.py::TestPeftCustomModel::test_merge[Vanilla MLP-LoraConfig]",
        "tests/test_other.py::test_missing_keys_are_reported",
        "tests/test_config.py::test_from_peft_config",
    ]
    reasons = {k.split("::")[-1]: v for k, v in left_out.items()}
    assert reasons == {
        "test_merge[IA3-IA3Config]": "parametrized by another method (IA3Config)",
        "test_init": "about another method (ADALORA)",
        "test_x": "not a LoRA test file",
        "test_bnb_merge": "needs a GPU, bitsandbytes or the regression data",
        "test_gptqmodel_load": "needs a GPU, FSDP or a quantization backend",
    }


def _row(test_id: str, outcome: str, when: str = "call", message: str = "", used: tuple[str, ...] = ()) -> dict:
    return {"id": test_id, "outcome": outcome, "when": when, "message": message, "used": list(used)}


def test_counting_n_m_k_and_causes(tmp_path: Path) -> None:
    ids = ["t::pass", "t::fail", "t::hub", "t::skip", "t::internal", "t::public", "t::peft_fails"]
    peft_rows = [
        _row("t::pass", "passed"),
        _row("t::fail", "passed"),
        _row("t::hub", "failed", message="OSError: We couldn't connect to 'https://huggingface.co'"),
        _row("t::skip", "skipped"),
        _row("t::internal", "passed"),
        _row("t::public", "passed"),
        _row("t::peft_fails", "failed", message="AssertionError"),
    ]
    lorakit_rows = [
        _row("t::pass", "passed"),
        _row("t::pass", "passed", when="teardown"),
        _row("t::fail", "failed", message="TypeError: f() got an unexpected keyword argument 'x' at 0x7f12 line 12"),
        _row("t::hub", "failed"),
        _row("t::skip", "skipped"),
        _row("t::internal", "failed", used=("private:peft.utils._get_submodules",)),
        _row("t::public", "failed", used=("public:peft.KasaConfig",)),
    ]  # t::peft_fails never ran under lorakit
    for name, rows in (("peft", peft_rows), ("lorakit", lorakit_rows)):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    peft = report.read(tmp_path / "peft.jsonl", ids)
    ours = report.read(tmp_path / "lorakit.jsonl", ids)
    s = report.summarize(ids, peft, ours, "test")
    assert (s["N"], s["M"], s["K"]) == (1, 4, 3)  # M: pass, fail, public, peft_fails; K: the first three
    assert (s["hub"], s["skipped_by_peft"], s["unsupported_import"]) == (1, 1, 1)
    assert dict(s["causes"]) == {
        "TypeError: f() got an unexpected keyword argument 'x' at #x# line #": 1,
        "missing public name: peft.KasaConfig": 1,
        "not collected (or the run stopped early)": 1,
    }
    assert s["tests"]["t::internal"]["cause"] == "unsupported import: peft.utils._get_submodules"


@pytest.mark.parametrize(
    "message, hub",
    [("huggingface_hub.errors.LocalEntryNotFoundError: cannot find", True), ("AssertionError: 3 != 4", False)],
)
def test_needs_hub_reads_the_error(message: str, hub: bool) -> None:
    assert report.needs_hub({"outcome": "failed", "message": message}) is hub


def _item(node_id: str, **params: object) -> object:
    from types import SimpleNamespace

    return SimpleNamespace(nodeid=node_id, callspec=SimpleNamespace(params=params), stash=pytest.Stash())


def test_an_auto_id_numbered_by_a_filtered_list_gets_peft_s_id() -> None:
    """A parametrize list filtered on PEFT's own classes numbers LoraConfig 13 under PEFT and 0 under the shim: the
    run keeps the test under PEFT's id; an ambiguous or unrelated id is left alone."""
    import peft_suite_plugin as plugin

    base = "t.py::T::test_zero"
    ours = _item(f"{base}[LoraConfig-mandatory_kwargs0]", config_class=1, mandatory_kwargs={})
    named = _item("t.py::T::test_x[LoraConfig-mandatory_kwargs18]", config_class=1, mandatory_kwargs={})
    twins = [_item(f"t.py::T::test_two[p{i}]", p=i) for i in (0, 1)]
    wanted = {f"{base}[LoraConfig-mandatory_kwargs13]", named.nodeid, "t.py::T::test_two[p5]", "t.py::T::test_two[p6]"}
    plugin._align_positional_ids([ours, named, *twins], wanted)
    assert plugin._peft_id(ours) == f"{base}[LoraConfig-mandatory_kwargs13]"
    assert plugin._peft_id(named) == named.nodeid
    assert [plugin._peft_id(t) for t in twins] == [t.nodeid for t in twins]  # two candidates each: no guess


def test_a_file_added_to_the_selection_is_collected_alone_and_appended(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache made before a file joined selection.FILES: only that file is collected, its tests go after the cached
    ones (whose places, and so the --quick subset, stay), and the next run reads the cache."""
    import suite

    runs: list[list[str]] = []

    def fake_pytest(source: Path, deps: Path, files: list[str], *, out: Path, **kwargs: object) -> None:
        runs.append(files)
        tests = [{"id": f"tests/{name}::test_new"} for name in files]
        out.write_text(json.dumps({"methods": ["LORA"], "public": ["LoraConfig"], "tests": tests}))

    monkeypatch.setattr(suite, "pytest", fake_pytest)
    old = [{"id": f"tests/{name}::test_old"} for name in selection.FILES[:-2]]  # made before the last two files
    (tmp_path / "collected.json").write_text(json.dumps({"methods": [], "public": [], "tests": old}))  # no "files"
    collected = suite.collect(tmp_path, tmp_path, tmp_path, refresh=False)
    assert runs == [selection.FILES[-2:]] and "test_lora_ga.py" in runs[0] and "test_arrow.py" in runs[0]
    assert [t["id"] for t in collected["tests"]] == [t["id"] for t in old] + [
        f"tests/{name}::test_new" for name in selection.FILES[-2:]]
    assert set(collected["files"]) == set(selection.FILES)
    suite.collect(tmp_path, tmp_path, tmp_path, refresh=False)  # now current: read from the cache
    assert len(runs) == 1
    assert not (tmp_path / "collected-new.json").exists()  # replaced into collected.json, whole
