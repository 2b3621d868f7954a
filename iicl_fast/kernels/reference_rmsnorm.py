"""Plain PyTorch reference of rmsnorm.py: transformers' LlamaRMSNorm (normalised in fp32,
rounded to the input's dtype, then times the weight)."""
from __future__ import annotations

import torch


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, dtype=None) -> torch.Tensor:
    """x [..., H], weight [H] -> y [..., H]; dtype=None rounds as transformers does (in x's
    dtype), a dtype (float64) computes everything in it."""
    if dtype is not None:
        x, weight = x.to(dtype), weight.to(dtype)
    xf = x.float() if dtype is None else x
    n = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * n.to(x.dtype)


def add_rmsnorm_ref(h: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float, dtype=None):
    """-> (s = h + y, rmsnorm_ref(s)) as a decoder layer computes them (dtype: as rmsnorm_ref)."""
    s = h + y if dtype is None else h.to(dtype) + y.to(dtype)
    return s, rmsnorm_ref(s, weight, eps, dtype)
