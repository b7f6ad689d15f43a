"""SS-Attention's bounded scope (``window``): groups are one grid phase inside one window.

The oracle is a loop-by-loop fp64 reading of docs/ss_attention.md ("Bounded scope") that
shares no code with the package: it walks every (sample, phase, window), gathers the tokens by
index and runs the definition on them. The fast paths (SDPA, the model, the CLI) are held
to the reference, and the reference to the oracle.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ssbsn import SSBSN
from ssbsn.attention import SSAttention, ss_attention
from ssbsn.attention.common import to_window_groups, window_blocks
from ssbsn.attention.functional import group_tokens
from ssbsn.attention.reference import ss_attention_reference
from ssbsn.attention.sdpa import ss_attention_sdpa
from ssbsn.nn import BSN

from helpers import attention_inputs, run_grads


def windowed_oracle(x, w, g, window, group_stats=False):
    """x + attention(x) with windowed groups, by explicit loops over windows and tokens."""
    B, C, H, W = x.shape
    T = math.ceil(window / g)
    Hp, Wp = math.ceil(H / g) * g, math.ceil(W / g) * g
    y = F.layer_norm(x, x.shape[-3:], eps=1e-5)
    out = torch.zeros(B, C, Hp, Wp, dtype=x.dtype)
    xp = F.pad(x, (0, Wp - W, 0, Hp - H))
    yp = F.pad(y, (0, Wp - W, 0, Hp - H))
    for b in range(B):
        for a in range(g):
            for c in range(g):
                for r0 in range(0, Hp // g, T):
                    for c0 in range(0, Wp // g, T):
                        pos = [(a + g * i, c + g * j)
                               for i in range(r0, min(r0 + T, Hp // g))
                               for j in range(c0, min(c0 + T, Wp // g))]
                        v = torch.stack([xp[b, :, r, s] for r, s in pos])
                        real = torch.tensor([float(r < H and s < W) for r, s in pos],
                                            dtype=x.dtype)[:, None]
                        if group_stats:
                            n = real.sum() * C
                            mu = (v * real).sum() / max(n, 1)
                            var = (((v - mu) * real) ** 2).sum() / max(n, 1)
                            yy = (v - mu) / torch.sqrt(var + 1e-5) * real
                        else:
                            yy = torch.stack([yp[b, :, r, s] for r, s in pos])
                        q = yy @ w
                        q = q / (q.norm(dim=1, keepdim=True) + 1e-8)
                        att = torch.softmax((1 + q @ q.T) / math.sqrt(w.shape[1]), dim=-1)
                        o = att @ v
                        for k, (r, s) in enumerate(pos):
                            out[b, :, r, s] = o[k]
    return x + out[:, :, :H, :W]


# (H, W, g, window): ragged last windows both ways, padding inside them, a window of one grid
# cell (T = 1), a window that is not a multiple of g (rounded up), the model's two grids
CASES = [(13, 17, 4, 8), (13, 17, 4, 5), (24, 30, 6, 12), (10, 23, 3, 3), (9, 14, 4, 1),
         (26, 26, 6, 14)]


@pytest.mark.parametrize("H,W,g,window", CASES)
@pytest.mark.parametrize("group_stats", [False, True])
def test_reference_matches_loop_oracle(H, W, g, window, group_stats):
    x, w = attention_inputs((2, 5, H, W), embed=7)
    want = windowed_oracle(x, w, g, window, group_stats)
    got = ss_attention_reference(x, w, g, group_stats=group_stats, window=window)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("H,W,g,window", CASES)
@pytest.mark.parametrize("group_stats", [False, True])
def test_sdpa_matches_reference_with_gradients(H, W, g, window, group_stats):
    x, w = attention_inputs((2, 8, H, W))
    go = torch.randn_like(x)
    ref = run_grads(lambda a, b: ss_attention_reference(a, b, g, group_stats=group_stats,
                                                        window=window), x, w, go)
    ours = run_grads(lambda a, b: ss_attention_sdpa(a, b, g, group_stats, window=window),
                     x, w, go)
    for name, a, r in zip(("out", "dx", "dw"), ours, ref):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("backend", ["reference", "sdpa", "fused"])
def test_window_covering_the_map_is_whole_map_groups_bitwise(backend):
    x, w = attention_inputs((1, 8, 22, 19), dtype=torch.float32)
    whole = ss_attention(x, w, 4, backend=backend)
    assert torch.equal(ss_attention(x, w, 4, backend=backend, window=None), whole)
    assert torch.equal(ss_attention(x, w, 4, backend=backend, window=24), whole)  # 6×5 tokens
    assert not torch.equal(ss_attention(x, w, 4, backend=backend, window=20), whole)


def test_groups_are_bounded_and_cover_the_map():
    """The windowed grouping visits every padded position exactly once, and the largest group
    is the window's, whatever the image size (the cost grows with the area, not its square)."""
    g, window = 4, 42  # T = 11 tokens, windows of 44 pixels
    for H, W in ((50, 70), (200, 130), (1000, 750)):
        ids = torch.arange(H * W, dtype=torch.float64).view(1, 1, H, W) + 1
        blocks = to_window_groups(ids, g, window)
        seen = torch.cat([b.flatten() for b in blocks])
        real = seen[seen > 0]
        assert real.numel() == H * W and torch.equal(real.sort().values, ids.flatten())
        assert max(b.shape[1] for b in blocks) == group_tokens(H, W, g, window) == 121
        assert len(window_blocks(H, W, g, window)) <= 4


def test_window_validation():
    x, w = attention_inputs((1, 4, 8, 8))
    for bad in (0, -4, 2.5, True, "8"):
        with pytest.raises(ValueError, match="window"):
            ss_attention(x, w, 4, window=bad)
        with pytest.raises(ValueError, match="window"):
            SSAttention(4, 4, window=bad)


@pytest.mark.parametrize("p", [(20, 18), (3, 35), (40, 0)])
def test_exact_blind_spot_with_windows(p):
    """Windows keep every token of a group g·k apart: with per-group statistics the blind spot
    stays exact (no gradient from the pixel to its own output)."""
    torch.manual_seed(1)
    bsn = BSN(base_channels=16, num_modules=3, ss_blocks=2, group_stats=True, window=12).double()
    x = torch.randn(1, 3, 41, 37, dtype=torch.float64, requires_grad=True)
    bsn(x)[0, :, p[0], p[1]].sum().backward()
    g = x.grad[0].abs().sum(0)
    assert g[p].item() == 0.0
    g[p] = 0
    assert (g > 0).sum() > 100


def test_windows_bound_what_attention_reaches():
    """A token's output depends only on the tokens of its own window (and, through the
    image-wide LayerNorm, negligibly on the rest)."""
    x, w = attention_inputs((1, 6, 40, 40))
    x.requires_grad_()
    out = ss_attention_reference(x, w, 4, window=16, group_stats=True)  # 4×4 tokens, 16 px
    out[0, :, 5, 6].sum().backward()  # window (0, 0), phase (1, 2)
    reach = x.grad[0].abs().sum(0)
    assert reach[:16, :16].sum() > 0
    assert reach[16:, :].abs().max() == 0 and reach[:, 16:].abs().max() == 0


# ------------------------------------------------------------------ the model and its file

QUICK = dict(base_channels=8, num_modules=2, ss_blocks=1, pd_train=3, pd_test=2, pd_pad=0)


def test_model_window_travels_with_the_checkpoint(tmp_path):
    torch.manual_seed(0)
    m = SSBSN(**QUICK, attention_window=20).eval()
    assert m.bsn.branch1.body[-3].attn.window == 20
    path = tmp_path / "m.safetensors"
    m.save(path)
    loaded = SSBSN.load(path).eval()
    assert loaded.config.attention_window == 20
    x = torch.rand(1, 3, 64, 72) * 255
    with torch.no_grad():
        y = m.denoise(x, r3=False)
        assert torch.equal(loaded.denoise(x, r3=False), y)
        whole = SSBSN.load(path, attention_window=0).eval()  # overridden at load
        assert whole.config.attention_window == 0
        y_whole = whole.denoise(x, r3=False)
    assert not torch.equal(y_whole, y)
    m.set_attention_window(None)
    with torch.no_grad():
        assert torch.equal(m.denoise(x, r3=False), y_whole)


def test_model_window_on_reference_and_fast_path_agree():
    torch.manual_seed(0)
    fast = SSBSN(**QUICK, attention_window=12).eval()
    ref = SSBSN(**QUICK, attention_window=12, backend="reference").eval()
    ref.load_state_dict(fast.state_dict())
    x = torch.rand(1, 3, 50, 46) * 255
    with torch.no_grad():
        torch.testing.assert_close(fast.denoise(x, r3=False), ref.denoise(x, r3=False),
                                   rtol=1e-5, atol=1e-3)


def test_cli_attention_window(tmp_path, capsys):
    from ssbsn.cli import main
    from ssbsn.images import read_image, write_image
    torch.manual_seed(0)
    weights = tmp_path / "m.safetensors"
    SSBSN(**QUICK).save(weights)
    src = tmp_path / "a.png"
    write_image(src, np.random.default_rng(0).integers(0, 256, (40, 44, 3)).astype(np.uint8))
    assert main(["denoise", str(src), "-o", str(tmp_path / "o"), "-w", str(weights), "--no-r3",
                 "--attention-window", "12"]) == 0
    model = SSBSN.load(weights, attention_window=12).eval()
    t = torch.from_numpy(read_image(src).astype(np.float32).transpose(2, 0, 1).copy())[None]
    with torch.no_grad():
        want = model.denoise(t, r3=False)[0].numpy().transpose(1, 2, 0)
    got = read_image(tmp_path / "o" / "a.png").astype(np.float64)
    assert np.abs(got - want).max() <= 0.5 + 1e-3
    capsys.readouterr()
    rc = main(["denoise", str(src), "-o", str(tmp_path / "o2"), "-w", str(weights),
               "--attention-window", "-3"])
    err = capsys.readouterr().err
    assert rc != 0 and "--attention-window" in err and err.count("\n") == 1
    assert not (tmp_path / "o2").exists()


def test_scaling_benchmark_smoke(tmp_path, one_thread):
    """benchmarks/inference_scaling.py --smoke: both scopes timed side by side at two sizes,
    the full inference split into its steps, the report written."""
    import json

    from benchmarks.inference_scaling import main
    assert main(["--smoke", "--out", str(tmp_path), "--max-seconds", "1e9"]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["window"] == 42 and res["windows"] == [0, 42]
    rows = res["timing"]
    assert {(r["kind"], r["window"]) for r in rows} == {(k, w) for k in ("pass", "full")
                                                        for w in (0, 42)}
    for r in rows:
        assert r["seconds"] > 0 and r["us_per_pixel"] > 0
        if r["kind"] == "full":
            # the quick preset: PD 2 over its 2² shifts, the blend's reference at PD 3 over
            # the 3 shifts of its Latin square
            assert r["passes"] == 2 * 2 + 3 and r["network_s"] <= r["seconds"]
    assert "whole map" in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize("H,W,g,window", CASES)
@pytest.mark.parametrize("group_stats", [False, True])
@pytest.mark.parametrize("chunk", [1, None])
def test_sdpa_inference_in_chunks_matches_reference(monkeypatch, H, W, g, window, group_stats,
                                                    chunk):
    """Without autograd on the CPU, SDPA takes the map a window-aligned chunk at a time (the
    image-wide LayerNorm statistics first); ``chunk=1``: one window per chunk."""
    import ssbsn.attention.sdpa as sdpa
    if chunk:
        monkeypatch.setattr(sdpa, "CHUNK_PIXELS", chunk)
    x, w = attention_inputs((2, 8, H, W))
    want = ss_attention_reference(x, w, g, group_stats=group_stats, window=window)
    with torch.no_grad():
        got = ss_attention_sdpa(x, w, g, group_stats, window=window)
        # float32 channels_last, as the network's CPU inference path gives it
        x32 = x.float().contiguous(memory_format=torch.channels_last)
        got32 = ss_attention_sdpa(x32, w.float(), g, group_stats, window=window)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got32.double(), want, rtol=1e-5, atol=1e-5)


def test_layer_norm_stats_are_layer_norms():
    from ssbsn.attention.common import layer_norm_stats
    x = torch.randn(3, 5, 70, 300, dtype=torch.float64) * 3 + 7   # more than one 64k piece
    for t in (x, x.contiguous(memory_format=torch.channels_last), x.float()):
        mean, rstd = layer_norm_stats(t)
        torch.testing.assert_close(((t - mean) * rstd).double(),
                                   F.layer_norm(x, x.shape[-3:], eps=1e-5),
                                   rtol=1e-5 if t.dtype == torch.float32 else 1e-12,
                                   atol=1e-5 if t.dtype == torch.float32 else 1e-12)
