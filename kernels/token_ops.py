"""Per-token Triton kernels around SS-Attention: LayerNorm statistics, the q̂ projection and
their backward (LayerNorm, projection, dW).

Read top to bottom: shared helpers (grid-group geometry, strided token addressing, the dot
wrapper), then the forward kernels (``_ln_partials_kernel`` → host combine →
``_qhat_kernel``), then the backward kernels (``_ln_bwd_dx_kernel``, which combines the
LayerNorm-backward sums the dq kernel wrote, and dW: in a fixed order by ``_dw_split``
programs in the same launch, or by atomics with ``DW_ATOMICS``),
then the host launchers.

Token addressing (shared with ``ss_attention.py``). Phase (a, c) of the map zero-padded to
Hp × Wp (multiples of g) is a grid of Ht × Wt = Hp/g × Wp/g tokens, token (i, j) being pixel
(a + g·i, c + g·j). The bounded scope cuts that grid into windows of TH × TW tokens from the
top-left (the last window of a row/column is smaller: th × tw); whole-map groups are the one
window TH = Ht, TW = Wt. A group (b, window (r, k), phase (a, c)) starts at token
(row0, col0) = (r·TH, k·TW) and has hr = clamp(ceil((H − a)/g) − row0, 0, th) real rows and
wr (likewise) real columns; only *real* pixels are tokens here: real token t ∈ [0, hr·wr) is
pixel (a + g·(row0 + t // wr), c + g·(col0 + t % wr)). The zero-padded tokens of the reference
are never touched: the attention kernels count them analytically (n_pad = th·tw − hr·wr; only
bottom/right windows have any). Every kernel reads x through its four strides, so NCHW and
channels_last (the fast path on GPU: one token = C contiguous values) both work without copies.
The window sizes TH, TW are runtime ints (not specialised): one compiled kernel serves every
window.

Per-token buffers (q̂, row statistics, gradient scratch) are laid out (BG, NB, ·) with
NB = TH·TW (the most tokens a group has) and BG = B·NWH·NWW·g² (NWH × NWW windows): group
(b, r, k, a, c) at index ((b·NWH + r)·NWW + k)·g² + a·g + c, token t at row t. The sample is
outermost, so per-sample reductions are views (B, NWH·NWW·g², ...). Programs take the phase
from grid axis 1 and (sample, window) from axis 2 (each limited to 65,535 by CUDA).

LayerNorm statistics are one (mean, rstd) per *group* index: with per-image statistics the
entries of a sample are equal, with ``group_stats`` they differ (one per windowed group).
Partial (count, mean, M2) per token tile are combined inside the kernels that need them, with
Chan's formula in float64 (fixed order: every program gets the same bits, no E[x²] − E[x]²
cancellation, and no host reduction between the launches).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..attention.common import LN_EPS, NORM_EPS, window_tokens


def _interpreting() -> bool:
    try:
        from triton import knobs
        return bool(knobs.runtime.interpret)
    except Exception:  # triton without knobs
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


#: True when the kernels below were built for Triton's CPU interpreter (TRITON_INTERPRET=1 at
#: import time). They then run on CPU tensors; without it they need CUDA tensors.
INTERPRET = _interpreting()

try:  # torch >= 2.6: kernels launched through wrap_triton are traced into torch's graphs
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor
    from torch.library import wrap_triton
    _TRACED = (FakeTensor, FunctionalTensor)
except ImportError:  # pragma: no cover - older torch: the op stays opaque to the compiler
    wrap_triton, _TRACED = None, ()


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) on the host (``triton.cdiv`` is a constexpr function, several µs a call)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two ≥ n (n ≥ 1) on the host, as ``triton.next_power_of_2``."""
    return 1 << (int(n) - 1).bit_length()


def tracing(t: torch.Tensor) -> bool:
    """Whether torch is tracing the op that received ``t`` (torch.compile's AOTAutograd, or the
    op's fake implementation): the launches then go through ``wrap_triton``, so the traced graph
    holds the kernels themselves (no data is touched). Interpreted kernels cannot be traced."""
    return not INTERPRET and isinstance(t, _TRACED)


def launch(kernel, grid, *args, **kw):
    """``kernel[grid](*args, **kw)``; while torch traces (``tracing`` of the first argument), the
    same call through ``wrap_triton``."""
    if tracing(args[0]):
        return wrap_triton(kernel)[grid](*args, **kw)
    return kernel[grid](*args, **kw)


MAX_CHANNELS = 256  # C and E up to this are supported by the fused kernels
MAX_GRID_YZ = 65535  # CUDA's limit on a launch grid's second and third extents


def device_fn(fn):
    """Decorator for device helpers called from the kernels: ``@triton.jit`` when compiled, a
    plain Python function under the interpreter (which re-patches ``triton.language`` on every
    call of a nested jit function; that dominated the interpreter's run time)."""
    return fn if INTERPRET else triton.jit(fn)


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------
@device_fn
def group_index(G: tl.constexpr):
    """This program's group index: phase a·g + c on grid axis 1, (sample, window) on axis 2."""
    return tl.program_id(2) * (G * G) + tl.program_id(1)


@device_fn
def group_geometry(pid_bg, H, W, TH, TW, G: tl.constexpr):
    """(sample b, pixel (p_row, p_col) of the group's first token, real token rows hr and
    columns wr, the window's tokens th·tw padding included) of group pid_bg = (b, window
    (r, k), phase (a, c)) for windows of TH × TW tokens: p_row = a + g·r·TH, p_col = c + g·k·TW
    (the window's first token row0 = r·TH, col0 = k·TW)."""
    Ht = (H + (G - 1)) // G
    Wt = (W + (G - 1)) // G
    nww = (Wt + TW - 1) // TW
    per_b = (Ht + TH - 1) // TH * nww * (G * G)  # groups per sample
    b = pid_bg // per_b
    r = pid_bg - b * per_b
    win = r // (G * G)
    r = r - win * (G * G)
    a = r // G
    c = r - a * G
    wrow = win // nww
    row0 = wrow * TH
    col0 = (win - wrow * nww) * TW
    # a phase has Ht or Ht − 1 real token rows and row0 ≤ Ht − 1: no clamp at 0 needed
    hr = tl.minimum((H - a + (G - 1)) // G - row0, TH)
    wr = tl.minimum((W - c + (G - 1)) // G - col0, TW)
    n_win = tl.minimum(Ht - row0, TH) * tl.minimum(Wt - col0, TW)
    return b, a + G * row0, c + G * col0, hr, wr, n_win


@device_fn
def token_offsets(t, p_row, p_col, wr, G: tl.constexpr, s_h, s_w):
    """Offsets (within one sample) of the pixels of real tokens t of the group whose first
    token is pixel (p_row, p_col)."""
    wr1 = tl.maximum(wr, 1)
    i = t // wr1
    j = t - i * wr1
    return (p_row + G * i) * s_h + (p_col + G * j) * s_w


if INTERPRET:
    def loop_bound(n):
        """A runtime loop bound as a Python int. Under Triton 3.6's interpreter every runtime
        scalar is a 1-element array, which ``range()`` turns into an int with ``int()`` — an
        error since numpy 2.4. The conversion must sit inside the ``range(...)`` expression
        (3.6's interpreter wraps assigned values back into tensors)."""
        import numpy as np
        h = getattr(n, "handle", None)
        return int(np.asarray(h.data).reshape(-1)[0]) if h is not None else int(n)
else:
    @triton.jit
    def loop_bound(n):
        """Compiled kernels: the bound itself (see the interpreter's version)."""
        return n


if INTERPRET:
    def round_to(v, dtype):
        """``v.to(dtype)`` rounded to nearest even, as compiled kernels and torch round: the
        interpreter truncates fp32 → bf16, so the rounding is done on the bits first."""
        if dtype == tl.bfloat16 and v.dtype == tl.float32:
            bits = v.to(tl.uint32, bitcast=True)
            bits = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16) << 16
            v = bits.to(tl.float32, bitcast=True)
        return v.to(dtype)
else:
    @triton.jit
    def round_to(v, dtype: tl.constexpr):
        """``v.to(dtype)`` (round to nearest even)."""
        return v.to(dtype)


@device_fn
def mma(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b with fp32 accumulation. PREC is the fp32 input precision ("tf32x3", "tf32");
    UPCAST computes in fp32 (Triton's interpreter gets bf16 dots wrong)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision=PREC)
    else:
        return tl.dot(a, b, acc)


@device_fn
def normalize(X, mu, rs, x_base, pix, offs_t, n_real, offs_c, C, s_xc):
    """The normalised input y = (x − μ)·rstd of a token tile, fp32, 0 outside real tokens."""
    mask = (offs_t < n_real)[:, None] & (offs_c < C)[None, :]
    x = tl.load(X + x_base + pix[:, None] + offs_c[None, :] * s_xc, mask=mask, other=0.0)
    return tl.where(mask, (x.to(tl.float32) - mu) * rs, 0.0)


@device_fn
def load_y(X, MEAN, RSTD, pid_bg, x_base, pix, offs_t, n_real, offs_c, C, s_xc):
    """``normalize`` with the group's saved (mean, rstd)."""
    mu = tl.load(MEAN + pid_bg)
    rs = tl.load(RSTD + pid_bg)
    return normalize(X, mu, rs, x_base, pix, offs_t, n_real, offs_c, C, s_xc)


# Partials: rows of three fp32 (count, a, b), NPS rows per group of which the first NUSED are
# written. A statistics unit (a sample, or one group with ``group_stats``) is STAT_DIV
# consecutive groups. Every program that needs a unit's statistics combines the unit's partials
# itself, in the same fixed order and in float64: all programs get the same bits, and no host
# reduction or extra launch sits between the kernels.
PARTIAL_BLOCK = 256


@device_fn
def _load_partials(PART, g0, start, total, NPS, NUSED, BLOCK_P: tl.constexpr):
    """The three columns of a unit's partial rows start … start + BLOCK_P − 1 (flat over its
    groups g0, g0 + 1, ...), float64, 0 from row ``total`` on."""
    i = start + tl.arange(0, BLOCK_P)
    m = i < total
    g = i // NUSED
    ptr = PART + ((g0 + g).to(tl.int64) * NPS + (i - g * NUSED)) * 3
    return (tl.load(ptr, mask=m, other=0.0).to(tl.float64),
            tl.load(ptr + 1, mask=m, other=0.0).to(tl.float64),
            tl.load(ptr + 2, mask=m, other=0.0).to(tl.float64))


@device_fn
def sum_partials(PART, g0, total, NPS, NUSED, BLOCK_P: tl.constexpr):
    """(Σ count, Σ a, Σ b) over a unit's ``total`` partial rows, float64, fixed order."""
    s0 = tl.zeros([BLOCK_P], tl.float64)
    s1 = tl.zeros([BLOCK_P], tl.float64)
    s2 = tl.zeros([BLOCK_P], tl.float64)
    for start in range(0, loop_bound(total), BLOCK_P):
        a, b, c = _load_partials(PART, g0, start, total, NPS, NUSED, BLOCK_P)
        s0 += a
        s1 += b
        s2 += c
    return tl.sum(s0, 0), tl.sum(s1, 0), tl.sum(s2, 0)


@device_fn
def chan_partials(PART, g0, total, NPS, NUSED, BLOCK_P: tl.constexpr):
    """(count, mean, M2) in float64 of a unit's (count, mean, M2) partials: Chan's parallel
    formula, two passes (Σ n·μ, then Σ M2 + n·(μ − mean)²), no E[x²] − E[x]² cancellation."""
    n_acc = tl.zeros([BLOCK_P], tl.float64)
    s_acc = tl.zeros([BLOCK_P], tl.float64)
    for start in range(0, loop_bound(total), BLOCK_P):
        n, mu, _ = _load_partials(PART, g0, start, total, NPS, NUSED, BLOCK_P)
        n_acc += n
        s_acc += n * mu
    cnt = tl.maximum(tl.sum(n_acc, 0), 1.0)
    mean = tl.sum(s_acc, 0) / cnt
    m2_acc = tl.zeros([BLOCK_P], tl.float64)
    for start in range(0, loop_bound(total), BLOCK_P):
        n, mu, m2 = _load_partials(PART, g0, start, total, NPS, NUSED, BLOCK_P)
        d = mu - mean
        m2_acc += m2 + n * d * d
    return tl.sum(n_acc, 0), mean, tl.sum(m2_acc, 0)


@device_fn
def ln_moments(PART, g0, total, NPS, NUSED, eps, BLOCK_P: tl.constexpr):
    """(mean, rstd) in fp32 of a unit's (count, mean, M2) partials (``chan_partials``)."""
    cnt, mean, m2 = chan_partials(PART, g0, total, NPS, NUSED, BLOCK_P)
    var = m2 / tl.maximum(cnt, 1.0)
    return mean.to(tl.float32), (1.0 / tl.sqrt(var + eps)).to(tl.float32)


@triton.jit
def _combine_partials_kernel(PART, OUT, NPS, NUSED, STAT_DIV, CHAN: tl.constexpr,
                             BLOCK_P: tl.constexpr):
    """One unit's partials combined into one row (stored at its first group's row of OUT):
    (count, mean, M2) by Chan's formula (CHAN), else (count, Σ a, Σ b). For units with many
    partials, so that the kernels after it read one row per unit instead of all of them."""
    g0 = tl.program_id(0) * STAT_DIV
    if CHAN:
        a, b, c = chan_partials(PART, g0, STAT_DIV * NUSED, NPS, NUSED, BLOCK_P)
    else:
        a, b, c = sum_partials(PART, g0, STAT_DIV * NUSED, NPS, NUSED, BLOCK_P)
    out = OUT + g0.to(tl.int64) * 3
    tl.store(out, a.to(tl.float32))
    tl.store(out + 1, b.to(tl.float32))
    tl.store(out + 2, c.to(tl.float32))


# ---------------------------------------------------------------------------------------------
# Forward: LayerNorm statistics (partials), then q̂ = normalize(y · W)
# ---------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["TH", "TW"])
def _ln_partials_kernel(X, PART, s_xb, s_xc, s_xh, s_xw, C, H, W, TH, TW, NBLK,
                        G: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """(count, mean, M2) of the x values of one token tile of one group."""
    pid_t = tl.program_id(0)
    pid_bg = group_index(G)
    b, p_row, p_col, hr, wr, _ = group_geometry(pid_bg, H, W, TH, TW, G)
    n_real = hr * wr
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = tl.arange(0, BLOCK_C)
    mask = (offs_t < n_real)[:, None] & (offs_c < C)[None, :]
    pix = token_offsets(offs_t, p_row, p_col, wr, G, s_xh, s_xw)
    x = tl.load(X + b.to(tl.int64) * s_xb + pix[:, None] + offs_c[None, :] * s_xc,
                mask=mask, other=0.0).to(tl.float32)
    n_tok = tl.minimum(tl.maximum(n_real - pid_t * BLOCK_T, 0), BLOCK_T)
    cnt = (n_tok * C).to(tl.float32)
    mean = tl.sum(tl.sum(x, 1), 0) / tl.maximum(cnt, 1.0)
    d = tl.where(mask, x - mean, 0.0)
    m2 = tl.sum(tl.sum(d * d, 1), 0)
    out = PART + (pid_bg * NBLK + pid_t) * 3
    tl.store(out, cnt)
    tl.store(out + 1, mean)
    tl.store(out + 2, m2)


@triton.jit(do_not_specialize=["TH", "TW"])
def _qhat_kernel(X, Wm, MEAN, RSTD, QH, PART, DW, WSUM, DO, O, DD, DQA,
                 s_xb, s_xc, s_xh, s_xw, s_wc, s_we, s_db, s_dc, s_dh, s_dw,
                 s_ob, s_oc, s_oh, s_ow,
                 C, E, H, W, TH, TW, NB, NPS, NUSED, NREAD, STAT_DIV, NZ, G: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr,
                 PREC: tl.constexpr, UPCAST: tl.constexpr, NORM_EPS: tl.constexpr,
                 LN_EPS: tl.constexpr,
                 STATS: tl.constexpr, ZERO_DW: tl.constexpr, BWD: tl.constexpr,
                 ZERO_DQA: tl.constexpr, BLOCK_P: tl.constexpr):
    """q̂ = q / (‖q‖ + NORM_EPS), q = y · W (W rounded to x's dtype), for one token tile; stored
    in the input dtype. STATS (forward): the group's (mean, rstd) from the LayerNorm partials
    PART of its statistics unit (NREAD rows from the unit's first group, NPS rows a group of
    which NUSED are written; a unit is STAT_DIV groups), written to MEAN/RSTD
    by the group's first tile; otherwise (backward) read from MEAN/RSTD. BWD: the first program
    stores W's column sums Σ_c W (fp32, W rounded to x's dtype) for the dq kernel's
    LayerNorm-backward sums, and every program the attention backward's preprocess for its
    tokens: D = rowsum(dO ∘ o) with o (O) the attention output before the residual add, saved
    by the forward (fp32, into DD); ZERO_DW: the first program also zeroes the first NZ elements
    of DW: the fp32 dW accumulator that the backward's last kernel adds into, or (deterministic
    mode) the int32 tickets of its dW reduction; ZERO_DQA: every program zeroes its tokens' rows of the
    fp32 dq̂ buffer that the key-tile kernel adds the query half of dq̂ into by atomics."""
    pid_t = tl.program_id(0)
    pid_bg = group_index(G)
    b, p_row, p_col, hr, wr, _ = group_geometry(pid_bg, H, W, TH, TW, G)
    n_real = hr * wr
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = tl.arange(0, BLOCK_C)
    offs_e = tl.arange(0, BLOCK_E)
    wmask = (offs_c < C)[:, None] & (offs_e < E)[None, :]
    if STATS:
        g0 = (pid_bg // STAT_DIV) * STAT_DIV
        mu, rs = ln_moments(PART, g0, NREAD, NPS, NUSED, LN_EPS, BLOCK_P)
        first = pid_t == 0
        tl.store(MEAN + pid_bg, mu, mask=first)
        tl.store(RSTD + pid_bg, rs, mask=first)
    else:
        mu = tl.load(MEAN + pid_bg)
        rs = tl.load(RSTD + pid_bg)
    if ZERO_DW:
        # the first NZ elements of DW, flat: the (C, E) fp32 dW accumulator, or the int32 ticket
        # counters of deterministic mode's dW reduction (NZ ≤ C·E ≤ BLOCK_C·BLOCK_E)
        # (a vector condition: the interpreter rejects a 0-d boolean broadcast into a mask)
        first_program = (offs_c * 0 + pid_t + pid_bg) == 0
        flat = offs_c[:, None] * BLOCK_E + offs_e[None, :]
        tl.store(DW + flat, tl.zeros((BLOCK_C, BLOCK_E), DW.dtype.element_ty),
                 mask=(flat < NZ) & first_program[:, None])
    pix = token_offsets(offs_t, p_row, p_col, wr, G, s_xh, s_xw)
    y = normalize(X, mu, rs, b.to(tl.int64) * s_xb, pix, offs_t, n_real, offs_c, C, s_xc)
    w = round_to(tl.load(Wm + offs_c[:, None] * s_wc + offs_e[None, :] * s_we, mask=wmask,
                         other=0.0), QH.dtype.element_ty)
    q = mma(y.to(w.dtype), w, tl.zeros((BLOCK_T, BLOCK_E), tl.float32), PREC, UPCAST)
    if BWD:
        first_e = (offs_e * 0 + pid_t + pid_bg) == 0
        tl.store(WSUM + offs_e, tl.sum(w.to(tl.float32), 0), mask=(offs_e < E) & first_e)
    qh = q / (tl.sqrt(tl.sum(q * q, 1)) + NORM_EPS)[:, None]
    t_mask = offs_t < n_real
    e2 = t_mask[:, None] & (offs_e < E)[None, :]
    rows = pid_bg.to(tl.int64) * NB + offs_t
    tl.store(QH + rows[:, None] * E + offs_e[None, :], qh.to(QH.dtype.element_ty), mask=e2)
    if BWD:
        # D_t = dO_t·o_t, o the attention's output without the residual
        mask = t_mask[:, None] & (offs_c < C)[None, :]
        cols = offs_c[None, :]
        do = tl.load(DO + b.to(tl.int64) * s_db + token_offsets(
            offs_t, p_row, p_col, wr, G, s_dh, s_dw)[:, None] + cols * s_dc, mask=mask, other=0.0)
        o = tl.load(O + b.to(tl.int64) * s_ob + token_offsets(
            offs_t, p_row, p_col, wr, G, s_oh, s_ow)[:, None] + cols * s_oc, mask=mask, other=0.0)
        dd = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        tl.store(DD + rows, dd, mask=t_mask)
    if ZERO_DQA:
        tl.store(DQA + rows[:, None] * E + offs_e[None, :],
                 tl.zeros((BLOCK_T, BLOCK_E), tl.float32), mask=e2)


# ---------------------------------------------------------------------------------------------
# Backward: dq (from the attention kernels) → dy = dq·Wᵀ → LayerNorm backward; dW = Σ yᵀ dq
# ---------------------------------------------------------------------------------------------
@device_fn
def _load_dy(X, DQ, Wm, pid_bg, offs_t, n_real, offs_c, offs_e, C, E, NB, s_wc, s_we,
             BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, PREC: tl.constexpr):
    """dq of a token tile and dy = dq·Wᵀ (W rounded to x's dtype, as in the forward)."""
    dq = tl.load(DQ + pid_bg.to(tl.int64) * NB * E + offs_t[:, None] * E + offs_e[None, :],
                 mask=(offs_t < n_real)[:, None] & (offs_e < E)[None, :], other=0.0)
    wt = tl.load(Wm + offs_e[:, None] * s_we + offs_c[None, :] * s_wc,
                 mask=(offs_e < E)[:, None] & (offs_c < C)[None, :], other=0.0)
    wt = round_to(wt, X.dtype.element_ty).to(tl.float32)
    dy = tl.dot(dq, wt, tl.zeros((BLOCK_T, BLOCK_C), tl.float32), input_precision=PREC)
    return dq, dy


@device_fn
def _dx_tile(X, Wm, MEAN, RSTD, DQ, DXV, SPART, DX, DW, pid_t, pid_bg, s_xb, s_xc, s_xh, s_xw,
             s_gb, s_gc, s_gh, s_gw, s_wc, s_we, C, E, H, W, TH, TW, NB, NPS, NUSED, NREAD,
             STAT_DIV, G: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
             BLOCK_E: tl.constexpr, PREC: tl.constexpr, ATOMIC_DW: tl.constexpr,
             BLOCK_P: tl.constexpr):
    """dx of one token tile; with ATOMIC_DW also its yᵀ·dq added into DW by float atomics."""
    b, p_row, p_col, hr, wr, _ = group_geometry(pid_bg, H, W, TH, TW, G)
    n_real = hr * wr
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = tl.arange(0, BLOCK_C)
    offs_e = tl.arange(0, BLOCK_E)
    t_mask = offs_t < n_real
    c_mask = offs_c < C
    pix = token_offsets(offs_t, p_row, p_col, wr, G, s_xh, s_xw)
    y = load_y(X, MEAN, RSTD, pid_bg, b.to(tl.int64) * s_xb, pix, offs_t, n_real, offs_c, C, s_xc)
    dq, dy = _load_dy(X, DQ, Wm, pid_bg, offs_t, n_real, offs_c, offs_e, C, E, NB, s_wc, s_we,
                      BLOCK_T, BLOCK_C, PREC)
    g0 = (pid_bg // STAT_DIV) * STAT_DIV
    cnt, s1, s2 = sum_partials(SPART, g0, NREAD, NPS, NUSED, BLOCK_P)
    cnt = tl.maximum(cnt, 1.0)
    m1 = (s1 / cnt).to(tl.float32)
    m2 = (s2 / cnt).to(tl.float32)
    rs = tl.load(RSTD + pid_bg)
    mask = t_mask[:, None] & c_mask[None, :]
    dxv = tl.load(DXV + pid_bg.to(tl.int64) * NB * C + offs_t[:, None] * C + offs_c[None, :],
                  mask=mask, other=0.0)
    dx = dxv + rs * (dy - m1 - y * m2)
    gpix = token_offsets(offs_t, p_row, p_col, wr, G, s_gh, s_gw)
    tl.store(DX + b.to(tl.int64) * s_gb + gpix[:, None] + offs_c[None, :] * s_gc,
             dx.to(DX.dtype.element_ty), mask=mask)
    if ATOMIC_DW:
        dw = tl.dot(tl.trans(y), dq, tl.zeros((BLOCK_C, BLOCK_E), tl.float32), input_precision=PREC)
        tl.atomic_add(DW + offs_c[:, None] * E + offs_e[None, :], dw,
                      mask=c_mask[:, None] & (offs_e < E)[None, :])


@device_fn
def _dw_split(X, MEAN, RSTD, DQ, DWP, DW, TICKET, item, s_xb, s_xc, s_xh, s_xw, C, E, H, W, TH,
              TW, NB, NBLK, NTILES, G: tl.constexpr, SPLIT: tl.constexpr, BLOCK_T: tl.constexpr,
              BLOCK_CT: tl.constexpr, BLOCK_ET: tl.constexpr, PREC: tl.constexpr):
    """Deterministic dW, work item ``item`` = (tile of W, split s): the sum of yᵀ·dq over the
    token tiles s, s + SPLIT, s + 2·SPLIT, ... (all groups' tiles, flat) in that order, stored
    as partial s of the W tile. Then the item takes a ticket of its W tile (an int32 counter
    the backward's first launch zeroed); the one that draws the last ticket adds the SPLIT
    partials in the order s = 0, 1, ... and stores the tile of dW in W's dtype. Which program
    finishes last varies from run to run, the sum's order does not: bitwise repeatable."""
    pid_ce = item // SPLIT
    pid_s = item - pid_ce * SPLIT
    n_et = tl.cdiv(E, BLOCK_ET)
    ct = pid_ce // n_et
    et = pid_ce - ct * n_et
    offs_c = ct * BLOCK_CT + tl.arange(0, BLOCK_CT)
    offs_e = et * BLOCK_ET + tl.arange(0, BLOCK_ET)
    acc = tl.zeros((BLOCK_CT, BLOCK_ET), tl.float32)
    for tau in range(loop_bound(pid_s), loop_bound(NTILES), SPLIT):
        pid_bg = tau // NBLK
        pid_t = tau - pid_bg * NBLK
        b, p_row, p_col, hr, wr, _ = group_geometry(pid_bg, H, W, TH, TW, G)
        n_real = hr * wr
        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        pix = token_offsets(offs_t, p_row, p_col, wr, G, s_xh, s_xw)
        y = load_y(X, MEAN, RSTD, pid_bg, b.to(tl.int64) * s_xb, pix, offs_t, n_real, offs_c, C,
                   s_xc)
        dq = tl.load(DQ + pid_bg.to(tl.int64) * NB * E + offs_t[:, None] * E + offs_e[None, :],
                     mask=(offs_t < n_real)[:, None] & (offs_e < E)[None, :], other=0.0)
        acc = tl.dot(tl.trans(y), dq, acc, input_precision=PREC)
    mask = (offs_c < C)[:, None] & (offs_e < E)[None, :]
    offs = offs_c[:, None] * E + offs_e[None, :]
    tl.store(DWP + pid_s * C * E + offs, acc, mask=mask)
    # every thread's stores of the partial happen before the ticket (a barrier, then a
    # release at GPU scope); the last ticket's acquire makes all SPLIT partials visible to it
    tl.debug_barrier()
    ticket = tl.atomic_add(TICKET + pid_ce, 1, sem="acq_rel", scope="gpu")
    tl.debug_barrier()
    if ticket == SPLIT - 1:
        total = tl.zeros((BLOCK_CT, BLOCK_ET), tl.float32)
        for s in range(0, SPLIT):
            total += tl.load(DWP + s * C * E + offs, mask=mask, other=0.0, cache_modifier=".cg")
        tl.store(DW + offs, round_to(total, DW.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["TH", "TW"])
def _ln_bwd_dx_kernel(X, Wm, MEAN, RSTD, DQ, DXV, SPART, DX, DW, DWP, TICKET,
                      s_xb, s_xc, s_xh, s_xw, s_gb, s_gc, s_gh, s_gw, s_wc, s_we,
                      C, E, H, W, TH, TW, NB, NPS, NUSED, NREAD, STAT_DIV, NBLK, NTILES, NITEMS,
                      G: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
                      BLOCK_E: tl.constexpr, PREC: tl.constexpr, ATOMIC_DW: tl.constexpr,
                      BLOCK_P: tl.constexpr, SPLIT: tl.constexpr, BLOCK_CT: tl.constexpr,
                      BLOCK_ET: tl.constexpr):
    """dx = (dO + dV) + rstd·(dy − mean(dy) − y·mean(dy·y)), written into the x-shaped map, one
    token tile per program (the first NBLK programs of every group); dW = Σ yᵀ·dq by float
    atomics from the same programs (ATOMIC_DW: ``DW_ATOMICS``), or (the default) by the
    launch's programs past the token tiles: program (NBLK + k, group g) is dW work item
    k·BG + g of ``_dw_split`` (NITEMS in all; those past NITEMS do nothing). The two means come
    from the (count, Σ dy, Σ dy·y) partials the dq kernel wrote per query tile (NPS rows per
    group, NUSED of them written; NREAD rows from the unit's first group), combined here for
    the statistics unit."""
    pid_t = tl.program_id(0)
    pid_bg = group_index(G)
    if ATOMIC_DW:
        _dx_tile(X, Wm, MEAN, RSTD, DQ, DXV, SPART, DX, DW, pid_t, pid_bg, s_xb, s_xc, s_xh,
                 s_xw, s_gb, s_gc, s_gh, s_gw, s_wc, s_we, C, E, H, W, TH, TW, NB, NPS, NUSED,
                 NREAD, STAT_DIV, G, BLOCK_T, BLOCK_C, BLOCK_E, PREC, True, BLOCK_P)
    else:
        if pid_t < NBLK:
            _dx_tile(X, Wm, MEAN, RSTD, DQ, DXV, SPART, DX, DW, pid_t, pid_bg, s_xb, s_xc, s_xh,
                     s_xw, s_gb, s_gc, s_gh, s_gw, s_wc, s_we, C, E, H, W, TH, TW, NB, NPS,
                     NUSED, NREAD, STAT_DIV, G, BLOCK_T, BLOCK_C, BLOCK_E, PREC, False, BLOCK_P)
        else:
            item = (pid_t - NBLK) * (tl.num_programs(1) * tl.num_programs(2)) + pid_bg
            if item < NITEMS:
                _dw_split(X, MEAN, RSTD, DQ, DWP, DW, TICKET, item, s_xb, s_xc, s_xh, s_xw, C,
                          E, H, W, TH, TW, NB, NBLK, NTILES, G, SPLIT, BLOCK_T, BLOCK_CT,
                          BLOCK_ET, PREC)


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------
def block_dim(n: int) -> int:
    """Power-of-two tile width ≥ n (and ≥ 16, tl.dot's minimum)."""
    return max(16, next_pow2(n))


def fp32_precision() -> str:
    """tf32 policy for fp32 inputs: plain tf32 only when torch allows it for matmuls
    (``torch.set_float32_matmul_precision('high'/'medium')``); by default ("highest") 3xTF32,
    the tensor-core emulation of fp32 products (error at the level of fp32 rounding; the
    FMA-based "ieee" dots spill registers heavily at C = 128)."""
    return "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def window_sizes(height: int, width: int, grid: int, window: int | None):
    """(TH, TW, NWH, NWW): tokens per window side and windows per token row/column of one phase
    for ``window`` pixels (None or 0: one window over the whole map; a window past the map's
    side is cut to it, so a window covering the map gives the whole-map groups)."""
    Ht, Wt = -(-height // grid), -(-width // grid)
    T = window_tokens(window or None, grid)
    TH, TW = min(T or Ht, Ht), min(T or Wt, Wt)
    return TH, TW, -(-Ht // TH), -(-Wt // TW)


class Geometry:
    """Sizes of the grouped view of a (B, C, H, W) map with grid g and window (pixels; None or
    0: whole-map groups)."""

    def __init__(self, x: torch.Tensor, w: torch.Tensor, grid: int, window: int | None = None):
        self.B, self.C, self.H, self.W = x.shape
        self.E = w.shape[1]
        self.G = grid
        self.TH, self.TW, self.NWH, self.NWW = window_sizes(self.H, self.W, grid, window)
        self.NB = self.TH * self.TW  # tokens of the largest group, padding included
        self.GPS = self.NWH * self.NWW * grid * grid  # groups per sample
        self.BG = self.B * self.GPS
        self.BLOCK_C, self.BLOCK_E = block_dim(self.C), block_dim(self.E)
        dt = x.dtype
        # fp32 dots: the attention dots of fp32 inputs (half inputs use half dots), and the
        # fp32 epilogue products (dq·Wᵀ, yᵀ·dq) of every input dtype, by the fp32 policy: with
        # plain tf32 there fp16's dW missed the FA3 rule on an H200 (ss_attention.py's notes)
        self.PREC = fp32_precision() if dt == torch.float32 else "tf32"
        self.PREC_EPI = fp32_precision()
        self.UPCAST = INTERPRET and dt == torch.bfloat16

    def launch(self, tiles: int) -> tuple[int, int, int]:
        """The launch grid of per-group kernels: (token tiles, phases, samples × windows)."""
        return tiles, self.G * self.G, self.BG // (self.G * self.G)

    def real_counts(self, device) -> torch.Tensor:
        """Real tokens per group of a sample, shape (GPS,) in group order (r, k, a, c)."""
        def side(n, t, nw):  # (windows, phases): real tokens of each along one side
            ph = torch.arange(self.G, device=device)
            n_ph = torch.div(n - ph + self.G - 1, self.G, rounding_mode="floor")
            start = torch.arange(nw, device=device)[:, None] * t
            return (n_ph[None, :] - start).clamp(0, t)
        hr = side(self.H, self.TH, self.NWH)
        wr = side(self.W, self.TW, self.NWW)
        return (hr[:, None, :, None] * wr[None, :, None, :]).reshape(-1)


TOKEN_BLOCK = 64


def _token_block(geo: Geometry) -> int:
    return TOKEN_BLOCK if max(geo.BLOCK_C, geo.BLOCK_E) <= 128 else 32


def _warps(geo: Geometry) -> int:
    """Warps of the per-token kernels: 8 keeps their [64, 128] fp32 tiles out of local memory."""
    return 8 if max(geo.BLOCK_C, geo.BLOCK_E) >= 128 else 4


def _stat_div(geo: Geometry, group_stats: bool) -> int:
    """Groups per LayerNorm statistics unit: one group, or a sample's GPS groups."""
    return 1 if group_stats else geo.GPS


#: A statistics unit with more partials than this has them combined by one more launch
#: (``_combine_partials_kernel``) before the kernels that need the unit's statistics; with at
#: most this many, every program of those kernels combines them itself (no launch, a few KB
#: read per program). The training and validation shapes stay below it (a few hundred to
#: ~1,100 partials per sample); large maps, or many windows per sample, go above it.
INLINE_PARTIALS = 2048


def unit_partials(part, nps: int, nused: int, geo: Geometry, group_stats: bool, chan: bool):
    """(partials, NPS, NUSED, NREAD) for the kernels that combine a unit's partials: the
    partials themselves, or, above ``INLINE_PARTIALS`` a unit, one combined row per unit."""
    stat_div = _stat_div(geo, group_stats)
    if stat_div * nused <= INLINE_PARTIALS:
        return part, nps, nused, stat_div * nused
    one = torch.empty(geo.BG, 1, 3, device=part.device, dtype=torch.float32)
    launch(_combine_partials_kernel, (geo.BG // stat_div,), part, one, nps, nused, stat_div,
           CHAN=chan, BLOCK_P=PARTIAL_BLOCK)
    return one, 1, 1, 1


def layer_norm_stats_and_qhat(x, w, geo: Geometry, group_stats: bool):
    """Forward, two launches (three above ``INLINE_PARTIALS``): the LayerNorm partials per
    token tile, then q̂ of every real token ((BG, NB, E) in x's dtype, padded rows left
    unwritten), whose programs combine the partials of their statistics unit and store the
    per-group-index (mean, rstd) (fp32, (BG,))."""
    BT = _token_block(geo)
    nblk = cdiv(geo.NB, BT)
    part = torch.empty(geo.BG, nblk, 3, device=x.device, dtype=torch.float32)
    launch(_ln_partials_kernel, geo.launch(nblk), x, part, *x.stride(), geo.C, geo.H, geo.W,
           geo.TH, geo.TW, nblk, G=geo.G, BLOCK_T=BT, BLOCK_C=geo.BLOCK_C)
    mean = torch.empty(geo.BG, device=x.device, dtype=torch.float32)
    rstd = torch.empty(geo.BG, device=x.device, dtype=torch.float32)
    stats = unit_partials(part, nblk, nblk, geo, group_stats, chan=True)
    qh = _qhat(x, w, mean, rstd, geo, stats=stats, stat_div=_stat_div(geo, group_stats))
    return mean, rstd, qh


def _qhat(x, w, mean, rstd, geo: Geometry, stats=None, stat_div=1, dw=None, prep=None):
    BT = _token_block(geo)
    qh = torch.empty(geo.BG, geo.NB, geo.E, device=x.device, dtype=x.dtype)
    part, nps, nused, nread = stats if stats is not None else (mean, 1, 1, 1)
    wsum, dout, o, dd, dqa = prep if prep is not None else (mean, x, x, mean, None)
    launch(_qhat_kernel, geo.launch(cdiv(geo.NB, BT)),
        x, w, mean, rstd, qh, part, dw if dw is not None else mean, wsum, dout, o, dd,
        dqa if dqa is not None else mean,
        *x.stride(), *w.stride(), *dout.stride(), *o.stride(), geo.C, geo.E, geo.H, geo.W,
        geo.TH, geo.TW, geo.NB, nps, nused, nread, stat_div, dw.numel() if dw is not None else 0,
        G=geo.G, BLOCK_T=BT, BLOCK_C=geo.BLOCK_C, BLOCK_E=geo.BLOCK_E, PREC=geo.PREC,
        UPCAST=geo.UPCAST,
        NORM_EPS=NORM_EPS, LN_EPS=LN_EPS, STATS=stats is not None, ZERO_DW=dw is not None,
        BWD=prep is not None, ZERO_DQA=dqa is not None, BLOCK_P=PARTIAL_BLOCK,
        num_warps=_warps(geo))
    return qh


def attention_backward_prep(x, w, mean, rstd, geo: Geometry, dout, o, dw=None, dqa=None):
    """The backward's first launch: q̂ of every real token from the saved (mean, rstd),
    (BG, NB, E) in the input dtype (padded rows left unwritten), and the attention backward's
    preprocess. Returns (q̂, Σ_c W (fp32, (E,)), D (fp32, (BG, NB): dO·o per real token, o the
    attention output the forward saved, x-shaped)). ``dw``, if given, a buffer of at most C·E
    elements zeroed on the way (the fp32 dW accumulator, or deterministic mode's int32 dW
    tickets); ``dqa``, if given, the fp32 (BG, NB, E) dq̂ accumulator, its real rows zeroed."""
    f32 = dict(device=x.device, dtype=torch.float32)
    wsum = torch.empty(geo.E, **f32)
    dd = torch.empty(geo.BG, geo.NB, **f32)
    qh = _qhat(x, w, mean, rstd, geo, dw=dw, prep=(wsum, dout, o, dd, dqa))
    return qh, wsum, dd


#: dW by float atomics into one fp32 accumulator (every token tile adds its whole C×E product
#: at the same addresses) instead of the fixed-order split-K reduction that deterministic mode
#: uses. Off: the split-K reduction in both modes (no same-address atomics, dW bitwise
#: repeatable for a given dq). benchmarks/gpu_check.py times both ("triton[dW atomics]").
DW_ATOMICS = False


def dw_by_atomics(deterministic: bool) -> bool:
    """Whether this backward reduces dW by atomics (``DW_ATOMICS``, never in deterministic
    mode)."""
    return DW_ATOMICS and not deterministic


def dw_reduction(geo: Geometry):
    """dW's fixed-order split-K shape: (SPLIT partials per W tile, W tile sides BCT × BET,
    W tiles n_ce)."""
    ntiles = geo.BG * cdiv(geo.NB, _token_block(geo))
    # 16 rows of W per warp (the launch's warps lie along the products' rows: no two warps on
    # the same rows of yᵀ·dq)
    bct, bet = min(geo.BLOCK_C, 16 * _warps(geo)), min(geo.BLOCK_E, 64)
    n_ce = cdiv(geo.C, bct) * cdiv(geo.E, bet)
    return min(64, next_pow2(ntiles)), bct, bet, n_ce


def layer_norm_projection_backward(x, w, mean, rstd, dq, dxv, spart, nps, nused, dw32,
                                   geo: Geometry, group_stats: bool, deterministic: bool,
                                   tickets=None):
    """From dq (fp32, (BG, NB, E)), dxv = dO + dV (fp32, (BG, NB, C)) and the dq kernel's
    (count, Σ dy, Σ dy·y) partials ``spart`` (NPS rows per group, NUSED written) to (dx, dW),
    one launch. dW: a fixed-order split-K reduction by the launch's programs past the token
    tiles, finished by the last of each W tile's programs (``tickets``: int32, one per W tile,
    zeroed by the backward's q̂ launch) and written in W's dtype; or, with ``DW_ATOMICS`` outside
    deterministic mode, added by atomics into ``dw32`` (fp32, zeroed by the backward's q̂
    launch) and cast to W's dtype. Above ``INLINE_PARTIALS`` partials a unit, one more launch
    combines them first."""
    BT = _token_block(geo)
    nblk = cdiv(geo.NB, BT)
    dx = torch.empty_like(x)
    spart, nps, nused, nread = unit_partials(spart, nps, nused, geo, group_stats, chan=False)
    split, bct, bet, n_ce = dw_reduction(geo)
    atomic = dw_by_atomics(deterministic)
    if not atomic:
        dw = torch.empty(geo.C, geo.E, device=x.device, dtype=w.dtype)
        partw = torch.empty(split, geo.C, geo.E, device=x.device, dtype=torch.float32)
        # the dW work items ride on the token-tile grid: extra tiles per group, BG items a tile
        extra = cdiv(n_ce * split, geo.BG)
    else:
        dw, partw, tickets, extra = dw32, mean, mean, 0
    launch(_ln_bwd_dx_kernel, geo.launch(nblk + extra),
        x, w, mean, rstd, dq, dxv, spart, dx, dw, partw, tickets,
        *x.stride(), *dx.stride(), *w.stride(), geo.C, geo.E, geo.H, geo.W, geo.TH, geo.TW,
        geo.NB, nps, nused, nread, _stat_div(geo, group_stats), nblk, geo.BG * nblk,
        n_ce * split, G=geo.G, BLOCK_T=BT, BLOCK_C=geo.BLOCK_C, BLOCK_E=geo.BLOCK_E,
        PREC=geo.PREC_EPI, ATOMIC_DW=atomic, BLOCK_P=PARTIAL_BLOCK, SPLIT=split,
        BLOCK_CT=bct, BLOCK_ET=bet, num_warps=_warps(geo))
    if not atomic or w.dtype == torch.float32:
        return dx, dw
    return dx, dw.to(w.dtype)
