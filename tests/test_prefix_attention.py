"""kernels/prefix_attention.py (decode attention over one shared prefix, GQA) against the
float64 reference, under the Triton interpreter on the CPU: odd prefix lengths (not a
multiple of any block, 1 included), several splits, row blocks with a ragged edge, group
sizes 1/4/8, head dims that are not powers of two, fp32 and bf16. Outputs are NaN-poisoned
by the launcher, so an unwritten element fails."""
import math

import pytest
import torch

from iicl_fast.kernels.prefix_attention import prefix_attention
from iicl_fast.kernels.reference_prefix_attention import prefix_attention_ref

CASES = [  # B, Hq, Hkv, n, K, d, split_len
    (1, 4, 4, 1, 1, 16, None),       # one row, one prefix position, group 1
    (3, 8, 2, 1, 97, 32, 32),        # group 4, four splits (the last 1 long)
    (2, 8, 1, 2, 130, 24, 64),       # group 8, two new positions a row, d not a power of two
    (5, 8, 2, 2, 7, 16, None),       # 40 query vectors, a 7-token prefix
    (9, 8, 1, 1, 65, 16, 16),        # 72 query vectors: two row blocks of 64, a ragged edge
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,Hq,Hkv,n,K,d,split_len", CASES)
def test_prefix_attention_matches_float64(B, Hq, Hkv, n, K, d, split_len, dtype):
    g = torch.Generator().manual_seed(B * 1000 + K)
    q = torch.randn(B, Hq, n, d, generator=g).to(dtype)
    k = torch.randn(Hkv, K, d, generator=g).to(dtype)
    v = torch.randn(Hkv, K, d, generator=g).to(dtype)
    scale = 1 / math.sqrt(d)
    o, lse = prefix_attention(q, k, v, scale, split_len=split_len)
    assert o.shape == (B, Hq, n, d) and lse.shape == (B, Hq, n)
    assert torch.isfinite(o).all() and torch.isfinite(lse).all()
    o64, lse64 = prefix_attention_ref(q, k, v, scale)
    # plain PyTorch in the same dtype, against the same float64 truth
    ot, lt = prefix_attention_ref(q, k, v, scale, dtype=torch.float32 if dtype == torch.float32 else dtype)
    err_o, err_t = (o.double() - o64).abs().max().item(), (ot.double() - o64).abs().max().item()
    err_l, err_lt = (lse.double() - lse64).abs().max().item(), (lt.double() - lse64).abs().max().item()
    floor = 1e-5 if dtype == torch.float32 else 1e-3
    assert err_o <= max(2 * err_t, floor), (err_o, err_t)
    assert err_l <= max(2 * err_lt, floor), (err_l, err_lt)


def test_prefix_attention_merges_with_a_suffix_like_one_softmax():
    """Prefix part + a suffix part merged by their log-sum-exps = attention over both."""
    g = torch.Generator().manual_seed(3)
    B, Hq, Hkv, d, K, T = 2, 4, 2, 16, 33, 5
    q = torch.randn(B, Hq, 1, d, generator=g)
    kp, vp = torch.randn(Hkv, K, d, generator=g), torch.randn(Hkv, K, d, generator=g)
    ks, vs = torch.randn(B, Hkv, T, d, generator=g), torch.randn(B, Hkv, T, d, generator=g)
    o_p, l_p = prefix_attention(q, kp, vp, d ** -0.5, split_len=16)
    rep = lambda t: t.repeat_interleave(Hq // Hkv, dim=1)   # noqa: E731
    s_s = (q.double() @ rep(ks).double().transpose(-1, -2)) * d ** -0.5
    l_s = torch.logsumexp(s_s, -1)
    o_s = torch.softmax(s_s, -1) @ rep(vs).double()
    lse = torch.logaddexp(l_p.double(), l_s)
    o = o_p.double() * (l_p.double() - lse).exp()[..., None] + o_s * (l_s - lse).exp()[..., None]
    k_all = torch.cat([kp[None].expand(B, -1, -1, -1), ks], 2)
    v_all = torch.cat([vp[None].expand(B, -1, -1, -1), vs], 2)
    want = torch.softmax((q.double() @ rep(k_all).double().transpose(-1, -2)) * d ** -0.5, -1) @ rep(v_all).double()
    torch.testing.assert_close(o, want, rtol=1e-5, atol=1e-6)


def test_bad_shapes_are_named():
    q, k = torch.randn(1, 6, 1, 16), torch.randn(4, 8, 16)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        prefix_attention(q, k, k, 0.25)
    with pytest.raises(ValueError, match=r"q must be \[B, Hq, n, d\]"):
        prefix_attention(q[0], k, k, 0.25)
