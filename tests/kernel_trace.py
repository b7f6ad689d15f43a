"""What torch.compile sees of the compiled (not interpreted) SS-Attention op, on a machine
without a GPU: run as a script in a process without TRITON_INTERPRET, it traces forward and
backward of ``ssbsn::ss_attention`` with AOTAutograd (the compiler's front end) on fake
tensors, and prints JSON: per case, the kernels in the forward and backward graphs, the other
graph ops, and whether the op's traced fake results match the hand-written fake kept for the
interpreter. Triton is pointed at an sm_90 target (a stub driver) so that torch can read the
kernels' TTIR to find which arguments they write; nothing is launched.

    python tests/kernel_trace.py     (used by tests/test_kernel_host.py)
"""
from __future__ import annotations

import json
import os
import sys


def _stub_driver() -> None:
    import triton
    from triton.backends.compiler import GPUTarget

    class Sm90:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    triton.runtime.driver.set_active(Sm90())


def _kernel(idx: int) -> tuple[str, int, list]:
    """(name, configurations left to the compiler's autotuner, the arguments it zeroes around
    its timed runs) of a graph's kernel."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from triton.runtime.autotuner import Autotuner
    k = kernel_side_table.get_kernel(idx)
    configs = len(k.configs) if isinstance(k, Autotuner) else 1
    reset = list(getattr(k, "reset_to_zero", None) or [])
    while hasattr(k, "fn") and not hasattr(k, "__code__"):
        k = k.fn
    return k.__name__, configs, reset


def _graph(gm) -> dict:
    kernels, configs, resets, ops = [], {}, {}, []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        name = str(node.target)
        if "triton_kernel_wrapper" in name:
            k, n, reset = _kernel(node.kwargs["kernel_idx"])
            kernels.append(k)
            configs[k] = n
            resets[k] = reset
        elif "getitem" not in name:
            ops.append(name)
    return {"kernels": kernels, "configs": configs, "resets": resets, "ops": ops}


def _meta(t) -> list:
    return [list(t.shape), str(t.dtype), list(t.stride())]


def trace(case: dict) -> dict:
    import torch
    from functorch.compile import aot_function, make_boxed_func
    from torch._subclasses.fake_tensor import FakeTensorMode

    K = sys.modules["ssbsn.kernels.ss_attention"]
    graphs = {}

    def keep(tag):
        def compiler(gm, _inputs):
            graphs[tag] = gm
            return make_boxed_func(gm.forward)
        return compiler

    B, C, H, W = case["shape"]
    E, g, det, window = case["E"], case["grid"], case["deterministic"], case["window"]
    dtype = getattr(torch, case["dtype"])
    fmt = torch.channels_last if case["channels_last"] else torch.contiguous_format
    with FakeTensorMode():
        x = torch.empty(B, C, H, W, dtype=dtype).contiguous(memory_format=fmt)
        w = torch.empty(C, E, dtype=dtype)
        x.requires_grad_()
        w.requires_grad_()
        fn = aot_function(
            lambda a, b: torch.ops.ssbsn.ss_attention(a, b, g, False, det, window)[0],
            fw_compiler=keep("forward"), bw_compiler=keep("backward"))
        fn(x, w).sum().backward()
        # the op's fake results (its launcher on fake tensors) against the interpreter's fake
        xd = x.detach()
        traced = torch.ops.ssbsn.ss_attention(xd, w.detach(), g, False, det, window)
        hand = K._fwd_fake(xd, w.detach(), g, False, det, window)
        back = torch.ops.ssbsn.ss_attention_backward(traced[0], xd, w.detach(), *traced[1:],
                                                     g, False, det, window)
        back_hand = K._bwd_fake(traced[0], xd, w.detach(), *traced[1:], g, False, det, window)
    fakes_agree = ([_meta(t) for t in traced] == [_meta(t) for t in hand]
                   and [_meta(t) for t in back] == [_meta(t) for t in back_hand])
    return {**{k: _graph(v) for k, v in graphs.items()}, "fakes_agree": fakes_agree,
            "fake_forward": [_meta(t) for t in traced]}


CASES = [
    dict(shape=(2, 32, 20, 18), E=32, grid=4, deterministic=False, window=0, dtype="bfloat16",
         channels_last=True),
    dict(shape=(1, 16, 13, 11), E=16, grid=2, deterministic=True, window=6, dtype="float32",
         channels_last=False),
]


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("kernel_trace: run without TRITON_INTERPRET (interpreted kernels cannot be traced)",
              file=sys.stderr)
        return 2
    _stub_driver()
    import ssbsn.kernels as kernels
    assert not kernels.INTERPRET
    print(json.dumps([{"case": c, **trace(c)} for c in CASES]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
