"""Loss-head ops: teacher statistics, forward KL by the loss-head identity, token log-prob,
and the general KL path. None holds a tokens × vocab tensor.

impl="auto": Triton on CUDA tensors, the PyTorch reference on CPU tensors;
impl="triton" on CPU tensors runs the kernels through the Triton interpreter (set
TRITON_INTERPRET=1 before triton is imported); impl="torch": the reference.

Identity (DESIGN.md): with teacher p_t = softmax(h_t·Wᵀ/T) and student z_s = h_s·Wᵀ/T,
    KL(p_t ‖ p_s) = lse_s − h_s·μ_t/T − H_t,   μ_t = E_{p_t}[W],
    ∂KL/∂h_s     = (E_{p_s}[W] − μ_t)/T,
so the teacher pass computes (lse_t, H_t, μ_t) once and a student step costs two
N×H×V GEMM-equivalents."""
from __future__ import annotations

from typing import NamedTuple

import torch

from .config import IICLError  # noqa: F401  (re-exported for callers)


class TeacherStats(NamedTuple):
    """lse [N], entropy [N], mu [N, H] (= E_p[W]), logprob [N] or None; all float32."""
    lse: torch.Tensor
    entropy: torch.Tensor
    mu: torch.Tensor
    logprob: torch.Tensor | None = None


def _backend(impl: str, *tensors):
    if impl not in ("auto", "triton", "torch"):
        raise IICLError(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    if impl == "auto":
        impl = "triton" if tensors[0].is_cuda else "torch"
    if impl == "triton":
        from .kernels import loss_head
        return loss_head
    from .kernels import reference_loss_head
    return reference_loss_head


def _check(h, weight, name="h", targets=None):
    if h.dim() != 2:
        raise IICLError(f"{name} must be [N, H], got shape {tuple(h.shape)}")
    if weight.dim() != 2 or weight.shape[1] != h.shape[1]:
        raise IICLError(f"weight must be [V, {h.shape[1]}] to match {name}, got {tuple(weight.shape)}")
    if h.dtype != weight.dtype:
        raise IICLError(f"{name} ({h.dtype}) and weight ({weight.dtype}) must have the same dtype")
    if h.device != weight.device:
        raise IICLError(f"{name} is on {h.device} but weight on {weight.device}")
    if targets is not None:
        if targets.shape != (h.shape[0],) or targets.dtype not in (torch.int64, torch.int32):
            raise IICLError(f"targets must be an integer tensor [{h.shape[0]}], got {targets.dtype} {tuple(targets.shape)}")
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= weight.shape[0]):
            raise IICLError(f"targets must lie in [0, {weight.shape[0]})")


def _reduce(x, reduction):
    if reduction == "none":
        return x
    if reduction == "mean":
        return x.mean()
    if reduction == "sum":
        return x.sum()
    raise IICLError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")


def _rowdot(a, b, rows=2048):
    """Σ_j a[i, j]·b[i, j] in fp32 [N], in row slices (no N×H fp32 copy of a at once)."""
    return torch.cat([(a[i:i + rows].float() * b[i:i + rows]).sum(1) for i in range(0, a.shape[0], rows)])


@torch.no_grad()
def teacher_stats(h, weight, targets=None, *, temperature=1.0, precise=False, impl="auto",
                  slab_rows: int | None = None) -> TeacherStats:
    """The single teacher pass: h [N, H], weight [V, H] -> TeacherStats (fp32).

    entropy is computed as lse − h·μ/T (= lse − Σp·z in exact arithmetic) so that it carries
    the same rounding as μ: then forward_kl = lse_s − h_s·μ/T − H_t sees only (h_s − h_t)·δμ,
    which vanishes near convergence. With Σp·z instead, bf16 rounding of P in μ gave a KL error
    2.3× the KL itself at KL 4.6e-4 (H=4096, V=128256, H100). precise=True also keeps P in fp32
    split into two bf16 products for μ (3 GEMM-equivalents instead of 2). slab_rows: at most
    this many rows a kernel slab (its [rows, V] workspace bounded whatever N is)."""
    _check(h, weight, "h", targets)
    be = _backend(impl, h)
    lse, _, zt, mu = be.softmax_stats(h.detach(), weight.detach(), targets, temperature=temperature,
                                      precise_w=precise, max_rows=slab_rows)
    return TeacherStats(lse, lse - _rowdot(h, mu) / temperature, mu, None if zt is None else zt - lse)


def _per_token_grad(ctx, g, rows=2048):
    """Each op saves d(loss_i)/dh_i [N, H] in forward (in h's dtype, or fp32); backward only
    scales it by g [N], in row slices: one fp32 [N, H] temporary put forward_kl_step at
    0.62 GiB peak (N=16384)."""
    (per_token,) = ctx.saved_tensors
    out = torch.empty(per_token.shape, dtype=ctx.h_dtype, device=per_token.device)
    for a in range(0, out.shape[0], rows):
        out[a:a + rows] = g[a:a + rows, None] * per_token[a:a + rows]
    return out


class _ForwardKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_s, weight, mu_t, ent_t, temperature, impl, slab_rows):
        be = _backend(impl, h_s)
        # ∂KL/∂h_s = (E_ps[W] − μ_t)/T comes out of the P·W kernel's epilogue, in h_s's dtype
        lse_s, _, _, grad = be.softmax_stats(h_s.detach(), weight.detach(), None, temperature=temperature,
                                             expect_w=ctx.needs_input_grad[0], minus=mu_t, w_dtype=h_s.dtype,
                                             max_rows=slab_rows)
        kl = lse_s - _rowdot(h_s, mu_t) / temperature - ent_t
        ctx.save_for_backward(grad)
        ctx.h_dtype = h_s.dtype
        return kl

    @staticmethod
    def backward(ctx, g):
        return _per_token_grad(ctx, g), None, None, None, None, None, None


def forward_kl(h_s, weight, st: TeacherStats, *, temperature=1.0, reduction="none", impl="auto",
               slab_rows: int | None = None):
    """KL(p_teacher ‖ p_student) per token [N] (or mean/sum), differentiable in h_s [N, H].
    slab_rows: as in teacher_stats."""
    _check(h_s, weight, "h_s")
    if st.mu.shape != h_s.shape:
        raise IICLError(f"teacher stats are for shape {tuple(st.mu.shape)}, h_s is {tuple(h_s.shape)}")
    kl = _ForwardKL.apply(h_s, weight, st.mu.float(), st.entropy.float(), float(temperature), impl, slab_rows)
    return _reduce(kl, reduction)


class _TokenLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, temperature, impl):
        be = _backend(impl, h)
        need = ctx.needs_input_grad[0]
        lse, spz, zt, ew = be.softmax_stats(h.detach(), weight.detach(), targets, temperature=temperature,
                                            expect_w=need)
        if need:   # ∂ log p(y)/∂h = (W_y − E_p[W]) / T
            ew = (weight[targets].float() - ew).div_(temperature)
        ctx.save_for_backward(ew)
        ctx.h_dtype = h.dtype
        ent = lse - spz
        ctx.mark_non_differentiable(ent)
        return zt - lse, ent

    @staticmethod
    def backward(ctx, g, _g_ent):
        return _per_token_grad(ctx, g), None, None, None, None


def token_logprob(h, weight, targets, *, temperature=1.0, impl="auto"):
    """-> log p(targets) [N] (differentiable in h [N, H]) and entropy [N] (no grad)."""
    _check(h, weight, "h", targets)
    return _TokenLogprob.apply(h, weight, targets, float(temperature), impl)


class _KLDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_s, weight_s, h_t, weight_t, kind, beta, temperature, softcap, impl):
        be = _backend(impl, h_s)
        loss, grad = be.dual_loss(h_s.detach(), weight_s.detach(), h_t.detach(), weight_t.detach(), kind=kind,
                                  beta=beta, temperature=temperature, softcap=softcap,
                                  need_grad=ctx.needs_input_grad[0], grad_dtype=h_s.dtype)
        ctx.save_for_backward(grad)
        ctx.h_dtype = h_s.dtype
        return loss

    @staticmethod
    def backward(ctx, g):
        return _per_token_grad(ctx, g), None, None, None, None, None, None, None, None


def kl_divergence(h_s, weight_s, h_t, weight_t, *, kind="forward", beta=0.5, temperature=1.0, softcap=None,
                  reduction="none", impl="auto"):
    """General path: teacher logits computed per vocab tile beside the student's (three
    N×H×V GEMM-equivalents for value and gradient, iicl_fast/kernels/loss_head.py). kind "forward" KL(p_t‖p_s),
    "reverse" KL(p_s‖p_t), "jsd" β·KL(p_t‖m) + (1−β)·KL(p_s‖m) with m = β·p_t + (1−β)·p_s.
    softcap: z → cap·tanh(z/cap) on raw logits, then /temperature. Differentiable in h_s."""
    _check(h_s, weight_s, "h_s")
    _check(h_t, weight_t, "h_t")
    if kind not in ("forward", "reverse", "jsd"):
        raise IICLError(f"kind must be 'forward', 'reverse' or 'jsd', got {kind!r}")
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise IICLError(f"jsd needs 0 < beta < 1, got {beta}")
    if h_s.shape[0] != h_t.shape[0] or weight_s.shape[0] != weight_t.shape[0]:
        raise IICLError("h_s/h_t must have the same tokens and weight_s/weight_t the same vocabulary")
    loss = _KLDivergence.apply(h_s, weight_s, h_t, weight_t, kind, float(beta), float(temperature),
                               None if softcap is None else float(softcap), impl)
    return _reduce(loss, reduction)
