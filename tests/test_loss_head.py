"""Loss-head ops (Triton through the interpreter on CPU, and the torch reference) against
float64 full-vocabulary computations, values and gradients, at odd shapes."""
import pytest
import torch

from iicl_fast import ops
from iicl_fast.kernels import loss_head

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"   # CPU: the Triton interpreter
SHAPES = [(1, 24, 37), (7, 40, 1000), (97, 40, 4099)]
IMPLS = ["triton", "torch"]
REAL_SLAB = loss_head._slab          # the fixture below replaces it


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(loss_head, "POISON", True)
    monkeypatch.setattr(loss_head, "_slab", lambda n, bn, row_bytes, **k: 3 * bn)   # N=97: 2 slabs, one partial


def inputs(N, H, V, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    h = randn(N, H, generator=g)
    W = torch.randn(V, H, generator=g) * scale / H ** 0.5
    return h.to(DEVICE), W.to(DEVICE), torch.randint(0, V, (N,), generator=g).to(DEVICE), g


def randn(*shape, generator):
    return torch.randn(tuple(shape), generator=generator).to(DEVICE)


def logits64(h, W, T=1.0, cap=None):
    z = h.double() @ W.double().t()
    if cap:
        z = cap * torch.tanh(z / cap)
    return z / T


def close(a, b, rtol=2e-4, atol=2e-5):
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("N,H,V", SHAPES)
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_teacher_stats(impl, N, H, V, T):
    h, W, y, _ = inputs(N, H, V, N + V)
    st = ops.teacher_stats(h, W, y, temperature=T, impl=impl)
    logp = torch.log_softmax(logits64(h, W, T), -1)
    p = logp.exp()
    close(st.lse, torch.logsumexp(logits64(h, W, T), -1))
    close(st.entropy, -(p * logp).sum(-1))
    close(st.mu, p @ W.double())
    close(st.logprob, logp.gather(1, y[:, None]).squeeze(1))
    assert ops.teacher_stats(h, W, temperature=T, impl=impl).logprob is None


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("N,H,V", SHAPES)
@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_forward_kl_identity(impl, N, H, V, T, reduction):
    h_t, W, _, g = inputs(N, H, V, 3 * N + V)
    h_s = (h_t + 0.5 * randn(N, H, generator=g)).requires_grad_(True)
    st = ops.teacher_stats(h_t, W, temperature=T, impl=impl)
    kl = ops.forward_kl(h_s, W, st, temperature=T, reduction=reduction, impl=impl)
    gout = randn(*kl.shape, generator=g)
    (kl * gout).sum().backward()

    h64 = h_s.detach().double().requires_grad_(True)
    logq = torch.log_softmax(logits64(h64, W, T), -1)
    logp = torch.log_softmax(logits64(h_t, W, T), -1)
    ref = (logp.exp() * (logp - logq)).sum(-1)
    ref = {"none": ref, "mean": ref.mean(), "sum": ref.sum()}[reduction]
    (ref * gout.double()).sum().backward()
    close(kl, ref, atol=1e-4)
    close(h_s.grad, h64.grad, atol=1e-5)


@pytest.mark.parametrize("noise", [0.02, 1e-3])
def test_forward_kl_near_convergence(noise):
    """Student ≈ teacher: KL and its gradient are small differences. The identity's error
    against float64 must stay within 2× that of the plain fp32 path (full log_softmax)."""
    h_t, W, _, g = inputs(33, 40, 1000, 5)
    h_s = (h_t + noise * randn(33, 40, generator=g)).requires_grad_(True)
    kl = ops.forward_kl(h_s, W, ops.teacher_stats(h_t, W, impl="triton"), reduction="sum", impl="triton")
    (grad,) = torch.autograd.grad(kl, h_s)

    def plain(h, W, dtype):
        logq = torch.log_softmax(h.to(dtype) @ W.to(dtype).t(), -1)
        logp = torch.log_softmax(h_t.to(dtype) @ W.to(dtype).t(), -1)
        return (logp.exp() * (logp - logq)).sum()

    h64 = h_s.detach().double().requires_grad_(True)
    ref = plain(h64, W, torch.float64)
    (g_ref,) = torch.autograd.grad(ref, h64)
    h32 = h_s.detach().clone().requires_grad_(True)
    p32 = plain(h32, W, torch.float32)
    (g32,) = torch.autograd.grad(p32, h32)
    err, err32 = abs(kl.item() - ref.item()), abs(p32.item() - ref.item())
    gerr = ((grad.double() - g_ref).norm() / g_ref.norm()).item()
    gerr32 = ((g32.double() - g_ref).norm() / g_ref.norm()).item()
    print(f"noise {noise}: KL {ref.item():.3e} err {err:.2e} (plain fp32 {err32:.2e}); "
          f"grad rel err {gerr:.2e} (plain fp32 {gerr32:.2e})")
    # The value is lse_s − h_s·μ_t/T − H_t from fp32 statistics: its floor is a few fp32
    # ulps of the O(10) terms per token, whatever the GEMM precision (6.5e-6 over 33 tokens
    # at KL 1e-4, vs 8.5e-7 for the plain fp32 path); the gradient has no such floor.
    ulp = torch.finfo(torch.float32).eps * ref.new_tensor(10.0).item()
    assert err <= 2 * err32 + 33 * ulp
    assert gerr <= 2 * gerr32 + 1e-5


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("N,H,V", SHAPES)
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_token_logprob(impl, N, H, V, T):
    h, W, y, g = inputs(N, H, V, 7 * N + V)
    h.requires_grad_(True)
    lp, ent = ops.token_logprob(h, W, y, temperature=T, impl=impl)
    gout = randn(N, generator=g)
    (lp * gout).sum().backward()
    h64 = h.detach().double().requires_grad_(True)
    logp = torch.log_softmax(logits64(h64, W, T), -1)
    ref = logp.gather(1, y[:, None]).squeeze(1)
    (ref * gout.double()).sum().backward()
    close(lp, ref)
    close(ent, -(logp.exp() * logp).sum(-1).detach())
    close(h.grad, h64.grad, atol=1e-5)
    assert not ent.requires_grad
    with torch.no_grad():                       # no grad: one GEMM pass, same values
        lp2, _ = ops.token_logprob(h, W, y, temperature=T, impl=impl)
    close(lp2, ref.detach())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("N,H,V", SHAPES)
@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("T,cap", [(1.0, None), (2.0, 4.0)])
def test_kl_divergence_general(impl, N, H, V, kind, T, cap):
    h_s, W_s, _, g = inputs(N, H, V, 11 * N + V)
    Ht = H + 8                                   # teacher of another width
    h_t = randn(N, Ht, generator=g)
    W_t = randn(V, Ht, generator=g) * 3 / Ht ** 0.5
    h_s.requires_grad_(True)
    loss = ops.kl_divergence(h_s, W_s, h_t, W_t, kind=kind, beta=0.3, temperature=T, softcap=cap, impl=impl)
    gout = randn(N, generator=g)
    (loss * gout).sum().backward()

    h64 = h_s.detach().double().requires_grad_(True)
    logq = torch.log_softmax(logits64(h64, W_s, T, cap), -1)
    logp = torch.log_softmax(logits64(h_t, W_t, T, cap), -1)
    if kind == "forward":
        ref = (logp.exp() * (logp - logq)).sum(-1)
    elif kind == "reverse":
        ref = (logq.exp() * (logq - logp)).sum(-1)
    else:
        m = 0.3 * logp.exp() + 0.7 * logq.exp()
        ref = 0.3 * (logp.exp() * (logp - m.log())).sum(-1) + 0.7 * (logq.exp() * (logq - m.log())).sum(-1)
    (ref * gout.double()).sum().backward()
    close(loss, ref, atol=1e-4)
    close(h_s.grad, h64.grad, atol=1e-5)


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_kl_divergence_without_grad(kind):
    """h_s without grad: forward / reverse KL from pass 1 alone (no workspace), JSD from its
    value pass; values as the float64 reference."""
    h_s, W_s, _, g = inputs(7, 24, 1000, 31)
    h_t = randn(7, 32, generator=g)
    W_t = randn(1000, 32, generator=g) * 0.6
    loss = ops.kl_divergence(h_s, W_s, h_t, W_t, kind=kind, beta=0.3, temperature=2.0, softcap=4.0, impl="triton")
    logq = torch.log_softmax(logits64(h_s, W_s, 2.0, 4.0), -1)
    logp = torch.log_softmax(logits64(h_t, W_t, 2.0, 4.0), -1)
    if kind == "forward":
        ref = (logp.exp() * (logp - logq)).sum(-1)
    elif kind == "reverse":
        ref = (logq.exp() * (logq - logp)).sum(-1)
    else:
        m = (0.3 * logp.exp() + 0.7 * logq.exp()).log()
        ref = 0.3 * (logp.exp() * (logp - m)).sum(-1) + 0.7 * (logq.exp() * (logq - m)).sum(-1)
    assert not loss.requires_grad
    close(loss, ref, atol=1e-5)


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("noise,cap", [(1.0, None), (0.01, None), (0.01, 4.0)])
def test_kl_divergence_fp16_workspace(monkeypatch, kind, noise, cap):
    """bf16 models keep u = z_t − m_tile and δ = z_s − z_t in an fp16 workspace between the
    passes. The interpreter has no bf16 GEMM, so the bf16 path is emulated: bf16-representable
    inputs held in fp16 (the same products, fp32 accumulation) with the fp16 workspace forced.
    Loss and gradient error against float64 must be no worse than 2× the plain bf16 path's
    (bf16 GEMM, fp32 softmax), at random and near-converged students."""
    monkeypatch.setattr(loss_head, "_dual_ws_dtype", lambda dtype: torch.float16)
    N, H, V = 33, 64, 1000
    g = torch.Generator().manual_seed(17)
    W = (torch.randn(V, H, generator=g) * 3 / H ** 0.5).bfloat16()
    h_t = torch.randn(N, H, generator=g).bfloat16()
    h_s = (h_t.float() + noise * torch.randn(N, H, generator=g)).bfloat16()

    def loss_of(h, dtype, softmax_dtype):
        def logp(x):
            z = (x.to(dtype) @ W.to(dtype).t()).to(softmax_dtype)
            return torch.log_softmax(cap * torch.tanh(z / cap) if cap else z, -1)
        lq, lp = logp(h), logp(h_t)
        if kind == "forward":
            return (lp.exp() * (lp - lq)).sum(-1)
        if kind == "reverse":
            return (lq.exp() * (lq - lp)).sum(-1)
        lm = (0.3 * lp.exp() + 0.7 * lq.exp()).log()
        return 0.3 * (lp.exp() * (lp - lm)).sum(-1) + 0.7 * (lq.exp() * (lq - lm)).sum(-1)

    def value_and_grad(fn, h):
        h = h.detach().clone().requires_grad_(True)
        val = fn(h)
        return val.detach().double(), torch.autograd.grad(val.sum(), h)[0].double()

    ref, g_ref = value_and_grad(lambda h: loss_of(h, torch.float64, torch.float64), h_s.double())
    plain, g_plain = value_and_grad(lambda h: loss_of(h, torch.bfloat16, torch.float32), h_s)
    ours, g_ours = value_and_grad(lambda h: ops.kl_divergence(
        h, W.half().to(DEVICE), h_t.half().to(DEVICE), W.half().to(DEVICE), kind=kind, beta=0.3, softcap=cap,
        impl="triton"), h_s.half().to(DEVICE))
    rel = lambda a, b: ((a.cpu() - b).norm() / b.norm()).item()
    print(f"{kind} noise {noise} cap {cap}: loss {rel(ours, ref):.1e} (plain bf16 {rel(plain, ref):.1e}), "
          f"grad {rel(g_ours, g_ref):.1e} (plain bf16 {rel(g_plain, g_ref):.1e})")
    assert rel(ours, ref) <= 2 * rel(plain, ref)
    assert rel(g_ours, g_ref) <= 2 * rel(g_plain, g_ref)


def test_row_shift_redo(monkeypatch):
    """P is stored as e^(z − c_row) with c a sampled max. Rows whose c is off by more than the
    safe window (true max − c > 60: P would overflow; < −30) are redone with per-tile
    re-basing: a shift estimate that is wrong on purpose must not change any result."""
    real = loss_head._row_shift
    seen = []

    def wrong(h, w_sample, inv_t):
        c = real(h, w_sample, inv_t)
        seen.append(len(c))
        off = torch.zeros_like(c)
        off[0::3], off[1::3] = -100.0, 80.0          # rows 0, 3, …: overflow; 1, 4, …: far above the max
        return c + off

    monkeypatch.setattr(loss_head, "_row_shift", wrong)
    N, H, V, T = 97, 40, 4099, 2.0
    h_t, W, y, g = inputs(N, H, V, 21)
    h_s = (h_t + 0.5 * randn(N, H, generator=g)).requires_grad_(True)
    st = ops.teacher_stats(h_t, W, y, temperature=T, impl="triton")
    kl = ops.forward_kl(h_s, W, st, temperature=T, impl="triton")
    (grad,) = torch.autograd.grad(kl.sum(), h_s)
    assert seen, "the row-shift path was not taken"
    logp = torch.log_softmax(logits64(h_t, W, T), -1)
    h64 = h_s.detach().double().requires_grad_(True)
    ref = (logp.exp() * (logp - torch.log_softmax(logits64(h64, W, T), -1))).sum(-1)
    (g_ref,) = torch.autograd.grad(ref.sum(), h64)
    close(st.mu, logp.exp() @ W.double())
    close(st.lse, torch.logsumexp(logits64(h_t, W, T), -1))
    close(st.logprob, logp.gather(1, y[:, None]).squeeze(1))
    close(kl, ref.detach(), atol=1e-4)
    close(grad, g_ref, atol=1e-5)


@pytest.mark.parametrize("row_shift", ["1", "0"])
def test_teacher_mu_precise_16bit(monkeypatch, row_shift):
    """16-bit inputs (fp16 here: the interpreter has no bf16 GEMM): μ = E_p[W] against float64
    is no worse than 2× the plain path's (16-bit P·W after an fp32 softmax); precise=True (fp32 P
    split into two 16-bit products) at least 4× closer than the default; both P layouts."""
    monkeypatch.setenv("IICL_LOSS_HEAD_ROW_SHIFT", row_shift)
    N, H, V = 33, 64, 4099
    g = torch.Generator().manual_seed(23)
    h = torch.randn(N, H, generator=g).half().to(DEVICE)
    W = (torch.randn(V, H, generator=g) * 3 / H ** 0.5).half().to(DEVICE)
    ref = torch.softmax(logits64(h, W), -1) @ W.double()
    plain = torch.softmax((h.float() @ W.float().t()), -1).half().float() @ W.float()
    rel = lambda a: ((a.double() - ref).norm() / ref.norm()).item()
    fast = rel(ops.teacher_stats(h, W, impl="triton").mu)
    precise = rel(ops.teacher_stats(h, W, precise=True, impl="triton").mu)
    print(f"row shift {row_shift}: μ error {fast:.1e}, precise {precise:.1e}, plain 16-bit {rel(plain):.1e}")
    assert fast <= 2 * rel(plain)
    assert precise <= fast / 4


def test_slab_rows():
    """Slabs: a multiple of BN, the workspace under its budget, at least one row block, no
    more rows than N rounded up (a 64 MiB statistics budget at V=128256 once gave 128-row slabs)."""
    real = REAL_SLAB
    assert real(16384, 128, 501 * 256 * 2) == 1024                  # bf16 P at V=128256: 256 MiB
    assert real(16384, 128, 501 * 12, workspace_bytes=64 << 20) == 11136
    assert real(97, 32, 10 ** 12) == 32 and real(97, 32, 1) == 128


def test_slab_rows_cap(monkeypatch):
    """slab_rows caps the kernel's slabs (training keeps its workspace the same size whatever
    the rows, in one call): 4 slabs of at most 32 rows at N=97 instead of 2 of 96, and the same
    results against float64."""
    real, seen = loss_head._row_shift, []
    monkeypatch.setattr(loss_head, "_row_shift", lambda h, w, t: seen.append(len(h)) or real(h, w, t))
    N, H, V, T = 97, 40, 4099, 1.5
    h_t, W, _, g = inputs(N, H, V, 31)
    h_s = (h_t + 0.5 * randn(N, H, generator=g)).requires_grad_(True)
    st = ops.teacher_stats(h_t, W, temperature=T, impl="triton", slab_rows=40)
    assert seen == [32, 32, 32, 1]
    seen.clear()
    kl = ops.forward_kl(h_s, W, st, temperature=T, impl="triton", slab_rows=40)
    (grad,) = torch.autograd.grad(kl.sum(), h_s)
    assert seen == [32, 32, 32, 1]
    logp = torch.log_softmax(logits64(h_t, W, T), -1)
    h64 = h_s.detach().double().requires_grad_(True)
    ref = (logp.exp() * (logp - torch.log_softmax(logits64(h64, W, T), -1))).sum(-1)
    (g_ref,) = torch.autograd.grad(ref.sum(), h64)
    close(st.mu, logp.exp() @ W.double())
    close(kl, ref.detach(), atol=1e-4)
    close(grad, g_ref, atol=1e-5)


def test_mean_reduction_and_bad_inputs():
    h, W, y, _ = inputs(7, 24, 37, 0)
    with pytest.raises(ops.IICLError, match="same dtype"):
        ops.token_logprob(h.double(), W, y)
    with pytest.raises(ops.IICLError, match="targets must lie"):
        ops.token_logprob(h, W, y + 37)
    with pytest.raises(ops.IICLError, match="weight must be"):
        ops.teacher_stats(h, W[:, :5])
    with pytest.raises(ops.IICLError, match="kind"):
        ops.kl_divergence(h, W, h, W, kind="tv")
    with pytest.raises(ops.IICLError, match="impl"):
        ops.teacher_stats(h, W, impl="cuda")
    with pytest.raises(ops.IICLError, match="reduction"):
        ops.forward_kl(h, W, ops.teacher_stats(h, W), reduction="max")


@pytest.mark.parametrize("tma,H", [("0", 40), ("1", 37)])
def test_pointer_loads(monkeypatch, tma, H):
    """The kernels' plain pointer loads (tensor descriptors off, or a row stride TMA cannot
    take: 37 fp32 = 148 bytes), with one tile per program (not persistent), give the same
    values and gradients against float64."""
    monkeypatch.setenv("IICL_LOSS_HEAD_TMA", tma)
    monkeypatch.setenv("IICL_LOSS_HEAD_PERSIST", "0")
    N, V, T = 97, 4099, 2.0
    h_t, W, y, g = inputs(N, H, V, 13)
    assert loss_head._tma_ok(loss_head._cfg(h_t.device), h_t, W) == (H % 4 == 0 and tma == "1")
    h_s = (h_t + 0.5 * randn(N, H, generator=g)).requires_grad_(True)
    st = ops.teacher_stats(h_t, W, y, temperature=T, impl="triton")
    kl = ops.forward_kl(h_s, W, st, temperature=T, impl="triton")
    gk = ops.kl_divergence(h_s, W, h_t, W, kind="reverse", temperature=T, softcap=4.0, impl="triton")
    (g1,) = torch.autograd.grad(kl.sum(), h_s)
    (g2,) = torch.autograd.grad(gk.sum(), h_s)

    h64 = h_s.detach().double().requires_grad_(True)
    logp = torch.log_softmax(logits64(h_t, W, T), -1)
    ref = (logp.exp() * (logp - torch.log_softmax(logits64(h64, W, T), -1))).sum(-1)
    (r1,) = torch.autograd.grad(ref.sum(), h64)
    logq_c = torch.log_softmax(logits64(h64, W, T, 4.0), -1)
    logp_c = torch.log_softmax(logits64(h_t, W, T, 4.0), -1)
    ref2 = (logq_c.exp() * (logq_c - logp_c)).sum(-1)
    (r2,) = torch.autograd.grad(ref2.sum(), h64)
    close(st.mu, logp.exp() @ W.double())
    close(st.logprob, logp.gather(1, y[:, None]).squeeze(1))
    close(kl, ref.detach(), atol=1e-4)
    close(g1, r1, atol=1e-5)
    close(gk, ref2.detach(), atol=1e-4)
    close(g2, r2, atol=1e-5)
