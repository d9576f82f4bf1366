#!/usr/bin/env bash
# The main job end to end on the embedded SmolLM2-135M-Instruct: set up, convert, ask.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source launch/setup_env.sh
if [ ! -f checkpoints/smollm2/manifest.json ]; then
  python -m launch.convert --source=smollm2 --out=checkpoints/smollm2
fi
python -m launch.chat --checkpoint=checkpoints/smollm2 "$@"
