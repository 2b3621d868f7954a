"""Plain PyTorch reference of rotary.py (transformers' rotate-half rotary embedding)."""
from __future__ import annotations

import torch


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """x [B, H, d], cos / sin [B, d] -> x·cos + rotate_half(x)·sin in `dtype`."""
    x, cos, sin = x.to(dtype), cos.to(dtype)[:, None], sin.to(dtype)[:, None]
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def rope_write_ref(q, k, v, cos, sin, ks, vs, cur, dtype=torch.float64):
    """-> (q_out [B, Hq, d], ks, vs) in `dtype`: copies of the caches with slot cur written."""
    B, Hkv, S, d = ks.shape
    c = int(cur.reshape(-1)[0])
    ks, vs = ks.to(dtype).clone(), vs.to(dtype).clone()
    ks[:, :, c] = rotate(k.reshape(B, Hkv, d), cos, sin, dtype)
    vs[:, :, c] = v.reshape(B, Hkv, d).to(dtype)
    return rotate(q.reshape(B, -1, d), cos, sin, dtype), ks, vs


def rope_ref(q, k, cos, sin, dtype=torch.float64):
    """q [B, Hq, T, d], k [B, Hk, T, d], cos / sin [B or 1, T, d] -> rotated (q, k) in `dtype`
    (differentiable: the backward's reference is autograd through this)."""
    c, s = cos.to(dtype)[:, None], sin.to(dtype)[:, None]

    def rot(x):
        x = x.to(dtype)
        half = x.shape[-1] // 2
        return x * c + torch.cat([-x[..., half:], x[..., :half]], -1) * s
    return rot(q), rot(k)
