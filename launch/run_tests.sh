#!/usr/bin/env bash
# All tests, from a fresh machine: set up the venv if needed, then pytest on 2 workers.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source launch/setup_env.sh
# tests/test_inspect_viewer.py opens the report's viewer in headless Chromium: Debian's package (about 25 s
# with apt-get update) when it is missing and apt-get can install it.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo -n"
  ($SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null) \
    || echo "warning: could not install chromium; tests/test_inspect_viewer.py will fail" >&2
fi
python -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder --durations=15 tests "$@"
