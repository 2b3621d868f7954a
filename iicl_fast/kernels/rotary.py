"""The rotary embedding, fused: one decoding step's rotation and cache write (the static
decoder's glue), and the rotation of a whole forward's q and k with its backward (training and
the passes).

transformers applies the rotary embedding to q and k as ~10 elementwise kernels a layer
(two products, a rotate-half built from two slices, a negation and a concatenation, a sum,
each way) and the static decoder then copies k and v into its cache: at one token a row,
those are a few microseconds each, and at 32 layers they were ~2 ms of a 9.6 ms step at 64
rows (benchmarks/NOTES.md). Here it is one kernel: program (row b, j) rotates HEADS query
heads of q[b] into q_out, or (past the query heads) HEADS KV heads of k[b] and writes them and
v[b]'s into the caches at slot cur (a device scalar: the step replays as a graph).

    q_out = rope_write(q, k, v, cos, sin, ks, vs, cur)
    # q [B, Hq·d], k / v [B, Hkv·d] (the projections' outputs), cos / sin [B, d] (the model's
    # rotary_emb: the two halves' frequencies concatenated), ks / vs [B, Hkv, S, d] -> q_out [B, Hq, d]

Rotation: x·cos + rotate_half(x)·sin with rotate_half(x) = [-x₂, x₁], computed in fp32 and
rounded once.

    q_out, k_out = rope_forward(q, k, cos, sin)     # q [B, Hq, T, d], k [B, Hk, T, d] (any strides
    dq, dk = rope_backward(gq, gk, cos, sin)        # but the last), cos / sin [B or 1, T, d]

rope_forward rounds as transformers does (each product to q's dtype, then their sum), so a
model's outputs do not move when it is switched on; the backward, the rotation's transpose
(∂x₁ = g₁c₁ + g₂s₂, ∂x₂ = g₂c₂ − g₁s₁), rounds once. One program per token rotates all its q and
k heads, reading cos / sin once: transformers' ~10 kernels each way over the strided
[B, H, T, d] views took ~50 of a 595 ms training step on the 8B shape (benchmarks/NOTES.md).
Reference beside it: reference_rotary.py."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

POISON = False   # tests set this: q_out starts as NaN so an unwritten element fails


# Heads a rope_write program rotates (a [HEADS, d/2] tile a half). One head a program (64
# elements, 4 warps) made 16,000 programs at 400 rows of the 8B heads: 0.36 ms of a 17.0 ms step
# for ~10 MB moved (profile_decode_graph_7701404; ~3 µs a layer at bandwidth where it took 11).
HEADS = 8


@triton.jit
def _rope_write_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, qo_ptr, ks_ptr, vs_ptr, cur_ptr, HQ, HKV, QP,
                       stride_qb, stride_kb, stride_vb, stride_cb, stride_sb, stride_ob,
                       stride_kcb, stride_kch, stride_kcn, stride_vcb, stride_vch, stride_vcn,
                       HALF: tl.constexpr, BLOCK: tl.constexpr, HEADS: tl.constexpr):
    """Program (row b, j): query heads j·HEADS.. (j < QP), else KV heads (j - QP)·HEADS.."""
    b = tl.program_id(0)
    j = tl.program_id(1)
    r = tl.arange(0, BLOCK)[None, :]
    rm = r < HALF
    c1 = tl.load(cos_ptr + b * stride_cb + r, mask=rm, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + b * stride_cb + HALF + r, mask=rm, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + b * stride_sb + r, mask=rm, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + b * stride_sb + HALF + r, mask=rm, other=0.0).to(tl.float32)
    D = 2 * HALF
    if j < QP:
        h = j * HEADS + tl.arange(0, HEADS)[:, None]
        m = (h < HQ) & rm
        src = q_ptr + b * stride_qb + h * D + r
        x1 = tl.load(src, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=m, other=0.0).to(tl.float32)
        dst = qo_ptr + b * stride_ob + h * D + r
        tl.store(dst, (x1 * c1 - x2 * s1).to(qo_ptr.dtype.element_ty), mask=m)
        tl.store(dst + HALF, (x2 * c2 + x1 * s2).to(qo_ptr.dtype.element_ty), mask=m)
    else:
        hk = (j - QP) * HEADS + tl.arange(0, HEADS)[:, None]
        m = (hk < HKV) & rm
        cur = tl.load(cur_ptr)
        src = k_ptr + b * stride_kb + hk * D + r
        x1 = tl.load(src, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=m, other=0.0).to(tl.float32)
        dst = ks_ptr + b * stride_kcb + hk * stride_kch + cur * stride_kcn + r
        tl.store(dst, (x1 * c1 - x2 * s1).to(ks_ptr.dtype.element_ty), mask=m)
        tl.store(dst + HALF, (x2 * c2 + x1 * s2).to(ks_ptr.dtype.element_ty), mask=m)
        vsrc = v_ptr + b * stride_vb + hk * D + r
        vdst = vs_ptr + b * stride_vcb + hk * stride_vch + cur * stride_vcn + r
        tl.store(vdst, tl.load(vsrc, mask=m, other=0.0), mask=m)
        tl.store(vdst + HALF, tl.load(vsrc + HALF, mask=m, other=0.0), mask=m)


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
    heads = max(1, min(HEADS, triton.next_power_of_2(max(Hq, Hkv))))
    qp = triton.cdiv(Hq, heads)
    _rope_write_kernel[(B, qp + triton.cdiv(Hkv, heads))](
        q, k, v, cos, sin, out, ks, vs, cur, Hq, Hkv, qp, q.stride(0), k.stride(0), v.stride(0), cos.stride(0),
        sin.stride(0), out.stride(0), ks.stride(0), ks.stride(1), ks.stride(2), vs.stride(0), vs.stride(1), vs.stride(2),
        HALF=d // 2, BLOCK=max(16, triton.next_power_of_2(d // 2)), HEADS=heads)
    return out


@triton.jit
def _round(x, ty: tl.constexpr):
    """fp32 x rounded to ty (nearest, ties to even), returned as fp32. bf16 by integer ops: a
    `.to(bf16).to(fp32)` round trip came out of the GPU compile unlike transformers' products
    (tests/test_cuda_e2e.py), and the interpreter truncates that cast."""
    if ty == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        return u.to(tl.float32, bitcast=True)
    elif ty == tl.float32:
        return x
    else:
        return x.to(ty).to(tl.float32)


@triton.jit
def _rope_rows(x_ptr, y_ptr, b, t, H, sxb, sxh, sxt, syb, syh, syt, c1, c2, s1, s2,
               HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BACKWARD: tl.constexpr):
    h = tl.arange(0, BLOCK_H)[:, None]
    r = tl.arange(0, BLOCK_D)[None, :]
    m = (h < H) & (r < HALF)
    src = x_ptr + b * sxb + h.to(tl.int64) * sxh + t * sxt + r
    x1 = tl.load(src, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=m, other=0.0).to(tl.float32)
    ty = y_ptr.dtype.element_ty
    if BACKWARD:        # the transpose of the rotation, rounded once
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:               # transformers' rounding: each product in the tensor's dtype, then the sum
        y1 = _round(x1 * c1, ty) + _round(-(x2 * s1), ty)
        y2 = _round(x2 * c2, ty) + _round(x1 * s2, ty)
    dst = y_ptr + b * syb + h.to(tl.int64) * syh + t * syt + r
    tl.store(dst, _round(y1, ty).to(ty), mask=m)          # exact: already on ty's grid
    tl.store(dst + HALF, _round(y2, ty).to(ty), mask=m)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, T, HQ, HK,
                 sqb, sqh, sqt, skb, skh, skt, sob, soh, sot, spb, sph, spt, scb, sct, ssb, sst,
                 HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr,
                 BACKWARD: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // T
    t = pid % T
    r = tl.arange(0, BLOCK_D)[None, :]
    m = r < HALF
    c = cos_ptr + b * scb + t * sct + r
    s = sin_ptr + b * ssb + t * sst + r
    c1 = tl.load(c, mask=m, other=0.0).to(tl.float32)
    c2 = tl.load(c + HALF, mask=m, other=0.0).to(tl.float32)
    s1 = tl.load(s, mask=m, other=0.0).to(tl.float32)
    s2 = tl.load(s + HALF, mask=m, other=0.0).to(tl.float32)
    _rope_rows(q_ptr, qo_ptr, b, t, HQ, sqb, sqh, sqt, sob, soh, sot, c1, c2, s1, s2, HALF, BLOCK_HQ, BLOCK_D, BACKWARD)
    _rope_rows(k_ptr, ko_ptr, b, t, HK, skb, skh, skt, spb, sph, spt, c1, c2, s1, s2, HALF, BLOCK_HK, BLOCK_D, BACKWARD)


def _rope_check(name: str, q, k, cos, sin) -> None:
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:] or q.shape[-1] % 2:
        raise ValueError(f"{name}: q and k must be [B, H, T, d] with the same B, T and an even d; got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}")
    B, _, T, d = q.shape
    for n, c in (("cos", cos), ("sin", sin)):
        if c.dim() != 3 or c.shape[1:] != (T, d) or c.shape[0] not in (1, B):
            raise ValueError(f"{name}: {n} must be [B={B} or 1, T={T}, d={d}]; got {tuple(c.shape)}")
    if k.dtype != q.dtype:
        raise ValueError(f"{name}: q and k must share a dtype; got {q.dtype}, {k.dtype}")


def _rope_launch(q, k, cos, sin, backward: bool):
    q, k, cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, cos, sin))
    B, Hq, T, d = q.shape
    Hk = k.shape[1]
    qo = torch.full_like(q, float("nan")) if POISON else torch.empty_like(q)    # q's layout (strided views stay so)
    ko = torch.full_like(k, float("nan")) if POISON else torch.empty_like(k)
    if q.numel() == 0:
        return qo, ko
    half = d // 2
    bd = max(16, triton.next_power_of_2(half))
    bq, bk = triton.next_power_of_2(Hq), triton.next_power_of_2(Hk)
    cb = 0 if cos.shape[0] == 1 else cos.stride(0)
    sb = 0 if sin.shape[0] == 1 else sin.stride(0)
    _rope_kernel[(B * T,)](q, k, cos, sin, qo, ko, T, Hq, Hk, *q.stride()[:3], *k.stride()[:3], *qo.stride()[:3],
                           *ko.stride()[:3], cb, cos.stride(1), sb, sin.stride(1), HALF=half, BLOCK_HQ=bq, BLOCK_HK=bk,
                           BLOCK_D=bd, BACKWARD=backward, num_warps=4 if bq * bd <= 2048 else 8)
    return qo, ko


def rope_forward(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q [B, Hq, T, d], k [B, Hk, T, d], cos / sin [B or 1, T, d] -> (q·cos + rotate_half(q)·sin,
    the same of k), each in its input's dtype and memory layout."""
    _rope_check("rope_forward", q, k, cos, sin)
    return _rope_launch(q, k, cos, sin, False)


def rope_backward(gq: torch.Tensor, gk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """The gradients of rope_forward's outputs -> those of its inputs q and k (cos, sin are constants)."""
    _rope_check("rope_backward", gq, gk, cos, sin)
    return _rope_launch(gq, gk, cos, sin, True)
