#!/usr/bin/env bash
# The main job end to end on the embedded SmolLM2-135M-Instruct: set up, convert, run the
# quickstart introspection sweep (resumable), grade, report. Extra args go to launch.sweep,
# e.g. --config.strengths=2.0,4.0
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source launch/setup_env.sh
# Convert unless a checkpoint this version reads is there (one converted by an older version,
# with another weight layout, is replaced).
if ! python -c "from jax_introspect import checkpoint; checkpoint.read_manifest('checkpoints/smollm2')" 2>/dev/null; then
  python -m launch.convert --source=smollm2 --out=checkpoints/smollm2 --overwrite
fi
python -m launch.chat --checkpoint=checkpoints/smollm2 --max_new_tokens=24
python -m launch.sweep --config=configs/sweeps/quickstart.py --checkpoint=checkpoints/smollm2 \
  --out=results/quickstart "$@"
