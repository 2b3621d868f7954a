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
