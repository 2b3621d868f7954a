"""Phase 3: path selection. Keep the entries whose log-prob depends most on the chunk."""
from __future__ import annotations

import math
import random

import torch


def delta_ppl(logprob_teacher, logprob_student, offsets) -> torch.Tensor:
    """ΔPPL per entry [E]: mean over its response tokens of log P(r_t | C, q, r<t) − log P(r_t | q, r<t).

    logprob_* [N] per response token; entry e owns rows offsets[e]:offsets[e+1]."""
    gap = (logprob_teacher - logprob_student).double()
    return torch.stack([gap[a:b].mean() if b > a else gap.new_tensor(float("-inf"))
                        for a, b in zip(offsets[:-1], offsets[1:])])


def select_by_ppl_gap(gaps: torch.Tensor, *, ratio: float = 1.0, top_k: int | None = None) -> list[int]:
    """Indices of the entries to keep: the top_k (if given) or the top ceil(ratio·E) by ΔPPL,
    in their original order. Ties are broken by position (earlier first)."""
    E = gaps.numel()
    k = top_k if top_k is not None else math.ceil(ratio * E)
    k = max(0, min(E, k))
    order = sorted(range(E), key=lambda i: (-float(gaps[i]), i))
    return sorted(order[:k])


def select_random(n: int, *, ratio: float = 1.0, top_k: int | None = None, seed: int = 0) -> list[int]:
    """As many indices as select_by_ppl_gap keeps of n entries, drawn uniformly at random
    (seeded), in their original order: the ablation that tells what ΔPPL ranking is worth."""
    k = top_k if top_k is not None else math.ceil(ratio * n)
    return sorted(random.Random(seed).sample(range(n), max(0, min(n, k))))
