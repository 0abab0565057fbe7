"""The demo's adapter, served: exact match on the demo's 50 held-out dates in llama.cpp and vLLM themselves.

Takes the folder ``./run demo`` wrote (default ``runs/demo``: adapter/ and test.jsonl), exports the adapter with
``lorakit export`` (``--to gguf``, ``--to merged-gguf --outtype q8_0``, ``--to vllm``) and has each engine answer
every test prompt greedily (chat template, token ids from lorakit's tokenizer so both sides read the same input),
with and without the adapter. Prints exact match per engine and target, beside lorakit's own.

Run: ./run engines demo [DEMO_FOLDER]     (after ./run demo; sets up both engines on first use)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from lorakit.commands.export import export_adapter
from lorakit.commands.generate import load_pretrained
from lorakit.io.models import bundled_gguf

HERE = Path(__file__).resolve().parent
MAX_NEW = 16


def prompt_ids(tokenizer, prompts: list[str]) -> list[list[int]]:
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def exact(tokenizer, outputs: list[list[int]], answers: list[str]) -> float:
    said = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in outputs]
    return sum(s == a.strip() for s, a in zip(said, answers, strict=True)) / len(answers)


def lorakit_outputs(adapter: Path, ids: list[list[int]]) -> dict[str, list[list[int]]]:
    model, _ = load_pretrained(adapter=adapter)
    out: dict[str, list[list[int]]] = {"adapter": [], "base": []}
    for prompt in ids:
        x = torch.tensor([prompt])
        with torch.no_grad():
            out["adapter"].append(model.generate(x, max_new_tokens=MAX_NEW, do_sample=False)[0, len(prompt) :].tolist())
            with model.disable_adapter():
                out["base"].append(
                    model.generate(x, max_new_tokens=MAX_NEW, do_sample=False)[0, len(prompt) :].tolist()
                )
    return out


def llama_cpp(python: str, model: str, lora: str | None, ids: list[list[int]]) -> list[list[int]]:
    job = {"model": model, "lora": lora, "prompts": ids, "continuations": [[] for _ in ids], "max_new_tokens": MAX_NEW}
    done = subprocess.run([python, str(HERE / "llama_cpp_run.py")], input=json.dumps(job), capture_output=True,
                          text=True, check=True)  # fmt: skip
    return json.loads(done.stdout)["greedy"]


def vllm(python: str, base: str, adapter: Path, rank: int, ids: list[list[int]], work: Path) -> dict:
    (work / "prompts.json").write_text(json.dumps(ids))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    command = [python, str(HERE / "vllm_serve_greedy.py"), "--base", base, "--adapter", str(adapter),
               "--max-lora-rank", str(rank), "--max-tokens", str(MAX_NEW), "--prompts", str(work / "prompts.json"),
               "--out", str(work / "vllm.json")]  # fmt: skip
    with open(work / "vllm.log", "w") as log:
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, check=True)
    return json.loads((work / "vllm.json").read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("demo", nargs="?", default="runs/demo", help="the folder ./run demo wrote")
    parser.add_argument("--llama-python", default=str(HERE.parents[1] / ".engines/llama-cpp/bin/python"))
    parser.add_argument("--vllm-python", default=str(HERE.parents[1] / ".engines/vllm/bin/python"))
    args = parser.parse_args()
    demo = Path(args.demo)
    rows = [json.loads(line) for line in (demo / "test.jsonl").read_text().splitlines() if line.strip()]
    prompts, answers = [r["prompt"] for r in rows], [r["completion"] for r in rows]
    _, tokenizer = load_pretrained(adapter=demo / "adapter")
    ids = prompt_ids(tokenizer, prompts)
    results: dict[str, tuple[float, float]] = {}
    ours = lorakit_outputs(demo / "adapter", ids)
    results["lorakit (transformers, fp32)"] = (exact(tokenizer, ours["base"], answers),
                                               exact(tokenizer, ours["adapter"], answers))  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        lora = export_adapter(demo / "adapter", "gguf", work / "adapter.gguf").output
        merged = export_adapter(demo / "adapter", "merged-gguf", work / "merged.gguf", outtype="q8_0").output
        served = export_adapter(demo / "adapter", "vllm", work / "vllm")
        base_gguf = os.path.join(*bundled_gguf())
        base_said = exact(tokenizer, llama_cpp(args.llama_python, base_gguf, None, ids), answers)
        results["llama.cpp: Q4_1 base + --lora adapter.gguf"] = (
            base_said,
            exact(tokenizer, llama_cpp(args.llama_python, base_gguf, str(lora), ids), answers),
        )
        results["llama.cpp: merged.gguf (q8_0 changes)"] = (
            base_said,
            exact(tokenizer, llama_cpp(args.llama_python, str(merged), None, ids), answers),
        )
        base_folder = served.serve[0].split()[2]  # vllm serve BASE ...
        rank = int(served.serve[0].split()[-1])
        got = vllm(args.vllm_python, base_folder, served.output, rank, ids, work)
        results[f"vLLM {got['version']}: --enable-lora (fp32)"] = (exact(tokenizer, got["base"], answers),
                                                                 exact(tokenizer, got["adapter"], answers))  # fmt: skip
    print(f"exact match on {len(rows)} held-out dates ({demo / 'test.jsonl'}), greedy, {MAX_NEW} new tokens at most")
    print(f"{'engine':45} {'base':>6} {'with the adapter':>17}")
    for name, (before, after) in results.items():
        print(f"{name:45} {before:>6.0%} {after:>17.0%}")
    ok = all(after >= 0.9 for _, after in results.values())
    print("PASS" if ok else "FAIL", "(every engine with the adapter at 90% or more)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
