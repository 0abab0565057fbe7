"""Opt-in check of ``export_vllm`` against the real engine: vLLM must give lorakit's greedy tokens, token for token.

lorakit trains a small adapter on its bundled default model (SmolLM2-135M-Instruct; all-linear, r=8 with a
rank_pattern, rsLoRA, an alpha_pattern), saves it, exports it with export_vllm, and decodes 4 chat prompts greedily.
Then vLLM's own Python (a separate venv without lorakit) serves the base with the exported folder as a LoRARequest
(compat/engines/vllm_serve_greedy.py) on the same prompt token ids. Run with the project's Python::

    HF_HUB_OFFLINE=1 .venv/bin/python compat/engines/vllm_check.py [--vllm-python PATH] [--work DIR]

Prints a table (prompt, equal?, first difference) and a summary line. Exits 1 if vLLM's tokens differ from
lorakit's, or if the adapter changes no prompt's tokens against the base (then the check could not have failed).
About 70 s on 2 CPU cores, most of it vLLM's start. Not run by CI.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.export.vllm import VllmExport, export_vllm
from lorakit.io.models import default_model_path, load_default_model

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = ROOT / ".engines" / "vllm" / "bin" / "python"
SERVE_GREEDY = Path(__file__).with_name("vllm_serve_greedy.py")
MAX_NEW_TOKENS = 24
PROMPTS = ["What is the capital of Italy?", "Name an animal that lives in the sea.", "How do I boil an egg?",
           "Tell me something about the moon."]  # fmt: skip
TRAIN = [
    ("What is the capital of France?", "Arr, matey! Paris be the capital o' France, savvy?"),
    ("Name a color.", "Arr! Blue, like the seven seas, me hearty!"),
    ("How do I make tea?", "Arr, boil the water, drop in the leaves, and wait like a patient sea dog!"),
]
CONFIG = LoraConfig(
    target_modules="all-linear", r=8, lora_alpha=16, use_rslora=True, rank_pattern={"v_proj": 16},
    alpha_pattern={"q_proj": 32, "down_proj": 8}, task_type="CAUSAL_LM",
)  # fmt: skip


def chat_ids(tokenizer: PreTrainedTokenizerBase, user: str, assistant: str | None = None) -> list[int]:
    """Token ids of one chat turn through the tokenizer's template: a prompt ready for the answer, or the whole
    exchange when ``assistant`` is given (for training)."""
    messages = [{"role": "user", "content": user}]
    if assistant is not None:
        messages.append({"role": "assistant", "content": assistant})
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=assistant is None, return_dict=True)
    return list(encoded["input_ids"])


def train_adapter(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, steps: int = 8) -> PeftModel:
    """The default model with CONFIG's adapter after a few AdamW steps on TRAIN (pirate answers), so that B is not
    zero and greedy tokens change."""
    torch.manual_seed(0)
    peft = get_peft_model(model, CONFIG)
    optimizer = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=2e-3)
    batches = [torch.tensor([chat_ids(tokenizer, q, a)]) for q, a in TRAIN]
    peft.train()
    for _ in range(steps):
        for ids in batches:
            peft(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return peft.eval()


def lorakit_greedy(model: PeftModel, prompts: list[list[int]], pad_id: int) -> list[list[int]]:
    """The new tokens of each prompt, greedy, one prompt at a time (no padding)."""
    out = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            generated = model.generate(
                input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                pad_token_id=pad_id,
            )  # fmt: skip
            out.append(generated[0, len(ids) :].tolist())
    return out


def vllm_greedy(python: Path, base: str, export: VllmExport, prompts: list[list[int]], work: Path) -> dict:
    """vllm_serve_greedy.py's result ({"version", "adapter", "base"}), run with vLLM's Python; its log goes to
    ``work/vllm.log`` (printed in part if it fails)."""
    (work / "prompts.json").write_text(json.dumps(prompts))
    command = [str(python), str(SERVE_GREEDY), "--base", base, "--adapter", str(export.output.resolve()),
               "--max-lora-rank", str(export.max_lora_rank), "--max-tokens", str(MAX_NEW_TOKENS),
               "--prompts", str(work / "prompts.json"), "--out", str(work / "vllm.json")]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    # GiB of KV cache, plenty for 4 prompts; without it vLLM's CPU backend reserves 92% of the memory and may refuse
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    with open(work / "vllm.log", "w") as log:
        done = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        tail = (work / "vllm.log").read_text().splitlines()[-40:]
        sys.exit(f"vLLM failed (exit {done.returncode}); the end of {work / 'vllm.log'}:\n" + "\n".join(tail))
    return json.loads((work / "vllm.json").read_text())


def first_difference(ours: list[int], theirs: list[int], tokenizer: PreTrainedTokenizerBase) -> str:
    """'' if equal, else where and how the two token lists first differ."""
    if ours == theirs:
        return ""
    i = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    word = lambda ids: repr(tokenizer.decode(ids[i : i + 1])) if i < len(ids) else "(end)"  # noqa: E731
    return f"token {i}: lorakit {word(ours)} vs vLLM {word(theirs)}"


def report(prompts: list[str], ours: dict, theirs: dict, tokenizer: PreTrainedTokenizerBase) -> tuple[int, int, int]:
    """Print the table; (prompts equal with the adapter, prompts the adapter changes, base prompts equal)."""
    print(f"{'prompt':<40} {'equal?':<7} {'adapter changes':<16} {'base equal?':<12} first difference")
    equal = changed = base_equal = 0
    for i, prompt in enumerate(prompts):
        diff = first_difference(ours["adapter"][i], theirs["adapter"][i], tokenizer)
        is_changed = theirs["adapter"][i] != theirs["base"][i]
        is_base_equal = ours["base"][i] == theirs["base"][i]
        equal, changed, base_equal = equal + (not diff), changed + is_changed, base_equal + is_base_equal
        yes = lambda flag: "yes" if flag else "NO"  # noqa: E731
        print(f"{prompt[:39]:<40} {yes(not diff):<7} {yes(is_changed):<16} {yes(is_base_equal):<12} {diff or '-'}")
        print(f"{'':<4}lorakit: {tokenizer.decode(ours['adapter'][i])!r}")
        if diff:
            print(f"{'':<4}vLLM:    {tokenizer.decode(theirs['adapter'][i])!r}")
    return equal, changed, base_equal


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vllm-python", type=Path, default=VLLM_PYTHON, help=f"default: {VLLM_PYTHON}")
    parser.add_argument("--work", type=Path, help="folder for the adapter, the export and vLLM's log (default: temp)")
    args = parser.parse_args()
    if not args.vllm_python.is_file():
        sys.exit(f"no vLLM Python at {args.vllm_python}; install vLLM in its own venv there, or pass --vllm-python")
    work = args.work or Path(tempfile.mkdtemp(prefix="lorakit-vllm-check-"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    model, tokenizer = load_default_model()
    peft = train_adapter(model, tokenizer)
    peft.save_pretrained(work / "adapter")
    export = export_vllm(work / "adapter", work / "vllm-adapter", overwrite=True)
    print(f"exported {export.output} (max_lora_rank {export.max_lora_rank}); to serve it:\n  {export.serve_command}")
    prompts = [chat_ids(tokenizer, p) for p in PROMPTS]
    ours = {"adapter": lorakit_greedy(peft, prompts, tokenizer.pad_token_id)}
    with peft.disable_adapter():
        ours["base"] = lorakit_greedy(peft, prompts, tokenizer.pad_token_id)

    theirs = vllm_greedy(args.vllm_python, default_model_path(), export, prompts, work)
    equal, changed, base_equal = report(PROMPTS, ours, theirs, tokenizer)
    n, ok = len(PROMPTS), equal == len(PROMPTS) and changed > 0
    print(
        f"{'OK' if ok else 'FAILED'}: vLLM {theirs['version']} gives lorakit's greedy tokens for {equal}/{n} prompts "
        f"with the exported adapter (all-linear, r=8, rank_pattern, rsLoRA, alpha_pattern; --max-lora-rank "
        f"{export.max_lora_rank}); the adapter changes {changed}/{n} prompts against the base; base alone equal "
        f"{base_equal}/{n}; {MAX_NEW_TOKENS} new tokens max; {time.perf_counter() - start:.0f} s (work: {work})"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
