"""The environment the CUDA extension build needs, found robustly (stdlib only: setup.py and
``benchmarks/gpu_check.py`` import it by path).

* ``CUDA_HOME``: torch guesses it from the folder of the ``nvcc`` on PATH; where that ``nvcc``
  is a wrapper script outside the toolkit the guess is wrong and the link fails on -lcudart.
  :func:`real_cuda_home` returns the directory that really holds ``bin/nvcc`` *and* the CUDA
  runtime library.
* ``TORCH_CUDA_ARCH_LIST``: without a visible GPU torch cannot ask the device which
  architecture to build for; :func:`build_env` then asks for Hopper (9.0).
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess

DEFAULT_ARCH = "9.0"  # H100/H200, the machines this package is benchmarked on


def is_toolkit(d: str | None) -> bool:
    """True if d holds bin/nvcc and a CUDA runtime library (lib64/, lib/ or targets/*/lib/)."""
    return bool(d) and os.path.isfile(os.path.join(d, "bin", "nvcc")) and any(
        glob.glob(os.path.join(d, sub, "libcudart*"))
        for sub in ("lib64", "lib", os.path.join("targets", "*", "lib")))


def _nvcc_reported_dirs(nvcc: str) -> list[str]:
    """Toolkit folders named in ``nvcc -v``'s output (``#$ TOP=…``, ``#$ _HERE_=…/bin``):
    a wrapper that execs the real nvcc shows the real paths there."""
    try:
        out = subprocess.run([nvcc, "-v", "--version"], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.SubprocessError):
        return []
    text = out.stdout + out.stderr
    dirs = []
    for key in ("TOP", "_HERE_", "CUDA_HOME"):
        for m in re.finditer(rf"#\$ {key}=(\S+)", text):
            d = os.path.realpath(m.group(1).strip("\"'"))
            dirs.append(os.path.dirname(d) if os.path.basename(d) == "bin" else d)
    return dirs


def real_cuda_home() -> tuple[str | None, str]:
    """(CUDA_HOME of the real toolkit or None, how it was found / why not)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if is_toolkit(os.environ.get(var)):
            return os.environ[var], f"${var}"
    cands = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        cands.append((os.path.dirname(os.path.dirname(real)), f"nvcc on PATH ({real})"))
        cands += [(d, f"`{nvcc} -v`") for d in _nvcc_reported_dirs(nvcc)]
    cands += [(d, "standard location") for d in
              ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    for d, how in cands:
        if is_toolkit(d):
            return d, how
    return None, "no CUDA toolkit (bin/nvcc with libcudart) found"


def build_env(gpu_visible: bool, capability: tuple[int, int] | None = None) -> dict[str, str]:
    """Variables to set for the build: CUDA_HOME (if found) and TORCH_CUDA_ARCH_LIST (if not
    set already: the visible GPU's architecture, else DEFAULT_ARCH)."""
    env = {}
    home, _ = real_cuda_home()
    if home:
        env["CUDA_HOME"] = home
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        if gpu_visible and capability:
            env["TORCH_CUDA_ARCH_LIST"] = f"{capability[0]}.{capability[1]}"
        elif not gpu_visible:
            env["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH
    return env
