"""Plain PyTorch reference of sampling.py: the exact nucleus distribution of each row."""
from __future__ import annotations

import torch


def top_p_probs_ref(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """logits [B, V] -> float64 [B, V]: softmax(logits / temperature) restricted to the
    smallest set of most likely tokens whose mass reaches top_p (token i kept iff the mass of
    the tokens strictly more likely than i is < top_p), renormalised."""
    p = torch.softmax(logits.double() / temperature, -1)
    above = (p[:, None, :] * (p[:, None, :] > p[:, :, None])).sum(-1)      # [B, V]: mass above token i
    keep = above < top_p
    q = p * keep
    return q / q.sum(-1, keepdim=True)
