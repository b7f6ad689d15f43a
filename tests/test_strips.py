"""The BSN's CPU inference in strips of rows (ssbsn.nn.strips) is the whole-map forward.

Oracles: the same network run layer by layer over the whole map (``bsn.strips = False``), and
the network in float64 (which takes neither the strips nor the fused CPU path)."""
from __future__ import annotations

import pytest
import torch

from ssbsn.nn import BSN
from ssbsn.nn import strips as st

from memcheck import nan_filled_allocations

# (base channels, modules, SS-Blocks, window, group stats, batch, H, W): the quick preset's
# shape; two SS-Blocks (one between strips of the same branch); no SS-Block; whole-map groups;
# per-group statistics; a batch of PD sub-images; sizes off the grid
CASES = [
    (8, 2, 1, 12, False, 1, 61, 75),
    (8, 3, 2, 12, False, 1, 70, 52),
    (8, 2, 0, None, False, 1, 45, 40),
    (8, 2, 1, None, False, 1, 37, 41),
    (8, 2, 1, 9, True, 1, 58, 47),
    (6, 2, 1, 12, False, 4, 33, 29),
]


@pytest.mark.parametrize("C,modules,ss,window,group_stats,B,H,W", CASES)
@pytest.mark.parametrize("small", [True, False])
def test_strips_are_the_whole_map_forward(monkeypatch, C, modules, ss, window, group_stats, B, H,
                                          W, small):
    if small:  # strips of a few rows, one window per attention chunk
        monkeypatch.setattr(st, "STRIP_BYTES", 1)
        monkeypatch.setattr(st, "MIN_ROWS_PER_CONTEXT", 1)
        import ssbsn.attention.sdpa as sdpa
        monkeypatch.setattr(sdpa, "CHUNK_PIXELS", 1)
    torch.manual_seed(0)
    bsn = BSN(base_channels=C, num_modules=modules, ss_blocks=ss, window=window,
              group_stats=group_stats).eval()
    with torch.no_grad():  # signals that do not fade layer by layer, so a wrong row would show
        for m in bsn.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.mul_(2.0)
    x = torch.rand(B, 3, H, W) * 255
    calls = []
    monkeypatch.setattr(st, "in_strips", _counting(st.in_strips, calls))
    with torch.no_grad():
        bsn.strips = True
        with nan_filled_allocations():  # a row or strip left unwritten comes out NaN
            got = bsn(x)
        assert calls, "the strips path did not run"
        bsn.strips = False
        plain = bsn(x)
        f64 = bsn.double()(x.double())
    scale = f64.abs().max().item()
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(got.double(), f64, rtol=1e-4, atol=1e-4 * scale)


def _counting(fn, calls):
    def wrapped(*a, **k):
        calls.append(1)
        return fn(*a, **k)
    return wrapped


def test_attention_rows_read_in_order_are_the_whole_attention(monkeypatch):
    """AttentionRows computes each row of windows once and gives any rows asked in order."""
    import ssbsn.attention.sdpa as sdpa
    from ssbsn.attention import SSAttention
    att = SSAttention(8, 4, window=12).eval()
    z = torch.randn(2, 8, 50, 37).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        whole = att(z)
    spans = []
    orig = sdpa.windowed_rows
    monkeypatch.setattr(sdpa, "windowed_rows",
                        lambda *a: (spans.append((a[6], a[7])), orig(*a))[1])
    with torch.no_grad():
        assert st.AttentionRows.applies(att, z)
        rows = st.AttentionRows(att, z)
        for a, b in [(0, 7), (0, 15), (5, 20), (18, 33), (30, 50)]:
            torch.testing.assert_close(rows.rows(a, b), whole[:, :, a:b], rtol=1e-6, atol=1e-6)
    covered = [r for s, e in spans for r in range(s, e)]
    assert sorted(covered) == list(range(50))  # every row once, in windows of 12
    assert all(s % 12 == 0 for s, _ in spans)


def test_strip_plan_radii():
    bsn = BSN(base_channels=8, num_modules=3, ss_blocks=2, dilations=(2, 3))
    for branch, d in zip(bsn.branches(), (2, 3)):
        plan = st.branch_plan(branch.body)
        assert plan.pre_radius == (d - 1) + 2 * d         # masked conv, one D-ConvBlock
        assert [r for _, _, r in plan.posts] == [2 * d, 2 * d]  # SS-Block bodies; 1×1 after
