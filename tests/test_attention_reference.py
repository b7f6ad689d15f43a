"""The reference SS-Attention against an independent, loop-by-loop reading of its definition
(docs/ss_attention.md)."""
import math

import pytest
import torch

from ssbsn import SSAttention
from ssbsn.attention import ss_attention_reference


def loop_oracle(x, w, g, group_stats=False, eps=1e-5):
    """docs/ss_attention.md steps 1-6 with explicit loops over samples and grid groups, in fp64.

    Padded tokens are not materialised: each group has n_pad extra keys of logit 1/√E and
    value 0, which enter the softmax denominator only."""
    x, w = x.double(), w.double()
    B, C, H, W = x.shape
    E = w.shape[1]
    Hp, Wp = -(-H // g) * g, -(-W // g) * g
    n_all = (Hp // g) * (Wp // g)
    out = x.clone()
    for s in range(B):
        if not group_stats:
            mu, var = x[s].mean(), x[s].var(unbiased=False)
        for a in range(g):
            for b in range(g):
                xs = x[s, :, a::g, b::g]  # (C, h, w) real pixels of group (a, b)
                if xs.numel() == 0:
                    continue
                if group_stats:
                    mu, var = xs.mean(), xs.var(unbiased=False)
                tok = xs.reshape(C, -1).T  # (n, C)
                q = ((tok - mu) / torch.sqrt(var + eps)) @ w
                qh = q / (q.norm(dim=1, keepdim=True) + 1e-8)
                n = tok.shape[0]
                logits = (1 + qh @ qh.T) / math.sqrt(E)
                e = torch.exp(logits)
                denom = e.sum(1, keepdim=True) + (n_all - n) * math.exp(1 / math.sqrt(E))
                att = (e / denom) @ tok  # padded values are 0
                out[s, :, a::g, b::g] += att.T.reshape(xs.shape)
    return out


@pytest.mark.parametrize("shape,g", [((2, 8, 13, 11), 4), ((2, 8, 13, 11), 6), ((1, 5, 7, 5), 6),
                                     ((3, 4, 1, 1), 4), ((1, 6, 12, 18), 6), ((2, 3, 9, 4), 4)])
@pytest.mark.parametrize("group_stats", [False, True])
def test_reference_matches_loop_oracle(shape, g, group_stats):
    x = torch.randn(*shape, dtype=torch.float64) * 3 + 1
    w = torch.randn(shape[1], shape[1], dtype=torch.float64)
    got = ss_attention_reference(x, w, g, group_stats=group_stats)
    torch.testing.assert_close(got, loop_oracle(x, w, g, group_stats), rtol=1e-10, atol=1e-10)


def test_module_uses_its_parameter_and_grid():
    layer = SSAttention(8, 6).double()
    x = torch.randn(2, 8, 14, 9, dtype=torch.float64)
    torch.testing.assert_close(layer(x), loop_oracle(x, layer.wqk.detach(), 6))
    assert layer.wqk.shape == (8, 8) and list(layer.state_dict()) == ["wqk"]


def test_init_is_xavier_uniform_gain_1414():
    layer = SSAttention(128, 4)
    bound = 1.414 * math.sqrt(6 / (128 + 128))
    assert layer.wqk.abs().max() <= bound
    assert layer.wqk.abs().max() > 0.9 * bound  # fills the range
    assert abs(layer.wqk.std().item() - bound / math.sqrt(3)) < 0.02 * bound


def test_embed_width_scales_logits_by_its_root():
    x = torch.randn(1, 6, 8, 8, dtype=torch.float64)
    w = torch.randn(6, 10, dtype=torch.float64)
    torch.testing.assert_close(ss_attention_reference(x, w, 4), loop_oracle(x, w, 4))


def test_bad_shapes_are_one_clear_error():
    with pytest.raises(ValueError, match="does not fit 8 channels"):
        ss_attention_reference(torch.randn(1, 8, 4, 4), torch.randn(6, 6), 4)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        ss_attention_reference(torch.randn(8, 4, 4), torch.randn(8, 8), 4)


@pytest.mark.parametrize("backend", ["reference", "sdpa", "fused"])
def test_bad_arguments_are_one_clear_error_on_every_path(backend):
    """A grid, channel count or dtype SS-Attention cannot take is a ValueError naming it, from
    the module and the function alike (not a division by zero or an aten error later)."""
    from ssbsn import ss_attention
    x, w = torch.randn(1, 8, 8, 8), torch.randn(8, 8)
    for grid in (0, -2, 2.0, True):
        with pytest.raises(ValueError, match="grid must be a positive int"):
            ss_attention(x, w, grid, backend=backend)
        with pytest.raises(ValueError, match="grid must be a positive int"):
            SSAttention(8, grid, backend=backend)
    for kw in (dict(channels=0, grid=4), dict(channels=8, grid=4, embed=0)):
        with pytest.raises(ValueError, match="must be a positive int"):
            SSAttention(**kw, backend=backend)
    with pytest.raises(ValueError, match="floating-point"):
        ss_attention(torch.randint(0, 9, (1, 8, 8, 8)), w, 4, backend=backend)
