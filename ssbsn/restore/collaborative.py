"""Collaborative Wiener filtering in torch: the second stage of BM3D (Dabov et al., IEEE TIP
2007), with the noise of every transform coefficient computed from a measured noise power
spectrum, as for correlated noise (after Mäkinen, Azzari and Foi, IEEE TIP 2020).

Given a noisy image z and a pilot p (an estimate of the clean image) of C channels, with noise
of known power spectrum in each channel:

1. block matching on a guide (the pilot's first channel): reference blocks of n×n pixels on a
   grid of step ``step`` (and the last row and column, so that every pixel is covered); for
   each, the K = ``group`` blocks of the guide nearest to it in L2 distance among those within
   ``radius`` pixels in each direction (the reference block first, the rest by increasing
   distance); the groups serve every channel;
2. each group of noisy blocks and of pilot blocks goes through a separable 3-D orthonormal
   transform: the 2-D DCT of each block, then the Haar transform across the group;
3. every noisy coefficient is scaled by the empirical Wiener factor W = P² / (P² + μ²·v), P the
   pilot's same coefficient and v its noise variance: for the 2-D DCT basis function φ,
   v = Σ_k psd(k)·|FFT(φ)(k)|² / (H·W)²; across the group, the Haar details keep v, while the
   group mean gets (1/K)·Σ over the pairs of blocks of the noise covariance of their
   coefficients at the pair's offset (blocks that overlap, or lie within the noise's
   correlation, share noise: in a flat area, where the groups are of neighbouring blocks, the
   mean is much noisier than v / K);
4. back through the inverse transforms; each block estimate is added into the image with the
   weight Kaiser window × 1/Σ(W²·v) of its group and channel, and the output is the weighted
   sum over the sum of the weights at every pixel.

How: the 2-D DCTs of every block position come from separable matrix products, into ring
buffers of the rows of positions that the groups of one row of tiles can reach; the block
distances are matrix products (|c|² − 2·r·c for reference r and candidate c) over tiles of
reference blocks that share the union of their search windows, then ``topk``; the Haar
transforms are butterflies over chunks of groups; the group estimates go back into a
coefficient map (``index_add_``, in a fixed order) that separable matrix products with the
window folded in turn into the image. Pure torch, in the inputs' dtype on their device.

On the CPU the image goes in horizontal bands (each runs the part of the pass over the whole
image that its rows need) to threads that each run torch ops on one thread: the output is the
same to the bit whatever the bands and torch's thread count, and a busy machine slows the
filter down in proportion to the share of the cores it leaves, where the ops of one pass on
several threads would each wait for the slowest of them.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

_BIG = 1e30  # the distance of a block out of reach (outside the image or the search window)
CHUNK = 1 << 21  # values of the 3-D coefficients of one chunk of groups in the Wiener filter
BANDS_PER_THREAD = 2  # on the CPU: horizontal bands of the image per torch thread …
MIN_BAND = 256        # … of at least this many rows (each inner edge of a band redoes
#                       the work of about 90 rows)
MAX_WORKERS = 16      # bands at a time (each with its own ring buffers)


@dataclass(frozen=True)
class Params:
    """The parameters of :func:`collaborative_wiener`. BM3D's Wiener stage has 8×8 blocks, up
    to 32 per group from a 39×39 window, Kaiser β = 2, and a step of 3. The step here is 6, a
    quarter of the groups: on the quality benchmark's held-out photos (two trained models) it
    gave up 0.03 dB of PSNR against a step of 4 and stayed 0.1 dB above the bm3d package's
    Wiener stage (benchmarks/results/wiener)."""
    block: int = 8     # blocks of block×block pixels
    step: int = 6      # reference blocks every ``step`` pixels (and the last row and column)
    radius: int = 19   # the search window: ±radius pixels around the reference block
    group: int = 32    # blocks per group (a power of two)
    beta: float = 2.0  # Kaiser window of the aggregation
    mu2: float = 1.0   # W = P² / (P² + mu2·v)
    tile: tuple = (3, 6)  # reference blocks matched together (rows, columns): they share
    #                       the candidates of their search windows' union


DEFAULT = Params()


# ------------------------------------------------------------------ transforms

def dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix, D[u, i] = c_u·cos(π(2i + 1)u / 2n): row u is basis u."""
    i = np.arange(n)
    d = np.cos(np.pi * (2 * i[None, :] + 1) * i[:, None] / (2 * n)) * np.sqrt(2.0 / n)
    d[0] /= np.sqrt(2.0)
    return d


def haar_matrix(n: int) -> np.ndarray:
    """The orthonormal Haar matrix of size n (a power of two), full decomposition: row 0 the
    mean, then the details from the coarsest to the finest."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"the Haar transform needs a power of two, got {n}")
    h = np.ones((1, 1))
    while h.shape[0] < n:
        m = h.shape[0]
        h = np.concatenate([np.kron(h, [1.0, 1.0]), np.kron(np.eye(m), [1.0, -1.0])]) / np.sqrt(2)
    return h


def kaiser_window(n: int, beta: float) -> np.ndarray:
    return np.kaiser(n, beta)


def cosines(n: int, lags: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of 2π·k·d/n, (n, 2·lags + 1) for k = 0…n − 1 and d = −lags…lags."""
    t = 2 * np.pi * np.outer(np.arange(n), np.arange(-lags, lags + 1)) / n
    return np.cos(t), np.sin(t)


def _autocorrelations(block: int) -> np.ndarray:
    """A[u, δ + block − 1] = Σ_i D[u, i]·D[u, i + δ]: the autocorrelation of each 1-D DCT basis
    vector at lags δ = −(block − 1) … block − 1."""
    D = dct_matrix(block)
    lags = np.arange(-(block - 1), block)
    A = np.zeros((block, lags.size))
    for k, d in enumerate(lags):
        lo, hi = max(0, -d), min(block, block - d)
        A[:, k] = (D[:, lo:hi] * D[:, lo + d:hi + d]).sum(1)
    return A


def coefficient_covariances(psd: np.ndarray, block: int = 8, reach: int | None = None
                            ) -> np.ndarray:
    """The covariance of the noise in the same 2-D DCT coefficient of two block×block blocks
    whose positions differ by δ = (δy, δx), for |δy|, |δx| ≤ ``reach`` (default block + 3: the
    blocks' own extent and the ±4 pixels over which :func:`ssbsn.restore.wiener.noise_psd`
    measures the noise's correlation): (2·reach + 1, 2·reach + 1, block²), index
    [δy + reach, δx + reach, k], k in the order of the coefficient maps (a·block + b: a the
    frequency along the columns, b along the rows). ``psd`` (H, W) is the noise's power
    spectrum in BM3D's convention (white noise of variance s: s·H·W everywhere).

    With R the noise's autocovariance (the inverse FFT of psd / (H·W), circular) and φ the
    basis function: cov(δ) = Σ_{x, x'} φ(x)·φ(x')·R(δ + x' − x). At δ = 0 it is the variance
    v = Σ_k psd(k)·|FFT(φ)(k)|² / (H·W)² (:func:`coefficient_variances`); the group mean of
    blocks that overlap, or lie within the noise's correlation of each other, has a variance of
    Σ cov(δ) over the pairs of blocks rather than v."""
    H, W = psd.shape
    L = block + 3 if reach is None else reach
    M = L + block - 1
    # the autocovariance at lags (dy, dx) up to ±M: the real part of the inverse DFT of
    # psd / (H·W) there (circular), as cosine sums
    cy, sy = cosines(H, M)
    cx, sx = cosines(W, M)
    psd = np.asarray(psd, dtype=np.float64)
    Rb = (cy.T @ (psd @ cx) - sy.T @ (psd @ sx)) / float(H * W) ** 2
    A = _autocorrelations(block)
    win = np.lib.stride_tricks.sliding_window_view(Rb, (2 * block - 1, 2 * block - 1))
    t = np.einsum("ax,pqyx->pqya", A, win)
    return np.einsum("by,pqya->pqab", A, t).reshape(2 * L + 1, 2 * L + 1, block * block)


def coefficient_variances(psd: np.ndarray, block: int = 8) -> np.ndarray:
    """The noise variance of each 2-D DCT coefficient of a block×block block, (block²,) in the
    order of the coefficient maps, for noise of power spectrum ``psd`` (H, W) in BM3D's
    convention: v = Σ_k psd(k)·|FFT(φ)(k)|² / (H·W)², φ the basis function (computed as
    :func:`coefficient_covariances` at δ = 0)."""
    return coefficient_covariances(psd, block, reach=0)[0, 0]


def _analysis(x: torch.Tensor, D: torch.Tensor, out: torch.Tensor, buf: torch.Tensor
              ) -> torch.Tensor:
    """The 2-D DCT of every block of x (h, w, C; any strides): ``out`` (hp·wp·C, n²) with
    hp, wp = h − n + 1, w − n + 1, coefficient a·n + b of the block at (y, x) of channel c in
    row (y·wp + x)·C + c.
    Separable: the 1-D DCT along the rows of every n pixels (a matrix product on a copy of
    them), then down the columns (one matrix product per block row, then the coefficients
    brought next to each other); ``buf`` holds (n² + 2n)·h·wp·C values."""
    n = D.shape[0]
    h, w, C = x.shape
    hp, wp = h - n + 1, w - n + 1
    M = wp * C * n
    u = buf[:h * M].view(h, wp, C, n)
    u.copy_(x.unfold(1, n, 1))                                            # (y, x, c, j)
    a = torch.matmul(u.view(-1, n), D.T, out=buf[h * M:2 * h * M].view(-1, n))  # (y, x, c, a)
    g = torch.bmm(D.expand(hp, n, n), a.view(-1).as_strided((hp, n, M), (M, M, 1)),
                  out=buf[2 * h * M:2 * h * M + hp * n * M].view(hp, n, M))  # (y, b, (x, c, a))
    out.view(hp, wp, C, n, n).copy_(g.view(hp, n, wp, C, n).permute(0, 2, 3, 4, 1))
    return out


def _synthesis(m: torch.Tensor, Dk: torch.Tensor, img: torch.Tensor, buf: torch.Tensor) -> None:
    """The adjoint of :func:`_analysis` with a window: add into ``img`` (hp + n − 1, wp + n − 1, C)
    the blocks Σ_ab m[(y·wp + x)·C + c, a·n + b]·Dk[b, i]·Dk[a, j] at (y + i, x + j) of a
    coefficient map m (hp·wp·C, n²), Dk = D·window (n, n). Separable: along the rows (one matrix
    product per block row, then n shifted sums), then along the columns; ``buf`` holds
    (n² + 2n)·(hp + n)·wp·C values."""
    n = Dk.shape[0]
    h, w, C = img.shape
    hp, wp = h - n + 1, w - n + 1
    M = wp * C * n
    g = torch.bmm(Dk.T.expand(hp, n, n), m.view(hp, M, n).transpose(1, 2),
                  out=buf[:hp * n * M].view(hp, n, M))          # (y, i, (x, c, a))
    t = buf[hp * n * M:hp * n * M + h * M].view(h, M).zero_()
    for i in range(n):
        t[i:i + hp].add_(g[:, i])                                # (y + i, (x, c, a))
    r = torch.matmul(Dk.T, t.view(-1, n).T, out=buf[hp * n * M + h * M:hp * n * M + 2 * h * M]
                     .view(n, -1)).view(n, h, wp, C)              # (j, y, x, c)
    for j in range(n):
        img[:, j:j + wp].add_(r[j])


# ------------------------------------------------------------------ reference grid and tiles

def reference_positions(n: int, step: int) -> list[int]:
    """Positions 0, step, 2·step, … below n, and n − 1 (the last) if it is not among them."""
    out = list(range(0, n, step))
    if out[-1] != n - 1:
        out.append(n - 1)
    return out


def _chunks(pos: list[int], size: int) -> list[tuple[int, tuple[int, ...], int]]:
    """(origin, offsets from the origin padded to ``size`` by repeating the last, real count)."""
    out = []
    for i in range(0, len(pos), size):
        c = pos[i:i + size]
        rel = tuple(p - c[0] for p in c) + (c[-1] - c[0],) * (size - len(c))
        out.append((c[0], rel, len(c)))
    return out


def group_size(group: int, hp: int, wp: int, radius: int) -> int:
    """The group size: ``group``, or the largest power of two no larger than the fewest
    candidates any reference block has (a small image, a small window)."""
    avail = min(radius + 1, hp) * min(radius + 1, wp)
    k = min(group, avail)
    return 1 << (k.bit_length() - 1)


# ------------------------------------------------------------------ the filter

def default_bands(height: int, device, threads: int | None = None) -> tuple[int, int]:
    """(bands, workers) for :func:`collaborative_wiener` on an image of ``height`` rows with
    ``threads`` torch threads (default: torch's): on the CPU with more than one thread,
    ``BANDS_PER_THREAD`` bands per thread of at least ``MIN_BAND`` rows each, on as many
    single-threaded workers as torch has threads (at most ``MAX_WORKERS``); one band elsewhere
    (a GPU runs every op on the whole image at once)."""
    threads = torch.get_num_threads() if threads is None else threads
    if torch.device(device).type != "cpu" or threads <= 1:
        return 1, 1
    bands = max(1, min(BANDS_PER_THREAD * threads, height // MIN_BAND))
    return bands, min(threads, bands, MAX_WORKERS)


def band_cuts(height: int, bands: int) -> list[int]:
    """The first row of each of ``bands`` bands of about equal height, and ``height``."""
    bands = max(1, min(bands, height))
    return [height * k // bands for k in range(bands + 1)]


def collaborative_wiener(noisy: torch.Tensor, pilot: torch.Tensor, noise: torch.Tensor,
                         params: Params = DEFAULT, guide: torch.Tensor | None = None,
                         piece: int = 16, bands: int | None = None,
                         workers: int | None = None) -> torch.Tensor:
    """BM3D's Wiener stage on ``noisy`` (C, H, W) with ``pilot`` (C, H, W) as its pilot; the
    groups are matched on ``guide`` (H, W; default: the pilot's channel 0) and shared by all
    channels. ``noise``: per channel, the covariances of the blocks' 2-D DCT coefficients
    (C, 2L + 1, 2L + 1, block²) (:func:`coefficient_covariances`), or their variances alone
    (C, block²) (:func:`coefficient_variances`; then the blocks' noise is taken as
    uncorrelated between blocks). Computes in the inputs' dtype on their device. See the
    module's docstring.

    Bands: the output is computed in ``bands`` horizontal bands, each on its own from the rows
    it needs (default: :func:`default_bands`). A band runs the very ops that the pass over the
    whole image runs for its rows, so the output does not depend on the bands. On the CPU the
    bands go to ``workers`` threads (default: :func:`default_bands`), each running torch ops
    on one thread: the output does not depend on torch's thread count either (some ops, such
    as sums, split their work by the thread count, and the split changes the rounding), and
    the workers share no parallel regions: on a busy machine, a worker that the system sets aside holds up its own band only,
    where every op of a multi-threaded pass would wait for its slowest thread.

    Memory: besides three images, per worker, the coefficient maps of the noisy image, the
    pilot and the estimate for the rows of block positions that one row of tiles can reach
    (ring buffers of step·(tile rows − 1) + 2·radius + 1 rows: 3·51·W·C·block² values by
    default, 0.47 GB for a 4000-pixel-wide RGB image in float32), and ``piece`` rows at a time
    through the transforms."""
    C, H, W = noisy.shape
    n = params.block
    nn = n * n
    if noise.dim() == 2:
        noise = noise.reshape(C, 1, 1, -1)
    L = (noise.shape[1] - 1) // 2
    if pilot.shape != noisy.shape or tuple(noise.shape) != (C, 2 * L + 1, 2 * L + 1, nn):
        raise ValueError("noisy and pilot must be (C, H, W) alike, noise (C, block²) or "
                         "(C, 2L + 1, 2L + 1, block²)")
    if guide is not None and tuple(guide.shape) != (H, W):
        raise ValueError(f"the guide must be (H, W) = ({H}, {W}), got {tuple(guide.shape)}")
    if H < n or W < n:
        raise ValueError(f"the image ({H}×{W}) is smaller than a block ({n}×{n})")
    dev, dt = noisy.device, noisy.dtype
    f = _Filter(noisy.permute(1, 2, 0), pilot.permute(1, 2, 0),
                None if guide is None else guide.to(device=dev, dtype=dt)[:, :, None],
                noise.to(device=dev, dtype=dt), params, piece)
    auto_bands, auto_workers = default_bands(H, dev)
    cuts = band_cuts(H, auto_bands if bands is None else bands)
    jobs = list(zip(cuts[:-1], cuts[1:]))
    if dev.type != "cpu":
        out = f.band(0, H) if len(jobs) == 1 else torch.cat([f.band(a, b) for a, b in jobs])
    else:
        out = torch.empty(H, W, C, dtype=dt, device=dev)
        _single_threaded(lambda a, b: out[a:b].copy_(f.band(a, b)), jobs,
                         max(1, min(auto_workers if workers is None else workers, len(jobs))))
    return out.permute(2, 0, 1).contiguous()


def _single_threaded(f, jobs: list, workers: int) -> None:
    """f(*job) for every job, on ``workers`` threads that take the next job as they finish
    one, each running torch ops on one thread of its own."""
    threads = torch.get_num_threads()
    try:
        with ThreadPoolExecutor(workers, initializer=torch.set_num_threads,
                                initargs=(1,)) as ex:
            for _ in ex.map(lambda job: f(*job), jobs):
                pass
    finally:
        # torch.set_num_threads sets the calling thread's count, and the count that threads
        # which first run torch ops from now on start with: that one back to this thread's
        torch.set_num_threads(threads)


_ANALYSE, _GROUP, _FLUSH = range(3)


class _Filter:
    """The filter of one image: its constants, and the schedule of the pass over the whole
    image, row of tiles by row of tiles, as a list of steps:

    * ``_ANALYSE`` a, e: the 2-D DCTs of block-position rows [a, e) into the ring buffers
      (ahead of the first row of tiles that reaches them);
    * ``_GROUP`` i: block matching and Wiener filtering of the groups of row of tiles i, the
      estimates added into the ring of coefficient maps;
    * ``_FLUSH`` a, e: rows [a, e) of the coefficient map, which no later row of tiles reaches,
      through the inverse 2-D DCT into the image (``num``, ``den``), and their ring rows
      cleared.

    The analysis and the flushes go ``piece`` rows at a time, never across the end of the
    ring. :meth:`band` runs the part of the schedule that some rows of the output need."""

    def __init__(self, zh, ph, gh, cov, params: Params, piece: int):
        H, W, C = zh.shape
        n, S, R = params.block, params.step, params.radius
        nn = n * n
        dev, dt = zh.device, zh.dtype
        self.zh, self.ph, self.gh, self.params = zh, ph, gh, params
        self.shape, self.n, self.nn = (H, W, C), n, nn
        self.hp, self.wp = hp, wp = H - n + 1, W - n + 1
        self.K = K = group_size(params.group, hp, wp, R)
        t = lambda a: torch.as_tensor(a, dtype=dt, device=dev)  # noqa: E731
        self.D = t(dct_matrix(n))
        self.win = kaiser_window(n, params.beta).tolist()
        self.Dk = t(dct_matrix(n) * kaiser_window(n, params.beta))  # D[u, i]·window[i]
        self.Hk = t(haar_matrix(K))
        L = (cov.shape[1] - 1) // 2
        self.var = cov[:, L, L]
        # the covariance table by pair offset, and a last row of zeros for pairs farther apart
        self.table = torch.cat([cov.permute(1, 2, 0, 3).reshape(-1, C * nn),
                                torch.zeros(1, C * nn, dtype=dt, device=dev)])
        tr, tc = params.tile
        self.rows = _chunks(reference_positions(hp, S), tr)
        self.cols = _chunks(reference_positions(wp, S), tc)
        # ring buffers of the coefficient maps: block-position row y lives in ring row y mod nbuf
        self.nbuf = nbuf = min(hp, S * (tr - 1) + 2 * R + 1)
        self.piece = piece = max(1, min(piece, nbuf))

        def segments(r0, r1):
            """[r0, r1) in pieces that neither wrap around the ring nor exceed ``piece`` rows."""
            a = r0
            while a < r1:
                e = min(r1, a + piece, a - a % nbuf + nbuf)
                yield a, e
                a = e
        steps, reach = [], []   # reach: the block rows [b0, b1] that each row of tiles reaches
        done = flushed = 0
        for i, (oy, rel, ny) in enumerate(self.rows):
            b0, b1 = max(0, oy - R), min(hp - 1, oy + rel[ny - 1] + R)
            reach.append((b0, b1))
            steps += [(_FLUSH, a, e) for a, e in segments(flushed, b0)]  # rows no later
            flushed = b0                                                   # group reaches
            steps += [(_ANALYSE, a, e) for a, e in segments(done, b1 + 1)]
            done = b1 + 1
            steps.append((_GROUP, i, i + 1))
        steps += [(_FLUSH, a, e) for a, e in segments(flushed, hp)]
        self.steps, self.reach = steps, reach

    def _span(self, y0: int, y1: int) -> tuple[int, int, int, int]:
        """(first step, end step, lo, hi) of the part of the schedule that output rows [y0, y1)
        need: the flushes of the block rows [lo, hi) whose blocks cover them, every row of
        tiles that reaches one of those (in the whole pass, they are all done before the
        flush), and the analysis of every row that those rows of tiles reach."""
        n, steps = self.n, self.steps
        kept = [k for k, (kind, a, e) in enumerate(steps)
                if kind == _FLUSH and a < y1 and e + n - 1 > y0]
        lo, hi = steps[kept[0]][1], steps[kept[-1]][2]
        i0 = next(i for i, (b0, b1) in enumerate(self.reach) if b1 >= lo)
        b0 = self.reach[i0][0]
        first = next(k for k, (kind, a, e) in enumerate(steps)
                     if (kind == _ANALYSE and e > b0) or (kind == _GROUP and a == i0))
        return first, kept[-1] + 1, lo, hi

    def band(self, y0: int, y1: int) -> torch.Tensor:
        """Output rows [y0, y1) (y1 − y0, W, C): the steps of the whole pass that they need,
        in its order, on buffers of their own (a flush of rows outside [lo, hi) only clears
        them). Every op is one of the whole pass, on the same values."""
        H, W, C = self.shape
        n, nn, hp, wp, nbuf, K = self.n, self.nn, self.hp, self.wp, self.nbuf, self.K
        zh, ph, gh, D, Dk, win, params = self.zh, self.ph, self.gh, self.D, self.Dk, self.win, \
            self.params
        dev, dt = zh.device, zh.dtype
        first, end, lo, hi = self._span(y0, y1)
        num = torch.zeros(hi + n - 1 - lo, W, C, dtype=dt, device=dev)  # image rows lo…
        den = torch.zeros_like(num)
        zr = torch.empty(nbuf * wp * C, nn, dtype=dt, device=dev)
        pr = torch.empty_like(zr)
        cr = torch.zeros_like(zr)
        wr = torch.zeros(nbuf * wp, C, dtype=dt, device=dev)
        gr = None if gh is None else torch.empty(nbuf * wp, nn, dtype=dt, device=dev)
        lr = pr.view(nbuf, wp, C, nn)[:, :, 0] if gr is None else gr.view(nbuf, wp, nn)
        matcher = _Matcher(nbuf, wp, nn, params, K, dt, dev)
        buf = torch.empty((nn + 2 * n) * (self.piece + n) * wp * C, dtype=dt, device=dev)
        zm, pm, cm = zr.view(-1, C, nn), pr.view(-1, C, nn), cr.view(-1, C, nn)
        for kind, a, e in self.steps[first:end]:
            sl = slice(a % nbuf * wp * C, (e - 1) % nbuf * wp * C + wp * C)
            if kind == _ANALYSE:
                _analysis(zh[a:e + n - 1], D, zr[sl], buf)
                _analysis(ph[a:e + n - 1], D, pr[sl], buf)
                if gr is not None:
                    _analysis(gh[a:e + n - 1], D, gr[sl.start // C:sl.stop // C], buf)
                matcher.put(a, lr[a % nbuf:(e - 1) % nbuf + 1])
            elif kind == _GROUP:
                idx = matcher.match(self.rows[a], self.cols, hp)      # (refs, K): y·wp + x
                _filter(zm, pm, idx, (idx // wp % nbuf) * wp + idx % wp, wp, self.Hk,
                        self.var, self.table, params.mu2, cm, wr)
            else:
                if lo <= a < hi:
                    _synthesis(cr[sl], Dk, num[a - lo:e + n - 1 - lo], buf)
                    w = wr[sl.start // C:sl.stop // C].view(e - a, wp, C)
                    t = buf[:(e - a + n - 1) * wp * C].view(e - a + n - 1, wp, C).zero_()
                    for i, v in enumerate(win):            # the window, along the rows …
                        t[i:i + e - a].add_(w, alpha=v)
                    d = den[a - lo:e + n - 1 - lo]
                    for j, v in enumerate(win):            # … and the columns
                        d[:, j:j + wp].add_(t, alpha=v)
                cr[sl].zero_()
                wr[sl.start // C:sl.stop // C].zero_()
        return num[y0 - lo:y1 - lo].div_(den[y0 - lo:y1 - lo])


class _Matcher:
    """Block matching on the guide's coefficient map, row of tiles by row of tiles.

    The guide's coefficients, augmented with their squared norm, live in a ring of rows
    (block-position row y in ring row y mod rows; columns padded by ``pad`` blocks on each side
    and one more ring row, all out of reach: norm _BIG). The distance from reference block r
    to candidate c is |c|² − 2·r·c (|r|² is the same for all of r's candidates, and the DCT is
    orthonormal), one matrix product per tile over the candidates of the union of its blocks'
    search windows; a bias puts the candidates outside a block's own window out of reach and
    its own position first."""

    def __init__(self, rows: int, wp: int, nn: int, params: Params, K: int, dtype, device):
        S, R = params.step, params.radius
        tr, tc = params.tile
        self.S, self.R, self.tr, self.tc, self.K = S, R, tr, tc, K
        self.rows, self.wp, self.nn = rows, wp, nn
        self.pad = R + S * tc
        self.Wa = wp + 2 * self.pad
        self.aug = torch.zeros(rows + 1, self.Wa, nn + 1, dtype=dtype, device=device)
        self.aug[..., nn] = _BIG
        self.flat = self.aug.view(-1, nn + 1)
        self.rh, self.rw = S * (tr - 1) + 2 * R + 1, S * (tc - 1) + 2 * R + 1  # a tile's area
        qx = torch.arange(self.rw, device=device)
        self.qx = qx
        self.area_pos = (torch.arange(self.rh, device=device).view(-1, 1) * wp + qx).view(-1)
        self.bias = {}

    def put(self, y0: int, lum: torch.Tensor) -> None:
        """Rows y0.. of the guide's coefficient map, lum (rows, wp, n²), that do not wrap around
        the ring."""
        r0 = y0 % self.rows
        inner = self.aug[r0:r0 + lum.shape[0], self.pad:self.pad + self.wp]
        inner[..., :self.nn] = lum
        torch.sum(lum * lum, -1, out=inner[..., self.nn])

    def _bias(self, rel_y, rel_x):
        key = (rel_y, rel_x)
        if key not in self.bias:
            R, rh, rw, tr, tc = self.R, self.rh, self.rw, self.tr, self.tc
            dev = self.aug.device
            ry = torch.tensor(rel_y, device=dev).view(-1, 1).expand(tr, tc).reshape(-1)
            rx = torch.tensor(rel_x, device=dev).view(1, -1).expand(tr, tc).reshape(-1)
            qy = torch.arange(rh, device=dev)
            inside = (((qy.view(1, rh, 1) - R - ry.view(-1, 1, 1)).abs() <= R)
                      & ((self.qx.view(1, 1, rw) - R - rx.view(-1, 1, 1)).abs() <= R))
            bias = torch.where(inside, 0.0, _BIG).to(self.aug.dtype).view(1, tr * tc, rh * rw)
            self_q = (ry + R) * rw + rx + R
            bias[0, torch.arange(tr * tc, device=dev), self_q] = -_BIG
            self.bias[key] = bias, self_q
        return self.bias[key]

    def match(self, row, cols, hp: int) -> torch.Tensor:
        """The groups of the reference blocks of the tile row ``row`` × the tile columns
        ``cols``: (refs, K) positions y·wp + x of the blocks of each group, the reference block
        first, then by increasing distance; refs in the order of the tiles, then row by row
        within a tile, real ones only. The ring must hold every row the tiles reach."""
        S, R, tr, tc, K, nn, Wa = self.S, self.R, self.tr, self.tc, self.K, self.nn, self.Wa
        rh, rw, refs = self.rh, self.rw, self.tr * self.tc
        dev = self.aug.device
        oy, rel_y, ny = row
        y = torch.arange(oy - R, oy - R + rh, device=dev)
        ring = torch.where((y >= 0) & (y < hp), y % self.rows, self.rows)
        area = (ring.view(-1, 1) * Wa + self.qx.view(1, -1)).view(-1)   # at column offset 0
        ring = ring.tolist()
        chunk = max(1, (1 << 23) // (refs * rh * rw))
        out = []
        for rel_x, nx in sorted({(c[1], c[2]) for c in cols}):
            bias, self_q = self._bias(rel_y, rel_x)
            origins = [c[0] for c in cols if c[1:] == (rel_x, nx)]
            ox = torch.tensor(origins, device=dev)
            left = ox - R + self.pad                                         # (T,)
            ref = self.flat.index_select(0, (area[self_q].view(1, -1) + left.view(-1, 1))
                                         .view(-1)).view(-1, refs, nn + 1)
            ref = torch.cat([-2 * ref[..., :nn], torch.ones_like(ref[..., nn:])], -1)
            keep = ((torch.arange(tr, device=dev) < ny).view(-1, 1)
                    & (torch.arange(tc, device=dev) < nx).view(1, -1)).view(-1)
            t0 = 0
            while t0 < len(origins):   # runs of tiles evenly spaced, at most ``chunk``
                t1 = t0 + 1
                while (t1 < len(origins) and t1 - t0 < chunk and
                       origins[t1] - origins[t1 - 1] == origins[t0 + 1] - origins[t0]):
                    t1 += 1
                gap = (origins[t0 + 1] - origins[t0] if t1 > t0 + 1 else 1) * (nn + 1)
                dist = torch.empty(t1 - t0, refs, rh * rw, dtype=ref.dtype, device=dev)
                for r in range(rh):   # the tiles' candidates on one row of the ring at a time
                    cand = self.aug.as_strided(
                        (t1 - t0, rw, nn + 1), (gap, nn + 1, 1),
                        (ring[r] * Wa + origins[t0] - R + self.pad) * (nn + 1))
                    torch.baddbmm(bias[:, :, r * rw:(r + 1) * rw], ref[t0:t1],
                                  cand.transpose(1, 2), out=dist[:, :, r * rw:(r + 1) * rw])
                q = dist.topk(K, dim=-1, largest=False, sorted=True).indices  # (t, refs, K)
                pos = ((oy - R) * self.wp + ox[t0:t1] - R).view(-1, 1, 1) + self.area_pos[q]
                out.append(pos[:, keep].reshape(-1, K))
                t0 = t1
        return torch.cat(out)


def _haar(x: torch.Tensor, out: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """``out`` = diag(c)·H·x for x (K, N): the Haar transform of :func:`haar_matrix` along the
    rows, unnormalised (row h scaled by c_h = √(its support)), by butterflies: sums and
    differences of pairs of rows, then of pairs of the sums, and so on. Overwrites x;
    tmp (K/2, N)."""
    K = x.shape[0]
    if K == 1:
        return out.copy_(x)
    cur, m, i = x, K // 2, 0
    while m >= 1:
        a, b = cur[0::2], cur[1::2]
        torch.sub(a, b, out=out[m:2 * m])
        nxt = out[:1] if m == 1 else (tmp, x)[i % 2][:m]   # never the rows being read
        torch.add(a, b, out=nxt)
        cur, m, i = nxt, m // 2, i + 1
    return out


def _haar_adjoint(y: torch.Tensor, out: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """``out`` = (diag(c)·H)ᵀ·y for y (K, N), the adjoint of :func:`_haar`, by the butterflies
    in reverse; tmp (K, N)."""
    K = y.shape[0]
    if K == 1:
        return out.copy_(y)
    levels = K.bit_length() - 1
    cur, m = y[:1], 1
    for i in range(levels):          # the last level writes into out
        nxt = (out if (levels - 1 - i) % 2 == 0 else tmp)[:2 * m]
        d = y[m:2 * m]
        torch.add(cur, d, out=nxt[0::2])
        torch.sub(cur, d, out=nxt[1::2])
        cur, m = nxt, 2 * m
    return out


def _filter(zm, pm, pos, idx, wp, Hk, var, table, mu2, cm, wm, chunk: int = 0) -> None:
    """Wiener-filter the groups of blocks at ``pos`` (refs, K; y·wp + x) whose coefficients are
    at rows ``idx`` of the maps zm, pm (rows, C, n²), and add the weighted estimates into cm
    (rows, C, n²) and their weights into wm (rows, C), group after group.

    The noise variance of every 3-D coefficient is that of its 2-D coefficient, var (C, n²),
    but for the group mean (the Haar transform's first row): (1/K)·Σ over the pairs of blocks
    of the covariance at their offset, from ``table`` ((2L + 1)² + 1, C·n²; the last row, for
    pairs farther apart than L, zero). The Haar transform runs unnormalised (row h times c_h):
    the variances are scaled by c², and the estimates by 1/c² before the adjoint."""
    N, K = idx.shape
    C, nn = zm.shape[1:]
    row = C * nn
    chunk = chunk or max(1, CHUNK // (K * row))
    dev, dt = zm.device, zm.dtype
    L = (math.isqrt(table.shape[0] - 1) - 1) // 2
    zf, pf, cf = zm.view(-1, row), pm.view(-1, row), cm.view(-1, row)
    c2 = 1.0 / Hk.abs().amax(1) ** 2                            # c_h² (K,)
    mv = (mu2 * c2.view(K, 1, 1, 1) * var).clamp_min(torch.finfo(dt).tiny)   # (K, 1, C, nn)
    inv_c2 = (1.0 / c2).view(K, 1, 1, 1)
    floor = 1e-12 * var.sum(-1).clamp_min(1e-30)
    g_max = min(chunk, N)
    size = K * g_max * row
    b1, b2, b3 = (torch.empty(size, dtype=dt, device=dev) for _ in range(3))
    tmp = torch.empty(size, dtype=dt, device=dev)
    jk, jl = torch.triu_indices(K, K, 1, device=dev)
    twos = torch.full((g_max, jk.numel()), 2.0, dtype=dt, device=dev)
    side = 2 * L + 1
    centre = L * side + L
    for g0 in range(0, N, chunk):
        ix = idx[g0:g0 + chunk].T.reshape(-1)       # (K·g): block j of every group, j by j
        g = ix.numel() // K
        n = K * g * row
        # the variance of the group mean: the pairs of blocks counted by offset, times the
        # covariance at that offset
        p = pos[g0:g0 + g]
        py, px = p // wp, p % wp
        dy = py[:, jl] - py[:, jk]                   # the pairs j < l; G(−δ) = G(δ)
        dx = px[:, jl] - px[:, jk]
        far = (dy.abs() > L) | (dx.abs() > L)
        bins = dy.add_(L).mul_(side).add_(dx).add_(L).masked_fill_(far, table.shape[0] - 1)
        count = torch.zeros(g, table.shape[0], dtype=dt, device=dev)
        count.scatter_add_(1, bins, twos[:g])
        count[:, centre] += K                        # the pairs j = l
        v0 = torch.matmul(count, table).view(g, C, nn).clamp_min_(0).div_(K)
        shape = (K, g, C, nn)
        t = tmp[:n].view(K, -1)
        zg = torch.index_select(zf, 0, ix, out=b1[:n].view(K * g, row))
        zt = _haar(zg.view(K, -1), b2[:n].view(K, -1), t).view(shape)
        pg = torch.index_select(pf, 0, ix, out=b1[:n].view(K * g, row))
        pt = _haar(pg.view(K, -1), b3[:n].view(K, -1), t).view(shape)
        pt.square_()
        d = torch.add(pt, mv, out=b1[:n].view(shape))
        torch.add(pt[0], v0.mul(mu2 * K).clamp_min_(torch.finfo(dt).tiny), out=d[0])
        pt.div_(d)                                    # W = P² / (P² + μ²v)
        zt.mul_(pt)
        w2 = pt.square_()
        wsum = (w2[1:].sum(0) * var).sum(-1) + (w2[0] * v0).sum(-1)   # Σ W²·v: (g, C)
        w = 1.0 / torch.maximum(wsum, floor)
        zt.mul_(w.view(1, g, C, 1) * inv_c2)
        est = _haar_adjoint(zt.view(K, -1), b1[:n].view(K, -1), t)
        cf.index_add_(0, ix, est.view(K * g, row))
        wm.index_add_(0, ix, w.expand(K, g, C).reshape(K * g, C))
