"""RMSNorm of a frozen base model (Llama, Qwen2/3, Mistral, Phi-3), forward and backward in
one pass over the rows each.

transformers computes it as ~6 kernels over fp32 copies of the activations (to fp32, square,
mean, rsqrt-multiply, back to 16 bits, times the weight), ~18 bytes per element each way;
here one kernel reads the 16-bit row once and writes it once (and one more for backward).
Measured on the 8B shape: benchmarks/NOTES.md.

    y = w · round16(x · rstd),   rstd = 1 / sqrt(mean(x²) + eps)      (transformers' rounding)
    ∂x = rstd · (g − n · mean(g · n)),   g = ∂y · w,   n = x · rstd      (w frozen: no ∂w)

add_rmsnorm_forward fuses the residual add a decoder layer makes before each norm (the static
decoder's step, no gradient): s = round16(h + y), then the norm of s, one kernel for the two
(saves a launch and a round trip of the activations, twice a layer).

Reference beside it: reference_rmsnorm.py. Launchers take CUDA tensors, or CPU tensors
under TRITON_INTERPRET=1 (the tests)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

POISON = False   # tests set this: every output a kernel must fully write starts as NaN


def _like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan")) if POISON else torch.empty_like(t)


@triton.jit
def _rmsnorm_fwd(x_ptr, w_ptr, y_ptr, rstd_ptr, H, eps, stride_x, stride_y, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / H + eps)
    n = (x * rstd).to(y_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, (n * w).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _add_rmsnorm_fwd(h_ptr, y_ptr, w_ptr, s_ptr, x_ptr, H, eps, stride_h, stride_y, stride_s, stride_x,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    h = tl.load(h_ptr + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + row * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
    s = (h + y).to(s_ptr.dtype.element_ty)                     # the sum rounded as torch's add rounds it
    tl.store(s_ptr + row * stride_s + cols, s, mask=mask)
    s = s.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(s * s, 0) / H + eps)
    n = (s * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(x_ptr + row * stride_x + cols, (n * w).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rmsnorm_bwd(x_ptr, w_ptr, dy_ptr, rstd_ptr, dx_ptr, H, stride_x, stride_dy, stride_dx, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + row)
    n = x * rstd
    g = dy * w
    c = tl.sum(g * n, 0) / H
    tl.store(dx_ptr + row * stride_dx + cols, (rstd * (g - n * c)).to(dx_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _warps(block: int) -> int:
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


def rmsnorm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float):
    """x [..., H] (16-bit or fp32), weight [H] (x's dtype) -> (y like x, rstd [N] fp32)."""
    x2 = _rows(x)
    N, H = x2.shape
    y = _like(x2)
    rstd = _like(torch.empty(N, device=x.device, dtype=torch.float32))
    block = triton.next_power_of_2(H)
    if N:
        _rmsnorm_fwd[(N,)](x2, weight, y, rstd, H, eps, x2.stride(0), y.stride(0), BLOCK=block, num_warps=_warps(block))
    return y.view(x.shape), rstd


def rmsnorm_backward(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """-> ∂x like x (the weight is frozen)."""
    x2, dy2 = _rows(x), _rows(dy.to(x.dtype))
    N, H = x2.shape
    dx = _like(x2)
    block = triton.next_power_of_2(H)
    if N:
        _rmsnorm_bwd[(N,)](x2, weight, dy2, rstd, dx, H, x2.stride(0), dy2.stride(0), dx.stride(0), BLOCK=block,
                           num_warps=_warps(block))
    return dx.view(x.shape)


def add_rmsnorm_forward(h: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float):
    """h, y [..., H] (one dtype), weight [H] (that dtype) -> (s = h + y, norm(s)), both like h:
    the residual add and the RMSNorm after it in one kernel (forward only, no gradient)."""
    if y.shape != h.shape or y.dtype != h.dtype or weight.shape != h.shape[-1:] or weight.dtype != h.dtype:
        raise ValueError(f"add_rmsnorm_forward: h {tuple(h.shape)} {h.dtype}, y {tuple(y.shape)} {y.dtype} and "
                         f"weight {tuple(weight.shape)} {weight.dtype} must share a dtype, y h's shape, weight [H]")
    h2, y2 = _rows(h), _rows(y)
    N, H = h2.shape
    s, x = _like(h2), _like(h2)
    block = triton.next_power_of_2(H)
    if N:
        _add_rmsnorm_fwd[(N,)](h2, y2, weight, s, x, H, eps, h2.stride(0), y2.stride(0), s.stride(0), x.stride(0),
                               BLOCK=block, num_warps=_warps(block))
    return s.view(h.shape), x.view(h.shape)
