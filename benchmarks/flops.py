"""Analytic FLOPs of MSA (paper Eq. 6) and SS-Attention (Eq. 10), and the "≈3.8% of MSA" figure.

As in the paper (docs/ss_attention.md):   MSA  = 4hwC + 2(hw)²C          SS-Attention = hwC + 2(hw)²C / ḡ²

Units: the quadratic terms count multiply-accumulates (QKᵀ: (hw)²C MACs, A·V: (hw)²C MACs), so
counted FLOPs are 2× the formulas. The linear terms are the projections: MSA has four C×C
projections (Q, K, V, O) = 4hwC² MACs and SS-Attention one (the shared Q=K matrix; V is the raw
input) = hwC² MACs — the formulas as written drop one factor C (Swin's Ω(MSA) = 4hwC² + 2(hw)²C).
:func:`msa_flops` / :func:`ssa_flops` take ``linear="C"`` (as written) or ``"C2"`` (projections
counted); ``benchmarks/test_bench_flops.py`` checks both against ``FlopCounterMode``.

Run ``python -m benchmarks.flops`` for the derivation of 3.8% and our own figures.
"""
from __future__ import annotations

import math

PAPER_C = 128
PAPER_GRIDS = (4, 6)       # g = γ·d, γ = 2, dilations d = 2, 3


def msa_flops(hw: float, C: int, linear: str = "C") -> float:
    """Eq. 6 (MAC units): 4hwC + 2(hw)²C; linear="C2" counts the projections as 4hwC²."""
    lin = 4 * hw * C * (C if linear == "C2" else 1)
    return lin + 2 * hw ** 2 * C


def ssa_flops(hw: float, C: int, g_bar_sq: float, linear: str = "C") -> float:
    """Eq. 10 (MAC units): hwC + 2(hw)²C/ḡ²; linear="C2" counts the projection as hwC²."""
    lin = hw * C * (C if linear == "C2" else 1)
    return lin + 2 * hw ** 2 * C / g_bar_sq


def ratio(hw: float, C: int, g_bar_sq: float, linear: str = "C") -> float:
    return ssa_flops(hw, C, g_bar_sq, linear) / msa_flops(hw, C, linear)


def branch_average_ratio(hw: float, C: int, grids=PAPER_GRIDS, linear: str = "C") -> float:
    """Both branches run their own attention: Σ SS / Σ MSA = mean of the per-branch ratios."""
    return (sum(ssa_flops(hw, C, g * g, linear) for g in grids)
            / (len(grids) * msa_flops(hw, C, linear)))


# --- counted kernel FLOPs at real (padded) map sizes --------------------------------------
def padded(n: int, g: int) -> int:
    return -(-n // g) * g


def ss_counted(H: int, W: int, C: int, g: int, B: int = 1, projection: bool = True) -> float:
    """FLOPs FlopCounterMode counts for the reference forward: 2·(B·Hp·Wp)·C·C (projection)
    + 4·N²·C per group (QKᵀ and A·V), N = Hp·Wp/g², B·g² groups."""
    Hp, Wp = padded(H, g), padded(W, g)
    N = Hp * Wp // (g * g)
    return (2.0 * B * Hp * Wp * C * C if projection else 0.0) + 4.0 * N * N * C * B * g * g


def msa_counted(H: int, W: int, C: int, B: int = 1, projection: bool = True) -> float:
    """FLOPs of full MSA over all H·W pixels: 4 projections + QKᵀ + A·V."""
    hw = H * W
    return (8.0 * B * hw * C * C if projection else 0.0) + 4.0 * B * hw * hw * C


def network_ratio(H: int, W: int, C: int = PAPER_C, grids=PAPER_GRIDS,
                  projection: bool = True) -> float:
    """Our figure: SS-Attention of both branches vs MSA in the same places, counted FLOPs,
    including the padding to multiples of g (140 → 144 for g = 6)."""
    ss = sum(ss_counted(H, W, C, g, projection=projection) for g in grids)
    msa = len(grids) * msa_counted(H, W, C, projection=projection)
    return ss / msa


def derivation() -> list[tuple[str, float]]:
    """Candidate readings of ḡ and their ratios, at the paper's C = 128."""
    C = PAPER_C
    g1, g2 = PAPER_GRIDS
    out = []
    for label, hw in (("120×120 crop", 120 * 120), ("PD-5 map 140×140", 140 * 140),
                      ("SIDD PD-2 map 264×264", 264 * 264), ("hw → ∞", 1e12)):
        for lin in ("C", "C2"):
            tag = f"{label}, linear {'hwC (as written)' if lin == 'C' else 'hwC² (projections)'}"
            out.append((f"ḡ = mean(g) = 5, ḡ² = 25; {tag}", ratio(hw, C, ((g1 + g2) / 2) ** 2, lin)))
            out.append((f"ḡ² = mean(g²) = 26 (quadratic mean); {tag}",
                        ratio(hw, C, (g1 * g1 + g2 * g2) / 2, lin)))
            out.append((f"branch average (mean of 1/g²); {tag}", branch_average_ratio(hw, C, linear=lin)))
    return out


def required_g_bar(target: float = 0.038) -> float:
    """ḡ such that the asymptotic ratio 1/ḡ² equals target."""
    return 1.0 / math.sqrt(target)


def summary() -> str:
    lines = ["SS-Attention / MSA FLOPs (C = 128, g = 4 and 6, γ = 2)", ""]
    lines.append(f"3.8% needs ḡ² = 1/0.038 = {1 / 0.038:.1f} (ḡ = {required_g_bar():.2f}) "
                 "asymptotically (the quadratic terms dominate: hw ≫ ḡ²).")
    for hw, name in ((140 * 140, "140×140"), (120 * 120, "120×120"), (264 * 264, "264×264")):
        lines.append(f"  ḡ² = (4² + 6²)/2 = 26, {name}, Eq. as written: "
                     f"{100 * ratio(hw, PAPER_C, 26.0):.2f}%  ← the paper's ≈3.8%")
    lines.append(f"  ḡ = (4 + 6)/2 = 5:                 {100 * ratio(140 * 140, PAPER_C, 25.0):.2f}%")
    lines.append(f"  mean over branches of 1/g²:        "
                 f"{100 * branch_average_ratio(140 * 140, PAPER_C):.2f}%")
    lines.append("")
    lines.append("Ours (counted FLOPs, both branches, padding to multiples of g, projections "
                 "counted as C² MACs):")
    for (H, W), name in (((140, 140), "training PD-5 map 140×140"),
                         ((264, 264), "SIDD inference PD-2 map 264×264"),
                         ((532, 532), "512-crop PD-5 map 532×532")):
        lines.append(f"  {name}: {100 * network_ratio(H, W):.2f}% "
                     f"(attention matmuls only: {100 * network_ratio(H, W, projection=False):.2f}%)")
    return "\n".join(lines)


if __name__ == "__main__":
    print(summary())
    print()
    for label, r in derivation():
        print(f"{100 * r:6.2f}%  {label}")
