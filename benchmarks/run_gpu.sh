#!/usr/bin/env bash
# The LONG GPU benchmark run, for a machine you own (949 cases, ~50 torch.compile builds; an
# estimated 45-100 minutes on an H100). A short GPU session runs benchmarks/gpu_check.sh instead
# (≤ 8 minutes, the targets MET/MISSED). Split into parts that each take a few minutes (so that
# every part fits a 10-minute command limit), then merged into one report:
#
#     bash benchmarks/run_gpu.sh [OUT_DIR]        # default OUT_DIR: benchmarks/results/h100
#
# A part that fails (a wrong kernel fails its case) still leaves its JSON; the report is built
# from whatever parts exist. Run a single part with PARTS="sweep" bash benchmarks/run_gpu.sh.
set -u
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/h100}
PARTS=${PARTS:-"train sidd large sweep compile e2e"}
mkdir -p "$OUT/parts"
unset TRITON_INTERPRET
common=(--bench-size full -p no:cacheprovider -q)
for part in $PARTS; do
  case $part in
    train)   sel=(-m "attention and not compile" -k "train or tiny") ;;
    sidd)    sel=(-m "attention and not compile" -k "sidd") ;;
    large)   sel=(-m "attention and not compile" -k "large") ;;
    sweep)   sel=(-m "attention and not compile" -k "sweep") ;;
    compile) sel=(-m "compile") ;;
    e2e)     sel=(-m "not attention and not compile") ;;   # flops, e2e, conv (memtarget skips)
    *) echo "unknown part $part"; exit 2 ;;
  esac
  echo "=== part $part"
  python -m pytest benchmarks/ "${common[@]}" "${sel[@]}" \
      --benchmark-json "$OUT/parts/$part.json" 2>&1 | tail -n 80
done
python benchmarks/report.py "$OUT"/parts/*.json -o "$OUT"
