#!/usr/bin/env bash
# The GPU proof in one short run (208 s from cold on an H200; the limits add up to 10 minutes):
#
#     bash benchmarks/gpu_check.sh [OUT]          # default OUT: benchmarks/results/<device>
#     bash benchmarks/gpu_check.sh --dry-run [OUT] # the same steps on CPU, tiny shapes, Triton's
#                                                 # interpreter, no CUDA build (CI runs it)
#
# Steps (benchmarks/gpu_check.py; each under its own timeout, so a hang or a failure in one
# does not stop the others; a summary line per step as it goes):
#   setup        pip install --no-deps --no-build-isolation -e .   (no network needed)
#   conv build   the CUDA conv extension, in the background (CUDA_HOME of the real toolkit,
#                TORCH_CUDA_ARCH_LIST=9.0 without a visible GPU), or one line saying why not
#   env          device, driver, versions, date, commit
#   correctness  fused kernels vs fp64 by the FA3 rule at the real shapes
#   timing       eager: fused vs gather+SDPA (flash/efficient/cuDNN) vs the authors' code at
#                the training, SIDD and a 1024² inference shape; forward/backward TFLOP/s at N ≥ 16k
#   compiled     inside torch.compile: the compiled chain, our op traced, backend "fused"; a
#                CUDA-graph replay, host vs GPU time, per-kernel GPU times; deterministic bits
#   train        SSBSN() step vs reference; ssbsn train's default step vs fp32 eager and the
#                authors' code; its loss over 200 steps in bf16 vs fp32; the largest crop
#                (batch 4) and whole image, ours and the authors'; batch 4 at 512 crops
#   conv         the conv extension vs cuDNN
#   restore      the Wiener refinement on the GPU: the CPU's result on a crop; a 4000x3000
#                photo's time against the bm3d package's on one CPU thread
#   denoise      a 12-MP photo as `ssbsn denoise` runs it, 42-px attention windows: the quick
#                model's full default inference and the paper model's PD 2 + R3, split by
#                step, peak memory; whole-map groups at 512², extrapolated
#   report       OUT/results.json (figures + targets) and OUT/summary.md (MET / MISSED)
# The limits add up to 595 s (9.9 min); a step may use what earlier steps left of theirs, so
# the run still ends within that sum; the conv build overlaps the steps before conv.
# Exit status: 0 all steps ran, every check passed and every target was met; 2 only targets
# missed (never in a dry run: CPU speed is not a target); 1 a step or a check failed.
set -u
cd "$(dirname "$0")/.."
DRY=0
OUT=""
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,/^set -u$/{/^set -u$/!p}' "$0"; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $arg (see --help)"; exit 2 ;;
    *) OUT=$arg ;;
  esac
done
PY=${PYTHON:-python}   # the interpreter with torch (PYTHON=.venv/bin/python ...)
command -v "$PY" >/dev/null 2>&1 || PY=python3
T0=$(date +%s)
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  OUT=${OUT:-${TMPDIR:-/tmp}/ssbsn-gpu-check-dry-run}
  FLAG=(--dry-run)
  LIMIT_SCALE=${LIMIT_SCALE:-4}  # a shared CI core is no GPU: the limits only catch hangs here
else
  unset TRITON_INTERPRET
  FLAG=()
  LIMIT_SCALE=${LIMIT_SCALE:-1}
fi
if [ -z "$OUT" ]; then
  dev=$("$PY" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" 2>/dev/null || echo unknown)
  OUT=benchmarks/results/$(echo "$dev" | tr '[:upper:]' '[:lower:]' | sed 's/nvidia //; s/[^a-z0-9]\+/-/g; s/^-//; s/-$//')
fi
mkdir -p "$OUT/parts" "$OUT/logs"
rm -rf "$OUT/parts" "$OUT/logs" "$OUT/sub"
mkdir -p "$OUT/parts" "$OUT/logs"
echo "gpu_check: results in $OUT$([ "$DRY" = 1 ] && echo ' (dry run: CPU, tiny shapes, interpreter)')"

# step NAME LIMIT_S [CMD...]: run CMD (default: gpu_check.py's step NAME) under a timeout, log
# to OUT/logs/NAME.log, print its result lines as they come. A step may also use the time the
# steps before it left unused (PLANNED: the sum of their limits), so a slow compile does not
# lose its rows while the run as a whole still ends within the sum of the limits.
PLANNED=0
step() {
  local name=$1 base=$(( $2 * LIMIT_SCALE )); shift 2
  [ $# -gt 0 ] || set -- "$PY" -m benchmarks.gpu_check "$name" --out "$OUT" "${FLAG[@]}"
  local t=$(date +%s)
  local spare=$(( PLANNED - (t - T0) ))
  [ "$spare" -gt 0 ] || spare=0
  local limit=$(( base + spare ))
  PLANNED=$(( PLANNED + base ))
  echo "== $name (limit ${limit}s$([ "$spare" -gt 0 ] && echo ": ${base}s + ${spare}s left by earlier steps"))"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/logs/$name.log" | grep --line-buffered -E '^  '
  local rc=${PIPESTATUS[0]}
  echo "$rc" > "$OUT/parts/$name.rc"
  local verdict=ok
  [ "$rc" = 0 ] || verdict="FAILED (exit $rc)"
  { [ "$rc" = 124 ] || [ "$rc" = 137 ]; } && verdict="TIMED OUT after ${limit}s"
  echo "== $name: $verdict in $(( $(date +%s) - t ))s (total $(( $(date +%s) - T0 ))s)"
}

# setup: install without network; the CUDA build comes next, in the background
if [ "$DRY" = 1 ]; then
  echo "== setup: dry run, the package is used as installed ($("$PY" -c 'import ssbsn; print(ssbsn.__file__)' 2>&1 | tail -1))"
else
  step setup 30 env SSBSN_NO_CUDA_EXT=1 "$PY" -m pip install -q --no-deps --no-build-isolation -e .
fi
# CUDA conv extension: environment from the real toolkit, then build in place in the background
exports=$("$PY" -m benchmarks.gpu_check cuda-env --out "$OUT" "${FLAG[@]}" 2>"$OUT/logs/cuda-env.log" | tee -a "$OUT/logs/cuda-env.log")
echo "$exports" | grep -v '^export ' | grep -E '^  ' || true
BUILD_PID=""
if echo "$exports" | grep -q '^export CUDA_HOME='; then
  eval "$(echo "$exports" | grep '^export ')"
  echo "== conv build: started in the background (CUDA_HOME=$CUDA_HOME, TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-auto})"
  ( timeout --kill-after=10 300 "$PY" setup.py -q build_ext --inplace > "$OUT/logs/conv-build.log" 2>&1
    echo $? > "$OUT/parts/conv-build.rc" ) &
  BUILD_PID=$!
else
  echo "== conv build: skipped ($(grep -o '"reason": "[^"]*"' "$OUT/parts/cuda-env.json" 2>/dev/null | cut -d'"' -f4))"
fi

step env 20
step correctness 90
step timing 80
step compiled 130
step train 95
if [ -n "$BUILD_PID" ]; then
  wait "$BUILD_PID"
  brc=$(cat "$OUT/parts/conv-build.rc" 2>/dev/null || echo "?")
  echo "== conv build: $([ "$brc" = 0 ] && echo ok || echo "FAILED (exit $brc): $(tail -n 3 "$OUT/logs/conv-build.log" | tr '\n' ' ')")"
fi
step conv 25
step restore 40
step denoise 70
step report 15
rc=$(cat "$OUT/parts/report.rc")
cat "$OUT/summary.md" 2>/dev/null
echo "gpu_check: done in $(( $(date +%s) - T0 ))s; $OUT/summary.md, $OUT/results.json"
if [ "$DRY" = 1 ] && [ "$rc" = 2 ]; then rc=0; fi
exit "$rc"
