"""./run peft-suite: PEFT's own LoRA tests, run under real PEFT (the baseline) and under lorakit (issue 14).

Steps, each cached in $LORAKIT_CACHE/peft-suite/<version> (fetch.py): download PEFT's sdist with pip and extract its
tests/; collect them under real PEFT and select the LoRA tests of the public API (selection.py, rules on test ids and
parameters); run the selection under PEFT, offline, to learn which tests need the hub or are skipped here (results kept
per test, so a later run only runs the tests not seen yet); run it under lorakit, with shim/peft first on PYTHONPATH;
print N/M/K and the failures by cause and write the JSON report (report.py).

A full run takes about 7 minutes on a quiet 2-core machine with --workers 2 (2026-12-04, nothing cached: PEFT 298 s,
lorakit 93 s); --max-tests, --files and --match run a slice.
--quick runs a fixed subset under lorakit only and fails if a test of quick_expected.txt does not pass (for CI).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fetch
import report
import selection

VERSION = "0.21.2"
HERE = Path(__file__).resolve().parent
QUICK_EXPECTED = HERE / "quick_expected.txt"
QUICK_EVERY = 40  # the quick subset: every 40th selected test, in collection order


def pytest(
    source: Path,
    deps: Path,
    files: list[str],
    *,
    shim: bool,
    mode: str,
    out: Path,
    ids: list[str] = (),
    workers: int = 1,
    log: Path,
) -> None:
    """Run PEFT's test files under real PEFT or (shim=True) lorakit, with the suite's plugin; its results go to out."""
    out.unlink(missing_ok=True)
    select = out.with_suffix(".select")
    select.write_text("\n".join(ids))
    paths = ([HERE / "shim"] if shim else []) + [HERE, deps]
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join([*map(str, paths), os.environ.get("PYTHONPATH", "")]),
        "PEFT_SUITE_MODE": mode,
        "PEFT_SUITE_OUT": str(out),
        "PEFT_SUITE_SELECT": str(select),
        "PEFT_SUITE_VERSION": VERSION,
        "PEFT_SUITE_PUBLIC": str(source.parent / "public-names.txt"),
        "HF_HUB_OFFLINE": "1",
        # No download ever: a test that turns offline mode off meets a proxy that refuses at once.
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
    }
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "peft_suite_plugin",
        "-p",
        "no:cacheprovider",
        "-o",
        "addopts=",
        "-q",
        "--tb=short",
        "--rootdir",
        str(source),
    ]
    command += (
        ["--collect-only"] if mode == "collect" else ["-n", str(workers), "--dist", "load"] if workers > 1 else []
    )
    command += [f"tests/{name}" for name in files]
    with log.open("w") as f:
        subprocess.run(command, cwd=source, env=env, stdout=f, stderr=subprocess.STDOUT)


def collect(source: Path, deps: Path, cache: Path, refresh: bool) -> dict:
    """Every test of the LoRA files as PEFT collects it (cached). A file added to selection.FILES since the cache was
    made is collected alone, its tests appended (so those of the files before keep their places)."""
    path = cache / "collected.json"
    collected = None if refresh or not path.exists() else json.loads(path.read_text())
    covered = set(collected.get("files", [])) if collected else set()  # the files collected, tests or none
    covered |= {t["id"].split("::")[0].removeprefix("tests/") for t in (collected or {}).get("tests", [])}
    missing = [name for name in selection.FILES if name not in covered]
    if missing:
        print(f"peft-suite: collecting PEFT's tests of {', '.join(missing)} under PEFT ...", file=sys.stderr)
        new = cache / "collected-new.json"
        pytest(source, deps, missing, shim=False, mode="collect", out=new, log=cache / "collect.log")
        if not new.exists():
            sys.exit(f"peft-suite: collection under PEFT failed; see {cache / 'collect.log'}")
        added = json.loads(new.read_text())
        tests = (collected["tests"] if collected else []) + added["tests"]
        collected = added | {"tests": tests, "files": sorted(covered | set(missing))}
        new.write_text(json.dumps(collected))
        os.replace(new, path)  # whole or not at all: another run may be reading the cache
    (cache / "public-names.txt").write_text("\n".join(collected["public"]))  # for the shim
    return collected


def fingerprint() -> str:
    """The packages PEFT's results depend on: a baseline is reused only while they stay the same."""
    from importlib.metadata import version

    return " ".join(f"{p}=={version(p)}" for p in ("peft", "torch", "transformers", "accelerate"))


def baseline(source: Path, deps: Path, cache: Path, ids: list[str], workers: int, refresh: bool) -> dict[str, dict]:
    """PEFT's result for each id, from the cache or by running the ones not cached yet."""
    path = cache / "baseline.json"
    stored = json.loads(path.read_text()) if path.exists() and not refresh else {}
    known = stored.get("results", {}) if stored.get("fingerprint") == fingerprint() else {}
    missing = [t for t in ids if t not in known]
    if missing:
        known |= run(source, deps, cache, missing, shim=False, workers=workers)
        path.write_text(json.dumps({"fingerprint": fingerprint(), "results": known}))
    return {t: known[t] for t in ids}


def run(
    source: Path, deps: Path, cache: Path, ids: list[str], *, shim: bool, workers: int, log: Path | None = None
) -> dict[str, dict]:
    """Each test's result; pytest's output goes to ``log`` (default: run-<who>.log in the cache)."""
    who = "lorakit" if shim else "PEFT"
    log = log or cache / f"run-{who.lower()}.log"
    print(f"peft-suite: running {len(ids)} tests under {who} (log: {log}) ...", file=sys.stderr)
    start = time.monotonic()
    files = sorted({t.split("::")[0].removeprefix("tests/") for t in ids})
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.jsonl"
        pytest(source, deps, files, shim=shim, mode="run", out=out, ids=ids, workers=workers, log=log)
        results = report.read(out, ids)
    print(f"peft-suite: {who}: {time.monotonic() - start:.0f} s", file=sys.stderr)
    return results


def pick(ids: list[str], args: argparse.Namespace) -> list[str]:
    """The slice asked for: --files, --match, then --max-tests evenly spread over what is left."""
    if args.files:
        ids = [t for t in ids if t.split("::")[0].removeprefix("tests/") in args.files.split(",")]
    if args.match:
        ids = [t for t in ids if re.search(args.match, t)]
    if args.max_tests and len(ids) > args.max_tests:
        ids = [ids[i * len(ids) // args.max_tests] for i in range(args.max_tests)]
    return ids


def quick(source: Path, deps: Path, cache: Path, ids: list[str], args: argparse.Namespace) -> int:
    """The CI subset under lorakit: every QUICK_EVERY-th selected test; each one in quick_expected.txt must pass."""
    subset = ids[::QUICK_EVERY]
    results = run(source, deps, cache, subset, shim=True, workers=args.workers)
    passed = [t for t in subset if results[t]["outcome"] == "passed"]
    if args.write_expected:
        QUICK_EXPECTED.write_text("".join(f"{t}\n" for t in passed))
        print(f"peft-suite --quick: wrote {len(passed)} passing tests to {QUICK_EXPECTED}")
        return 0
    expected = [t for t in QUICK_EXPECTED.read_text().splitlines() if t]
    broken = [t for t in expected if results.get(t, {}).get("outcome") != "passed"]
    new = [t for t in passed if t not in set(expected)]
    print(
        f"peft-suite --quick: {len(passed)}/{len(subset)} pass under lorakit; {len(expected)} expected to pass, "
        f"{len(broken)} of them do not; {len(new)} newly passing"
    )
    for t in new:
        print(f"  newly passing (add to {QUICK_EXPECTED.name}): {t}")
    for t in broken:
        status = results[t] if t in results else {"outcome": "not in the quick subset"}
        print(f"  REGRESSION {t}: {report.cause(status) if t in results else status['outcome']}")
    return 1 if broken else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="./run peft-suite", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max-tests", type=int, metavar="N", help="run N selected tests, evenly spread (a slice)")
    parser.add_argument("--files", help="only these test files, comma-separated (e.g. test_config.py,test_other.py)")
    parser.add_argument("--match", metavar="REGEX", help="only the selected tests whose node id matches REGEX")
    parser.add_argument("--workers", type=int, default=1, help="pytest-xdist workers for each run (default 1)")
    parser.add_argument("--quick", action="store_true", help="the fixed CI subset, under lorakit only")
    parser.add_argument(
        "--write-expected",
        action="store_true",
        help="with --quick: record the tests that pass now as quick_expected.txt",
    )
    parser.add_argument("--refresh", action="store_true", help="collect again and run the baseline again")
    parser.add_argument("--list", action="store_true", help="print the selected node ids (after any slice) and stop")
    parser.add_argument("--explain", metavar="REGEX", help="print why each collected test matching REGEX is left out")
    parser.add_argument("--json", type=Path, help="where to write the report (default: the cache's report.json)")
    args = parser.parse_args(argv)

    source, deps = fetch.fetch(VERSION)
    cache = fetch.cache_dir(VERSION)
    ids, left_out = selection.select(collect(source, deps, cache, args.refresh))
    if args.explain:
        for test in (t for t in [*ids, *left_out] if re.search(args.explain, t)):
            print(f"{test}: {left_out.get(test, 'selected')}")
        return 0
    if args.quick:
        return quick(source, deps, cache, ids, args)
    sliced = pick(ids, args)
    if args.list:
        print("\n".join(sliced))
        return 0
    peft = baseline(source, deps, cache, sliced, args.workers, args.refresh)
    ran = [t for t in sliced if not report.needs_hub(peft[t])]  # a hub test fails offline under lorakit too
    # With --json, the log goes beside the report, so that runs side by side keep their own logs.
    log = args.json.with_suffix(".log") if args.json else None
    ours = run(source, deps, cache, ran, shim=True, workers=args.workers, log=log)
    ours |= {t: {"outcome": "not run", "message": "needs the hub", "used": []} for t in sliced if t not in ours}
    label = "" if len(sliced) == len(ids) else f" (a slice: {len(sliced)} of the {len(ids)} selected tests)"
    summary = report.summarize(sliced, peft, ours, label)
    report.print_summary(summary)
    path = args.json or cache / "report.json"
    path.write_text(json.dumps(summary | {"peft_version": VERSION, "environment": fingerprint()}, indent=1))
    print(f"  report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
