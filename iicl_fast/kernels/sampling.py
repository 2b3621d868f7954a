"""Nucleus (top-p) sampling on the device without sorting the vocabulary: one program a row.

The nucleus of a row is the smallest set of most likely tokens whose mass reaches top_p:
token i is in it iff the mass of the tokens more likely than i is < top_p. It is an upper
set (every token likelier than a member is a member), so rejection sampling is exact (the
scheme FlashInfer's sorting-free sampler uses): draw a token from the distribution
restricted to the tokens above a pivot (first pivot: none) by inverse CDF in vocabulary
order; if the mass strictly above it is < top_p it is in the nucleus — accept; otherwise no
token at or below it is, so it becomes the pivot and the draw repeats on what is above it.
An accepted draw is distributed as the nucleus renormalised. Each round is two passes over
the row (the draw, the check); the first pass finds the row's max and normaliser. A row
needs more than one round with probability at most 1 - top_p.

The draws come from Philox (tl.rand) keyed on a seed read from device memory and the row:
the caller advances the seed every step, on the device, so a captured CUDA graph replays
without a host sync and every step draws fresh numbers.

    tok = sample_top_p(logits, seed, temperature=0.7, top_p=0.9)   # logits [B, V] -> [B] int64

Reference beside it: reference_sampling.py (the exact nucleus distribution). Launchers take
CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (the tests)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

POISON = False   # tests set this: the output starts as -1 (no token) so an unwritten row fails
ROUNDS = 64      # after this many rejections a row takes its most likely token (always in the nucleus)
# Vocabulary entries a loop iteration reads, and warps (None: 16 from 8,192 entries, 8 from 2,048):
# a program walks its row one block after another, so fewer, larger blocks wait less. H200,
# 128,256 fp32 logits a row, T 0.7, top-p 0.9 (benchmarks/tune_sampler.py, 28th session), ms a
# call at 64 / 200 / 400 rows: 4,096 × 8 warps 0.155 / 0.265 / 0.393, 16,384 × 16 0.099 / 0.202 /
# 0.276, 32,768 × 32 0.106 / 0.219 / 0.297. (The four-pass kernel before: 0.275 at 64 rows.)
BLOCK_V = 16384
WARPS: int | None = None


@triton.jit
def _top_p_kernel(z_ptr, out_ptr, seed_ptr, keys_ptr, V, stride_z, inv_t, top_p,
                  BLOCK_V: tl.constexpr, ROUNDS_: tl.constexpr, FULL: tl.constexpr, KEYS: tl.constexpr):
    """Row b: w_i = exp((z_i - max z) / T), W = Σ w; rounds of (draw under the pivot, check).
    The draws are keyed on keys[b] (KEYS) or on b."""
    b = tl.program_id(0)
    if KEYS:
        key = tl.load(keys_ptr + b).to(tl.int32)
    else:
        key = b
    row = z_ptr + b * stride_z
    rv = tl.arange(0, BLOCK_V)
    # pass 1: max (and its first index) and the normaliser in one online pass (W rescaled when
    # the max rises: one read of the row where a max pass and a sum pass took two)
    m = tl.full((), float("-inf"), tl.float32)
    arg = tl.zeros((), tl.int32)
    W = tl.zeros((), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        z = tl.load(row + v0 + rv, mask=v0 + rv < V, other=float("-inf")).to(tl.float32)
        bm = tl.max(z, 0)
        bi = tl.min(tl.where(z == bm, v0 + rv, V), 0)
        arg = tl.where(bm > m, bi, arg)
        m_new = tl.maximum(m, bm)
        W = W * tl.exp(tl.where(m_new == float("-inf"), 0.0, (m - m_new) * inv_t)) + \
            tl.sum(tl.where(z > float("-inf"), tl.exp((z - m_new) * inv_t), 0.0), 0)
        m = m_new
    seed = tl.load(seed_ptr)
    pivot = tl.full((), -1.0, tl.float32)          # draw among w > pivot
    Q = W                                          # their mass
    tok = arg
    r = 0
    done = False
    while (r < ROUNDS_) & (not done):
        u = tl.rand(seed, key * ROUNDS_ + r)
        target = u * Q
        carry = tl.zeros((), tl.float32)
        pick = tl.full((), -1, tl.int32)
        last = tl.full((), -1, tl.int32)
        for v0 in range(0, V, BLOCK_V):
            z = tl.load(row + v0 + rv, mask=v0 + rv < V, other=float("-inf")).to(tl.float32)
            w = tl.exp((z - m) * inv_t)
            w = tl.where(w > pivot, w, 0.0)
            bsum = tl.sum(w, 0)
            if (pick < 0) & (carry + bsum > target):   # the draw lands in this block: scan it
                cs = tl.cumsum(w, 0) + carry
                first = tl.min(tl.where((cs > target) & (w > 0), v0 + rv, V), 0)
                pick = tl.where(first < V, first, pick)
            last = tl.maximum(last, tl.max(tl.where(w > 0, v0 + rv, -1), 0))
            carry += bsum
        pick = tl.where(pick < 0, last, pick)      # u·Q rounded past the last cumulative sum
        w_pick = tl.exp((tl.load(row + pick).to(tl.float32) - m) * inv_t)
        if FULL:
            tok = pick
            done = True
        else:
            above = tl.zeros((), tl.float32)
            for v0 in range(0, V, BLOCK_V):
                z = tl.load(row + v0 + rv, mask=v0 + rv < V, other=float("-inf")).to(tl.float32)
                w = tl.exp((z - m) * inv_t)
                above += tl.sum(tl.where(w > w_pick, w, 0.0), 0)
            ok = above < top_p * W
            tok = tl.where(ok, pick, tok)
            done = ok
            pivot = w_pick
            Q = above
        r += 1
    tl.store(out_ptr + b, tok.to(tl.int64))


def sample_top_p(logits: torch.Tensor, seed: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0,
                 *, keys: torch.Tensor | None = None, block_v: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B, V] (fp32 or bf16; -inf = never) -> token ids [B] int64 drawn from
    softmax(logits / temperature) restricted to each row's top_p nucleus. seed: int64 [1] on
    logits' device (the caller advances it between steps). keys: int64 [B] in [0, 2^24) on the
    same device, or None (= the row indices): row b's draws depend on (seed, keys[b]) only, so
    a row draws the same numbers in any batch, order or process."""
    if logits.dim() != 2 or logits.shape[1] < 1:
        raise ValueError(f"sample_top_p: logits must be [B, V]; got {tuple(logits.shape)}")
    if seed.numel() != 1 or seed.dtype != torch.int64 or seed.device != logits.device:
        raise ValueError(f"sample_top_p: seed must be one int64 on {logits.device}; got {seed.dtype} "
                         f"{tuple(seed.shape)} on {seed.device}")
    if not temperature > 0 or not 0 < top_p <= 1:
        raise ValueError(f"sample_top_p: temperature must be > 0 and top_p in (0, 1]; got {temperature}, {top_p}")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    B, V = logits.shape
    if keys is not None and (keys.shape != (B,) or keys.dtype != torch.int64 or keys.device != logits.device):
        raise ValueError(f"sample_top_p: keys must be int64 [{B}] on {logits.device}; got {keys.dtype} "
                         f"{tuple(keys.shape)} on {keys.device}")
    if out is None:
        out = torch.full((B,), -1, dtype=torch.int64, device=logits.device) if POISON else \
            torch.empty(B, dtype=torch.int64, device=logits.device)
    block = min(block_v or BLOCK_V, max(16, triton.next_power_of_2(V)))
    warps = WARPS or (16 if block >= 8192 else 8 if block >= 2048 else 4)
    _top_p_kernel[(B,)](logits, out, seed, seed if keys is None else keys, V, logits.stride(0), 1.0 / float(temperature),
                        float(top_p), BLOCK_V=block, ROUNDS_=ROUNDS, FULL=top_p >= 1.0, KEYS=keys is not None,
                        num_warps=warps)
    return out
