"""What Inductor generates for the compiled (not interpreted) SS-Attention op on a CUDA device,
on a machine without a GPU: run as a script in a process without TRITON_INTERPRET, it lowers
one graph holding ``ssbsn::ss_attention`` and ``ssbsn::ss_attention_backward`` through
``torch._inductor.compile_fx`` on fake CUDA tensors and prints JSON: per case, the Triton
kernels the generated wrapper launches, the other calls it makes, and the autotuning configs
handed to each kernel. Nothing is compiled for or launched on a device: the generated module is
intercepted before it is loaded (which would compile the kernels with the CUDA driver).

Where torch would ask the driver (device properties, the current device, the RNG state, the
SDPA pattern library built from real tensors), an sm_90 H100's answers are given instead; the
patches are listed in ``_stub_cuda``.

    python tests/inductor_codegen.py     (used by tests/test_kernel_host.py)
"""
from __future__ import annotations

import ast
import json
import os
import re
import sys
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_trace import CASES, _stub_driver  # noqa: E402  (the cases, the sm_90 target)


class _Generated(Exception):
    """Raised instead of loading the generated module: the code is what this script wants."""


_REAL_IS_AVAILABLE = None


def _stub_cuda() -> None:
    """An H100 as far as Inductor's code generation asks; installed before torch._dynamo binds
    torch.cuda's functions. ``is_available`` stays false while fake inputs are made (true, a
    fake CUDA tensor would initialise a real context): see ``_cuda_available``."""
    import torch
    import torch.cuda.random as cuda_random
    global _REAL_IS_AVAILABLE
    _REAL_IS_AVAILABLE = torch.cuda.is_available
    props = types.SimpleNamespace(
        name="NVIDIA H100 80GB HBM3", major=9, minor=0, multi_processor_count=132,
        total_memory=80 * 2**30, warp_size=32, max_threads_per_multi_processor=2048,
        regs_per_multiprocessor=65536, max_threads_per_block=1024,
        shared_memory_per_block=49152, shared_memory_per_block_optin=232448,
        shared_memory_per_multiprocessor=233472, L2_cache_size=50 * 2**20, gcnArchName="",
        is_integrated=False, clock_rate=1980000, memory_clock_rate=2619000,
        memory_bus_width=5120, uuid="0")
    rng = torch.get_rng_state()
    torch.cuda.get_device_properties = lambda *a, **k: props
    torch.cuda.get_device_capability = lambda *a, **k: (9, 0)
    torch.cuda.get_device_name = lambda *a, **k: props.name
    torch.cuda.is_bf16_supported = lambda *a, **k: True
    torch.cuda.device_count = lambda: 1
    torch.cuda.current_device = lambda: 0
    torch.cuda.set_device = lambda *a, **k: None
    torch.cuda._lazy_init = lambda: None
    torch.cuda._exchange_device = lambda i: 0
    torch.cuda._maybe_exchange_device = lambda i: 0
    torch.cuda.get_rng_state = cuda_random.get_rng_state = lambda *a, **k: rng
    torch.cuda.set_rng_state = cuda_random.set_rng_state = lambda *a, **k: None
    import torch._inductor.fx_passes.joint_graph as joint_graph
    import torch._inductor.fx_passes.post_grad as post_grad
    import torch._subclasses.fake_tensor as fake_tensor
    fake_tensor.init_gpu_context = lambda *a, **k: None
    # the pattern libraries (SDPA fusion and others) are traced from real device tensors
    joint_graph.lazy_init = lambda *a, **k: None
    post_grad.lazy_init = lambda *a, **k: None


def _cuda_available(yes: bool) -> None:
    import torch
    torch.cuda.is_available = (lambda: True) if yes else _REAL_IS_AVAILABLE


def _intercept(store: list) -> None:
    from torch._inductor.codecache import PyCodeCache

    def load_by_key_path(key, path, *args, **kwargs):
        with open(path) as f:
            store.append(f.read())
        raise _Generated
    PyCodeCache.load_by_key_path = staticmethod(load_by_key_path)


def _launches(code: str) -> dict:
    """The wrapper's kernel launches (in order), its other calls, and per kernel the number of
    configurations its autotuner gets and the arguments it zeroes around its timed runs."""
    body = code[code.index("def call(self, args):"):]
    body = body[:body.index("\nrunner = ")] if "\nrunner = " in body else body
    launches = [m.group(1) for m in re.finditer(r"^\s+(\w+?)_\d+\.run\(", body, re.M)]
    calls = sorted({m.group(1) for m in re.finditer(
        r"^\s+(?:\w+ = )?((?:torch\.ops|aten|extern_kernels|torch)\.[\w.]+)\(", body, re.M)})
    configs, resets = {}, {}
    for m in re.finditer(r"(\w+?)_\d+ = async_compile\.triton\('\w+', '''(.*?)'''", code,
                         re.S):
        name, source = m.groups()
        c = re.search(r"user_autotune\(\s*configs=(\[.*?\]),\s*inductor_meta", source, re.S)
        if c:
            configs[name] = len(ast.literal_eval(c.group(1)))  # a list of plain dicts
        z = re.search(r"'reset_to_zero': (\([^)]*\))", source)
        if z:
            resets[name] = list(ast.literal_eval(z.group(1)))  # a tuple of names
    return {"launches": launches, "calls": calls, "configs": configs, "resets": resets}


def lower(case: dict) -> dict:
    import torch
    from torch._inductor.compile_fx import compile_fx
    from torch._subclasses.fake_tensor import FakeTensorMode

    B, C, H, W = case["shape"]
    E, g, det, window = case["E"], case["grid"], case["deterministic"], case["window"]
    dtype = getattr(torch, case["dtype"])
    fmt = torch.channels_last if case["channels_last"] else torch.contiguous_format

    def fwd_bwd(x, w, dout):
        out, o, lse, mean, rstd = torch.ops.ssbsn.ss_attention(x, w, g, False, det, window)
        dx, dw = torch.ops.ssbsn.ss_attention_backward(dout, x, w, o, lse, mean, rstd,
                                                       g, False, det, window)
        return out, dx, dw

    _cuda_available(False)
    with FakeTensorMode():
        x = torch.empty(B, C, H, W, dtype=dtype, device="cuda").contiguous(memory_format=fmt)
        dout = torch.empty_like(x)
        w = torch.empty(C, E, dtype=dtype, device="cuda")
    _cuda_available(True)
    gm = torch.fx.symbolic_trace(fwd_bwd)
    code: list = []
    _intercept(code)
    try:
        compile_fx(gm, [x, w, dout])
    except Exception as e:  # noqa: BLE001 -- Inductor wraps what the interception raises
        chain, cause = [], e
        while cause is not None:
            chain.append(cause)
            cause = cause.__cause__ or cause.__context__
        if not any(isinstance(c, _Generated) for c in chain) or not code:
            raise
    return _launches(code[-1])


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("inductor_codegen: run without TRITON_INTERPRET", file=sys.stderr)
        return 2
    _stub_driver()
    _stub_cuda()
    import torch._inductor.config as inductor_config
    import ssbsn.kernels as kernels
    assert not kernels.INTERPRET
    inductor_config.compile_threads = 1
    inductor_config.fx_graph_cache = False
    results = []
    for case in CASES:
        results.append({"case": case, **lower(case)})
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
