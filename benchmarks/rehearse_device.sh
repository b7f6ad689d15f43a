#!/usr/bin/env bash
# The GPU machines' versions, rehearsed on a CPU machine before a GPU session spends its minutes:
#
#     bash benchmarks/rehearse_device.sh [VENV]   # default VENV: ${TMPDIR:-/tmp}/ssbsn-device-venv
#
# CI runs torch 2.13 (CPU build) and Triton 3.9; the GPU machines run torch 2.11 (CUDA 13 build)
# and Triton 3.6 (benchmarks/results/h200/summary.md). This builds a second environment with the
# GPU machines' versions (TORCH=..., TRITON=... override them; the CUDA build of torch brings
# NVIDIA's libraries, about 4 GB from the package index) and runs on the CPU:
#   tests       the whole suite with SSBSN_SLOW_TESTS=1: the kernels under that Triton's
#               interpreter, every tile compiled for sm_90 by that Triton (tests/test_aot_compile.py),
#               the op lowered by that torch's Inductor to CUDA code (tests/test_kernel_host.py:
#               a CUDA build of torch is what lets it run), and gpu_check's dry run
#   conv build  the CUDA conv extension against that torch, for sm_90, outside the checkout
# Logs and a summary in VENV/rehearsal/. Exit status: 0 when both steps pass.
set -u
cd "$(dirname "$0")/.."
VENV=${1:-${TMPDIR:-/tmp}/ssbsn-device-venv}
TORCH=${TORCH:-2.11.0}
TRITON=${TRITON:-3.6.0}
PY=${PYTHON:-python3}
OUT=$VENV/rehearsal
T0=$(date +%s)

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV" || { echo "rehearse: cannot create a virtual environment in $VENV"; exit 1; }
fi
mkdir -p "$OUT"
echo "== setup: torch $TORCH, triton $TRITON in $VENV"
# torch's own pins first (its CUDA build and setuptools < 82 for 2.11), then the package
if ! { "$VENV/bin/python" -m pip install -q "torch==$TORCH" "triton==$TRITON" "setuptools<82" wheel \
       && SSBSN_NO_CUDA_EXT=1 "$VENV/bin/python" -m pip install -q --no-build-isolation -e ".[test]" \
            ninja pybind11; } > "$OUT/setup.log" 2>&1; then
  echo "== setup: FAILED ($(grep -v '^WARNING' "$OUT/setup.log" | tail -n 2 | tr '\n' ' '))"
  exit 1
fi
versions=$("$VENV/bin/python" -c "import torch, triton; print(torch.__version__, triton.__version__)")
echo "== setup: ok (torch, triton: $versions) in $(( $(date +%s) - T0 ))s"

t=$(date +%s)
echo "== tests (the whole suite, SSBSN_SLOW_TESTS=1)"
SSBSN_SLOW_TESTS=1 "$VENV/bin/python" -m pytest -q -rs -p no:cacheprovider > "$OUT/tests.log" 2>&1
tests_rc=$?
echo "== tests: $(tail -n 1 "$OUT/tests.log") (exit $tests_rc, $(( $(date +%s) - t ))s)"
grep -E '^(FAILED|ERROR) ' "$OUT/tests.log" | sed 's/^/   /'

t=$(date +%s)
echo "== conv build (sm_90, into $OUT/conv-build)"
# (setup.py finds CUDA_HOME of the real toolkit and asks for sm_90 without a visible GPU)
rm -rf "$OUT/conv-build"
"$VENV/bin/python" setup.py -q build_ext --build-lib "$OUT/conv-build" --build-temp "$OUT/conv-build/tmp" \
  > "$OUT/conv-build.log" 2>&1
conv_rc=$?
so=$(find "$OUT/conv-build" -maxdepth 2 -name '_C_conv*.so' 2>/dev/null | head -n 1)
if [ "$conv_rc" = 0 ] && [ -n "$so" ]; then
  echo "== conv build: ok ($(basename "$so"), $(( $(date +%s) - t ))s)"
else
  [ "$conv_rc" = 0 ] && conv_rc=1
  echo "== conv build: FAILED ($(tail -n 3 "$OUT/conv-build.log" | tr '\n' ' '))"
fi

{
  echo "# Rehearsal of the GPU machines' versions on $(uname -m), $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "commit $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo ' + uncommitted changes'); torch, triton: $versions"
  echo
  echo "- tests: $(tail -n 1 "$OUT/tests.log") (exit $tests_rc)"
  echo "- conv build: exit $conv_rc"
} > "$OUT/summary.md"
echo "rehearse: done in $(( $(date +%s) - T0 ))s; $OUT/summary.md"
[ "$tests_rc" = 0 ] && [ "$conv_rc" = 0 ]
