"""The gated MLP's activation, silu(gate) · up, forward and backward in one elementwise pass.

transformers runs it as two kernels forward (silu, then the product) and four backward, each
over [tokens, intermediate] 16-bit tensors (14,336 wide on an 8B model); here one kernel each
way reads the inputs once and writes the outputs once.

    h = round16(round16(silu(g)) · u)                (transformers' rounding)
    ∂u = ∂h · silu(g),   ∂g = ∂h · u · σ(g) · (1 + g · (1 − σ(g)))

Reference beside it: reference_swiglu.py."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

POISON = False   # tests set this: every output a kernel must fully write starts as NaN


def _like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan")) if POISON else torch.empty_like(t)

BLOCK = 2048


@triton.jit
def _swiglu_fwd(g_ptr, u_ptr, h_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(h_ptr.dtype.element_ty).to(tl.float32)
    tl.store(h_ptr + offs, (s * u).to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(g_ptr, u_ptr, dh_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-g))
    tl.store(du_ptr + offs, (dh * g * sig).to(du_ptr.dtype.element_ty), mask=mask)
    tl.store(dg_ptr + offs, (dh * u * sig * (1.0 + g * (1.0 - sig))).to(dg_ptr.dtype.element_ty), mask=mask)


def swiglu_forward(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """g, u [..., I] (same shape and dtype) -> silu(g) · u."""
    g, u = g.contiguous(), u.contiguous()
    h = _like(g)
    n = g.numel()
    if n:
        _swiglu_fwd[(triton.cdiv(n, BLOCK),)](g, u, h, n, BLOCK=BLOCK, num_warps=8)
    return h


@triton.jit
def _swiglu_packed_fwd(gu_ptr, h_ptr, I, stride_gu, stride_h, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    g = tl.load(gu_ptr + row * stride_gu + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * stride_gu + I + offs, mask=mask, other=0.0).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(h_ptr.dtype.element_ty).to(tl.float32)
    tl.store(h_ptr + row * stride_h + offs, (s * u).to(h_ptr.dtype.element_ty), mask=mask)


def swiglu_packed(gu: torch.Tensor) -> torch.Tensor:
    """gu [M, 2I] (gate columns, then up: one GEMM's output over [W_gate; W_up]) -> silu(g) · u
    [M, I], as swiglu_forward rounds it. Reads the halves in place: split and made contiguous
    they cost two copies a layer in a decoding step."""
    if gu.dim() != 2 or gu.shape[1] % 2:
        raise ValueError(f"swiglu_packed: gu must be [M, 2I]; got {tuple(gu.shape)}")
    if gu.stride(1) != 1:
        gu = gu.contiguous()
    M, I = gu.shape[0], gu.shape[1] // 2
    h = torch.full((M, I), float("nan"), dtype=gu.dtype, device=gu.device) if POISON else \
        torch.empty((M, I), dtype=gu.dtype, device=gu.device)
    if M and I:
        block = min(BLOCK, triton.next_power_of_2(I))
        _swiglu_packed_fwd[(M, triton.cdiv(I, block))](gu, h, I, gu.stride(0), h.stride(0), BLOCK=block, num_warps=4)
    return h


def swiglu_backward(g: torch.Tensor, u: torch.Tensor, dh: torch.Tensor):
    """-> (∂g, ∂u) like g."""
    g, u, dh = g.contiguous(), u.contiguous(), dh.to(g.dtype).contiguous()
    dg, du = _like(g), _like(g)
    n = g.numel()
    if n:
        _swiglu_bwd[(triton.cdiv(n, BLOCK),)](g, u, dh, dg, du, n, BLOCK=BLOCK, num_warps=8)
    return dg, du
