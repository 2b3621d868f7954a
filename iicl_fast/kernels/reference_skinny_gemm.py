"""Plain PyTorch reference of skinny_gemm.py."""
from __future__ import annotations

import torch


def skinny_linear_ref(x: torch.Tensor, w: torch.Tensor, add: torch.Tensor | None = None, dtype=None) -> torch.Tensor:
    """x [M, K], w [N, K], add [M, N] or None -> x Wᵀ (+ add): dtype=None in x's dtype as
    torch.addmm rounds it (one rounding), a dtype (float64): exact in it."""
    if dtype is None:
        return torch.mm(x, w.t()) if add is None else torch.addmm(add, x, w.t())
    y = x.to(dtype) @ w.to(dtype).t()
    return y if add is None else y + add.to(dtype)
