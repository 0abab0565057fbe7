"""Fork server for tests/test_soak.py: imports lorakit once, then runs each job in a forked child that the test kills
with SIGKILL. Forking from a warm process makes one kill cost a fraction of a second instead of the ~7 s it takes a
fresh ``python -m lorakit.cli`` to import torch + transformers; the child runs the same ``lorakit.cli.main``.

Run as ``OMP_NUM_THREADS=1 python tests/soak_worker.py``. Nothing computes before a fork, so each child starts like a
fresh process. Protocol, one JSON object per line: the server says ``{"ready": true}`` once imported; then for each
job the test writes, it answers ``{"pid": N}`` as soon as the child runs, and waits for the test's next line:
``"wait"`` (let the child finish; after WAIT_LIMIT seconds it is killed) or ``"kill"`` (SIGKILL it now; the server
has not reaped it yet, so the pid is still the child's even if it already ended). Then it answers ``{"status": S}``:
the child's exit code, or minus the signal that ended it.

Jobs:

- ``{"job": "train", "argv": [...], "log": FILE}``: ``lorakit.cli.main(argv)``, stdout and stderr to FILE.
- ``{"job": "save", "base": {...}, "versions": [V1, V2], "folder": F, "ready": FILE, "log": FILE}``: load the
  adapters saved in V1 and V2 onto tiny llamas (``helpers._llama_config(**base)``, seed 0), create FILE, then
  ``save_pretrained(F)`` them in turn (V2, V1, V2, ...) until killed.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot  # noqa: E402,F401 - imported once here, not in every child (loss.png)
import transformers.models.llama.modeling_llama  # noqa: E402,F401 - transformers imports model code lazily
from helpers import _build, _llama_config  # noqa: E402
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402,F401

import lorakit.cli  # noqa: E402
import lorakit.training.trainer  # noqa: E402,F401
from lorakit import PeftModel  # noqa: E402

WAIT_LIMIT = 120  # seconds a child may run when the test waits for it (a hang then fails instead of blocking)


def _train(job: dict[str, Any]) -> int:
    return lorakit.cli.main(job["argv"])


def _save_loop(job: dict[str, Any]) -> int:
    models = [PeftModel.from_pretrained(_build(LlamaForCausalLM, _llama_config(**job["base"]), 0), version)
              for version in job["versions"]]  # fmt: skip
    Path(job["ready"]).touch()
    while True:
        for model in models[::-1]:  # the folder starts with version 1: write 2 first
            model.save_pretrained(job["folder"])


JOBS = {"train": _train, "save": _save_loop}


def _child(job: dict[str, Any]) -> None:
    """Runs in the forked child; never returns."""
    code = 1
    try:
        fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        code = JOBS[job["job"]](job)
    except BaseException:  # noqa: BLE001 - report anything in the log, then exit
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _say(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main() -> None:
    _say({"ready": True})
    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(job)
        _say({"pid": pid})
        deadline = time.monotonic() + (0 if json.loads(sys.stdin.readline() or '"kill"') == "kill" else WAIT_LIMIT)
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
            if time.monotonic() >= deadline:
                os.kill(pid, signal.SIGKILL)
                done = os.waitpid(pid, 0)
                break
            time.sleep(0.005)
        status = done[1]
        _say({"status": os.waitstatus_to_exitcode(status)})


if __name__ == "__main__":
    main()
