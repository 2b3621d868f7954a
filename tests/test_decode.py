"""Cascade attention (decode.py): the shared prefix attended once, merged with each row's
own tokens by log-sum-exp, against plain float64 attention over [prefix; row]."""
import math

import pytest
import torch

from iicl_fast.decode import _PREFIX, cascade_attention


class _Layer:
    layer_idx = 0


def plain_attention(q, pk, pv, k, v, vis):
    """float64: q [B, H, q, d]; prefix [kvh, K, d] (seen by every query); rows' k/v [B, kvh, T, d]
    with vis [B, 1, q, T]. -> [B, q, H, d]."""
    B, H, n, d = q.shape
    kvh, K = pk.shape[0], pk.shape[1]
    g = H // kvh
    kk = torch.cat([pk[None].expand(B, -1, -1, -1), k], 2).double().repeat_interleave(g, 1)
    vv = torch.cat([pv[None].expand(B, -1, -1, -1), v], 2).double().repeat_interleave(g, 1)
    s = q.double() @ kk.transpose(-1, -2) / math.sqrt(d)
    full = torch.cat([torch.ones(B, 1, n, K, dtype=torch.bool), vis], -1)
    s = s.masked_fill(~full, -math.inf)
    return (torch.softmax(s, -1) @ vv).transpose(1, 2)


@pytest.mark.parametrize("B,kvh,g,n,K,T", [(1, 2, 1, 1, 7, 1), (3, 2, 4, 1, 97, 5), (2, 1, 8, 6, 13, 6),
                                           (5, 2, 4, 3, 33, 9)])
def test_cascade_matches_plain_attention(B, kvh, g, n, K, T):
    torch.manual_seed(B * 100 + K)
    d, H = 16, kvh * g
    q = torch.randn(B, H, n, d)
    pk, pv = torch.randn(kvh, K, d), torch.randn(kvh, K, d)
    k, v = torch.randn(B, kvh, T, d), torch.randn(B, kvh, T, d)
    # rows of different suffix lengths (left padding), causal among the last n positions
    pad = torch.randint(0, T, (B,))
    pad[0] = 0
    cols = torch.arange(T)
    causal = cols[None, :] <= (torch.arange(n)[:, None] + T - n)
    vis = (cols[None, None, :] >= pad[:, None, None]) & causal[None]
    vis = vis[:, None]                                             # [B, 1, n, T]
    with _prefix([(pk, pv)]):
        out, _ = cascade_attention(_Layer(), q, k, v, vis, scaling=1 / math.sqrt(d))
    ref = plain_attention(q, pk, pv, k, v, vis)
    assert out.shape == (B, n, H, d) and torch.isfinite(out).all()
    assert (out.double() - ref).norm() / ref.norm() < 1e-5


class _prefix:
    def __init__(self, kv):
        self.kv = kv

    def __enter__(self):
        self.prev = dict(_PREFIX)
        _PREFIX.clear()
        _PREFIX.update(dict(enumerate(self.kv)))

    def __exit__(self, *a):
        _PREFIX.clear()
        _PREFIX.update(self.prev)


def nucleus_by_sort(probs, top_p):
    p, idx = probs.sort(-1, descending=True)
    keep = p.cumsum(-1) - p < top_p
    return torch.zeros_like(probs, dtype=torch.bool).scatter(1, idx, keep)


@pytest.mark.parametrize("V,top_p,sharp", [(7, 0.9, 1.0), (97, 0.5, 3.0), (1000, 0.95, 0.3), (50, 0.999, 5.0)])
def test_nucleus_mask_equals_the_sorted_definition(V, top_p, sharp):
    from iicl_fast.generation import nucleus_mask
    torch.manual_seed(V)
    probs = torch.softmax(torch.randn(6, V, dtype=torch.float64) * sharp, -1)   # fp64: no boundary ties by rounding
    assert torch.equal(nucleus_mask(probs, top_p), nucleus_by_sort(probs, top_p))


def test_sampled_tokens_follow_the_nucleus_distribution():
    """40,000 draws over a 7-token vocabulary against the renormalised nucleus, and the same
    seed draws the same tokens."""
    from iicl_fast.generation import next_token, sampling_generator
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0]]).repeat(40000, 1)
    from iicl_fast.generation import nucleus_mask
    draw = lambda: next_token(logits, True, 0.8, 0.9, sampling_generator("cpu", 5))   # noqa: E731
    a = draw()
    assert torch.equal(a, draw())
    p = torch.softmax(logits[0] / 0.8, -1)
    p = p * nucleus_by_sort(p[None], 0.9)[0]
    p = p / p.sum()
    probs = torch.softmax(logits / 0.8, -1)                  # the CUDA path: bisected threshold
    b = torch.multinomial(probs * nucleus_mask(probs, 0.9), 1, generator=sampling_generator("cpu", 6)).squeeze(1)
    for draws in (a, b):
        freq = torch.bincount(draws, minlength=7).double() / draws.numel()
        assert freq[p == 0].sum() == 0
        sd = (p * (1 - p) / draws.numel()).sqrt()
        assert ((freq - p).abs() <= 5 * sd + 1e-12).all(), (freq, p)
