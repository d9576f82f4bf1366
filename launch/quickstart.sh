#!/usr/bin/env bash
# The main job end to end on the embedded SmolLM2-135M-Instruct: set up, convert, run the
# quickstart introspection sweep (resumable), grade, report. Extra args go to launch.sweep,
# e.g. --config.strengths=2.0,4.0
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source launch/setup_env.sh
if [ ! -f checkpoints/smollm2/manifest.json ]; then
  python -m launch.convert --source=smollm2 --out=checkpoints/smollm2
fi
python -m launch.chat --checkpoint=checkpoints/smollm2 --max_new_tokens=24
python -m launch.sweep --config=configs/sweeps/quickstart.py --checkpoint=checkpoints/smollm2 \
  --out=results/quickstart "$@"
