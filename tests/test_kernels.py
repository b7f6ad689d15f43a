"""Fused Triton SS-Attention (ssbsn.kernels) against the reference, forward and both gradients.

CPU tests run the kernels under Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py):
small ragged shapes, few groups (the interpreter runs programs one by one). GPU tests
(``-m gpu``) need CUDA and compiled kernels (run them with TRITON_INTERPRET=0).

Accuracy rule (FlashAttention-3's): with the oracle computed in float64, the kernel's error
must be at most twice the error of the same-dtype PyTorch reference, plus a tiny absolute slack.
"""
from __future__ import annotations

import math
import sys

import pytest
import torch

from ssbsn.attention.common import (from_window_groups, materialised_attention, softmax_scale,
                                    to_window_groups, window_queries)
from ssbsn.attention.reference import ss_attention_reference

from helpers import attention_inputs, run_grads
from memcheck import memory_checked, program_order

pytest.importorskip("triton")
import ssbsn.kernels as kernels  # noqa: E402

K = sys.modules["ssbsn.kernels.ss_attention"]
T = sys.modules["ssbsn.kernels.token_ops"]

interp = pytest.mark.skipif(not kernels.INTERPRET,
                            reason="CPU tests of the kernels need TRITON_INTERPRET=1 at import")
GPU_REASON = ("needs a CUDA device" if not torch.cuda.is_available() else
              "GPU tests need compiled kernels: run with TRITON_INTERPRET=0")
requires_gpu = pytest.mark.skipif(not torch.cuda.is_available() or kernels.INTERPRET,
                                  reason=GPU_REASON)


# ---------------------------------------------------------------------------------------------
# helpers (run_grads, attention_inputs: tests/helpers.py)
# ---------------------------------------------------------------------------------------------
def _fa3_check(ours, same, oracle, names=("out", "dx", "dw"), factor=2.0, slack=2e-6):
    for name, a, r, o in zip(names, ours, same, oracle):
        assert a.dtype == r.dtype, f"{name}: dtype {a.dtype} != {r.dtype}"
        scale = o.abs().max().item()
        err = (a.double() - o).abs().max().item()
        base = (r.double() - o).abs().max().item()
        assert math.isfinite(err) and err <= factor * base + slack * scale + 1e-12, \
            f"{name}: kernel error {err:.3e} > {factor}× reference error {base:.3e} (scale {scale:.3g})"


def _same_dtype_reference(grid, group_stats, per_group=False):
    """The error yardstick of the FA3 rule: SS-Attention's PyTorch math in the input dtype
    (``ssbsn.attention.common.materialised_attention``: q̂'s normalisation in fp32, padded tokens
    without gradient — the plain reference is NaN in fp16 on ragged shapes, where 1e-8 rounds
    to 0). per_group: one group at a time under activation checkpointing, so that large N
    (17.7k tokens: 2.5 GB per fp64 N×N matrix) fits."""
    return lambda x, w: materialised_attention(x, w, grid, group_stats, per_group)


def _windowed_same_dtype_reference(grid, group_stats, window):
    """The FA3 rule's yardstick for windowed groups: the materialised math of
    :func:`_same_dtype_reference`, one window block at a time (q̂ from
    ``common.window_queries``: fp32 normalisation, padded tokens without gradient)."""
    def fn(x, w):
        outs = []
        for q, v in zip(window_queries(x, w, grid, window, group_stats),
                        to_window_groups(x, grid, window)):
            a = torch.softmax((1.0 + q @ q.transpose(-1, -2)) * softmax_scale(w.shape[1]), dim=-1)
            outs.append(a @ v)
        return x + from_window_groups(outs, x.shape[0], *x.shape[-2:], grid, window)
    return fn


def _compare(x64, w64, grid, group_stats, dtype, memory_format, *, deterministic=False,
             per_group=False, window=None):
    """Kernel vs same-dtype reference vs fp64 oracle, forward and both gradients."""
    if per_group:
        oracle_fn = _same_dtype_reference(grid, group_stats, per_group=True)
    else:
        oracle_fn = lambda a, b: ss_attention_reference(  # noqa: E731
            a, b, grid, group_stats=group_stats, window=window)
    same_fn = (_same_dtype_reference(grid, group_stats, per_group) if window is None else
               _windowed_same_dtype_reference(grid, group_stats, window))
    go64 = torch.randn_like(x64)
    oracle = run_grads(oracle_fn, x64, w64, go64)
    x = x64.to(dtype).contiguous(memory_format=memory_format)
    w, go = w64.to(dtype), go64.to(dtype)
    same = run_grads(same_fn, x, w, go)
    ours = run_grads(lambda a, b: kernels.ss_attention(a, b, grid, group_stats=group_stats,
                                                  deterministic=deterministic, window=window),
                     x, w, go)
    assert ours[0].stride() == x.stride(), "output must keep the input's memory layout"
    _fa3_check(ours, same, oracle)
    return ours


NCHW, CL = torch.contiguous_format, torch.channels_last


@pytest.fixture(autouse=True)
def _memory_checked():
    """Every interpreted launch of every test here under tests/memcheck.py: no load, store or
    atomic outside the launch's tensors, every torch.empty NaN-filled, so that a result built
    on memory no kernel wrote fails the test's own comparison, and each launch's programs
    shuffled (one order per grid shape, so that repeated runs repeat their bits), as a GPU may
    order them."""
    if not kernels.INTERPRET:
        yield
        return
    with memory_checked() as violations, program_order("shuffled"):
        yield
    assert not violations, "\n".join(map(str, violations[:10]))


# ---------------------------------------------------------------------------------------------
# CPU (interpreter)
# ---------------------------------------------------------------------------------------------
@interp
@pytest.mark.parametrize("shape,grid,dtype,fmt,group_stats", [
    ((1, 16, 37, 29), 4, torch.float32, NCHW, False),   # N = 80: several tiles per loop
    ((1, 16, 50, 45), 6, torch.float32, CL, True),      # N = 72, g = 6, ragged both ways
    ((2, 16, 13, 11), 4, torch.float16, CL, False),     # B > 1, fp16
    ((1, 32, 37, 29), 6, torch.float16, NCHW, True),    # sides not multiples of g: partial groups
    ((2, 16, 7, 5), 4, torch.float32, NCHW, True),      # tiny ragged, B > 1
    ((2, 16, 1, 1), 4, torch.float32, CL, False),       # one real token, 15 empty groups
    ((1, 16, 1, 1), 6, torch.float16, NCHW, True),
    ((1, 128, 8, 9), 4, torch.float32, CL, False),      # C = 128
    ((1, 16, 13, 11), 4, torch.bfloat16, CL, True),     # bf16 (dots upcast in the interpreter)
])
def test_matches_reference(shape, grid, dtype, fmt, group_stats):
    x64, w64 = attention_inputs(shape)
    _compare(x64, w64, grid, group_stats, dtype, fmt)


@interp
@pytest.mark.parametrize("shape,grid,window,dtype,fmt,group_stats", [
    # few groups (the interpreter runs programs one by one), so mostly g = 2. T = 4 on 7 × 6
    # tokens: last windows ragged both ways (4 + 3 rows, 4 + 2 columns); H and W not multiples
    # of g: padded tokens in the bottom/right windows
    ((1, 16, 13, 11), 2, 8, torch.float32, NCHW, False),
    # B > 1 (sample-outermost groups), T = 3 on 6 × 5: 3 + 3 rows, 3 + 2 columns
    ((2, 16, 11, 9), 2, 6, torch.float32, CL, True),
    # g = 3, T = 3 on 4 × 5: 3 + 1 rows, 3 + 2 columns
    ((1, 16, 11, 13), 3, 7, torch.float32, NCHW, True),
    # window < g: T = 1, one token per group on 3 × 2; phase 1 has no real token in the last
    # window row and column (all-padded groups)
    ((1, 16, 5, 3), 2, 1, torch.float32, CL, False),
    # rows split only (T = 3 ≥ Wt = 3; 3 + 3 + 3 + 1 rows), fp16, per-window statistics
    ((1, 16, 19, 6), 2, 6, torch.float16, NCHW, True),
    # columns split only (3 + 3 + 2), bf16 (dots upcast in the interpreter)
    ((1, 32, 6, 15), 2, 6, torch.bfloat16, CL, True),
])
def test_windowed_matches_reference(shape, grid, window, dtype, fmt, group_stats):
    x64, w64 = attention_inputs(shape)
    _compare(x64, w64, grid, group_stats, dtype, fmt, window=window)


@interp
def test_window_covering_the_map_is_whole_map():
    """A window at least the map's size (T ≥ Ht and T ≥ Wt) runs exactly the whole-map kernels."""
    x64, w64 = attention_inputs((1, 16, 9, 7))  # g = 2: 5 × 4 tokens per phase
    x, w = x64.float().contiguous(memory_format=CL), w64.float()
    go = torch.randn_like(x)
    fn = lambda window: lambda a, b: kernels.ss_attention(  # noqa: E731
        a, b, 2, group_stats=True, deterministic=True, window=window)
    whole = run_grads(fn(None), x, w, go)
    for window in (9, 1000):  # T = 5 = Ht; far past the map
        for a, b in zip(run_grads(fn(window), x, w, go), whole):
            assert torch.equal(a, b)


def test_window_geometry():
    """Geometry's window sizes and per-group real-token counts against the reference grouping
    (``common.to_window_groups`` of a map of ones), in the kernels' group order."""
    from ssbsn.attention.common import window_blocks
    for H, W, g, window in [(13, 11, 2, 8), (11, 13, 3, 7), (5, 3, 2, 1), (6, 5, 4, 3),
                            (19, 6, 2, 6), (6, 15, 2, 6), (13, 11, 4, None), (13, 11, 4, 1000)]:
        geo = T.Geometry(torch.empty(2, 1, H, W), torch.empty(1, 1), g, window)
        Ht, Wt = -(-H // g), -(-W // g)
        assert geo.NB == max(th * tw for _, _, th, _, _, tw in window_blocks(H, W, g, window))
        assert (geo.NWH * geo.TH >= Ht > (geo.NWH - 1) * geo.TH
                and geo.NWW * geo.TW >= Wt > (geo.NWW - 1) * geo.TW)
        counts = torch.zeros(geo.NWH, geo.NWW, g, g, dtype=torch.long)
        ones = torch.ones(1, 1, H, W)
        for blk, (r0, nr, th, c0, nc, tw) in zip(to_window_groups(ones, g, window),
                                                  window_blocks(H, W, g, window)):
            n = blk.sum(dim=(1, 2)).long().view(nr, nc, g, g)
            counts[r0 // geo.TH:r0 // geo.TH + nr, c0 // geo.TW:c0 // geo.TW + nc] = n
        assert torch.equal(geo.real_counts("cpu"), counts.reshape(-1)), (H, W, g, window)


@interp
def test_embed_differs_from_channels():
    x64, w64 = attention_inputs((1, 16, 12, 10), embed=24)
    _compare(x64, w64, 4, False, torch.float32, NCHW)


@interp
def test_arbitrary_strides():
    """A non-dense view of a larger map (strided in C and W) is read in place."""
    x64, _ = attention_inputs((1, 32, 14, 22))
    _, w64 = attention_inputs((1, 16, 1, 1))
    xv = x64.float()[:, ::2, :, 1::2]
    assert not xv.is_contiguous() and not xv.is_contiguous(memory_format=CL)
    go = torch.randn(xv.shape)
    ours = run_grads(lambda a, b: kernels.ss_attention(a, b, 4), xv, w64.float(), go)
    ref = run_grads(lambda a, b: ss_attention_reference(a, b, 4), xv.double(), w64, go.double())
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-5)


@interp
@pytest.mark.parametrize("shape,grid,window", [((1, 16, 21, 19), 4, None),
                                               ((1, 16, 13, 11), 2, 10)])  # 5 + 2 by 5 + 1 tokens
def test_deterministic_bitwise(shape, grid, window):
    """Deterministic mode gives the same bits whatever order the programs run in (a GPU runs
    them in any order: here the interpreter's order and the reverse); the default mode, its
    programs in a random order, agrees to rounding."""
    x64, w64 = attention_inputs(shape)
    x = x64.float().contiguous(memory_format=CL)
    w = w64.float()
    go = torch.randn_like(x)
    fn = lambda a, b: kernels.ss_attention(  # noqa: E731
        a, b, grid, deterministic=True, window=window)
    first = run_grads(fn, x, w, go)
    with program_order("reversed"):
        second = run_grads(fn, x, w, go)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    with program_order(seed=sum(shape)):  # another order for every launch
        atomic = run_grads(lambda a, b: kernels.ss_attention(a, b, grid, window=window), x, w, go)
    for a, b in zip(first, atomic):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _oracle_lse(x, w, grid, window):
    """Per group (in the kernels' order: sample, window row, window column, phase) the
    natural-log logsumexp over the keys of the logits (1 + q̂_i·q̂_j)/√E of each real token i,
    padded keys (logit 1/√E) included: docs/ss_attention.md read directly, in float64."""
    x, w = x.double(), w.double()
    B, C, H, W = x.shape
    E = w.shape[1]
    mu = x.mean(dim=(1, 2, 3), keepdim=True)
    y = (x - mu) / torch.sqrt(x.var(dim=(1, 2, 3), unbiased=False, keepdim=True) + 1e-5)
    Ht, Wt = -(-H // grid), -(-W // grid)
    TH, TW, NWH, NWW = T.window_sizes(H, W, grid, window)
    out = []
    for b in range(B):
        for r in range(NWH):
            for k in range(NWW):
                th, tw = min(Ht - r * TH, TH), min(Wt - k * TW, TW)
                for a in range(grid):
                    for c in range(grid):
                        ph = y[b, :, a::grid, c::grid][:, r * TH:r * TH + th, k * TW:k * TW + tw]
                        tok = ph.reshape(C, -1).T  # real tokens, row-major: the kernels' rows
                        q = tok @ w
                        q = q / (q.norm(dim=1, keepdim=True) + 1e-8)
                        logits = (1.0 + q @ q.T) / math.sqrt(E)
                        n_pad = th * tw - tok.shape[0]
                        pad = torch.full((tok.shape[0], n_pad), 1.0 / math.sqrt(E),
                                         dtype=torch.float64)
                        out.append(torch.logsumexp(torch.cat([logits, pad], 1), dim=1))
    return out


@interp
@pytest.mark.parametrize("shape,grid,window", [((2, 16, 13, 11), 4, None),  # padded, B > 1
                                               ((1, 16, 13, 11), 2, 8)])    # ragged windows
def test_forward_saves_the_logsumexp(shape, grid, window):
    """The forward's saved statistic is the log2-domain LSE of the oracle's logits per query
    row (the backward recomputes P = exp2(logits·log2 e − LSE) from it), 0 past the real
    tokens of a group."""
    x64, w64 = attention_inputs(shape)
    out, o, lse, _, _ = torch.ops.ssbsn.ss_attention(x64.float(), w64.float(), grid, False,
                                                     False, window or 0)
    assert torch.equal(out, (x64.float() + o))  # o: the attention output before the residual
    want = _oracle_lse(x64, w64, grid, window)
    assert lse.shape[0] == len(want)
    for row, ref in zip(lse, want):
        n = ref.shape[0]
        torch.testing.assert_close(row[:n].double() * math.log(2.0), ref, rtol=0, atol=2e-6)
        assert torch.count_nonzero(row[n:]) == 0


@interp
@pytest.mark.parametrize("shape,grid,window,dtype,fmt,dw_atomics", [
    ((1, 16, 37, 29), 4, None, torch.float32, NCHW, False),  # N = 80: several key, query tiles
    ((2, 16, 13, 11), 4, None, torch.float16, CL, False),
    ((1, 16, 13, 11), 2, 8, torch.bfloat16, CL, False),      # ragged windows, padded tokens
    ((2, 16, 13, 11), 4, None, torch.bfloat16, CL, True),    # dW by atomics (DW_ATOMICS)
])
def test_atomic_and_deterministic_paths_agree(monkeypatch, shape, grid, window, dtype, fmt,
                                              dw_atomics):
    """The default backward (the query half of dq̂ by atomics from the key-tile kernel; dW by
    the fixed-order reduction, or by atomics with DW_ATOMICS) and the deterministic one (the
    dq kernel's own loop over keys) each pass the FA3 rule against the fp64 oracle, give the
    same output bits, and differ from each other by at most the FA3 rule's allowance (twice
    the same-dtype reference's error)."""
    monkeypatch.setattr(T, "DW_ATOMICS", dw_atomics)
    x64, w64 = attention_inputs(shape)
    torch.manual_seed(0)  # the same upstream gradient in the three runs
    det = _compare(x64, w64, grid, False, dtype, fmt, deterministic=True, window=window)
    torch.manual_seed(0)
    atomic = _compare(x64, w64, grid, False, dtype, fmt, window=window)
    assert torch.equal(det[0], atomic[0])
    torch.manual_seed(0)
    go64 = torch.randn_like(x64)
    oracle_fn = lambda a, b: ss_attention_reference(a, b, grid, window=window)  # noqa: E731
    same_fn = (_same_dtype_reference(grid, False) if window is None else
               _windowed_same_dtype_reference(grid, False, window))
    oracle = run_grads(oracle_fn, x64, w64, go64)
    x = x64.to(dtype).contiguous(memory_format=fmt)
    same = run_grads(same_fn, x, w64.to(dtype), go64.to(dtype))
    for name, a, b, r, o in zip(("dx", "dw"), det[1:], atomic[1:], same[1:], oracle[1:]):
        gap = (a.double() - b.double()).abs().max().item()
        base = (r.double() - o).abs().max().item()
        assert gap <= 2.0 * base + 2e-6 * o.abs().max().item(), f"{name}: {gap:.3e} vs {base:.3e}"


@interp
@pytest.mark.parametrize("deterministic", [False, True])
def test_autotuning_leaves_the_gradients_alone(monkeypatch, deterministic):
    """The first backward of a shape tunes the backward kernels as on a GPU: two configurations
    each, every timed run executed on the real arguments (3 runs a configuration). Its dx and dW
    equal those of the next call, which launches the tuned configurations directly; the kernel
    that adds the query half of dq̂ into a buffer by atomics must not leave the timed runs' sums
    there."""
    runs = []

    def bench(kernel_call, quantiles=None):
        for _ in range(3):
            kernel_call()
        runs.append(1)
        return [float(len(runs))] * 3  # the first configuration timed is the fastest

    def two_configs(configs, nargs, **kw):
        small = [c for c in configs if c.kwargs["BLOCK_M"] <= 32 and c.kwargs["BLOCK_N"] == 16]
        return small[:2]

    for kernel in (K._ss_attn_bwd_dkdv_kernel, K._ss_attn_bwd_dq_kernel):
        monkeypatch.setattr(kernel, "early_config_prune", two_configs)
        monkeypatch.setattr(kernel, "_do_bench", bench)
        monkeypatch.setitem(kernel.__dict__, "do_bench", bench)  # a cached property
        monkeypatch.setattr(kernel, "cache", {})
    monkeypatch.setattr(K, "_CONFIGS", {})
    x64, w64 = attention_inputs((1, 16, 13, 11))  # g = 2: N = 42, several key and query tiles
    x, w = x64.float(), w64.float()
    go = torch.randn_like(x)
    fn = lambda a, b: kernels.ss_attention(a, b, 2, deterministic=deterministic)  # noqa: E731
    first = run_grads(fn, x, w, go)
    assert len(runs) == 4, "both backward kernels tuned over two configurations"
    again = run_grads(fn, x, w, go)
    assert len(runs) == 4, "the second call launches the tuned configurations"
    for name, a, b in zip(("out", "dx", "dw"), first, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


@interp
@pytest.mark.parametrize("shape,grid,window", [((1, 16, 6, 5), 4, 0), ((1, 16, 6, 3), 2, 4)])
def test_op_registration(shape, grid, window):
    """Schema, fake tensor, autograd registration and AOT dispatch of ssbsn::ss_attention (window
    4 at g = 2: 2 + 1 token rows by 2 columns; the fake shapes follow the windowed groups)."""
    x = torch.randn(*shape, requires_grad=True)
    w = torch.randn(16, 16, requires_grad=True)
    torch.library.opcheck(torch.ops.ssbsn.ss_attention.default, (x, w, grid, False, True, window))


@interp
def test_compile_fullgraph_triton_op():
    """The Triton op inside torch.compile(fullgraph=True), forward and backward (the op is opaque
    to the compiler, so the interpreter runs it; aot_eager keeps the test cheap)."""
    x = torch.randn(1, 16, 13, 11, requires_grad=True)
    w = torch.randn(16, 16, requires_grad=True)
    fn = lambda a, b: kernels.ss_attention(a, b, 4, group_stats=True)  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(x, w)
    out.sum().backward()
    grads = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    ref = fn(x, w)
    ref.sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grads[0], x.grad)
    torch.testing.assert_close(grads[1], w.grad)


@interp
def test_autotune_key_is_a_bucket_of_n():
    """Images of different sizes whose token counts share a power-of-two bucket share one
    autotuning entry (no re-tuning per size); another bucket gets its own entry."""
    fwd = K._ss_attn_fwd_kernel
    assert fwd.keys == ["C", "E", "NB_BUCKET"]
    fwd.cache.clear()
    K._CONFIGS.clear()  # the host's cache of the chosen configurations, per the same key
    w = torch.randn(16, 16)
    for side in (24, 28):  # g = 4: N = 36 and 49 tokens per group, bucket 64
        kernels.ss_attention(torch.randn(1, 16, side, side), w, 4)
    assert [k[:3] for k in fwd.cache] == [(16, 16, 64)]
    kernels.ss_attention(torch.randn(1, 16, 20, 20), w, 4)  # N = 25: bucket 32
    assert sorted(k[2] for k in fwd.cache) == [32, 64]
    assert sorted(k[1][2] for k in K._CONFIGS if k[0] is fwd) == [32, 64]
    assert [K.tune_bucket(n) for n in (1, 25, 32, 33, 1225, 17689)] == [1, 32, 32, 64, 2048, 32768]


@interp
@pytest.mark.parametrize("dtype,C,cls", [(torch.bfloat16, 128, "half"), (torch.float16, 64, "half"),
                                         (torch.float32, 128, "fp32"), (torch.float16, 256, "wide")])
def test_autotune_prunes_to_the_operand_class(dtype, C, cls):
    """Each launch only benchmarks the tile list of its operand class and mode (TILES,
    DETERMINISTIC_TILES; checked for shared memory and spills by tests/test_aot_compile.py),
    not configurations that cannot launch; the backward kernels' autotuning key has the mode."""
    assert K.operand_class(dtype, T.block_dim(C), T.block_dim(C)) == cls
    for kind, name, mode in (("fwd", "_ss_attn_fwd_kernel", {}),
                             ("bwd_dkdv", "_ss_attn_bwd_dkdv_kernel", {"ATOMIC": True}),
                             ("bwd_dkdv", "_ss_attn_bwd_dkdv_kernel", {"ATOMIC": False}),
                             ("bwd_dq", "_ss_attn_bwd_dq_kernel", {"QUERY_LOOP": False}),
                             ("bwd_dq", "_ss_attn_bwd_dq_kernel", {"QUERY_LOOP": True})):
        tuner = getattr(K, name)
        assert tuner.keys == ["C", "E", "NB_BUCKET", *mode]
        det = mode.get("QUERY_LOOP", False) or not mode.get("ATOMIC", True)
        x = torch.empty(1, C, 4, 4, dtype=dtype)
        kept = tuner.early_config_prune(tuner.configs, {"X": x}, BLOCK_C=T.block_dim(C),
                                        BLOCK_E=T.block_dim(C), **mode)
        got = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept]
        assert got == K.tiles(kind, cls, det)[:1]  # the interpreter runs the first one only
    assert K.tiles("bwd_dq", "fp32", True) != K.TILES["bwd_dq"]["fp32"]


def test_unsupported_inputs_are_named():
    x = torch.randn(1, 8, 5, 5)
    assert "dtype" in kernels.unsupported_reason(x.double(), torch.randn(8, 8).double(), 4)
    assert "channels" in kernels.unsupported_reason(torch.randn(1, 300, 2, 2), torch.randn(300, 300), 4)
    assert "does not fit" in kernels.unsupported_reason(x, torch.randn(7, 8), 4)
    with pytest.raises(RuntimeError, match="dtype"):
        kernels.ss_attention(x.double(), torch.randn(8, 8).double(), 4)
    w = torch.randn(8, 8)
    for window in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="window"):
            kernels.ss_attention(x, w, 4, window=window)
        assert "window" in kernels.unsupported_reason(x, w, 4, window)
    big = torch.empty(1, 1, 1, 1).expand(2, 8, 1024, 1030)  # g = 4: 256 × 258 tokens a phase
    assert "windows" in kernels.unsupported_reason(big, w, 4, 4)  # 2 × 256 × 258 windows
    assert "windows" not in (kernels.unsupported_reason(big, w, 4, 16) or "")  # 2 × 64 × 65


def test_fused_backend_on_cpu_is_sdpa_without_warning():
    import warnings

    from ssbsn.attention import ss_attention
    from ssbsn.attention.functional import BACKENDS
    assert set(BACKENDS) == {"reference", "sdpa", "triton", "fused"}
    x, w = torch.randn(1, 16, 9, 7), torch.randn(16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ss_attention(x, w, 4, backend="fused")
    torch.testing.assert_close(out, ss_attention(x, w, 4, backend="sdpa"), rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown"):
        ss_attention(x, w, 4, backend="nope")


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------
GPU_SHAPES = [  # (shape, grid): the model's real shapes (docs/ss_attention.md)
    ((4, 128, 140, 140), 6),   # training, g = 6: N = 576
    ((4, 128, 140, 140), 4),   # training, g = 4: N = 1225
    ((1, 128, 264, 264), 4),   # SIDD validation: N = 4356
    ((1, 128, 532, 532), 4),   # 512 crops: N = 17 689
]


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("shape,grid", GPU_SHAPES, ids=["N576", "N1225", "N4356", "N17689"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("group_stats", [False, True])
def test_gpu_matches_reference(shape, grid, dtype, group_stats):
    x64, w64 = attention_inputs(shape, device="cuda")
    big = shape[-1] * shape[-2] // grid ** 2 > 5000
    _compare(x64, w64, grid, group_stats, dtype, CL, per_group=big)
    if shape[0] == 4 and not group_stats and dtype == torch.float16:  # NCHW too, once
        _compare(x64, w64, grid, group_stats, dtype, NCHW)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("group_stats", [False, True])
def test_gpu_windowed_matches_reference(dtype, group_stats):
    """Training shape, g = 4, window 64: T = 16 on 35 × 35 tokens (16 + 16 + 3 both ways)."""
    x64, w64 = attention_inputs((4, 128, 140, 140), device="cuda")
    _compare(x64, w64, 4, group_stats, dtype, CL, window=64)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_deterministic_bitwise(dtype):
    x64, w64 = attention_inputs((4, 128, 140, 140), device="cuda")
    x = x64.to(dtype).contiguous(memory_format=CL)
    w, go = w64.to(dtype), torch.randn_like(x)
    fn = lambda a, b: kernels.ss_attention(a, b, 4, deterministic=True)  # noqa: E731
    first = run_grads(fn, x, w, go)
    for _ in range(3):
        for a, b in zip(first, run_grads(fn, x, w, go)):
            assert torch.equal(a, b)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_cuda_graph_capture_replay(dtype):
    """Forward and backward of the op captured in one CUDA graph (no host synchronisation, no
    host-side allocation decisions that depend on data), replayed on new inputs copied into the
    static buffers: the same bits as eager, deterministic mode (the ticketed dW reduction
    included)."""
    shape = (2, 128, 64, 64)
    x64, w64 = attention_inputs(shape, device="cuda")
    sx = x64.to(dtype).contiguous(memory_format=CL).requires_grad_()
    sw = w64.to(dtype).requires_grad_()
    sgo = torch.randn_like(sx)

    def step():
        out = kernels.ss_attention(sx, sw, 4, deterministic=True)
        return (out, *torch.autograd.grad(out, (sx, sw), sgo))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: autotuning and compilation outside the capture
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    for seed in (1, 2):
        torch.manual_seed(seed)
        x, _ = attention_inputs(shape, device="cuda")
        x = x.to(dtype).contiguous(memory_format=CL)
        go = torch.randn_like(x)
        with torch.no_grad():
            sx.copy_(x)
            sgo.copy_(go)
        graph.replay()
        torch.cuda.synchronize()
        eager = run_grads(lambda a, b: kernels.ss_attention(a, b, 4, deterministic=True),
                          x, sw.detach(), go)
        for name, a, b in zip(("out", "dx", "dw"), static, eager):
            assert torch.equal(a, b), name


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("grid", [4, 6])
def test_gpu_compile_keeps_the_kernels(grid):
    """Inside torch.compile (Inductor, fullgraph) the op's kernels are in the generated code,
    not behind an opaque call, and forward and backward agree with eager within the FA3 rule's
    reach (bf16; the compiler may tune other tiles, so not bitwise)."""
    from torch._inductor.utils import run_and_get_code
    x64, w64 = attention_inputs((2, 128, 56, 56), device="cuda")
    x = x64.to(torch.bfloat16).contiguous(memory_format=CL)
    w, go = w64.to(torch.bfloat16), torch.randn_like(x)
    fn = lambda a, b: kernels.ss_attention(a, b, grid)  # noqa: E731
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    _, codes = run_and_get_code(lambda: run_grads(compiled, x, w, go))
    code = "\n".join(codes)
    for name in ("_ln_partials_kernel", "_qhat_kernel", "_ss_attn_fwd_kernel"):
        assert name in code, name
    assert "ssbsn.ss_attention" not in code
    oracle = run_grads(lambda a, b: ss_attention_reference(a, b, grid), x64, w64, go.double())
    same = run_grads(_same_dtype_reference(grid, False), x, w, go)
    _fa3_check(run_grads(compiled, x, w, go), same, oracle)


@pytest.mark.gpu
@requires_gpu
def test_gpu_fused_backend_and_fallback_warning():
    from ssbsn.attention import ss_attention
    x, w = torch.randn(1, 16, 20, 20, device="cuda"), torch.randn(16, 16, device="cuda")
    torch.testing.assert_close(ss_attention(x, w, 4, backend="fused"),
                               ss_attention(x, w, 4, backend="reference"), rtol=1e-4, atol=1e-4)
    with pytest.warns(RuntimeWarning, match="dtype"):
        ss_attention(x.double(), w.double(), 4, backend="fused")


@pytest.mark.gpu
@requires_gpu
def test_gpu_ssbsn_training_step_fused_vs_reference(exact_reference):
    """One full SS-BSN training step (L1 self-supervised loss, Adam): fused vs reference.
    No TF32 (``exact_reference``): with cuDNN's TF32 on (torch's default for convolutions) the
    1e-7 differences of the attention outputs are rounded apart in the TF32 convolutions around
    them, and wqk's gradient differed by 1.2e-3 on an H200 — noise of the convolutions, not of
    the kernels."""
    from ssbsn import SSBSN
    torch.manual_seed(0)
    noisy = torch.rand(4, 3, 120, 120, device="cuda") * 255
    ref = SSBSN(fused=False).cuda()
    fused = SSBSN(fused=True).cuda()
    fused.load_state_dict(ref.state_dict())
    losses = []
    for model in (ref, fused):
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        opt.zero_grad()
        torch.manual_seed(1)  # same PD/crop randomness, if any
        loss = (model(noisy) - noisy).abs().mean()
        loss.backward()
        losses.append(loss.detach())
        opt.step()
        assert all(torch.isfinite(p).all() for p in model.parameters())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-3)
    for (name, p_ref), p_fused in zip(ref.named_parameters(), fused.parameters()):
        g_ref, g_fused = p_ref.grad, p_fused.grad
        rel = ((g_fused - g_ref).norm() / g_ref.norm().clamp_min(1e-12)).item()
        assert rel < 1e-3, f"{name}: relative gradient difference {rel:.2e}"
