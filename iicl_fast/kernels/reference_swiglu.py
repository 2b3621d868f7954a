"""Plain PyTorch reference of swiglu.py: transformers' act_fn(gate) * up with SiLU."""
from __future__ import annotations

import torch


def swiglu_ref(g: torch.Tensor, u: torch.Tensor, dtype=None) -> torch.Tensor:
    """dtype=None: in g's dtype as transformers rounds it; a dtype (float64): exact in it."""
    if dtype is not None:
        g, u = g.to(dtype), u.to(dtype)
    return torch.nn.functional.silu(g) * u
