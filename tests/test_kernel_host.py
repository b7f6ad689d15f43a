"""The fused op's host path (issue #31, item 3): how many Triton launches one forward and one
backward of ``ss_attention(..., backend="triton")`` make, and that no aten compute kernel runs
inside the op (allocations and views are free; a fill, a reduction or a cast is a GPU kernel
launched from the host between ours).

Counted on the CPU: the Triton launches by a recorder around Triton's launcher
(``InterpretedFunction.run`` under the interpreter, ``JITFunction.run`` when compiled), the aten
ops by a ``TorchDispatchMode`` that also looks inside the ``ssbsn::`` custom ops. The launches'
own tensor traffic (the interpreter copies every argument to and from its host buffers) is not
the op's and is not counted.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import attention_inputs, run_grads
from memcheck import memory_checked

pytest.importorskip("triton")
import ssbsn.kernels as kernels  # noqa: E402
from ssbsn.attention import ss_attention  # noqa: E402

K = sys.modules["ssbsn.kernels.ss_attention"]

interp = pytest.mark.skipif(not kernels.INTERPRET,
                            reason="CPU tests of the kernels need TRITON_INTERPRET=1 at import")

# Budgets reached (issue #31 item 3 targets: <= 3 launches forward, <= 4 backward, no aten
# compute kernel inside the op), in both modes: deterministic mode takes the same four
# launches (the dq kernel loops over the keys instead of reading the atomics' buffer, and dW's
# fixed-order split-K reduction runs in the token pass's launch, finished by a ticket); a
# statistics unit with more than token_ops.INLINE_PARTIALS partials (large maps) takes one
# more launch each way.
FWD_LAUNCHES = ["_ln_partials_kernel", "_qhat_kernel", "_ss_attn_fwd_kernel"]
BWD_LAUNCHES = ["_qhat_kernel", "_ss_attn_bwd_dkdv_kernel", "_ss_attn_bwd_dq_kernel",
                "_ln_bwd_dx_kernel"]
BWD_LAUNCHES_DETERMINISTIC = BWD_LAUNCHES
ISSUE_TARGET = {"forward launches": 3, "backward launches": 4, "aten compute ops": 0}

# allocations launch nothing; views and aliases (func.is_view) neither
FREE_OPS = {"aten.empty.memory_format", "aten.empty_like.default", "aten.new_empty.default",
            "aten.empty_strided.default", "aten.new_empty_strided.default"}


def _is_alias(func, out, args) -> bool:
    """A view op whose result shares its input's storage (``aten.to`` is a view op that copies
    when the dtype changes, and the mode then does not see the copy inside it)."""
    if not func.is_view:
        return False
    first = out[0] if isinstance(out, (list, tuple)) and out else out
    if not isinstance(first, torch.Tensor):
        return True
    ptr = first.untyped_storage().data_ptr()
    return any(isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() == ptr
               for a in args)


class Recorder(TorchDispatchMode):
    """Triton launches (kernel names, in order) and aten compute ops inside the block."""

    def __init__(self):
        super().__init__()
        self.launches: list[str] = []
        self.aten: list[str] = []
        self._in_launch = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "ssbsn":  # run the op's implementation where this mode sees it
            impl = {"ss_attention": lambda x, w, g, gs, det, win=0: K._forward(x, w, g, gs, win),
                    "ss_attention_backward": K._backward}[func._opname]
            with self:
                return impl(*args, **kwargs)
        out = func(*args, **kwargs)
        if not self._in_launch and str(func) not in FREE_OPS and not _is_alias(func, out, args):
            self.aten.append(str(func))
        return out

    @contextlib.contextmanager
    def launches_recorded(self):
        from triton.runtime.jit import JITFunction
        classes = [JITFunction]
        try:
            from triton.runtime.interpreter import InterpretedFunction
            classes.append(InterpretedFunction)
        except ImportError:  # pragma: no cover
            pass
        originals = {cls: cls.__dict__["run"] for cls in classes if "run" in cls.__dict__}

        def wrap(orig):
            def run(fn_self, *args, **kw):
                name = getattr(fn_self, "__name__", None) or fn_self.fn.__name__
                self.launches.append(name)
                self._in_launch += 1
                try:
                    return orig(fn_self, *args, **kw)
                finally:
                    self._in_launch -= 1
            return run

        for cls, orig in originals.items():
            cls.run = wrap(orig)
        try:
            with self:
                yield self
        finally:
            for cls, orig in originals.items():
                cls.run = orig


def _record(fn):
    rec = Recorder()
    with rec.launches_recorded():
        result = fn()
    return rec, result


def _fwd_bwd(x, w, grid, **kw):
    """The launches and aten ops of one fwd+bwd, recorded after a first one: a shape's first
    call tunes the kernels (the autotuner runs every configuration and zeroes the atomics
    buffer around the runs: Triton 3.6 does so even for the interpreter's single one)."""
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    first = ss_attention(x, w, grid, backend="triton", **kw)
    torch.autograd.grad(first, (x, w), torch.randn_like(first))
    fwd, out = _record(lambda: ss_attention(x, w, grid, backend="triton", **kw))
    go = torch.randn_like(out)
    bwd, grads = _record(lambda: torch.autograd.grad(out, (x, w), go))
    return fwd, bwd, out, grads


def _report(fwd, bwd):
    return (f"forward: {len(fwd.launches)} launches {fwd.launches}, aten {fwd.aten}; "
            f"backward: {len(bwd.launches)} launches {bwd.launches}, aten {bwd.aten}; "
            f"issue #31 target {ISSUE_TARGET}")


def _run_compiled(args: list, timeout: int, **env):
    """``python *args`` from the checkout in a process without Triton's interpreter (the
    kernels compiled, not interpreted), with ``env`` added; checked for exit status 0."""
    import os
    import subprocess
    root = Path(__file__).resolve().parents[1]
    full = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    full["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), full.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, *args], cwd=root, capture_output=True, text=True,
                         env={**full, **env}, timeout=timeout)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def _traced_cases(script: str, timeout: int) -> list:
    """The JSON list a tests/ script (kernel_trace.py, inductor_codegen.py) prints for its two
    cases, run by :func:`_run_compiled` without a visible GPU."""
    import json
    run = _run_compiled([str(Path(__file__).with_name(script))], timeout,
                        CUDA_VISIBLE_DEVICES="")
    results = json.loads(run.stdout)
    assert len(results) == 2
    return results


def _case_class(case: dict) -> str:
    """The operand class (tile lists) of a traced case of tests/kernel_trace.py."""
    T = sys.modules["ssbsn.kernels.token_ops"]
    return K.operand_class(getattr(torch, case["dtype"]), T.block_dim(case["shape"][1]),
                           T.block_dim(case["E"]))


@interp
@pytest.mark.parametrize("xdtype,group_stats,window,fmt", [
    (torch.float32, False, None, torch.channels_last),
    (torch.bfloat16, True, None, torch.contiguous_format),  # autocast: bf16 x, fp32 W
    (torch.float16, False, 6, torch.channels_last),         # windowed groups
])
def test_launches_and_no_aten_compute(xdtype, group_stats, window, fmt):
    x64, w64 = attention_inputs((2, 16, 9, 7))
    x = x64.to(xdtype).contiguous(memory_format=fmt)
    fwd, bwd, _, grads = _fwd_bwd(x, w64.float(), 2, group_stats=group_stats, window=window)
    report = _report(fwd, bwd)
    assert fwd.launches == FWD_LAUNCHES, report
    assert bwd.launches == BWD_LAUNCHES, report
    assert fwd.aten == [] and bwd.aten == [], report
    assert grads[1].dtype == torch.float32


@interp
def test_deterministic_launches_and_no_aten_compute():
    x64, w64 = attention_inputs((1, 16, 9, 7))
    fwd, bwd, _, _ = _fwd_bwd(x64.float(), w64.float(), 4, deterministic=True)
    report = _report(fwd, bwd)
    assert fwd.launches == FWD_LAUNCHES, report
    assert bwd.launches == BWD_LAUNCHES_DETERMINISTIC, report
    assert fwd.aten == [] and bwd.aten == [], report


@interp
@pytest.mark.parametrize("dw_atomics", [False, True])
def test_half_w_and_the_cast_of_dw(monkeypatch, dw_atomics):
    """W in half precision: the fixed-order dW reduction writes dW in W's dtype (no aten op);
    with DW_ATOMICS, dW is accumulated by fp32 atomics and comes back through one cast (the
    only aten compute op). An fp32 W (a model's parameter under autocast) has none either way."""
    monkeypatch.setattr(sys.modules["ssbsn.kernels.token_ops"], "DW_ATOMICS", dw_atomics)
    x64, w64 = attention_inputs((1, 16, 9, 7))
    fwd, bwd, _, grads = _fwd_bwd(x64.half(), w64.half(), 4)
    assert fwd.aten == [] and bwd.aten == (["aten.to.dtype"] if dw_atomics else []), \
        _report(fwd, bwd)
    assert grads[1].dtype == torch.float16


def test_recorder_sees_aten_compute_and_launches():
    """The recorder is not blind: the SDPA path's ops are counted, and so is a launch."""
    x, w = torch.randn(1, 8, 6, 6), torch.randn(8, 8)
    rec, _ = _record(lambda: ss_attention(x, w, 2, backend="sdpa"))
    assert len(rec.aten) > 5 and rec.launches == []
    if kernels.INTERPRET:
        rec, _ = _record(lambda: K._forward(x, w, 2, False))
        assert rec.launches == FWD_LAUNCHES and rec.aten == []


@interp
def test_fp32_w_with_half_x_matches_half_w():
    """W is rounded to x's dtype inside the kernels: an fp32 W gives the output of W rounded
    beforehand, and dW (fp32-accumulated, in W's dtype) matches the half-W gradient."""
    x64, w64 = attention_inputs((1, 16, 9, 7))
    x = x64.to(torch.bfloat16)
    go = torch.randn_like(x)
    fn = lambda a, b: kernels.ss_attention(a, b, 4)  # noqa: E731
    out32, dx32, dw32 = run_grads(fn, x, w64.float(), go)
    out16, dx16, dw16 = run_grads(fn, x, w64.to(torch.bfloat16), go)
    assert dw32.dtype == torch.float32 and dw16.dtype == torch.bfloat16
    assert torch.equal(out32, out16) and torch.equal(dx32, dx16)
    torch.testing.assert_close(dw32.to(torch.bfloat16), dw16, rtol=0, atol=0)


@interp
def test_unused_output_gradient():
    """The op's statistics outputs get no gradients and the output's may be missing: the
    backward returns no gradient rather than filling zeros."""
    x = torch.randn(1, 16, 6, 5, requires_grad=True)
    w = torch.randn(16, 16, requires_grad=True)
    out, o, lse, mean, rstd = torch.ops.ssbsn.ss_attention(x, w, 4, False, False, 0)
    assert not (o.requires_grad or lse.requires_grad or mean.requires_grad or rstd.requires_grad)
    (out.sum() * 0).backward()
    assert x.grad is not None and torch.count_nonzero(x.grad) == 0


@interp
def test_autotuned_launch_skips_the_autotuner_once_cached(monkeypatch):
    """After a key's first launch the configuration comes from the host's cache: the
    autotuner (and its per-call key construction) is not entered again for that bucket."""
    monkeypatch.setattr(K, "_CONFIGS", {})
    w = torch.randn(16, 16)
    kernels.ss_attention(torch.randn(1, 16, 24, 24), w, 4)  # bucket 64: tuned

    def refuse(*args, **kwargs):
        raise AssertionError("autotuner entered for a cached key")

    monkeypatch.setattr(K._ss_attn_fwd_kernel, "run", refuse)
    out = kernels.ss_attention(torch.randn(1, 16, 28, 28), w, 4)  # N = 49: same bucket
    assert out.shape == (1, 16, 28, 28)
    with pytest.raises(AssertionError, match="autotuner entered"):
        kernels.ss_attention(torch.randn(1, 16, 20, 20), w, 4)  # N = 25: a new bucket


@interp
@pytest.mark.parametrize("group_stats", [False, True])
def test_many_partials_take_one_combine_launch(monkeypatch, group_stats):
    """A statistics unit with more partials than ``INLINE_PARTIALS`` (large maps, many windows)
    has them combined by one more launch each way instead of by every program: still no aten
    compute, and the same results as the programs' own combination."""
    T = sys.modules["ssbsn.kernels.token_ops"]
    x64, w64 = attention_inputs((1, 16, 13, 11))
    x, w = x64.float().contiguous(memory_format=torch.channels_last), w64.float()
    go = torch.randn_like(x)
    fn = lambda a, b: kernels.ss_attention(a, b, 4, group_stats=group_stats)  # noqa: E731
    inline = run_grads(fn, x, w, go)
    monkeypatch.setattr(T, "INLINE_PARTIALS", 0)
    with memory_checked() as violations:  # the combine launches in bounds, on written memory
        combined = run_grads(fn, x, w, go)
    assert not violations, "\n".join(map(str, violations))
    for a, b in zip(combined, inline):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    fwd, bwd, _, _ = _fwd_bwd(x, w, 4, group_stats=group_stats)
    report = _report(fwd, bwd)
    assert fwd.launches == (FWD_LAUNCHES[:1] + ["_combine_partials_kernel"]
                            + FWD_LAUNCHES[1:]), report
    assert bwd.launches == (BWD_LAUNCHES[:3] + ["_combine_partials_kernel"]
                            + BWD_LAUNCHES[3:]), report
    assert fwd.aten == [] and bwd.aten == [], report


def test_compiler_traces_the_kernels():
    """With compiled kernels the op is a ``torch.library.triton_op``: torch.compile's front end
    (AOTAutograd, on fake tensors; tests/kernel_trace.py, in a process without the interpreter
    and a stub sm_90 driver) sees the kernels themselves, the same launches as eager in both
    modes, allocations and nothing else (dW in W's dtype from its fixed-order reduction), the
    attention kernels with their operand class's tile list left for the compiler to tune; and
    the op's fake results (its launcher on fake tensors) match the hand-written fake that the
    interpreter's opaque op keeps."""
    for r in _traced_cases("kernel_trace.py", 300):
        case = r["case"]
        fw, bw = r["forward"], r["backward"]
        assert fw["kernels"] == FWD_LAUNCHES, r
        assert bw["kernels"] == (BWD_LAUNCHES_DETERMINISTIC if case["deterministic"]
                                 else BWD_LAUNCHES), r
        assert set(fw["ops"]) <= FREE_OPS, fw["ops"]
        assert set(bw["ops"]) <= FREE_OPS, bw["ops"]
        cls, det = _case_class(case), case["deterministic"]
        for kind, graph in (("fwd", fw), ("bwd_dkdv", bw), ("bwd_dq", bw)):
            assert graph["configs"][f"_ss_attn_{kind}_kernel"] == len(K.tiles(kind, cls, det))
        # the compiler's autotuner zeroes the atomics' buffer around its timed runs
        assert bw["resets"]["_ss_attn_bwd_dkdv_kernel"] == ["DQA"], bw["resets"]
        assert all(not v for k, v in {**fw["resets"], **bw["resets"]}.items()
                   if k != "_ss_attn_bwd_dkdv_kernel"), (fw["resets"], bw["resets"])
        assert r["fakes_agree"], r["fake_forward"]


@pytest.mark.skipif(not torch.version.cuda,
                    reason="Inductor's CUDA code generation needs a CUDA build of torch (no GPU)")
def test_inductor_launches_the_kernels():
    """Inductor, the compiler's back end, lowers a graph of the op's forward and backward on
    CUDA tensors (tests/inductor_codegen.py: fake tensors, a stub H100, the generated module
    read and not loaded) to a wrapper that launches our 3 + 4 kernels itself, in eager's order,
    with nothing between them but allocations: no fallback to the op, no kernel of its own. It
    hands each attention kernel its operand class's tile list to tune, and the key-tile kernel
    the buffer its atomics add into, to zero around its timed runs."""
    for r in _traced_cases("inductor_codegen.py", 600):
        case = r["case"]
        assert r["launches"] == FWD_LAUNCHES + (
            BWD_LAUNCHES_DETERMINISTIC if case["deterministic"] else BWD_LAUNCHES), r
        assert set(r["calls"]) <= {"torch.cuda.set_device"}, r["calls"]
        for kind in ("fwd", "bwd_dkdv", "bwd_dq"):
            assert r["configs"][f"_ss_attn_{kind}_kernel"] == len(
                K.tiles(kind, _case_class(case), case["deterministic"])), r
        assert r["resets"] == {"_ss_attn_bwd_dkdv_kernel": ["DQA"]}, r["resets"]


def test_inductor_code_reader_sees_fallbacks_and_own_kernels():
    """The reader of test_inductor_launches_the_kernels on a wrapper where Inductor fell back
    to the opaque op and added a kernel of its own: both are reported."""
    import inductor_codegen
    code = ("k_0 = async_compile.triton('k', '''\n@triton_heuristics.user_autotune(\n"
            "    configs=[{'BLOCK_M': 64}, {'BLOCK_M': 128}],\n    inductor_meta={},\n"
            "    triton_meta={'reset_to_zero': ('DQA',)})\n''')\n"
            "class Runner:\n    def call(self, args):\n"
            "        buf0 = torch.ops.ssbsn.ss_attention.default(arg0_1, arg1_1, 4)\n"
            "        triton_poi_fused_add_0.run(buf0, stream=stream0)\n"
            "        k_0.run(buf0, stream=stream0)\n"
            "        buf2 = extern_kernels.mm(buf0, arg1_1)\n"
            "\nrunner = Runner(partitions=[])\n")
    got = inductor_codegen._launches(code)
    assert got["launches"] == ["triton_poi_fused_add", "k"]
    assert got["calls"] == ["extern_kernels.mm", "torch.ops.ssbsn.ss_attention.default"]
    assert got["configs"] == {"k": 2}
    assert got["resets"] == {"k": ["DQA"]}


def test_compiled_host_path_without_a_gpu(tmp_path):
    """benchmarks/host_time.py: the compiled kernels' host path (no interpreter; launches
    recorded, nothing run; configurations from the eager cache after a bucket's first call) on
    a CPU: the same 3 + 4 launches per forward + backward in both modes, and a time."""
    import json
    out = tmp_path / "host.json"
    _run_compiled(["-m", "benchmarks.host_time", "--shape", "2", "32", "24", "20", "--reps",
                   "5", "--json", str(out)], 300)
    rows = json.loads(out.read_text())["rows"]
    assert [r["deterministic"] for r in rows] == [False, True]
    for r in rows:
        budget = len(FWD_LAUNCHES) + len(BWD_LAUNCHES_DETERMINISTIC if r["deterministic"]
                                         else BWD_LAUNCHES)
        assert r["launches"] == budget and r["median_us"] > 0, r
