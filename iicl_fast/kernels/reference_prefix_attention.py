"""Plain PyTorch reference of prefix_attention.py: every row's queries attend to one shared
prefix K/V (GQA: query head h reads kv head h // group)."""
from __future__ import annotations

import torch


def prefix_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dtype=torch.float64):
    """q [B, Hq, n, d], k/v [Hkv, K, d] -> (o [B, Hq, n, d], lse [B, Hq, n]) in `dtype`:
    o = softmax(q·kᵀ·scale)·v over the K prefix positions, lse = logsumexp(q·kᵀ·scale)."""
    B, Hq, n, d = q.shape
    Hkv = k.shape[0]
    g = Hq // Hkv
    qq = q.to(dtype).reshape(B, Hkv, g, n, d)
    s = torch.einsum("bhgnd,hkd->bhgnk", qq, k.to(dtype)) * scale
    lse = torch.logsumexp(s, -1)
    o = torch.einsum("bhgnk,hkd->bhgnd", torch.softmax(s, -1), v.to(dtype))
    return o.reshape(B, Hq, n, d), lse.reshape(B, Hq, n)


def cascade_decode_ref(q, pk, pv, ks, vs, lo, cur, scale: float, dtype=torch.float64):
    """q [B, Hq, d]; prefix pk/pv [Hkv, K, d] or None; row caches ks/vs [B, Hkv, S, d]; row b
    sees its slots lo[b] .. cur -> o [B, Hq, d] in `dtype`: softmax over [prefix; own slots]."""
    B, Hq, d = q.shape
    Hkv, S = ks.shape[1], ks.shape[2]
    g = Hq // Hkv
    rep = lambda t: t.to(dtype).repeat_interleave(g, dim=-3)      # noqa: E731  [.., Hkv, L, d] -> [.., Hq, L, d]
    s = torch.einsum("bhd,bhld->bhl", q.to(dtype), rep(ks)) * scale
    slot = torch.arange(S)[None, :].to(lo.device)
    seen = (slot >= lo.long()[:, None]) & (slot <= int(cur.reshape(-1)[0]))
    s = s.masked_fill(~seen[:, None, :], float("-inf"))
    v = rep(vs)
    if pk is not None:
        sp = torch.einsum("bhd,hld->bhl", q.to(dtype), rep(pk)) * scale
        s = torch.cat([sp, s], -1)
        v = torch.cat([rep(pv)[None].expand(B, -1, -1, -1), v], 2)
    return torch.einsum("bhl,bhld->bhd", torch.softmax(s, -1), v)
