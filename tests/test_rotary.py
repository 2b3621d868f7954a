"""iicl_fast/kernels/rotary.py (rotary embedding + cache write of one decoding step) under the Triton
interpreter against float64 and against transformers' own apply_rotary_pos_emb: odd batch
sizes, group 3, a head dim whose half is not a power of two, every other cache slot intact."""
import pytest
import torch

from iicl_fast.kernels import rotary
from iicl_fast.kernels.reference_rotary import rope_write_ref
from iicl_fast.kernels.rotary import rope_write


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    monkeypatch.setattr(rotary, "POISON", True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,Hq,Hkv,d,S,cur", [(1, 4, 4, 16, 1, 0), (7, 9, 3, 64, 13, 5), (3, 8, 2, 24, 9, 8)])
def test_rope_write_matches_float64(B, Hq, Hkv, d, S, cur, dtype):
    g = torch.Generator().manual_seed(B * 10 + d)
    q = torch.randn(B, Hq * d, generator=g).to(dtype)
    k = torch.randn(B, Hkv * d, generator=g).to(dtype)
    v = torch.randn(B, Hkv * d, generator=g).to(dtype)
    ang = torch.rand(B, d // 2, generator=g) * 50
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(dtype), torch.cat([ang.sin()] * 2, -1).to(dtype)
    ks, vs = torch.randn(B, Hkv, S, d, generator=g).to(dtype), torch.randn(B, Hkv, S, d, generator=g).to(dtype)
    ks0, vs0 = ks.clone(), vs.clone()
    c = torch.tensor([cur], dtype=torch.int32)
    out = rope_write(q, k, v, cos, sin, ks, vs, c)
    want_q, want_k, want_v = rope_write_ref(q, k, v, cos, sin, ks0, vs0, c)
    plain_q, _, _ = rope_write_ref(q, k, v, cos, sin, ks0, vs0, c, dtype=dtype)    # plain, same dtype
    err, err_p = (out.double() - want_q).abs().max().item(), (plain_q.double() - want_q).abs().max().item()
    assert out.shape == (B, Hq, d) and torch.isfinite(out).all()
    assert err <= max(2 * err_p, 1e-6), (err, err_p)
    tol = 2e-6 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(ks.double(), want_k, atol=tol, rtol=tol)
    assert torch.equal(vs.double(), want_v)                   # v is copied, slot cur only
    others = [i for i in range(S) if i != cur]
    assert torch.equal(ks[:, :, others], ks0[:, :, others])


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_rope_write_every_head_with_few_heads_a_program(monkeypatch, heads):
    """rotary.HEADS below both head counts: several query programs and several KV programs a
    row, the last of each ragged (9 query heads, 3 KV heads) — a program that skips its tile's
    heads or writes past them fails the comparison (q_out starts as NaN, the caches random)."""
    monkeypatch.setattr(rotary, "HEADS", heads)
    test_rope_write_matches_float64(7, 9, 3, 64, 13, 5, torch.float32)


def test_rope_write_equals_transformers_rotation():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    g = torch.Generator().manual_seed(0)
    B, H, d = 5, 6, 32
    q, k = torch.randn(B, H * d, generator=g), torch.randn(B, 2 * d, generator=g)
    ang = torch.rand(B, d // 2, generator=g) * 9
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    ks = torch.zeros(B, 2, 4, d)
    out = rope_write(q, k, k, cos, sin, ks, ks.clone(), torch.tensor([2], dtype=torch.int32))
    hq, hk = apply_rotary_pos_emb(q.view(B, H, 1, d), k.view(B, 2, 1, d), cos[:, None], sin[:, None])
    torch.testing.assert_close(out, hq[:, :, 0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ks[:, :, 2], hk[:, :, 0], atol=1e-6, rtol=1e-6)


def test_bad_shapes_are_named():
    ks = torch.zeros(2, 2, 4, 16)
    cur = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="cos and sin"):
        rope_write(torch.zeros(2, 64), torch.zeros(2, 32), torch.zeros(2, 32), torch.zeros(2, 8), torch.zeros(2, 8), ks, ks, cur)
    with pytest.raises(ValueError, match="k and v"):
        rope_write(torch.zeros(2, 64), torch.zeros(2, 16), torch.zeros(2, 32), torch.zeros(2, 16), torch.zeros(2, 16), ks, ks, cur)


def _qkcs(B, Hq, Hk, T, d, dtype, cos_batch, seed):
    """q, k as transformers makes them ([B, T, H, d] projections viewed as [B, H, T, d]: strided),
    cos / sin [cos_batch, T, d]."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, Hq, d, generator=g).to(dtype).transpose(1, 2)
    k = torch.randn(B, T, Hk, d, generator=g).to(dtype).transpose(1, 2)
    ang = torch.rand(cos_batch, T, d // 2, generator=g) * 60
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(dtype), torch.cat([ang.sin()] * 2, -1).to(dtype)
    return q, k, cos, sin


SHAPES = [(1, 1, 1, 1, 2, 1), (3, 9, 3, 7, 24, 3), (2, 4, 4, 97, 16, 1), (2, 8, 1, 5, 128, 2)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,Hq,Hk,T,d,cb", SHAPES)
def test_rope_forward_backward_match_float64(B, Hq, Hk, T, d, cb, dtype):
    from iicl_fast.kernels.reference_rotary import rope_ref
    from iicl_fast.layers import rotary as fused
    q, k, cos, sin = _qkcs(B, Hq, Hk, T, d, dtype, cb, seed=B * 100 + T)
    q.requires_grad_(True)
    k.requires_grad_(True)
    qo, ko = fused(q, k, cos, sin)
    assert qo.stride() == q.stride() and ko.stride() == k.stride()        # the input's layout kept
    assert torch.isfinite(qo).all() and torch.isfinite(ko).all()          # every element written (poisoned)
    q64, k64 = q.detach().double().requires_grad_(True), k.detach().double().requires_grad_(True)
    wq, wk = rope_ref(q64, k64, cos, sin)
    pq, pk = rope_ref(q, k, cos, sin, dtype=dtype)                         # the plain path, same dtype
    g = torch.Generator().manual_seed(7)
    gq, gk = torch.randn(qo.shape, generator=g).to(dtype), torch.randn(ko.shape, generator=g).to(dtype)
    dq, dk = torch.autograd.grad((qo, ko), (q, k), (gq, gk))
    wdq, wdk = torch.autograd.grad((wq, wk), (q64, k64), (gq.double(), gk.double()))
    pdq, pdk = torch.autograd.grad((pq, pk), (q, k), (gq, gk))
    floor = 1e-6 if dtype == torch.float32 else 1e-3
    for got, plain, want in ((qo, pq, wq), (ko, pk, wk), (dq, pdq, wdq), (dk, pdk, wdk)):
        err = (got.double() - want).abs().max().item()
        err_p = (plain.double() - want).abs().max().item()
        assert torch.isfinite(got).all() and err <= max(2 * err_p, floor * want.abs().max().item()), (err, err_p)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_rope_forward_rounds_as_transformers(dtype):
    """Bit-equal to transformers' apply_rotary_pos_emb (each product rounded, then the sum; bf16
    rounded by integer ops, which the interpreter does not truncate)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    from iicl_fast.kernels.rotary import rope_forward
    q, k, cos, sin = _qkcs(3, 6, 2, 11, 32, dtype, 3, seed=5)
    want_q, want_k = apply_rotary_pos_emb.__dict__.get("__wrapped_original__", apply_rotary_pos_emb)(q, k, cos, sin)
    got_q, got_k = rope_forward(q, k, cos, sin)
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)


def test_rope_bad_shapes_are_named():
    from iicl_fast.kernels.rotary import rope_forward
    q, k, cos, sin = _qkcs(2, 4, 2, 5, 16, torch.float32, 2, seed=1)
    with pytest.raises(ValueError, match="cos must be"):
        rope_forward(q, k, cos[:, :3], sin)
    with pytest.raises(ValueError, match="q and k must be"):
        rope_forward(q, k[:1], cos, sin)
