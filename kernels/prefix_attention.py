"""Decode attention over one shared prefix (the prefix part of cascade attention), GQA-aware.

Every row of a chunk's elicitation batch attends to the same K prefix positions. For one KV
head, all its query vectors — rows × group (query heads per KV head) × new positions — form
one [M, d] matrix, so a program loads a [BLOCK_N, d] tile of the prefix's K and V once and
uses it for BLOCK_M query vectors (a GEMM, not M matrix-vector products): the prefix is read
once per row block instead of once per row and query head. The prefix is split into
`split` ranges (flash-decoding) so that a few KV heads still fill the GPU; each (KV head,
split, row block) program runs an online softmax over its range and writes its partial
output and log-sum-exp, and the partials are merged by their log-sum-exps (as the suffix
part is merged with this one in iicl_fast/decode.py).

    o, lse = prefix_attention(q, k, v, scale)     # q [B, Hq, n, d], k/v [Hkv, K, d]

Reference beside it: reference_prefix_attention.py. Launchers take CUDA tensors, or CPU
tensors under TRITON_INTERPRET=1 (the tests). Not yet wired into decode.py: it has not run
on a GPU (the torch/flash path stays the default there)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _prefix_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, M, K, D, split_len, scale,
                             stride_qh, stride_qm, stride_kh, stride_kn, stride_oh, stride_os, stride_om,
                             stride_lh, stride_ls, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_D: tl.constexpr):
    """One (KV head, prefix split, row block): online softmax of q·kᵀ·scale over the split's
    positions -> partial o [BLOCK_M, D] (normalised) and its lse [BLOCK_M]."""
    h = tl.program_id(0)
    sp = tl.program_id(1)
    mb = tl.program_id(2)
    rm = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    dmask = rd < D
    q = tl.load(q_ptr + h * stride_qh + rm[:, None] * stride_qm + rd[None, :],
                mask=(rm[:, None] < M) & dmask[None, :], other=0.0).to(tl.float32)
    start = sp * split_len
    end = tl.minimum(start + split_len, K)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for n0 in range(start, end, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        nmask = rn < end
        kv_off = h * stride_kh + rn[:, None] * stride_kn + rd[None, :]
        # read in the cache's dtype (bf16: half the bytes), computed in fp32
        kt = tl.load(k_ptr + kv_off, mask=nmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        vt = tl.load(v_ptr + kv_off, mask=nmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(kt)).to(tl.float32) * scale
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p, vt)
        m_i = m_new
    o = acc / l_i[:, None]
    tl.store(o_ptr + h * stride_oh + sp * stride_os + rm[:, None] * stride_om + rd[None, :], o,
             mask=(rm[:, None] < M) & dmask[None, :])
    tl.store(lse_ptr + h * stride_lh + sp * stride_ls + rm, m_i + tl.log(l_i), mask=rm < M)


def _splits(K: int, n_kv: int, row_blocks: int, split_len: int | None) -> int:
    """Prefix positions per split: enough programs to fill ~132 SMs twice, ranges of at
    least 256 positions (shorter ones spend more on the merge than they save)."""
    if split_len is not None:
        return max(1, split_len)
    want = max(1, (2 * 132) // max(1, n_kv * row_blocks))
    return max(256, triton.cdiv(K, want))


def prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, *,
                     block_m: int = 64, block_n: int = 64, split_len: int | None = None):
    """q [B, Hq, n, d] (n new positions per row), k/v [Hkv, K, d] (the shared prefix, K ≥ 1)
    -> (o [B, Hq, n, d] fp32, lse [B, Hq, n] fp32) of softmax(q·kᵀ·scale)·v over the prefix."""
    if q.dim() != 4 or k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"prefix_attention: q must be [B, Hq, n, d] and k, v [Hkv, K, d]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, Hq, n, d = q.shape
    Hkv, K, dk = k.shape
    if dk != d or Hq % Hkv or K < 1:
        raise ValueError(f"prefix_attention: head dims {d}/{dk}, heads {Hq}/{Hkv} (Hq must be a multiple of Hkv), "
                         f"prefix length {K} (must be >= 1)")
    g = Hq // Hkv
    M = B * g * n
    # [B, Hkv, g, n, d] -> [Hkv, B·g·n, d]: every query vector of one KV head in one matrix
    qm = q.reshape(B, Hkv, g, n, d).permute(1, 0, 2, 3, 4).reshape(Hkv, M, d).contiguous()
    k, v = k.contiguous(), v.contiguous()
    block_m = max(16, min(block_m, triton.next_power_of_2(M)))
    row_blocks = triton.cdiv(M, block_m)
    sl = _splits(K, Hkv, row_blocks, split_len)
    S = triton.cdiv(K, sl)                                      # every split non-empty
    o_part = torch.full((Hkv, S, M, d), float("nan"), dtype=torch.float32, device=q.device)
    lse_part = torch.full((Hkv, S, M), float("nan"), dtype=torch.float32, device=q.device)
    _prefix_attention_kernel[(Hkv, S, row_blocks)](
        qm, k, v, o_part, lse_part, M, K, d, sl, float(scale),
        qm.stride(0), qm.stride(1), k.stride(0), k.stride(1), o_part.stride(0), o_part.stride(1), o_part.stride(2),
        lse_part.stride(0), lse_part.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(d)))
    lse = torch.logsumexp(lse_part, 1)                          # [Hkv, M]
    o = (o_part * torch.exp(lse_part - lse[:, None]).unsqueeze(-1)).sum(1)
    o = o.reshape(Hkv, B, g, n, d).permute(1, 0, 2, 3, 4).reshape(B, Hq, n, d)
    return o, lse.reshape(Hkv, B, g, n).permute(1, 0, 2, 3).reshape(B, Hq, n)
