"""Ahead-of-time compilation of every fused-kernel configuration for a GPU target, without a GPU.

    python -m benchmarks.aot                      # attention kernels, bf16/fp16, channels_last
    python -m benchmarks.aot --all                # every kernel, every dtype, both layouts
    python -m benchmarks.aot --deterministic      # the backward kernels of deterministic mode
    python -m benchmarks.aot --json report.json   # also write the rows as JSON
    python -m benchmarks.aot --window 64          # launches of windowed groups (64 pixels)

Each row is one (kernel, tile configuration, dtype, memory layout) compiled by Triton for
``GPUTarget("cuda", 90, 32)`` (H100/H200) with the same argument specialisation a real launch
gets (the launch arguments are recorded by running the host launchers with the kernels' ``run``
replaced by a recorder; integer arguments equal to 1 become constants and multiples of 16 are
marked divisible, as Triton does, except those the kernel names in ``do_not_specialize``: the
window sizes TH, TW and the autotuning bucket stay plain i32). Reported: registers per thread,
spill stores/loads (bytes, from ptxas' own log), shared memory per block, and the types of the
runtime integer arguments (``ints``). A configuration needing more shared memory
than an sm_90 block can have (227 KB) cannot launch; one that spills is slow.

Needs ``TRITON_INTERPRET`` unset (the kernels must be built as real JIT functions): run it as
its own process (``tests/test_aot_compile.py`` does). Needs ptxas (Triton's wheel bundles one).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time

SM90_SMEM_LIMIT = 232448  # bytes of shared memory one block may use on sm_90 (227 KB)
# The budget the CI test enforces for bf16/fp16 channels_last: no configuration may spill more
# than this many bytes per thread (0 would be ideal; a few bytes of spill around the epilogue
# cost nothing measurable, whole accumulator tiles in local memory do).
SPILL_BUDGET = 0

DTYPES = ("bf16", "fp16", "fp32")
LAYOUTS = ("cl", "nchw")
ATTENTION_KERNELS = ("_ss_attn_fwd_kernel", "_ss_attn_bwd_dkdv_kernel", "_ss_attn_bwd_dq_kernel")
# the kernels that deterministic mode compiles differently (no atomics: the dq kernel's own
# loop over keys, dW's fixed-order reduction in the token pass's launch)
DETERMINISTIC_KERNELS = ("_ss_attn_bwd_dkdv_kernel", "_ss_attn_bwd_dq_kernel")


def _modules():
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("benchmarks.aot: run with TRITON_INTERPRET unset (compiled kernels)")
    import ssbsn.kernels  # noqa: F401
    return sys.modules["ssbsn.kernels.ss_attention"], sys.modules["ssbsn.kernels.token_ops"]


def record_launches(dtype: str, layout: str, shape=(4, 128, 140, 140), grid: int = 4,
                    deterministic: bool = False, window: int | None = None):
    """[(kernel object, positional args, keyword args)] of one forward + backward, in launch
    order, first launch of each kernel only. Runs the host code on empty CPU tensors."""
    import torch
    K, _ = _modules()
    tdt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
    seen: dict = {}
    with launches_recorded(lambda kernel, args, kw: seen.setdefault(id(kernel),
                                                                      (kernel, args, kw))):
        x = torch.zeros(shape, dtype=tdt).contiguous(memory_format=fmt)
        w = torch.zeros(shape[1], shape[1], dtype=tdt)
        _, o, lse, mean, rstd = K._forward(x, w, grid, False, window or 0)
        K._backward(x, x, w, o, lse, mean, rstd, grid, False, deterministic, window or 0)
    return list(seen.values())


@contextlib.contextmanager
def launches_recorded(record):
    """For the block, every kernel of ``ssbsn.kernels`` (and each autotuner's inner kernel,
    which a cached configuration launches) calls ``record(kernel, args, kwargs)`` instead of
    launching; nothing is compiled or run."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction
    K, T = _modules()
    found = [o for mod in (K, T) for o in vars(mod).values()
             if isinstance(o, (Autotuner, JITFunction))]
    found += [o.fn for o in found if isinstance(o, Autotuner)]
    saved = []
    for obj in found:
        if obj not in saved:
            saved.append(obj)

            def rec(*args, grid=None, warmup=None, _o=obj, **kw):
                record(_o, args, kw)
            obj.run = rec
    try:
        yield
    finally:
        for obj in saved:
            del obj.run  # back to the class's method


def _jit_fn(obj):
    from triton.runtime.jit import JITFunction
    while not isinstance(obj, JITFunction):
        obj = obj.fn
    return obj


def kernel_name(obj) -> str:
    return _jit_fn(obj).__name__


def configurations(obj, args, kw):
    """[(meta-parameters, num_warps, num_stages)] a launch with these arguments may use: the
    autotuner's configurations after its pruning, or the launch's own."""
    from triton.runtime.autotuner import Autotuner
    if isinstance(obj, Autotuner):
        cfgs = obj.configs
        if obj.early_config_prune:
            obj.nargs = dict(zip(obj.arg_names, args))
            cfgs = obj.early_config_prune(cfgs, obj.nargs, **kw)
            obj.nargs = None
        return [(dict(c.kwargs), c.num_warps, c.num_stages) for c in cfgs]
    return [({}, kw.get("num_warps", 4), kw.get("num_stages", 3))]


def _signature(fn, args, kw, meta):
    import torch
    names = fn.arg_names
    bound = dict(zip(names, args))
    bound.update({k: v for k, v in kw.items() if k in names})
    bound.update(meta)
    sig, const, attrs = {}, {}, {}
    tname = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
             torch.int32: "i32"}
    for i, (name, p) in enumerate(zip(names, fn.params)):
        v = bound[name]
        if p.is_constexpr:
            sig[name], const[name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[name] = "*" + tname[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # CUDA allocations are 256-byte aligned
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int) and getattr(p, "do_not_specialize", False):
            sig[name] = "i32" if abs(v) < 2 ** 31 else "i64"
        elif isinstance(v, int):
            if v == 1:  # Triton specialises integer arguments equal to 1 into constants
                sig[name], const[name] = "constexpr", 1
            else:
                sig[name] = "i32" if abs(v) < 2 ** 31 else "i64"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {name}={v!r} of unexpected type")
    return sig, const, attrs


_PTXAS = [("regs", r"Used (\d+) registers"), ("spill_stores", r"(\d+) bytes spill stores"),
          ("spill_loads", r"(\d+) bytes spill loads")]


def compile_one(obj, args, kw, meta, num_warps, num_stages, arch: int = 90) -> dict:
    """Compile one configuration for sm_<arch>; its resource usage as a dict."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn = _jit_fn(obj)
    sig, const, attrs = _signature(fn, args, kw, meta)
    row = {"kernel": fn.__name__, "config": _config_name(meta, num_warps, num_stages),
           "ints": {k: t for k, t in sig.items() if t in ("i32", "i64")}}
    log = io.StringIO()
    knobs = getattr(triton, "knobs", None)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache, _ptxas_log(knobs, cache), \
            contextlib.redirect_stdout(log):
        ck = triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    text = log.getvalue()
    for key, pat in _PTXAS:
        m = re.search(pat, text)
        row[key] = int(m.group(1)) if m else None
    if row["regs"] is None:  # no ptxas log (older triton): the cubin's resource usage
        row.update(_cuobjdump(ck.asm["cubin"]))
    row["smem"] = int(ck.metadata.shared)
    row["dots"] = dot_warps(ck.asm.get("ttgir", ""))
    row["launchable"] = row["smem"] <= SM90_SMEM_LIMIT
    return row


def dot_warps(ttgir: str) -> list[list[int]]:
    """[M, N, warps along M, warps along N] of every tensor-core product (``tt.dot`` or
    ``ttng.warp_group_dot``) in a TTGIR listing, from its result's ``nvidia_mma`` layout. A warp
    computes 16 rows of a product: warps along M × 16 > M means warps computing the same rows."""
    layouts = {m.group(1): [int(v) for v in m.group(2).split(",")] for m in re.finditer(
        r"^#(\w+) = #ttg\.nvidia_mma<\{[^}]*warpsPerCTA = \[([\d, ]+)\]", ttgir, re.M)}
    found = []
    for m in re.finditer(r"(?:tt\.dot|ttng\.warp_group_dot) .*-> tensor<(\d+)x(\d+)x\w+, #(\w+)>",
                         ttgir):
        if m.group(3) in layouts:
            dims = [int(m.group(1)), int(m.group(2))] + layouts[m.group(3)][:2]
            if dims not in found:
                found.append(dims)
    return found


@contextlib.contextmanager
def _ptxas_log(knobs, cache_dir):
    """A fresh cache (so ptxas runs) and ptxas' log printed to stdout, where the knobs exist."""
    old = os.environ.get("TRITON_CACHE_DIR")
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    nv = getattr(knobs, "nvidia", None)
    cc = getattr(knobs, "cache", None)
    prev = (getattr(nv, "dump_ptxas_log", None), getattr(cc, "dir", None))
    try:
        if nv is not None and hasattr(nv, "dump_ptxas_log"):
            nv.dump_ptxas_log = True
        if cc is not None and hasattr(cc, "dir"):
            cc.dir = cache_dir
        yield
    finally:
        if nv is not None and hasattr(nv, "dump_ptxas_log"):
            nv.dump_ptxas_log = prev[0]
        if cc is not None and hasattr(cc, "dir"):
            cc.dir = prev[1]
        if old is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = old


def _cuobjdump(cubin: bytes) -> dict:
    import shutil
    import subprocess
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    tool = tool if os.path.exists(tool) else shutil.which("cuobjdump")
    if not tool:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    if not m:
        return {}
    return {"regs": int(m.group(1)), "spill_stores": int(m.group(2)), "spill_loads": None}


def _config_name(meta, w, s) -> str:
    tiles = "x".join(str(meta[k]) for k in ("BLOCK_M", "BLOCK_N") if k in meta)
    return f"{tiles + ' ' if tiles else ''}w{w} s{s}"


def ptxas_available() -> str | None:
    """None if Triton can compile for sm_90 here, else why not."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        try:
            path = get_ptxas(90).path
        except TypeError:
            path = get_ptxas().path
        if not path or not os.path.exists(path):
            return "ptxas not found"
    except Exception as e:  # noqa: BLE001
        return f"Triton's NVIDIA backend/ptxas unavailable: {type(e).__name__}: {e}"
    return None


def report(dtypes=("bf16", "fp16"), layouts=("cl",), kernels=ATTENTION_KERNELS,
           deterministic=False, shape=(4, 128, 140, 140), grid=4, max_configs=None,
           window=None) -> list[dict]:
    rows = []
    for dt in dtypes:
        for lay in layouts:
            for obj, args, kw in record_launches(dt, lay, shape, grid, deterministic, window):
                if kernels and kernel_name(obj) not in kernels:
                    continue
                for meta, w, s in configurations(obj, args, kw)[:max_configs]:
                    row = compile_one(obj, args, kw, meta, w, s)
                    row.update(dtype=dt, layout=lay, C=shape[1], window=window,
                               mode="deterministic" if deterministic else "atomic")
                    rows.append(row)
    return rows


def table(rows) -> str:
    lines = ["| kernel | mode | config | dtype | layout | regs | spill st/ld (B) | smem (KB) | "
             "launches |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kernel']} | {r.get('mode', 'atomic')} | {r['config']} | "
                     f"{r['dtype']} | {r['layout']} | "
                     f"{r['regs']} | {r['spill_stores']}/{r['spill_loads']} | "
                     f"{r['smem'] / 1024:.0f} | {'yes' if r['launchable'] else 'NO'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--all", action="store_true", help="every kernel, dtype and layout")
    ap.add_argument("--dtypes", default="bf16,fp16")
    ap.add_argument("--layouts", default="cl")
    ap.add_argument("--channels", type=int, default=128)
    ap.add_argument("--window", type=int, default=None,
                    help="SS-Attention's window in pixels (default: whole-map groups)")
    ap.add_argument("--deterministic", action="store_true",
                    help="the backward kernels of deterministic mode (no atomics) instead")
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args(argv)
    why = ptxas_available()
    if why:
        print(f"benchmarks.aot: cannot compile for sm_90 here: {why}")
        return 3
    if a.all:
        rows = report(DTYPES, LAYOUTS, kernels=(), shape=(4, a.channels, 140, 140),
                      window=a.window)
        rows += report(DTYPES, LAYOUTS, kernels=DETERMINISTIC_KERNELS, deterministic=True,
                       shape=(4, a.channels, 140, 140), window=a.window)
    else:
        rows = report(tuple(a.dtypes.split(",")), tuple(a.layouts.split(",")),
                      kernels=DETERMINISTIC_KERNELS if a.deterministic else ATTENTION_KERNELS,
                      deterministic=a.deterministic, shape=(4, a.channels, 140, 140),
                      window=a.window)
    print(table(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
