"""Plain PyTorch reference of the loss-head ops (the same quantities as loss_head.py).

Loops over token slices: at most `token_chunk` × V logits exist at once, in fp32."""
from __future__ import annotations

import torch


def _slices(n, token_chunk):
    return [(s, min(n, s + token_chunk)) for s in range(0, n, token_chunk)]


def _logits(h, w, temperature=1.0, softcap=None):
    z = h.float() @ w.float().t()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


@torch.no_grad()
def softmax_stats(h, weight, targets=None, *, temperature=1.0, expect_w=True, precise_w=False, minus=None,
                  w_dtype=torch.float32, token_chunk=256, max_rows=None):
    """-> lse [N], Σ p·z [N], z_target [N] or None (fp32), E_p[W] [N, H] (or (E_p[W] − minus)/T)
    in w_dtype, or None. max_rows: the kernel's slab cap (here rows go token_chunk at a time)."""
    N = h.shape[0]
    lse = torch.empty(N, device=h.device)
    spz = torch.empty_like(lse)
    zt = torch.empty_like(lse) if targets is not None else None
    ew = torch.empty(N, h.shape[1], device=h.device, dtype=w_dtype) if expect_w else None
    for a, b in _slices(N, token_chunk):
        z = _logits(h[a:b], weight, temperature)
        lse[a:b] = torch.logsumexp(z, -1)
        p = torch.softmax(z, -1)
        spz[a:b] = (p * z).sum(-1)
        if targets is not None:
            zt[a:b] = z.gather(1, targets[a:b, None]).squeeze(1)
        if expect_w:
            e = p @ weight.float()
            ew[a:b] = e if minus is None else (e - minus[a:b]) / temperature
    return lse, spz, zt, ew


def dual_loss(h_s, weight_s, h_t, weight_t, *, kind, beta=0.5, temperature=1.0, softcap=None,
              need_grad=True, grad_dtype=torch.float32, token_chunk=256):
    """-> per-token loss [N] and dLoss/dh_s [N, H_s] (grad_dtype, autograd per token slice)."""
    N = h_s.shape[0]
    loss = torch.empty(N, device=h_s.device)
    grad = torch.empty(N, h_s.shape[1], device=h_s.device, dtype=grad_dtype) if need_grad else None
    for a, b in _slices(N, token_chunk):
        hs = h_s[a:b].detach().float().requires_grad_(need_grad)
        with torch.enable_grad():
            logq = torch.log_softmax(_logits(hs, weight_s, temperature, softcap), -1)
            with torch.no_grad():
                logp = torch.log_softmax(_logits(h_t[a:b], weight_t, temperature, softcap), -1)
            if kind == "forward":
                val = (logp.exp() * (logp - logq)).sum(-1)
            elif kind == "reverse":
                val = (logq.exp() * (logq - logp)).sum(-1)
            elif kind == "jsd":
                logm = torch.logsumexp(torch.stack([logp + torch.log(torch.tensor(beta)),
                                                    logq + torch.log(torch.tensor(1 - beta))]), 0)
                val = beta * (logp.exp() * (logp - logm)).sum(-1) + (1 - beta) * (logq.exp() * (logq - logm)).sum(-1)
            else:
                raise ValueError(kind)
            if need_grad:
                grad[a:b] = torch.autograd.grad(val.sum(), hs)[0]
        loss[a:b] = val.detach()
    return loss, grad
