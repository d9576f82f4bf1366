#!/usr/bin/env bash
# All tests, from a fresh machine: set up the venv if needed, then pytest on 2 workers.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source launch/setup_env.sh
python -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist loadfile --durations=15 tests "$@"
