"""One decoding step's rotary embedding and cache write, fused (the static decoder's glue).

transformers applies the rotary embedding to q and k as ~10 elementwise kernels a layer
(two products, a rotate-half built from two slices, a negation and a concatenation, a sum,
each way) and the static decoder then copies k and v into its cache: at one token a row,
those are a few microseconds each, and at 32 layers they were ~2 ms of a 9.6 ms step at 64
rows (benchmarks/NOTES.md). Here it is one kernel: program (row b, head h) rotates q[b, h]
into q_out, or (h ≥ Hq) rotates k[b, h - Hq] and writes it and v[b, h - Hq] into the caches
at slot cur (a device scalar: the step replays as a graph).

    q_out = rope_write(q, k, v, cos, sin, ks, vs, cur)
    # q [B, Hq·d], k / v [B, Hkv·d] (the projections' outputs), cos / sin [B, d] (the model's
    # rotary_emb: the two halves' frequencies concatenated), ks / vs [B, Hkv, S, d] -> q_out [B, Hq, d]

Rotation: x·cos + rotate_half(x)·sin with rotate_half(x) = [-x₂, x₁], computed in fp32 and
rounded once. Reference beside it: reference_rotary.py."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

POISON = False   # tests set this: q_out starts as NaN so an unwritten element fails


@triton.jit
def _rope_write_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, qo_ptr, ks_ptr, vs_ptr, cur_ptr, HQ,
                       stride_qb, stride_kb, stride_vb, stride_cb, stride_sb, stride_ob,
                       stride_kcb, stride_kch, stride_kcn, stride_vcb, stride_vch, stride_vcn,
                       HALF: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    r = tl.arange(0, BLOCK)
    m = r < HALF
    c1 = tl.load(cos_ptr + b * stride_cb + r, mask=m, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + b * stride_cb + HALF + r, mask=m, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + b * stride_sb + r, mask=m, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + b * stride_sb + HALF + r, mask=m, other=0.0).to(tl.float32)
    D = 2 * HALF
    if h < HQ:
        src = q_ptr + b * stride_qb + h * D
        x1 = tl.load(src + r, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF + r, mask=m, other=0.0).to(tl.float32)
        dst = qo_ptr + b * stride_ob + h * D
        tl.store(dst + r, (x1 * c1 - x2 * s1).to(qo_ptr.dtype.element_ty), mask=m)
        tl.store(dst + HALF + r, (x2 * c2 + x1 * s2).to(qo_ptr.dtype.element_ty), mask=m)
    else:
        hk = h - HQ
        cur = tl.load(cur_ptr)
        src = k_ptr + b * stride_kb + hk * D
        x1 = tl.load(src + r, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF + r, mask=m, other=0.0).to(tl.float32)
        dst = ks_ptr + b * stride_kcb + hk * stride_kch + cur * stride_kcn
        tl.store(dst + r, (x1 * c1 - x2 * s1).to(ks_ptr.dtype.element_ty), mask=m)
        tl.store(dst + HALF + r, (x2 * c2 + x1 * s2).to(ks_ptr.dtype.element_ty), mask=m)
        vsrc = v_ptr + b * stride_vb + hk * D
        vdst = vs_ptr + b * stride_vcb + hk * stride_vch + cur * stride_vcn
        tl.store(vdst + r, tl.load(vsrc + r, mask=m, other=0.0), mask=m)
        tl.store(vdst + HALF + r, tl.load(vsrc + HALF + r, mask=m, other=0.0), mask=m)


def rope_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               ks: torch.Tensor, vs: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
    """q [B, Hq·d], k / v [B, Hkv·d], cos / sin [B, d], caches ks / vs [B, Hkv, S, d], cur
    int32 [1] -> the rotated queries [B, Hq, d] (q's dtype); rotated k and v written to the
    caches at slot cur."""
    if ks.dim() != 4 or vs.shape != ks.shape:
        raise ValueError(f"rope_write: caches must be [B, Hkv, S, d]; got ks {tuple(ks.shape)}, vs {tuple(vs.shape)}")
    B, Hkv, S, d = ks.shape
    if d % 2 or q.dim() != 2 or q.shape[0] != B or q.shape[1] % d or k.shape != (B, Hkv * d) or v.shape != k.shape:
        raise ValueError(f"rope_write: q must be [B={B}, Hq·{d}], k and v [B, {Hkv * d}] (d even); got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if cos.shape != (B, d) or sin.shape != (B, d):
        raise ValueError(f"rope_write: cos and sin must be [B={B}, d={d}]; got {tuple(cos.shape)}, {tuple(sin.shape)}")
    if cur.numel() != 1 or cur.dtype != torch.int32:
        raise ValueError(f"rope_write: cur must be one int32; got {cur.dtype} {tuple(cur.shape)}")
    q, k, v, cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v, cos, sin))
    Hq = q.shape[1] // d
    out = torch.full((B, Hq, d), float("nan"), dtype=q.dtype, device=q.device) if POISON else \
        torch.empty((B, Hq, d), dtype=q.dtype, device=q.device)
    _rope_write_kernel[(B, Hq + Hkv)](
        q, k, v, cos, sin, out, ks, vs, cur, Hq, q.stride(0), k.stride(0), v.stride(0), cos.stride(0), sin.stride(0),
        out.stride(0), ks.stride(0), ks.stride(1), ks.stride(2), vs.stride(0), vs.stride(1), vs.stride(2),
        HALF=d // 2, BLOCK=max(16, triton.next_power_of_2(d // 2)))
    return out
