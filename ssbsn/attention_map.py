"""Where SS-Attention looks: one pixel's attention weights in every SS-Block (paper Fig. 1/7).

At inference the image goes through PD with stride b = ``pd_test``: it is split into b²
sub-images (pixels sharing row/column phase mod b), each zero-padded by p, tiled into one map.
An SS-Block attends within grid groups of that map (tokens sharing row and column phase mod g).
For the chosen image pixel we

1. capture the input of every ``SSAttention`` with a forward hook during the PD-b forward,
2. recompute the chosen token's attention row for its group only, with the shared pieces of
   ``ssbsn/attention/common.py`` — LayerNorm (image-wide or per group, as the module does),
   q = y·W, q̂ = q/(‖q‖ + NORM_EPS),
   softmax((1 + q̂·q̂ᵀ)/√E) over the group's tokens, zero-padded tokens included as keys with
   q̂ = 0 — which costs O(N), not O(N²),
3. map every key's map position back to the image pixel it holds (keys on the PD padding hold
   no image pixel; their total weight is reported as ``pad_share``),
4. say how far the row is from uniform attention over those pixels (:func:`concentration`):
   the heaviest weight relative to the uniform one, and the entropy relative to the uniform
   row's. The cosine logits bound the first: any two weights differ by at most e^{2/√E}.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .atomic import atomic_path
from .errors import UserError
from .attention.module import SSAttention
from .attention.common import (LN_EPS, layer_norm, normalize, padded_size, softmax_scale,
                               tokens_per_group, window_tokens)
from .pd import pd_down, pd_down_batch


def image_to_map(y: int, x: int, height: int, width: int, f: int, pad: int) -> tuple[int, int]:
    """Position in the PD-f map (:func:`ssbsn.pd.pd_down`) of image pixel (y, x); the image is
    (height, width), multiples of f."""
    hs, ws = height // f + 2 * pad, width // f + 2 * pad
    return (y % f) * hs + pad + y // f, (x % f) * ws + pad + x // f


def map_to_image(r, c, height: int, width: int, f: int, pad: int):
    """Inverse of :func:`image_to_map` for arrays of map positions: (y, x, valid) where
    ``valid`` is False on the PD padding."""
    r, c = np.asarray(r), np.asarray(c)
    h, w = height // f, width // f
    hs, ws = h + 2 * pad, w + 2 * pad
    lr, lc = r % hs - pad, c % ws - pad
    valid = (lr >= 0) & (lr < h) & (lc >= 0) & (lc < w)
    return lr * f + r // hs, lc * f + c // ws, valid


def attention_row(x: torch.Tensor, attn: SSAttention, r: int, c: int):
    """Attention weights of the token at map position (r, c) over its grid group.

    ``x``: the module's input (1, C, H, W). Returns (rows, cols, weights, pad_share): the map
    positions of the group's real tokens, their weights (float64), and the total weight of the
    zero-padded tokens.
    """
    g = attn.grid
    _, C, H, W = x.shape
    T = window_tokens(getattr(attn, "window", None), g)
    if T is None:  # whole-map groups
        y = layer_norm(x.double(), g, attn.group_stats)
        rows = torch.arange(r % g, H, g)
        cols = torch.arange(c % g, W, g)
        n_group = tokens_per_group(H, W, g)
    else:  # the token's window: T×T tokens of its phase (fewer in the last row/column)
        Ht, Wt = padded_size(H, g) // g, padded_size(W, g) // g
        i0, j0 = (r // g) // T * T, (c // g) // T * T
        rows = torch.arange(r % g + g * i0, min(H, g * (i0 + T)), g)
        cols = torch.arange(c % g + g * j0, min(W, g * (j0 + T)), g)
        n_group = (min(i0 + T, Ht) - i0) * (min(j0 + T, Wt) - j0)
        if attn.group_stats:  # one mean/variance over the window's group: its real pixels
            v = x.double()[0][:, rows][:, :, cols]
            y = ((x.double() - v.mean()) / torch.sqrt(v.var(unbiased=False) + LN_EPS))
        else:
            y = layer_norm(x.double(), g, False)
    tokens = y[0][:, rows][:, :, cols].reshape(C, -1).T  # (n, C), row-major over (rows, cols)
    w = attn.wqk.detach().double()
    q = tokens @ w
    qh = normalize(q)
    qi = int(((r - int(rows[0])) // g) * len(cols) + (c - int(cols[0])) // g)
    scale = softmax_scale(w.shape[1])
    logits = (1.0 + qh @ qh[qi]) * scale
    n_pad = n_group - logits.numel()
    # padded keys: q̂ = 0, logit 1/√E
    all_logits = torch.cat([logits, torch.full((n_pad,), scale, dtype=logits.dtype)])
    weights = torch.softmax(all_logits, dim=0)
    rr, cc = torch.meshgrid(rows, cols, indexing="ij")
    return (rr.reshape(-1).numpy(), cc.reshape(-1).numpy(), weights[:logits.numel()].numpy(),
            float(weights[logits.numel():].sum()))


def relative_weights(weights: np.ndarray) -> np.ndarray:
    """The weights over the uniform weight of the same keys (1 everywhere = uniform attention)."""
    w = np.asarray(weights, dtype=np.float64)
    return w * (len(w) / max(float(w.sum()), 1e-300))


def concentration(weights: np.ndarray) -> tuple[float, float]:
    """(peak, entropy) of one attention row over its keys: the heaviest weight over the uniform
    one (1 = uniform), and the row's entropy over that of the uniform row, log n (1 = uniform;
    1 for a single key). Both are taken over the weights renormalised to sum to 1."""
    rel = relative_weights(weights)
    n = len(rel)
    if n <= 1:
        return 1.0, 1.0
    p = rel[rel > 0] / n
    return float(rel.max()), float(-(p * np.log(p)).sum() / math.log(n))


def ss_blocks_of(model) -> list:
    """(dilation, block index, SSAttention) of each SS-Block of ``model``, branch order."""
    return [(branch.dilation, i, layer.attn) for branch in model.bsn.branches()
            for i, layer in enumerate(branch.body)
            if isinstance(getattr(layer, "attn", None), SSAttention)]


@torch.no_grad()
def attention_maps(model, image: np.ndarray, pixel: tuple[int, int]) -> list[dict]:
    """For image pixel ``pixel`` = (y, x) of ``image`` (H, W, C) floats in 0..255, one entry
    per SS-Block (branch order, then depth): branch dilation, block index, grid, and the keys'
    image coordinates ``ys``, ``xs`` with their ``weights``, plus ``pad_share`` and the row's
    ``peak`` and ``entropy`` over those pixels (:func:`concentration`)."""
    y0, x0 = pixel
    H, W = image.shape[:2]
    b, p = model.pd_test, model.pd_pad
    dev = next(model.parameters()).device
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32))[None]
    Hp, Wp = H + (-H) % b, W + (-W) % b
    xp = F.pad(x, (0, Wp - W, 0, Hp - H)).to(dev)
    blocks = ss_blocks_of(model)
    if not blocks:
        raise UserError("the model has no SS-Blocks (ss_blocks=0): it has no SS-Attention to "
                        "draw")
    captured: dict[int, torch.Tensor] = {}
    hooks = [a.register_forward_hook(lambda mod, inp, out, k=k: captured.__setitem__(k, inp[0]))
             for k, (_, _, a) in enumerate(blocks)]
    batch = getattr(model, "pd_layout", "mosaic") == "batch"
    # layer by layer over the whole map: the CPU path in strips computes windowed attention
    # without calling the modules, so the hooks would see nothing
    strips, model.bsn.strips = model.bsn.strips, False
    try:
        model.bsn((pd_down_batch if batch else pd_down)(xp, b, p))
    finally:
        model.bsn.strips = strips
        for h in hooks:
            h.remove()
    if batch:  # the pixel's sub-image alone: batch item (y mod b)·b + (x mod b)
        item, r, c = (y0 % b) * b + x0 % b, y0 // b + p, x0 // b + p
    else:
        item, (r, c) = 0, image_to_map(y0, x0, Hp, Wp, b, p)
    out = []
    for k, (d, i, attn) in enumerate(blocks):
        rows, cols, w, pad_share = attention_row(captured[k][item:item + 1].cpu(), attn, r, c)
        if batch:
            lr, lc = rows - p, cols - p
            ys, xs = lr * b + y0 % b, lc * b + x0 % b
            valid = (lr >= 0) & (lr < Hp // b) & (lc >= 0) & (lc < Wp // b)
        else:
            ys, xs, valid = map_to_image(rows, cols, Hp, Wp, b, p)
        valid &= (ys < H) & (xs < W)  # the bottom/right padding to a multiple of b
        pad_share += float(w[~valid].sum())
        peak, entropy = concentration(w[valid])
        out.append(dict(dilation=d, block=i, grid=attn.grid, ys=ys[valid], xs=xs[valid],
                        weights=w[valid], pad_share=pad_share, peak=peak, entropy=entropy))
    return out


def plot_attention(image: np.ndarray, pixel, maps: list[dict], path, top: int = 16) -> None:
    """Draw one panel per SS-Block: the image (dimmed), every key of the pixel's group coloured
    by its weight relative to uniform attention, the ``top`` heaviest outlined in red, the
    query pixel as a cyan cross. Written atomically as PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(maps)
    cols = min(n, 3)
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.2 * rows), squeeze=False)
    shown = np.clip(image / 255.0, 0, 1)
    shown = shown[..., 0] if shown.shape[-1] == 1 else shown
    for ax, m in zip(axes.flat, maps):
        ax.imshow(shown, cmap="gray", alpha=0.45, vmin=0, vmax=1)
        w = m["weights"]
        rel = relative_weights(w)
        sc = ax.scatter(m["xs"], m["ys"], c=rel, s=6, cmap="inferno", linewidths=0)
        if top > 0 and len(w):
            k = np.argsort(w)[::-1][:top]
            ax.scatter(m["xs"][k], m["ys"][k], s=40, facecolors="none", edgecolors="red",
                       linewidths=1.0)
        ax.plot(pixel[1], pixel[0], marker="+", color="cyan", markersize=14, mew=2)
        ax.set_title(f"d={m['dilation']} block {m['block']} (grid {m['grid']})", fontsize=9)
        ax.set_axis_off()
        fig.colorbar(sc, ax=ax, fraction=0.046, pad=0.02, label="weight / uniform")
    for ax in list(axes.flat)[n:]:
        ax.set_axis_off()
    fig.suptitle(f"SS-Attention of pixel (y={pixel[0]}, x={pixel[1]})", fontsize=11)
    fig.tight_layout()
    try:
        with atomic_path(path, ".tmp.png") as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    finally:
        plt.close(fig)


def attention_map_of_file(model, image_path, pixel: tuple[int, int], output, top: int = 16
                          ) -> list[dict]:
    """Read ``image_path``, compute :func:`attention_maps` for ``pixel`` = (y, x) and draw them
    (:func:`plot_attention`) into the PNG ``output``; a grey image goes through a 3-channel
    model as RGB. Returns the maps (one per SS-Block)."""
    from .images import check_size, read_image, split_alpha, to_model_range
    if not ss_blocks_of(model):
        raise UserError("the model has no SS-Blocks (ss_blocks=0): it has no SS-Attention to "
                        "draw")
    img = split_alpha(read_image(image_path))[0]
    check_size(img, image_path)
    y, x = pixel
    if not (0 <= y < img.shape[0] and 0 <= x < img.shape[1]):
        raise UserError(f"--pixel {y} {x} lies outside the {img.shape[0]}×{img.shape[1]} image")
    x255 = to_model_range(img)
    if x255.shape[-1] == 1 and model.in_channels == 3:
        x255 = np.repeat(x255, 3, axis=-1)
    maps = attention_maps(model, x255, (y, x))
    plot_attention(x255, (y, x), maps, output, top=top)
    return maps
