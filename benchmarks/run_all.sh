#!/usr/bin/env bash
# Run every benchmark and write benchmarks/results.md (machine, versions, load, tables).
#
#   bash benchmarks/run_all.sh            # ~85 minutes on 2 CPU cores (the sweep engine's part: ~60)
#
# Env: BENCH_MAX_LOAD (default 0.7) and BENCH_WAIT_S (default 900): before the timed parts, wait
# until the 1-minute load average is below BENCH_MAX_LOAD, polling every 30 s for at most
# BENCH_WAIT_S seconds (then run anyway; the load is in the tables). BENCH_OUT overrides the
# output file. Benchmarks are never part of the test suite.
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
# shellcheck source=/dev/null
source launch/setup_env.sh
set +e  # setup_env.sh sets -e; one failing benchmark must not stop the others
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export BENCH_MAX_LOAD="${BENCH_MAX_LOAD:-0.7}" BENCH_WAIT_S="${BENCH_WAIT_S:-900}"
OUT="${BENCH_OUT:-$REPO/benchmarks/results.md}"
WORK="$(mktemp -d /tmp/benchmarks.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT

# nnsight is optional: install it from the registry if it comes without another torch.
if ! python -c "import nnsight" 2>/dev/null; then
  TORCH_VERSION="$(python -c 'import torch; print(torch.__version__.split("+")[0])')"
  pip install -q nnsight "torch==$TORCH_VERSION" >"$WORK/nnsight_install.log" 2>&1 \
    || echo "nnsight not installed (see the log below); continuing without it" >&2
fi

wait_quiet() {  # $1: max seconds to wait
  python -c "import sys; from benchmarks.common import wait_for_quiet; wait_for_quiet(float(sys.argv[1]), float(sys.argv[2]))" \
    "$BENCH_MAX_LOAD" "$1"
}

STARTED="$(date -u '+%Y-%m-%d %H:%M UTC')"
wait_quiet "$BENCH_WAIT_S"
LOAD_START="$(cut -d' ' -f1-3 /proc/loadavg)"

run() {  # $1: name, $2: max seconds to wait for a quiet machine first, rest: the command
  local name="$1" wait_s="$2"; shift 2
  [ "$wait_s" -gt 0 ] && wait_quiet "$wait_s"
  echo "== $name: $*" >&2
  local t0=$SECONDS
  "$@" >"$WORK/$name.md" 2>"$WORK/$name.log"
  local rc=$?
  echo "$name finished in $((SECONDS - t0)) s (exit $rc)" >&2
  {
    cat "$WORK/$name.md"
    echo
    echo "_\`$*\`: $((SECONDS - t0)) s, exit $rc, 1/5/15-min load after: $(cut -d' ' -f1-3 /proc/loadavg)._"
    if [ "$rc" -ne 0 ]; then echo; echo '```'; tail -20 "$WORK/$name.log"; echo '```'; fi
    echo
  } >"$WORK/$name.section"
}

T0=$SECONDS
run throughput 0 python -m benchmarks.generation_throughput --batches=1,8,32 --runs=3 --new_tokens=100
run sweep 120 python -m benchmarks.sweep_grid --new_tokens=32 --runs=2
run engine 120 python -m benchmarks.sweep_engine --runs=3
run prefill 60 python -m benchmarks.engine_prefill --runs=3
run breakdown 60 python -m benchmarks.decode_breakdown --batches=1,8,32 --runs=3
run dots 60 python -m benchmarks.prefill_dots --runs=15
run compile 0 python -m benchmarks.compile_depth --layers=4,32 --runs=3
run conversion 0 python -m benchmarks.conversion_memory --sizes=0.5,1,2,4
run roofline 0 python -m benchmarks.roofline

{
  echo "# Benchmark results"
  echo
  echo "Written by \`bash benchmarks/run_all.sh\` ($STARTED, $((SECONDS - T0)) s in all; commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ', working tree modified'))."
  echo "Every number below was measured on this machine in that run except section 6 (arithmetic)."
  echo
  python -c "from benchmarks.common import machine_lines; print('\n'.join(machine_lines()))"
  echo "- XLA: CPU client, default threads (all cores); torch: \`torch.set_num_threads(<cores>)\`"
  echo "- 1/5/15-min load average at the start: $LOAD_START (the machine may be shared; each table gives the load around it, which counts the benchmark's own threads: about 1-2 while it runs on 2 cores)"
  echo
  for name in throughput sweep engine prefill compile conversion breakdown dots; do
    [ "$name" = conversion ] && echo "### 4. Conversion peak RSS against checkpoint size" && echo
    cat "$WORK/$name.section"
  done
  echo "### 6. TPU decode roofline (arithmetic, not measured; see docs/performance.md)"
  echo
  cat "$WORK/roofline.section"
  if [ -s "$WORK/nnsight_install.log" ]; then echo; echo "nnsight install log (tail):"; echo '```'; tail -5 "$WORK/nnsight_install.log"; echo '```'; fi
} >"$OUT"
echo "wrote $OUT" >&2
