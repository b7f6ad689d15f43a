#!/usr/bin/env bash
# Compile-check of the CUDA sources in csrc/ without a GPU and without a CUDA build of torch.
#
#   1. every csrc/**/*.cu with nvcc for one architecture (SSBSN_CUDA_ARCH, default sm_90),
#      nvcc and host-compiler warnings as errors; prints each kernel's registers, shared
#      memory and spills (spills are reported, not fatal);
#   2. the host emulation (csrc/emulation/*.cpp) with the host compiler, warnings as errors;
#   3. the torch binding (conv_binding.cpp), syntax only, against the installed torch's
#      headers (skipped when python or torch is missing; runs in parallel with 1 and 2).
#
# Exit status: 0 when everything compiles (or nvcc is absent: "skipped: nvcc not found"),
# non-zero on the first compile error.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
arch="${SSBSN_CUDA_ARCH:-sm_90}"

nvcc="${NVCC:-}"
if [[ -z "$nvcc" ]]; then
  for cand in "$(command -v nvcc || true)" "${CUDA_HOME:+$CUDA_HOME/bin/nvcc}" /usr/local/cuda/bin/nvcc; do
    if [[ -n "$cand" && -x "$cand" ]]; then nvcc="$cand"; break; fi
  done
fi
if [[ -z "$nvcc" ]]; then
  echo "compile_check: skipped: nvcc not found"
  exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# The toolkit's include directory (for the host-side checks), next to the real nvcc binary
# (nvcc may be a wrapper script elsewhere on the PATH).
echo '__global__ void probe() {}' > "$tmp/probe.cu"
nvcc_here="$("$nvcc" --dryrun -c "$tmp/probe.cu" -o "$tmp/probe.o" 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -n 1)"
cuda_inc=""
for cand in "${nvcc_here:+$nvcc_here/../include}" "${CUDA_HOME:+$CUDA_HOME/include}" /usr/local/cuda/include; do
  if [[ -n "$cand" && -f "$cand/cuda_fp16.h" ]]; then cuda_inc="$(cd "$cand" && pwd)"; break; fi
done
cxx="${CXX:-c++}"
total_start=$SECONDS

# 3. (in the background, it is the slowest) the binding, syntax only, against torch's headers.
python="${PYTHON:-$(command -v python3 || command -v python || true)}"
binding_cmd=""
if [[ -n "$python" ]] && torch_inc=$("$python" -c '
import sysconfig
from torch.utils.cpp_extension import include_paths
print(" ".join("-isystem " + p for p in include_paths() + [sysconfig.get_paths()["include"]]))' 2>/dev/null); then
  binding_cmd="$cxx -std=c++17 -fsyntax-only -Wall -Wextra -Werror -DTORCH_EXTENSION_NAME=check -DTORCH_API_INCLUDE_EXTENSION_H"
  # shellcheck disable=SC2086
  ( start=$SECONDS; $binding_cmd $torch_inc "$here/conv_binding.cpp" > "$tmp/binding.log" 2>&1; rc=$?
    echo "$rc $((SECONDS - start))" > "$tmp/binding.rc" ) &
  binding_pid=$!
fi

echo "compile_check: $("$nvcc" --version | tail -n 1 | sed 's/^Build //'), arch $arch"
mapfile -t cu_files < <(cd "$here" && find . -name '*.cu' | sort)
for f in "${cu_files[@]}"; do
  f="${f#./}"
  echo "compile_check: nvcc -c -std=c++17 -O3 -arch=$arch -Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror csrc/$f"
  start=$SECONDS
  if ! "$nvcc" -c -std=c++17 -O3 -arch="$arch" -Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror \
      --resource-usage -o "$tmp/out.o" "$here/$f" > "$tmp/log" 2>&1; then
    grep -v -E '^ptxas info|^ +[0-9]+ bytes stack frame' "$tmp/log" >&2 || true
    echo "compile_check: FAILED: csrc/$f" >&2
    exit 1
  fi
  # One line per kernel: registers, shared memory, spill bytes.
  awk '
    /Compiling entry function/ { name = $0; sub(/.*function \047/, "", name); sub(/\047.*/, "", name); spill = "" }
    /bytes spill stores/ { spill = $5 "+" $9 }
    /Used [0-9]+ registers/ && name != "" {
      regs = $0; sub(/.*Used /, "", regs); sub(/ registers.*/, "", regs)
      smem = "0"; if (match($0, /[0-9]+ bytes smem/)) { smem = substr($0, RSTART, RLENGTH); sub(/ bytes smem/, "", smem) }
      printf "%s\t%s\t%s\t%s\n", regs, smem, (spill == "" ? "0+0" : spill), name; name = ""
    }' "$tmp/log" > "$tmp/usage"
  if command -v c++filt > /dev/null; then
    cut -f4 "$tmp/usage" | c++filt | sed -e 's/ssbsn_conv::impl:://g' -e 's/void ssbsn_block_kernel<//' \
      -e 's/>(.*//' -e 's/__nv_bfloat16/bf16/g' -e 's/__half/f16/g' > "$tmp/names"
  else
    cut -f4 "$tmp/usage" > "$tmp/names"
  fi
  paste <(cut -f1-3 "$tmp/usage") "$tmp/names" | sort -t$'\t' -k4 |
    awk -F'\t' '{ printf "  regs %3s  smem %6s  spill(st+ld) %-7s %s\n", $1, $2, $3, $4 }'
  spills=$(awk -F'\t' '$3 != "0+0"' "$tmp/usage" | wc -l)
  echo "compile_check: ok csrc/$f ($((SECONDS - start)) s, $(wc -l < "$tmp/usage") kernels, $spills with register spills)"
done

if [[ -z "$cuda_inc" ]]; then
  echo "compile_check: host emulation and binding checks skipped: CUDA include directory not found"
else
  for f in "$here"/emulation/*.cpp; do
    echo "compile_check: $cxx -std=c++17 -O2 -Wall -Wextra -Werror -c csrc/emulation/$(basename "$f")"
    start=$SECONDS
    if ! "$cxx" -std=c++17 -O2 -Wall -Wextra -Werror -I"$cuda_inc" -c "$f" -o "$tmp/emu.o"; then
      echo "compile_check: FAILED: csrc/emulation/$(basename "$f")" >&2
      exit 1
    fi
    echo "compile_check: ok ($((SECONDS - start)) s)"
  done
fi

if [[ -z "$binding_cmd" ]]; then
  echo "compile_check: binding check skipped: python with torch not found"
else
  echo "compile_check: $binding_cmd csrc/conv_binding.cpp (torch headers)"
  wait "$binding_pid" || true
  read -r rc secs < "$tmp/binding.rc"
  if [[ "$rc" != 0 ]]; then
    cat "$tmp/binding.log" >&2
    echo "compile_check: FAILED: csrc/conv_binding.cpp" >&2
    exit 1
  fi
  echo "compile_check: ok (${secs} s, in parallel with the above)"
fi
echo "compile_check: all passed in $((SECONDS - total_start)) s"
