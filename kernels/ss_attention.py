"""Fused SS-Attention in Triton, forward and backward (docs/ss_attention.md, steps 1-6; algorithm: docs/kernels.md).

    out = x + softmax((1 + q̂ q̂ᵀ)/√E) · V   per grid group,   q̂ = normalize(LN(x) · W),  V = x

Read top to bottom like Triton's fused-attention tutorial: the forward kernel, the two backward
kernels, then the host launchers, the ``torch.library`` op with its autograd formula, and the
functional entry ``ss_attention``. The per-token kernels (LayerNorm statistics, the q̂
projection, LayerNorm/projection backward, dW) and the token addressing live in
``token_ops.py``.

Groups: one grid phase of one sample, inside one window of TH × TW tokens with the bounded
scope (``window``), or over the whole map (one window: TH, TW = the phase's token grid). Every
kernel takes TH, TW as runtime ints and derives its group's pixels from them
(``token_ops.group_geometry``); per-token buffers have NB = TH·TW rows per group. Only the
bottom/right windows hold padded tokens, n_pad = th·tw − (real tokens) for a th × tw window.

Algorithm
---------
Forward (3 launches, no aten compute kernel; tests/test_kernel_host.py):
  1. ``_ln_partials_kernel``: per token tile (count, mean, M2).
  2. ``_qhat_kernel``: each program combines its sample's (or, with ``group_stats``, its
     group's) partials in float64 (Chan's formula, fixed order) into mean and rstd (stored by
     the group's first tile); q̂ = q/(‖q‖+NORM_EPS), q = ((x−μ)·rstd)·W, for every real
     token, into a (BG, NB, E) buffer (BG groups) in the input dtype. The projection is done
     once per token rather than once per (query tile, key tile) pair: recomputing it inside
     the attention loop would add C·E/(BLOCK_M·(C+E)) ≈ 50 % to the attention FLOPs at
     C = E = 128, BLOCK_M = 64.
  3. ``_ss_attn_fwd_kernel``: one program per (query tile, group); loop over the group's key
     tiles: S = q̂_i q̂_jᵀ, P = exp2((S − 1)·log2(e)/√E), l += ΣP, acc += P·V_j. Padded keys
     (q̂ = 0, value 0) are not loaded: they add n_pad·exp(−1/√E) to l, counted analytically.
     Writes x + acc/l straight into the output map, o = acc/l (the attention output before
     the residual, x-shaped, input dtype) and LSE = log2(l) + 2·log2(e)/√E, the row's
     logsumexp of the logits (1 + S)/√E in log2 units (one fp32 per row).
Backward (FlashAttention-3's shape; 4 launches in both modes; no aten compute kernel):
  1. ``_qhat_kernel`` recomputes q̂ (cheap, O(N·C·E)) instead of it being saved, and does the
     preprocess: D_i = dO_i·o_i per real token (fp32); its first program zeroes the int32
     tickets of dW's reduction (or, with ``token_ops.DW_ATOMICS``, the fp32 dW accumulator),
     every program its rows of the fp32 dq̂ accumulator (default mode).
  2. ``_ss_attn_bwd_dkdv_kernel``: one program per key tile J, one loop over the query tiles I:
     P = exp2(S·log2(e)/√E − (LSE_I − log2(e)/√E)) (no division), dV_J += Pᵀ dO_I,
     dP = dO_I·V_Jᵀ, dS = P∘(dP − D_I), and the key half of dq̂, dk_J += dSᵀ q̂_I, in registers
     (V is x); by default also the query half of tile I, dS·q̂_J, added into the fp32 buffer by
     atomics (Q = K: dq̂ = (dS + dSᵀ)·q̂/√E, so each tile pair feeds both halves). Stores dO + dV
     (fp32, the residual and value paths of dx) and dk.
  3. ``_ss_attn_bwd_dq_kernel``: per query tile, dq̂ = (query half + key half)/√E: the query
     half from the atomics' buffer, or with ``deterministic=True`` from its own loop over the
     key tiles in a fixed order (S, dP, dS·q̂_j: bitwise repeatable, no atomics). Epilogue:
     recompute q, back through the normalisation, dq = dq̂/(‖q‖+ε) − q̂(q̂·dq̂)/‖q‖; store dq and
     the LayerNorm backward's sums of the tile, Σ dy = dq·(Σ_c W) and Σ dy·y = dq·q.
  4. ``token_ops``: each program combines its unit's sums (float64, fixed order), dy = dq·Wᵀ,
     dx = dO + dV + rstd·(dy − mean dy − y·mean(dy·y)) written into the x-shaped gradient, and
     dW = Σ yᵀ·dq by more programs of the same launch writing a fixed number of split-K
     partials, the last of them (by a ticket counter) summing them in a fixed order (no
     same-address atomics; bitwise repeatable for a given dq), in both modes; float atomics
     in the dx kernel instead with ``token_ops.DW_ATOMICS`` (default mode only).
  Padded keys need no term in the backward: they enter only LSE and o, both complete.
  Cost: 5 N×N-tile products per (query tile, key tile) pair in backward (forward: 2), 7 in
  deterministic mode (the dq loop recomputes S and dP), as in Triton's fused-attention
  tutorial; D costs one pass over dO and o per token.

What is exploited
-----------------
* Softmax shift invariance: the "+1" is dropped.
* |cos| ≤ 1: logits lie in [−1/√E, 1/√E]; a fixed shift by the maximum 1/√E replaces the
  running maximum and rescaling of FlashAttention (exp2 of values in [−2/√E·log2 e, 0]).
* Q = K: one q̂ buffer serves as queries and keys; dq̂ gets both dS and dSᵀ contributions.
* Padded tokens only enter l (forward), analytically: no padded tensor.
* Strided token gathering straight from the (B, C, H, W) map, any strides (NCHW or
  channels_last; channels_last is the fast GPU path, one token = C contiguous values); the
  output and dx are written straight back into the map, residual included. No N×N buffer,
  no pixel_unshuffle/permute/pad/contiguous copies of x.

Saved for backward: x, W, o (x-shaped, input dtype: D from out − x would carry out's rounding,
which broke the FA3 rule for bf16 dW), LSE (one fp32 per row) and the LayerNorm (mean, rstd)
per group index — q̂ is recomputed. Backward scratch (freed on return): q̂, dk and the atomics'
dq̂ buffer, dq (fp32, E per token), dO + dV (fp32, C per token), D (fp32 per token), partials.

Precision: fp32 accumulation everywhere; fp16/bf16 dot operands for fp16/bf16 inputs (P and dS
are rounded to the input dtype for the tensor-core products, as in FlashAttention); outputs in
the input dtype. tf32 policy: fp32 inputs use plain tf32 only if torch allows it
(``torch.get_float32_matmul_precision() != "highest"``); by default they use 3xTF32
(``input_precision="tf32x3"``: fp32-level accuracy on tensor cores; the FMA "ieee" dots spill
heavily at C = 128). Measured: with the products' operands rounded to tf32 (an emulation on
CPU, 1×128×40×40, g = 4) the output's error against fp64 is ~200× that of fp32 products, far
outside the FA3 rule's 2× of an fp32 reference — so plain tf32 only when the user asked for it.
Autotuning: keyed on (C, E, next power of two of N), the dtypes and (backward) the mode, over
per-dtype tile lists (``TILES``, ``DETERMINISTIC_TILES``: what compiles for sm_90 within shared
memory, see ``benchmarks/aot.py``). The fp32
epilogue products (dq·Wᵀ, yᵀ·dq) follow the fp32 policy for every input dtype: with plain tf32
there, fp16's dW missed the FA3 rule on an H200 (2.09× at 1×128×264×264; 3xTF32: 0.75×, for
+3 % backward time, channels_last). The LayerNorm-backward token pass of half inputs spills
nothing channels_last and ~600 B NCHW with Triton 3.9, ≤ 48 B with Triton 3.6
(benchmarks/results/sm90-aot/2026-12-07.md, ``python -m benchmarks.aot --all``).
Under Triton's interpreter (TRITON_INTERPRET=1, CPU tensors) bf16 dot operands are upcast to
fp32 (the interpreter's bf16 tl.dot is wrong).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..attention.common import NORM_EPS, check_window
from .token_ops import (INTERPRET, MAX_CHANNELS, MAX_GRID_YZ, Geometry, attention_backward_prep,
                        cdiv, dw_by_atomics, next_pow2,
                        device_fn, dw_reduction, group_geometry, group_index, launch,
                        layer_norm_projection_backward,
                        layer_norm_stats_and_qhat, load_y, loop_bound, mma, round_to,
                        token_offsets, tracing, window_sizes, wrap_triton)

LOG2E = 1.4426950408889634


def tune_bucket(n: int) -> int:
    """The autotuning key of a token count: the next power of two. Images and tiles of mixed
    sizes (training crops, ``ssbsn denoise`` over a folder) then share one tuning per bucket
    instead of re-tuning 3 kernels for every new N. Within a bucket N differs by less than 2×;
    the tiles' ranking is assumed to hold over that range (not yet measured on a GPU)."""
    return next_pow2(max(int(n), 1))


# Tile configurations (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and operand class,
# chosen from the sm_90 compile table of ``python -m benchmarks.aot --all`` (C = E = 128; the
# tables are in benchmarks/results/sm90-aot/). Every entry launches (shared memory ≤ 227 KB).
# * "half" (fp16/bf16): BLOCK_M = 64 per warpgroup so the products can be Hopper wgmma — the
#   BLOCK_M = 32 entries (mma.sync only, and the most registers) were dropped. No tile may give
#   two warps the same rows of a product: Triton lays the warps of chained products along M,
#   so 8 warps on a 64-row tile computed every S/dP tile twice (TTGIR warpsPerCTA [8, 1]); the
#   8-warp tiles are 128 rows, the 64-row ones 4 warps (tests/test_aot_compile.py checks both
#   this and spills). No tile spills (Triton 3.9, sm_90, bf16, channels_last): bwd_dkdv keeps
#   dV and dk ([BLOCK_M, 128] fp32 each) in registers over its loop, and spills from 64x32 w4
#   on (64x32 w4 s2 144 B, 64x64 w4 ~350 B, 128x64 w8 ~230 B), so 128x32 w8 and 64x16 w4.
# * "fp32": 3xTF32 (see ``fp32_precision``) splits every operand in a high and a low tf32 half
#   and issues three products, so fp32 tiles are smaller; one tile each, because a 3xTF32
#   kernel takes 5-20 s to compile and the fp32 path is for exactness — models train fast in
#   bf16 (autocast). Spills (bytes per thread, Triton 3.9): fwd 0, bwd_dkdv 32x16 w4 ~820
#   (64x16 w4 ~1.9 KB at 224 KB of shared memory), bwd_dq 32x16 w4 ~730 reading the atomics'
#   buffer. Deterministic mode's bwd_dq (its own loop over keys) has its own tile
#   (DETERMINISTIC_TILES): 16x16 w4, ~500 B with the query tile re-read per key tile (see
#   ``_dq_loop``). The 32x16 w4 tile lays its 4 warps along N, so each warp holds all 32 rows
#   of both A operands (q̂ and dO, high and low halves: 512 registers) and spills ~17 KB;
#   64x16 w4 (warps along M) ~2 KB, 16x32 w4 ~580 B, 16x16 w2 ~3 KB.
#   FMA ("ieee") dots spill more (2-43 KB); plain tf32 misses the FA3 rule by ~200×
#   against an fp32 reference. Measured on an H200 (Triton 3.6) for the former backward: an
#   8-warp 64×16 fp32 tile faulted (illegal memory access) where 4 warps were exact — so the
#   fp32 tiles have 4 warps.
# * "wide" (fp16/bf16 with C or E above 128, up to 256): small tiles. The backward's are
#   16x16 w4, the only ones compiled without spills (64x16/64x32 w4: 5-12 KB; 64x32 w8, whose
#   warps compute rows twice: 20-500 B). fp32 with C or E above 128 cannot launch on sm_90 at
#   all: the dq epilogue alone holds the [C, E] fp32 W tile (256 KB at 256 × 256).
TILES = {
    "fwd": {"half": [(64, 64, 4, 3), (128, 64, 8, 3), (128, 32, 8, 3)],
            "fp32": [(32, 32, 4, 2)],
            "wide": [(64, 32, 4, 1)]},
    "bwd_dkdv": {"half": [(128, 32, 8, 2), (64, 16, 4, 2)],
                 "fp32": [(32, 16, 4, 2)],
                 "wide": [(16, 16, 4, 2)]},
    "bwd_dq": {"half": [(128, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 3)],
               "fp32": [(32, 16, 4, 2)],
               "wide": [(16, 16, 4, 2)]},
}


#: Deterministic mode's tiles where they differ from TILES (per kernel and operand class): the
#: dq kernel then loops over the keys itself (two more products per pair), which changes what
#: fits in registers; the autotuning key includes the mode.
DETERMINISTIC_TILES = {"bwd_dq": {"fp32": [(16, 16, 4, 2)]}}


#: The most partial rows one dq-kernel tile writes: its BLOCK_M over the smallest BLOCK_M of
#: its operand class and mode (``part_block``; every tile list is checked against it below).
MAX_PART_ROWS = tl.constexpr(8)


def tiles(kind: str, cls: str, deterministic: bool = False) -> list:
    """The tile list of kernel ``kind`` for an operand class and mode."""
    if deterministic and cls in DETERMINISTIC_TILES.get(kind, {}):
        return DETERMINISTIC_TILES[kind][cls]
    return TILES[kind][cls]


def operand_class(dtype, block_c: int, block_e: int) -> str:
    """Which tile list of TILES a launch uses (fp32 has C, E ≤ 128 on a GPU: see
    ``unsupported_reason``)."""
    if dtype == torch.float32:
        return "fp32"
    return "wide" if max(block_c, block_e) > 128 else "half"


def _autotune(kind: str, mode: str | None = None, deterministic_when: bool = True,
              accumulates: tuple = ()):
    """``triton.autotune`` over the union of the tile lists of ``kind`` (both modes), keyed on
    (C, E, bucket of N) and the mode argument ``mode`` (a constexpr flag that is
    ``deterministic_when`` in deterministic mode) — and the dtypes of the tensor arguments,
    which Triton adds — and pruned before benchmarking to the operand class and mode of the
    launch. Under the interpreter, one configuration per class and mode.
    ``accumulates``: the arguments the kernel adds into (atomics onto a buffer that arrives
    zeroed). Benchmarking runs the kernel many times on the real arguments, so these are zeroed
    before each timed run and once more before the tuned launch (Triton's ``reset_to_zero``;
    torch.compile's autotuner honours it too); otherwise the first launch of every key would
    return the sum of all the timed runs."""
    lists = list(TILES[kind].values()) + list(DETERMINISTIC_TILES.get(kind, {}).values())
    union = []
    for cls in lists:
        union += [t for t in cls if t not in union]

    def prune(configs, nargs, **kw):
        det = mode is not None and mode in kw and bool(kw[mode]) == deterministic_when
        wanted = tiles(kind, operand_class(nargs["X"].dtype, kw["BLOCK_C"], kw["BLOCK_E"]), det)
        wanted = wanted[:1] if INTERPRET else wanted
        keep = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps,
                                       c.num_stages) in wanted]
        return keep

    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
               for m, n, w, s in union]
    # the interpreter has a single configuration left after pruning and nothing to time (Triton
    # 3.6 would still time it, through a GPU driver the interpreter does not have)
    no_timing = (lambda kernel_call, quantiles=None: [0.0, 0.0, 0.0]) if INTERPRET else None
    key = ["C", "E", "NB_BUCKET"] + ([mode] if mode else [])
    return triton.autotune(configs=configs, key=key, reset_to_zero=list(accumulates) or None,
                           prune_configs_by={"early_config_prune": prune}, do_bench=no_timing)


#: The configuration each autotuned kernel runs per (C, E, bucket of N, dtypes): chosen by
#: ``triton.autotune`` on the key's first launch, then launched directly (no per-call key).
_CONFIGS: dict = {}


#: The autotuned kernels as torch.compile gets them, per (kernel, configurations left).
_COMPILER_TUNERS: dict = {}


def _for_compiler(kernel, args, kw):
    """``kernel`` with its configurations already pruned for this launch, and its
    ``reset_to_zero`` kept. Given the kernel itself, torch.compile prunes the configurations
    and rebuilds the autotuner without ``reset_to_zero`` (torch 2.11-2.13), and its autotuner
    would then time the atomics kernel on the real buffers."""
    configs = kernel.early_config_prune(kernel.configs, dict(zip(kernel.arg_names, args)), **kw)
    key = (kernel, tuple(str(c) for c in configs))
    tuner = _COMPILER_TUNERS.get(key)
    if tuner is None:
        tuner = triton.autotune(configs=configs, key=[],
                                reset_to_zero=list(kernel.reset_to_zero) or None)(kernel.fn)
        _COMPILER_TUNERS[key] = tuner
    return tuner


def _launch_tuned(kernel, key, grid, *args, **kw):
    """``kernel[grid](*args, **kw)`` with the configuration cached for ``key``. While torch
    traces the op, the autotuned kernel itself goes into the graph (the compiler tunes it)."""
    if tracing(args[0]):
        launch(_for_compiler(kernel, args, kw), grid, *args, **kw)
        return
    cfg = _CONFIGS.get((kernel, key))
    if cfg is None:
        kernel[grid](*args, **kw)
        cfg = getattr(kernel, "best_config", None)
        if cfg is not None:  # None when a recorder replaced the launcher
            _CONFIGS[(kernel, key)] = cfg
    else:
        kernel.fn[grid](*args, **kw, **cfg.all_kwargs())


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------
@_autotune("fwd")
@triton.jit(do_not_specialize=["TH", "TW", "NB_BUCKET"])
def _ss_attn_fwd_kernel(X, QH, OUT, O, LSE,
                        s_xb, s_xc, s_xh, s_xw, s_ob, s_oc, s_oh, s_ow,
                        C, E, H, W, TH, TW, NB, NB_BUCKET, qk_scale,
                        G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr, PREC: tl.constexpr,
                        UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bg = group_index(G)
    b, p_row, p_col, hr, wr, n_win = group_geometry(pid_bg, H, W, TH, TW, G)
    n_real = hr * wr
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, BLOCK_C)
    offs_e = tl.arange(0, BLOCK_E)
    m_mask = offs_m < n_real
    c_mask = offs_c < C
    e_mask = offs_e < E
    x_base = X + b.to(tl.int64) * s_xb
    q_base = QH + pid_bg.to(tl.int64) * NB * E

    q = tl.load(q_base + offs_m[:, None] * E + offs_e[None, :],
                mask=m_mask[:, None] & e_mask[None, :], other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    hi = tl.where(start_m < n_real, n_real, 0)  # programs past the group's queries skip the loop
    for start_n in range(0, loop_bound(hi), BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_real
        kt = tl.load(q_base + offs_n[None, :] * E + offs_e[:, None],
                     mask=e_mask[:, None] & n_mask[None, :], other=0.0)
        s = mma(q, kt, tl.zeros((BLOCK_M, BLOCK_N), tl.float32), PREC, UPCAST)
        p = tl.exp2(s * qk_scale - qk_scale)  # ≤ 1: cos ≤ 1, no running maximum needed
        p = tl.where(n_mask[None, :], p, 0.0)
        l_i += tl.sum(p, 1)
        pix_n = token_offsets(offs_n, p_row, p_col, wr, G, s_xh, s_xw)
        v = tl.load(x_base + pix_n[:, None] + offs_c[None, :] * s_xc,
                    mask=n_mask[:, None] & c_mask[None, :], other=0.0)
        acc = mma(p.to(v.dtype), v, acc, PREC, UPCAST)
    # the window's padded keys: q̂ = 0 → p = exp2(−qk_scale), value 0
    l_i += (n_win - n_real).to(tl.float32) * tl.exp2(-qk_scale)
    l_safe = tl.where(m_mask, l_i, 1.0)

    mask = m_mask[:, None] & c_mask[None, :]
    pix_m = token_offsets(offs_m, p_row, p_col, wr, G, s_xh, s_xw)
    xq = tl.load(x_base + pix_m[:, None] + offs_c[None, :] * s_xc, mask=mask, other=0.0)
    o = acc / l_safe[:, None]
    res = xq.to(tl.float32) + o
    pix_o = token_offsets(offs_m, p_row, p_col, wr, G, s_oh, s_ow)
    o_off = b.to(tl.int64) * s_ob + pix_o[:, None] + offs_c[None, :] * s_oc
    tl.store(OUT + o_off, res.to(OUT.dtype.element_ty), mask=mask)
    # the attention output without the residual (OUT's strides: both are empty_like(x)), for
    # the backward's D = rowsum(dO ∘ o): out − x would carry out's rounding, ~|x|/|o| times o's
    tl.store(O + o_off, o.to(O.dtype.element_ty), mask=mask)
    # the row's logsumexp of the logits (1 + S)/√E in log2 units, LSE = log2(l) + 2·qk_scale
    # (l is shifted by the maximum logit 2/√E), for the backward's P = exp2(logits·log2 e − LSE);
    # every row of the group's NB, so that it needs no zero fill (rows past the real tokens: 0)
    lse = tl.log2(l_safe) + 2.0 * qk_scale
    tl.store(LSE + pid_bg.to(tl.int64) * NB + offs_m, tl.where(m_mask, lse, 0.0),
             mask=offs_m < NB)


# ---------------------------------------------------------------------------------------------
# Backward (FlashAttention-3's shape). P is recomputed from the saved LSE, P = exp2(S·qk_scale −
# (LSE − qk_scale)) with LSE the log2-domain logsumexp of the logits (1 + S)/√E; D = rowsum(dO ∘ o)
# comes from the first launch (``token_ops.attention_backward_prep``); dS = P ∘ (dP − D) with
# dP = dO·Vᵀ. Padded keys need no term here: they only enter the LSE and o, both complete.
# ---------------------------------------------------------------------------------------------
@device_fn
def _dkdv_loop(dv, dk, k, v, q_base, d_base, LSE_G, DD_G, DQA_G, n_real, hi, p_row, p_col, wr,
               E, C, s_dc, s_dh, s_dw, qk_scale, G: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr,
               BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr, PREC: tl.constexpr,
               UPCAST: tl.constexpr, ATOMIC: tl.constexpr):
    """The key tile's loop over the group's query tiles: dV += Pᵀ·dO and the key half of dq̂,
    dk += dSᵀ·q̂ (both in registers); with ATOMIC also the query half of the query tile,
    dS·k, added into the fp32 buffer DQA by atomics. Tensors are laid out keys × queries."""
    offs_c = tl.arange(0, BLOCK_C)
    offs_e = tl.arange(0, BLOCK_E)
    c_mask = offs_c < C
    e_mask = offs_e < E
    for start_n in range(0, loop_bound(hi), BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_real
        qt = tl.load(q_base + offs_n[None, :] * E + offs_e[:, None],
                     mask=e_mask[:, None] & n_mask[None, :], other=0.0)
        st = mma(k, qt, tl.zeros((BLOCK_M, BLOCK_N), tl.float32), PREC, UPCAST)
        # the query's row shift LSE − qk_scale (the logits' "+1" folded in), then P ≤ 1
        m_n = tl.load(LSE_G + offs_n, mask=n_mask, other=0.0) - qk_scale
        pt = tl.exp2(st * qk_scale - m_n[None, :])
        pt = tl.where(n_mask[None, :], pt, 0.0)
        pix_n = token_offsets(offs_n, p_row, p_col, wr, G, s_dh, s_dw)
        do = tl.load(d_base + pix_n[:, None] + offs_c[None, :] * s_dc,
                     mask=n_mask[:, None] & c_mask[None, :], other=0.0).to(v.dtype)
        dv = mma(pt.to(v.dtype), do, dv, PREC, UPCAST)
        dpt = mma(v, tl.trans(do), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), PREC, UPCAST)
        d_n = tl.load(DD_G + offs_n, mask=n_mask, other=0.0)
        dst = (pt * (dpt - d_n[None, :])).to(qt.dtype)
        dk = mma(dst, tl.trans(qt), dk, PREC, UPCAST)
        if ATOMIC:
            dq = mma(tl.trans(dst), k, tl.zeros((BLOCK_N, BLOCK_E), tl.float32), PREC, UPCAST)
            tl.atomic_add(DQA_G + offs_n[:, None] * E + offs_e[None, :], dq,
                          mask=n_mask[:, None] & e_mask[None, :])
    return dv, dk


# ---------------------------------------------------------------------------------------------
# Backward, main kernel: one program per (key tile, group) — dV and the key half of dq̂, and by
# atomics the query half (Q = K: dq̂ = (dS + dSᵀ)·q̂/√E, so every (query, key) tile pair feeds
# both halves)
# ---------------------------------------------------------------------------------------------
@_autotune("bwd_dkdv", "ATOMIC", deterministic_when=False, accumulates=("DQA",))
@triton.jit(do_not_specialize=["TH", "TW", "NB_BUCKET"])
def _ss_attn_bwd_dkdv_kernel(X, DO, QH, LSE, DD, DK, DQA, DXV,
                             s_xb, s_xc, s_xh, s_xw, s_db, s_dc, s_dh, s_dw,
                             C, E, H, W, TH, TW, NB, NB_BUCKET, qk_scale,
                             G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr, PREC: tl.constexpr,
                             UPCAST: tl.constexpr, ATOMIC: tl.constexpr):
    """Stores dO + dV (fp32, the residual and value paths of dx: V is x) and the key half of
    dq̂·√E (fp32, DK) of its key tile; with ATOMIC adds the query half into DQA (zeroed by the
    backward's first launch). Without it (deterministic mode) the query half is left to
    ``_ss_attn_bwd_dq_kernel``'s own loop."""
    pid_m = tl.program_id(0)  # tile of keys
    pid_bg = group_index(G)
    b, p_row, p_col, hr, wr, _ = group_geometry(pid_bg, H, W, TH, TW, G)
    n_real = hr * wr
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, BLOCK_C)
    offs_e = tl.arange(0, BLOCK_E)
    m_mask = offs_m < n_real
    mask = m_mask[:, None] & (offs_c < C)[None, :]
    e2 = m_mask[:, None] & (offs_e < E)[None, :]
    d_base = DO + b.to(tl.int64) * s_db
    q_base = QH + pid_bg.to(tl.int64) * NB * E
    row_base = pid_bg.to(tl.int64) * NB

    k = tl.load(q_base + offs_m[:, None] * E + offs_e[None, :], mask=e2, other=0.0)
    pix_m = token_offsets(offs_m, p_row, p_col, wr, G, s_xh, s_xw)
    v = tl.load(X + b.to(tl.int64) * s_xb + pix_m[:, None] + offs_c[None, :] * s_xc, mask=mask,
                other=0.0)
    dv = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
    dk = tl.zeros((BLOCK_M, BLOCK_E), tl.float32)
    hi = tl.where(start_m < n_real, n_real, 0)  # programs past the group's keys skip the loop
    dv, dk = _dkdv_loop(dv, dk, k, v, q_base, d_base, LSE + row_base, DD + row_base,
                        DQA + row_base * E, n_real, hi, p_row, p_col, wr, E, C, s_dc, s_dh, s_dw,
                        qk_scale, G, BLOCK_M, BLOCK_N, BLOCK_C, BLOCK_E, PREC, UPCAST, ATOMIC)
    tl.store(DK + (row_base + offs_m)[:, None] * E + offs_e[None, :], dk, mask=e2)
    pix_d = token_offsets(offs_m, p_row, p_col, wr, G, s_dh, s_dw)
    do_m = tl.load(d_base + pix_d[:, None] + offs_c[None, :] * s_dc, mask=mask, other=0.0)
    tl.store(DXV + (row_base + offs_m)[:, None] * C + offs_c[None, :],
             do_m.to(tl.float32) + dv, mask=mask)


@device_fn
def _dq_loop(acc, q_ptrs, do_ptrs, m_mask, e_mask, m_i, d_i, q_base, x_base, n_real, hi, p_row,
             p_col, wr, E, C, s_xc, s_xh, s_xw, qk_scale, G: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
             BLOCK_E: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
             RELOAD: tl.constexpr):
    """The query tile's loop over the group's key tiles: the query half of dq̂, acc += dS·q̂_j
    (deterministic mode's replacement for the key kernel's atomics). The query tile's q̂ and
    dO (``q_ptrs``, ``do_ptrs``) are loaded once, or with RELOAD in every iteration: held over
    the loop as the A operands of two products they take, in fp32 with 3xTF32 (a high and a
    low half each), four [BLOCK_M, 128] register tiles per warp — more than a thread's
    registers; read again per key tile they live for one iteration (cache hits)."""
    offs_c = tl.arange(0, BLOCK_C)
    offs_e = tl.arange(0, BLOCK_E)
    c_mask = offs_c < C
    qmask = m_mask[:, None] & e_mask[None, :]
    dmask = m_mask[:, None] & c_mask[None, :]
    if not RELOAD:
        q = tl.load(q_ptrs, mask=qmask, other=0.0)
        do = tl.load(do_ptrs, mask=dmask, other=0.0).to(q.dtype)
    for start_n in range(0, loop_bound(hi), BLOCK_N):
        if RELOAD:
            # (the loop-dependent mask, always true here, keeps the loads and the operands'
            # 3xTF32 splitting from being hoisted out of the loop as invariants; a vector: the
            # interpreter rejects a 0-d boolean broadcast into a mask)
            live = ((tl.arange(0, BLOCK_M) * 0 + start_n) < hi)[:, None]
            q = tl.load(q_ptrs, mask=qmask & live, other=0.0)
            do = tl.load(do_ptrs, mask=dmask & live, other=0.0).to(q.dtype)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_real
        kt = tl.load(q_base + offs_n[None, :] * E + offs_e[:, None],
                     mask=e_mask[:, None] & n_mask[None, :], other=0.0)
        s = mma(q, kt, tl.zeros((BLOCK_M, BLOCK_N), tl.float32), PREC, UPCAST)
        p = tl.exp2(s * qk_scale - m_i[:, None])
        p = tl.where(n_mask[None, :], p, 0.0)
        pix_n = token_offsets(offs_n, p_row, p_col, wr, G, s_xh, s_xw)
        vt = tl.load(x_base + pix_n[None, :] + offs_c[:, None] * s_xc,
                     mask=c_mask[:, None] & n_mask[None, :], other=0.0)
        dp = mma(do, vt.to(do.dtype), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), PREC,
                 UPCAST)
        ds = (p * (dp - d_i[:, None])).to(kt.dtype)
        acc = mma(ds, tl.trans(kt), acc, PREC, UPCAST)
    return acc


# ---------------------------------------------------------------------------------------------
# Backward, dq kernel: one program per (query tile, group) — dq̂ = (query half + key half)/√E,
# then back through the normalisation q̂ = q/(‖q‖+ε) to dq, and the LayerNorm backward's sums
# ---------------------------------------------------------------------------------------------
@_autotune("bwd_dq", "QUERY_LOOP")
@triton.jit(do_not_specialize=["TH", "TW", "NB_BUCKET"])
def _ss_attn_bwd_dq_kernel(X, DO, QH, Wm, WSUM, MEAN, RSTD, LSE, DD, DK, DQA, DQ, SPART,
                           s_xb, s_xc, s_xh, s_xw, s_db, s_dc, s_dh, s_dw, s_wc, s_we,
                           C, E, H, W, TH, TW, NB, NB_BUCKET, NPS, qk_scale, inv_sqrt_e,
                           G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr, PREC: tl.constexpr,
                           UPCAST: tl.constexpr, NORM_EPS: tl.constexpr,
                           QUERY_LOOP: tl.constexpr, PART_BLOCK: tl.constexpr):
    """The query half of dq̂ from DQA (the key kernel's atomics) or, with QUERY_LOOP
    (deterministic mode), from a loop over the group's key tiles in a fixed order; plus the key
    half DK. Stores dq (fp32) and the tile's (count, Σ dy, Σ dy·y) partial rows: one row per
    PART_BLOCK queries whatever the tile (the tile's sums in its first row, zeros in the
    others), so the rows written do not depend on the configuration the autotuner picks."""
    pid_m = tl.program_id(0)  # tile of queries
    pid_bg = group_index(G)
    b, p_row, p_col, hr, wr, _ = group_geometry(pid_bg, H, W, TH, TW, G)
    n_real = hr * wr
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, BLOCK_C)
    offs_e = tl.arange(0, BLOCK_E)
    m_mask = offs_m < n_real
    c_mask = offs_c < C
    e_mask = offs_e < E
    e2 = m_mask[:, None] & e_mask[None, :]
    x_off = b.to(tl.int64) * s_xb
    q_base = QH + pid_bg.to(tl.int64) * NB * E
    row_base = pid_bg.to(tl.int64) * NB
    rows = (row_base + offs_m)[:, None] * E + offs_e[None, :]
    pix_m = token_offsets(offs_m, p_row, p_col, wr, G, s_xh, s_xw)

    if QUERY_LOOP:
        pix_d = token_offsets(offs_m, p_row, p_col, wr, G, s_dh, s_dw)
        m_i = tl.load(LSE + row_base + offs_m, mask=m_mask, other=0.0) - qk_scale
        d_i = tl.load(DD + row_base + offs_m, mask=m_mask, other=0.0)
        hi = tl.where(start_m < n_real, n_real, 0)
        acc = _dq_loop(tl.zeros((BLOCK_M, BLOCK_E), tl.float32),
                       q_base + offs_m[:, None] * E + offs_e[None, :],
                       DO + b.to(tl.int64) * s_db + pix_d[:, None] + offs_c[None, :] * s_dc,
                       m_mask, e_mask, m_i, d_i, q_base, X + x_off, n_real, hi, p_row, p_col,
                       wr, E, C, s_xc, s_xh, s_xw, qk_scale, G, BLOCK_M, BLOCK_N, BLOCK_C,
                       BLOCK_E, PREC, UPCAST, QH.dtype.element_ty == tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_E), tl.float32)

    # back through q̂ = q/(‖q‖+ε): dq = dq̂/(‖q‖+ε) − q̂(q̂·dq̂)/‖q‖ = (dq̂ − q·t)/(‖q‖+ε) with
    # t = (q·dq̂)/((‖q‖+ε)·‖q‖); q recomputed first, so that y's tile is dead before dq̂'s loads
    y = load_y(X, MEAN, RSTD, pid_bg, x_off, pix_m, offs_m, n_real, offs_c, C, s_xc)
    w = round_to(tl.load(Wm + offs_c[:, None] * s_wc + offs_e[None, :] * s_we,
                         mask=c_mask[:, None] & e_mask[None, :], other=0.0), X.dtype.element_ty)
    q = mma(y.to(w.dtype), w, tl.zeros((BLOCK_M, BLOCK_E), tl.float32), PREC, UPCAST)
    if not QUERY_LOOP:
        acc = tl.load(DQA + rows, mask=e2, other=0.0)
    dqh = (acc + tl.load(DK + rows, mask=e2, other=0.0)) * inv_sqrt_e
    nrm = tl.sqrt(tl.sum(q * q, 1))
    t = tl.sum(q * dqh, 1) / ((nrm + NORM_EPS) * tl.where(nrm > 0, nrm, 1.0))
    dq = (dqh - q * t[:, None]) / (nrm + NORM_EPS)[:, None]
    tl.store(DQ + rows, dq, mask=e2)
    # the LayerNorm backward's sums over this tile, with dy = dq·Wᵀ and q = y·W:
    # Σ_c dy = dq·(Σ_c W) and Σ_c dy·y = dq·q, so no dy tile is formed here
    dq = tl.where(e2, dq, 0.0)
    wsum = tl.load(WSUM + offs_e, mask=e_mask, other=0.0)  # Σ_c W, from the first launch
    s1 = tl.sum(tl.sum(dq * wsum[None, :], 1), 0)
    s2 = tl.sum(tl.sum(dq * q, 1), 0)
    n_tok = tl.minimum(tl.maximum(n_real - start_m, 0), BLOCK_M)
    rows = BLOCK_M // PART_BLOCK  # at most MAX_PART_ROWS (checked on the tile lists)
    row0 = pid_m * rows
    part = SPART + (pid_bg.to(tl.int64) * NPS + row0) * 3
    tl.store(part, (n_tok * C).to(tl.float32))
    tl.store(part + 1, s1)
    tl.store(part + 2, s2)
    if BLOCK_M > PART_BLOCK:  # the tile's other rows: zeros (k = 4·row + column; rows past
        k = tl.arange(0, 4 * MAX_PART_ROWS)  # the group's NPS not written)
        tl.store(part + k - k // 4, tl.zeros((4 * MAX_PART_ROWS,), tl.float32),
                 mask=(k >= 4) & (k % 4 < 3) & (k // 4 < rows) & (row0 + k // 4 < NPS))

# ---------------------------------------------------------------------------------------------
# Host launchers
# ---------------------------------------------------------------------------------------------
def _forward(x, w, grid, group_stats, window=0):
    geo = Geometry(x, w, grid, window)
    mean, rstd, qh = layer_norm_stats_and_qhat(x, w, geo, group_stats)
    out = torch.empty_like(x)
    o = torch.empty_like(x)  # the attention output before the residual add, saved for backward
    lse = torch.empty(geo.BG, geo.NB, device=x.device, dtype=torch.float32)  # every row written
    qk_scale = LOG2E / math.sqrt(geo.E)
    bucket = tune_bucket(geo.NB)
    grid_of = lambda meta: geo.launch(cdiv(geo.NB, meta["BLOCK_M"]))  # noqa: E731
    _launch_tuned(
        _ss_attn_fwd_kernel, (geo.C, geo.E, bucket, x.dtype), grid_of, x, qh, out, o, lse,
        *x.stride(), *out.stride(), geo.C, geo.E, geo.H, geo.W, geo.TH, geo.TW, geo.NB, bucket,
        qk_scale, G=grid, BLOCK_C=geo.BLOCK_C, BLOCK_E=geo.BLOCK_E, PREC=geo.PREC,
        UPCAST=geo.UPCAST)
    return out, o, lse, mean, rstd


def part_block(geo: Geometry, x_dtype, deterministic: bool) -> int:
    """The queries per LayerNorm-backward partial row of the dq kernel: the smallest BLOCK_M
    among its tiles for this operand class and mode (every tile a multiple of it)."""
    return min(t[0] for t in tiles("bwd_dq", operand_class(x_dtype, geo.BLOCK_C, geo.BLOCK_E),
                                   deterministic))


def _check_part_rows() -> None:
    for cls in TILES["bwd_dq"]:
        for det in (False, True):
            ms = [t[0] for t in tiles("bwd_dq", cls, det)]
            if max(ms) // min(ms) > MAX_PART_ROWS.value or any(m % min(ms) for m in ms):
                raise AssertionError(f"bwd_dq tiles {cls} (deterministic={det}): BLOCK_M {ms}")


_check_part_rows()


def _backward(dout, x, w, o, lse, mean, rstd, grid, group_stats, deterministic, window=0):
    geo = Geometry(x, w, grid, window)
    f32 = dict(device=x.device, dtype=torch.float32)
    # zeroed by launch 1: the tickets of dW's fixed-order reduction, or dW's fp32 accumulator
    atomic_dw = dw_by_atomics(deterministic)
    dw32 = torch.empty(geo.C, geo.E, **f32) if atomic_dw else None
    tickets = (None if atomic_dw else
               torch.empty(dw_reduction(geo)[3], device=x.device, dtype=torch.int32))
    # the query half of dq̂ by atomics (zeroed by launch 1), or a loop of the dq kernel
    dqa = None if deterministic else torch.empty(geo.BG, geo.NB, geo.E, **f32)
    qh, wsum, dd = attention_backward_prep(x, w, mean, rstd, geo, dout, o,
                                           dw=dw32 if dw32 is not None else tickets, dqa=dqa)
    qk_scale = LOG2E / math.sqrt(geo.E)
    consts = dict(G=grid, BLOCK_C=geo.BLOCK_C, BLOCK_E=geo.BLOCK_E, PREC=geo.PREC,
                  UPCAST=geo.UPCAST)
    grid_of = lambda meta: geo.launch(cdiv(geo.NB, meta["BLOCK_M"]))  # noqa: E731
    bucket = tune_bucket(geo.NB)
    key = (geo.C, geo.E, bucket, x.dtype, w.dtype, dout.dtype, deterministic)
    dk = torch.empty(geo.BG, geo.NB, geo.E, **f32)
    dxv = torch.empty(geo.BG, geo.NB, geo.C, **f32)
    _launch_tuned(
        _ss_attn_bwd_dkdv_kernel, key, grid_of, x, dout, qh, lse, dd, dk,
        dqa if dqa is not None else dk, dxv, *x.stride(), *dout.stride(), geo.C, geo.E, geo.H,
        geo.W, geo.TH, geo.TW, geo.NB, bucket, qk_scale, ATOMIC=not deterministic, **consts)
    dq = torch.empty(geo.BG, geo.NB, geo.E, **f32)
    # the LayerNorm backward's partials: NPS rows per group, all written whatever the tile
    pb = part_block(geo, x.dtype, deterministic)
    nps = cdiv(geo.NB, pb)
    spart = torch.empty(geo.BG, nps, 3, **f32)
    _launch_tuned(
        _ss_attn_bwd_dq_kernel, key, grid_of, x, dout, qh, w, wsum, mean, rstd, lse, dd, dk,
        dqa if dqa is not None else dk, dq, spart, *x.stride(), *dout.stride(), *w.stride(),
        geo.C, geo.E, geo.H, geo.W, geo.TH, geo.TW, geo.NB, bucket, nps, qk_scale,
        1.0 / math.sqrt(geo.E), NORM_EPS=NORM_EPS, QUERY_LOOP=deterministic, PART_BLOCK=pb,
        **consts)
    del dk, dqa, dd, qh
    return layer_norm_projection_backward(x, w, mean, rstd, dq, dxv, spart, nps, nps, dw32,
                                          geo, group_stats, deterministic, tickets)


# ---------------------------------------------------------------------------------------------
# torch.library ops, with autograd registrations
# ---------------------------------------------------------------------------------------------
def _fake_sizes(x, grid, window):
    """(BG, NB): groups and per-group rows of the saved statistics (as ``Geometry``)."""
    B, C, H, W = x.shape
    TH, TW, NWH, NWW = window_sizes(H, W, grid, window)
    return B * NWH * NWW * grid * grid, TH * TW


def _register(name: str, fake):
    """Register the decorated launcher as the op ``name``. Compiled kernels: a
    ``torch.library.triton_op``, whose launches torch traces (``token_ops.launch``), so that
    torch.compile sees, tunes and schedules the kernels themselves (in its CUDA graphs too) and
    its fake implementation is the launcher run on fake tensors. Under the interpreter, whose
    kernels cannot be traced, an opaque ``custom_op`` with the hand-written ``fake``."""
    def decorate(fn):
        if INTERPRET or wrap_triton is None:
            op = torch.library.custom_op(name, mutates_args=())(fn)
            op.register_fake(fake)
            return op
        return torch.library.triton_op(name, mutates_args=())(fn)
    return decorate


def _fwd_fake(x, w, grid, group_stats, deterministic, window=0):
    BG, NB = _fake_sizes(x, grid, window)
    return (torch.empty_like(x), torch.empty_like(x), x.new_empty((BG, NB), dtype=torch.float32),
            x.new_empty((BG,), dtype=torch.float32), x.new_empty((BG,), dtype=torch.float32))


def _bwd_fake(dout, x, w, o, lse, mean, rstd, grid, group_stats, deterministic, window=0):
    return torch.empty_like(x), w.new_empty(w.shape)


@_register("ssbsn::ss_attention", _fwd_fake)
def ss_attention_op(x: torch.Tensor, w: torch.Tensor, grid: int, group_stats: bool,
                    deterministic: bool, window: int = 0
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                               torch.Tensor]:
    """(x + attention(x), attention(x), lse, mean, rstd); the last four are saved for backward
    (lse: per query row, the log2-domain logsumexp of the logits (1 + q̂ q̂ᵀ)/√E).
    ``window``: the bounded scope in pixels, 0 for whole-map groups."""
    return _forward(x, w, grid, group_stats, window)


@_register("ssbsn::ss_attention_backward", _bwd_fake)
def ss_attention_backward_op(dout: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                             o: torch.Tensor, lse: torch.Tensor, mean: torch.Tensor,
                             rstd: torch.Tensor, grid: int, group_stats: bool,
                             deterministic: bool, window: int = 0
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dW) of ss_attention for the upstream gradient dout (``o``: attention(x), the
    forward's second output, for D = rowsum(dO ∘ o))."""
    return _backward(dout, x, w, o, lse, mean, rstd, grid, group_stats, deterministic, window)


def _setup_context(ctx, inputs, output):
    x, w, grid, group_stats, deterministic, window = inputs
    _, o, lse, mean, rstd = output
    ctx.save_for_backward(x, w, o, lse, mean, rstd)
    ctx.mark_non_differentiable(o, lse, mean, rstd)
    # no zero tensors for the gradients of o, lse, mean and rstd (nor of an unused output)
    ctx.set_materialize_grads(False)
    ctx.cfg = (grid, group_stats, deterministic, window)


def _backward_fn(ctx, dout, *_unused):
    if dout is None:
        return None, None, None, None, None, None
    x, w, o, lse, mean, rstd = ctx.saved_tensors
    dx, dw = torch.ops.ssbsn.ss_attention_backward(dout, x, w, o, lse, mean, rstd, *ctx.cfg)
    return dx, dw, None, None, None, None


torch.library.register_autograd("ssbsn::ss_attention", _backward_fn, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Functional entry
# ---------------------------------------------------------------------------------------------
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def unsupported_reason(x: torch.Tensor, w: torch.Tensor, grid: int,
                       window: int | None = None) -> str | None:
    """Why the fused kernels cannot run these inputs (with this window), or None when they can."""
    if x.dim() != 4:
        return f"expects a (B, C, H, W) tensor, got shape {tuple(x.shape)}"
    if w.dim() != 2 or w.shape[0] != x.shape[1]:
        return f"Q/K matrix of shape {tuple(w.shape)} does not fit {x.shape[1]} channels"
    if not isinstance(grid, int) or grid < 1:
        return f"grid must be a positive int, got {grid!r}"
    if x.dtype not in SUPPORTED_DTYPES:
        return f"dtype {x.dtype} is not supported (float32, float16, bfloat16)"
    if max(x.shape[1], w.shape[1]) > MAX_CHANNELS:
        return f"C={x.shape[1]}, E={w.shape[1]}: more than {MAX_CHANNELS} channels"
    if x.numel() == 0:
        return "empty tensor"
    try:
        check_window(window)
    except ValueError as e:
        return str(e)
    _, _, nwh, nww = window_sizes(x.shape[2], x.shape[3], grid, window)
    if x.shape[0] * nwh * nww > MAX_GRID_YZ:
        return (f"{x.shape[0]} samples × {nwh * nww} windows: more than {MAX_GRID_YZ} (a launch "
                f"grid's extent); use a larger window")
    if x.device != w.device:
        return f"x on {x.device} and W on {w.device}"
    if x.device.type == "cpu":
        if not INTERPRET:
            return ("CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before triton "
                    "is imported, or use backend='sdpa' (the CPU path)")
    elif x.device.type != "cuda":
        return f"device {x.device} is not supported"
    elif x.dtype == torch.float32 and max(x.shape[1], w.shape[1]) > 128:
        return (f"float32 with C={x.shape[1]}, E={w.shape[1]}: more than 128 channels in fp32 "
                f"do not fit a GPU block's shared memory (use bfloat16/float16)")
    if sum((n - 1) * abs(s) for n, s in zip(x.shape[1:], x.stride()[1:])) >= 2 ** 31:
        return "one sample spans more than 2**31 elements (int32 offsets)"
    return None


def ss_attention(x: torch.Tensor, w: torch.Tensor, grid: int, *, group_stats: bool = False,
                 deterministic: bool = False, window: int | None = None) -> torch.Tensor:
    """Return ``x + attention(x)`` with the fused Triton kernels (differentiable in x and w).

    Args:
        x: (B, C, H, W), float32/float16/bfloat16, any strides (channels_last is fastest).
        w: (C, E) shared Q/K matrix; rounded to x's dtype where the kernels load it (its
            gradient comes back in w's dtype, accumulated in fp32).
        grid: the grid period g.
        group_stats: LayerNorm statistics per attention group instead of per sample.
        deterministic: bitwise-repeatable gradients (dW reduced in a fixed order, no atomics);
            also on when ``torch.use_deterministic_algorithms(True)`` is set.
        window: the bounded scope in pixels (``ssbsn.attention.common``: groups are one grid
            phase inside one window of ceil(window/g) tokens a side); None: the whole map.
    """
    check_window(window)
    deterministic = deterministic or torch.are_deterministic_algorithms_enabled()
    reason = unsupported_reason(x, w, grid, window)
    if reason is not None:
        raise RuntimeError(f"ssbsn.kernels.ss_attention: {reason}")
    if w.dtype not in SUPPORTED_DTYPES:
        w = w.to(x.dtype)
    # W in its own dtype: the kernels round it to x's dtype as they load it, and dW comes back
    # in W's dtype (an fp32 parameter with bf16 activations costs no cast either way)
    return torch.ops.ssbsn.ss_attention(x, w, grid, group_stats, deterministic, window or 0)[0]
