"""The plain PyTorch loss head: the correctness oracle for the fused ops.

Every function takes final hidden states h [N, H] and the frozen output layer W [V, H] and
works in token slices of `token_chunk` rows, so at most token_chunk × V logits exist at a
time (autograd included: each slice is checkpointed and recomputed in backward)."""
from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint


def logits_of(h, weight, bias=None, softcap=None, temperature=1.0):
    """[n, H] -> fp32 logits [n, V] for one token slice (softcap on raw logits, then /T)."""
    z = h.float() @ weight.float().t()
    if bias is not None:
        z = z + bias.float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def _slices(n: int, token_chunk: int):
    return [(s, min(n, s + token_chunk)) for s in range(0, n, token_chunk)]


@torch.no_grad()
def token_logprob(h, weight, targets, *, bias=None, softcap=None, temperature=1.0, token_chunk=256):
    """-> log p(targets) [N] and entropy [N], fp32, no grad."""
    weight = weight.float()        # once per call, not per slice (an 8B lm_head in fp32 is 2 GB)
    lp = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
    ent = torch.empty_like(lp)
    for s, e in _slices(h.shape[0], token_chunk):
        logp = torch.log_softmax(logits_of(h[s:e], weight, bias, softcap, temperature), dim=-1)
        lp[s:e] = logp.gather(1, targets[s:e, None]).squeeze(1)
        ent[s:e] = -(logp.exp() * logp).sum(-1)
    return lp, ent


def _slice_loss(kind, h_s, h_t, targets, weight, bias, softcap, temperature):
    logq = torch.log_softmax(logits_of(h_s, weight, bias, softcap, temperature), dim=-1)
    if kind == "seqkd":
        return -logq.gather(1, targets[:, None]).sum()
    with torch.no_grad():
        logp = torch.log_softmax(logits_of(h_t, weight, bias, softcap, temperature), dim=-1)
    if kind == "forward_kl":   # KL(p_teacher ‖ p_student)
        return (logp.exp() * (logp - logq)).sum()
    if kind == "reverse_kl":   # KL(p_student ‖ p_teacher)
        return (logq.exp() * (logq - logp)).sum()
    if kind == "jsd":          # ½ KL(p_t ‖ m) + ½ KL(p_s ‖ m), m = ½ (p_t + p_s)
        logm = torch.logaddexp(logp, logq) - math.log(2.0)
        return 0.5 * ((logp.exp() * (logp - logm)).sum() + (logq.exp() * (logq - logm)).sum())
    raise ValueError(f"unknown loss {kind!r}")


def distill_loss(kind, h_s, h_t, targets, weight, *, bias=None, softcap=None, temperature=1.0,
                 token_chunk=256):
    """Mean over the N response tokens of forward KL / reverse KL / cross-entropy (seqkd) / JSD (β ½).

    h_s [N, H] student hidden (differentiable), h_t [N, H] teacher hidden (frozen),
    targets [N] response token ids. Differentiable in h_s only."""
    n = h_s.shape[0]
    weight = weight.detach().float()     # once per call, not per slice and again in recompute
    total = h_s.new_zeros((), dtype=torch.float32)
    for s, e in _slices(n, token_chunk):
        args = (kind, h_s[s:e], h_t[s:e] if h_t is not None else None, targets[s:e],
                weight, bias, softcap, temperature)
        if h_s.requires_grad:
            total = total + checkpoint(_slice_loss, *args, use_reentrant=False)
        else:
            total = total + _slice_loss(*args)
    return total / max(n, 1)
