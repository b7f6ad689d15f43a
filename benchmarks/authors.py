"""The authors' SS-Attention formulation, re-implemented for benchmarking.

This is *our own* code following the sequence of operations of the official SS-BSN
implementation (``SSBlock._get_attention``), so that its speed and memory are what users of
that code pay: image-wide ``layer_norm``; zero pad bottom/right to a multiple of the grid;
a ``pixel_unshuffle``-based regrouping (channels folded into rows so the shuffle acts per
channel); ``torch.mm`` with the shared Q/K matrix over all tokens at once; L2 normalisation;
``bmm`` to the full N×N matrix; in-place ``+1`` and ``/√E``; softmax; ``bmm`` with the raw
input; ``pixel_shuffle`` back; crop; residual. No einops: the rearranges are views/reshapes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _pad(t: torch.Tensor, f: int) -> torch.Tensor:
    h, w = t.shape[-2:]
    ph, pw = (-h) % f, (-w) % f
    if ph or pw:
        t = F.pad(t, (0, pw, 0, ph), mode="constant", value=0.0)
    return t


def _unshuffle_to_groups(t: torch.Tensor, f: int) -> torch.Tensor:
    """(b, c, h, w) → (b·f², c, h/f, w/f): channels folded into rows, pixel_unshuffle,
    unfolded again (group index k = row phase · f + column phase)."""
    b, c, h, w = t.shape
    t = t.reshape(b, 1, c * h, w)                       # 'b c h w -> b 1 (c h) w'
    t = F.pixel_unshuffle(t, f)                         # (b, f², c·h/f, w/f)
    t = t.reshape(b, f * f, c, h // f, w // f)          # 'b k (c h) w -> b (k c) h w'
    return t.reshape(b * f * f, c, h // f, w // f)      # 'b (f c) h w -> (b f) c h w'


def _shuffle_from_groups(t: torch.Tensor, b: int, c: int, f: int) -> torch.Tensor:
    """Inverse of :func:`_unshuffle_to_groups`: (b·f², c, sh, sw) → (b, c, sh·f, sw·f)."""
    sh, sw = t.shape[-2:]
    t = t.reshape(b, f * f, c * sh, sw)                 # 'b (f c) h w -> b f (c h) w'
    t = F.pixel_shuffle(t, f)                           # (b, 1, c·sh·f, sw·f)
    return t.reshape(b, c, sh * f, sw * f)              # 'b 1 (c h) w -> b c h w'


def authors_ss_attention(x: torch.Tensor, wqk: torch.Tensor, grid: int) -> torch.Tensor:
    """x + attention(x), the authors' sequence of operations (N×N materialised per group)."""
    b, c, h, w = x.shape
    e = wqk.shape[1]
    f = grid
    xx = F.layer_norm(x, x.shape[-3:])                  # eps 1e-5, no affine
    xx = _unshuffle_to_groups(_pad(xx, f), f)
    v = _unshuffle_to_groups(_pad(x, f), f)
    bf, _, sh, sw = xx.shape
    qk = xx.permute(0, 2, 3, 1).reshape(-1, c)          # 'b c h w -> (b h w) c'
    v = v.permute(0, 2, 3, 1).reshape(-1, c)
    qk = torch.mm(qk, wqk)
    qk = qk.reshape(bf, sh * sw, e)                     # '(b h w) k -> b (h w) k'
    v = v.reshape(bf, sh * sw, c)
    qk_norm = torch.linalg.norm(qk, dim=-1).unsqueeze(-1) + 1e-8
    qk = qk / qk_norm
    attn = torch.bmm(qk, qk.transpose(1, 2))
    attn += 1.0
    attn /= e ** 0.5
    attn = F.softmax(attn, dim=-1)
    out = torch.bmm(attn, v)
    out = out.reshape(bf, sh, sw, c).permute(0, 3, 1, 2)  # 'b (h w) e -> b e h w'
    out = _shuffle_from_groups(out, b, c, f)
    return x + out[:, :, :h, :w]


def authors_state_dict(base: int = 8, modules: int = 3, ss: int = 1, in_ch: int = 3,
                       seed: int = 0, scale: float = 1.0) -> dict:
    """A random state dict in the authors' checkpoint layout, written from their class
    structure (SSBSN → SSBSNl → DC_branchl → Sequential body; CentralMaskedConv2d carries a
    ``mask`` buffer; SSBlock holds ``wqk`` next to conv1..conv3), not from our model: normal
    weights times ``scale``."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*s):
        return torch.randn(*s, generator=g) * scale
    sd = {"bsn.head.0.weight": rnd(base, in_ch, 1, 1), "bsn.head.0.bias": rnd(base)}
    for br, d in ((1, 2), (2, 3)):
        p, k = f"bsn.branch{br}.body", 2 * d - 1
        mask = torch.ones(base, base, k, k)
        mask[:, :, k // 2, k // 2] = 0
        sd |= {f"{p}.0.weight": rnd(base, base, k, k) * mask, f"{p}.0.bias": rnd(base),
               f"{p}.0.mask": mask}
        for i in (2, 4):
            sd |= {f"{p}.{i}.weight": rnd(base, base, 1, 1), f"{p}.{i}.bias": rnd(base)}
        for j in range(modules):
            q = f"{p}.{6 + j}"
            sd |= {f"{q}.conv1.weight": rnd(base, base, 3, 3), f"{q}.conv1.bias": rnd(base),
                   f"{q}.conv2.weight": rnd(base, base, 3, 3), f"{q}.conv2.bias": rnd(base),
                   f"{q}.conv3.weight": rnd(base, base, 1, 1), f"{q}.conv3.bias": rnd(base)}
            if j >= modules - ss:
                sd[f"{q}.wqk"] = rnd(base, base)
        sd |= {f"{p}.{6 + modules}.weight": rnd(base, base, 1, 1),
               f"{p}.{6 + modules}.bias": rnd(base)}
    dims = [(2 * base, base), (base, base // 2), (base // 2, base // 2), (base // 2, in_ch)]
    for i, (ci, co) in zip((0, 2, 4, 6), dims):
        sd |= {f"bsn.tail.{i}.weight": rnd(co, ci, 1, 1), f"bsn.tail.{i}.bias": rnd(co)}
    return sd
