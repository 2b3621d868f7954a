"""Fused loss head: vocabulary-tiled GEMMs with online softmax, never tokens × vocab.

Rows are processed in slabs whose [rows, V] bf16 workspace stays under 256 MiB (1,024 rows
at V=128256). Per slab:
  1. a tile kernel computes z = h·Wᵀ per [BN, BV] tile (fp32 accumulator), applies 1/T,
     and writes per (row, vocab tile) statistics — tile max m, Σe^(z−m), Σe^(z−m)·z — and,
     when E_p[W] is wanted, P = e^(z − c_row) into the workspace (c: a sampled row max, so
     that P needs no per-tile re-basing); the target logit is a row dot product h·W[y];
  2. small torch ops merge the tile statistics: lse, Σp·z;
  3. one GEMM kernel computes P·W · e^(c − m)/l over the whole vocabulary and writes E_p[W]
     (teacher μ_t), or (E_p[W] − μ_t)/T (the student's ∂KL/∂h), once.
Two N×H×V GEMM-equivalents give lse, entropy, target log-prob and E_p[W].

The general path (two models, softcap, reverse KL, JSD) computes both logit tiles once:
pass 1 merges statistics of both distributions and stores z_t − m_tile and z_s − z_t per
element in fp16, pass 2 (elementwise, no GEMM) writes dLoss/dz_s over them and a GEMM turns
it into dLoss/dh_s: three GEMM-equivalents.

Programs take their tiles in grouped order (GROUP row blocks sweep the vocabulary together)
so that the tiles in flight share h and W blocks in L2; on CUDA, h, W and the workspace are
read through tensor descriptors (TMA) when their strides allow.

Launchers take torch tensors on CUDA, or on the CPU under TRITON_INTERPRET=1."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _grouped(pid, n_rows, n_cols, GROUP: tl.constexpr):
    """Program id -> (row block, column block), GROUP row blocks sweeping the columns together:
    the programs in flight then share a few row and column blocks in L2. Row-block-fastest
    order (the first version) streamed all of h (128 MiB at N=16384) from HBM for every vocab
    tile column."""
    per_group = GROUP * n_cols
    first = (pid // per_group) * GROUP
    size = tl.minimum(n_rows - first, GROUP)
    return first + (pid % per_group) % size, (pid % per_group) // size


@triton.jit
def _logit_tile(h_ptr, w_ptr, n0, v0, rn, rv, N, H, v_end, stride_hn, stride_wv, inv_t, softcap,
                SOFTCAP: tl.constexpr, IEEE: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr,
                BK: tl.constexpr, TMA: tl.constexpr = False, WS: tl.constexpr = False):
    """z[BN, BV] = (softcap∘(h·Wᵀ))/T in fp32, −inf outside the vocabulary; and the softcap
    chain factor dz/dz_raw·T (1 without softcap). TMA: h_ptr, w_ptr are tensor descriptors
    over h [N, H] and W [V, H] (zero fill past the edges), blocks [BN, BK] and [BV, BK]."""
    rk = tl.arange(0, BK)
    acc = tl.zeros((BN, BV), dtype=tl.float32)
    for k in tl.range(0, H, BK, warp_specialize=WS):
        if TMA:
            hk = h_ptr.load([n0, k])
            wk = w_ptr.load([v0, k]).T
        else:
            hk = tl.load(h_ptr + rn[:, None] * stride_hn + (k + rk)[None, :],
                         mask=(rn[:, None] < N) & ((k + rk)[None, :] < H), other=0.0)
            wk = tl.load(w_ptr + rv[None, :] * stride_wv + (k + rk)[:, None],
                         mask=(rv[None, :] < v_end) & ((k + rk)[:, None] < H), other=0.0)
        if IEEE:
            acc = tl.dot(hk, wk, acc, input_precision="ieee")
        else:
            acc = tl.dot(hk, wk, acc)
    chain = tl.full((BN, BV), 1.0, tl.float32)
    if SOFTCAP:
        t = _tanh(acc / softcap)
        acc = softcap * t
        chain = 1.0 - t * t
    z = tl.where((rv < v_end)[None, :], acc * inv_t, float("-inf"))
    return z, chain


@triton.jit
def _tile_stats_kernel(h_ptr, w_ptr, p_ptr, m_ptr, l_ptr, s_ptr, c_ptr,
                       N, H, v_start, v_end, n_tiles, stride_hn, stride_wv, stride_pn, stride_mn, inv_t,
                       WRITE_P: tl.constexpr, ROW_C: tl.constexpr, IEEE: tl.constexpr,
                       TMA: tl.constexpr, GROUP: tl.constexpr, PERSIST: tl.constexpr, NUM_PROGS: tl.constexpr,
                       TMA_STORE: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr,
                       WS: tl.constexpr = False):
    """PERSIST: NUM_PROGS programs loop over the tiles (the K loop flattened into that loop,
    so the next tile's loads can be issued during this tile's epilogue); else one tile per
    program. TMA_STORE: p_ptr is a descriptor over the workspace (blocks [BN, BV]) and the
    tile of P leaves through the copy engine. ROW_C: P = e^(z − c_row) (c [N] fp32), else
    e^(z − m_tile)."""
    if PERSIST:
        for tile in tl.range(tl.program_id(0), tl.cdiv(N, BN) * n_tiles, NUM_PROGS, flatten=True,
                             warp_specialize=WS):
            _tile_stats(tile, h_ptr, w_ptr, p_ptr, m_ptr, l_ptr, s_ptr, c_ptr, N, H, v_start,
                        v_end, n_tiles, stride_hn, stride_wv, stride_pn, stride_mn, inv_t, WRITE_P, ROW_C,
                        IEEE, TMA,
                        GROUP, TMA_STORE, BN, BV, BK, False)
    else:
        _tile_stats(tl.program_id(0), h_ptr, w_ptr, p_ptr, m_ptr, l_ptr, s_ptr, c_ptr, N, H,
                    v_start, v_end, n_tiles, stride_hn, stride_wv, stride_pn, stride_mn, inv_t, WRITE_P,
                    ROW_C, IEEE, TMA,
                    GROUP, TMA_STORE, BN, BV, BK, WS)


@triton.jit
def _tile_stats(tile, h_ptr, w_ptr, p_ptr, m_ptr, l_ptr, s_ptr, c_ptr,
                N, H, v_start, v_end, n_tiles, stride_hn, stride_wv, stride_pn, stride_mn, inv_t,
                WRITE_P: tl.constexpr, ROW_C: tl.constexpr, IEEE: tl.constexpr,
                TMA: tl.constexpr, GROUP: tl.constexpr, TMA_STORE: tl.constexpr,
                BN: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, WS: tl.constexpr):
    pid_n, pid_v = _grouped(tile, tl.cdiv(N, BN), n_tiles, GROUP)
    rn = pid_n * BN + tl.arange(0, BN)
    rc = pid_v * BV + tl.arange(0, BV)          # column inside the chunk
    rv = v_start + rc
    z, chain = _logit_tile(h_ptr, w_ptr, pid_n * BN, v_start + pid_v * BV, rn, rv, N, H, v_end,
                           stride_hn, stride_wv, inv_t, 1.0, False, IEEE, BN, BV, BK, TMA, WS)
    valid = (rv < v_end)[None, :]
    m = tl.max(z, 1)
    e = tl.exp(z - m[:, None])                   # 0 outside the vocabulary
    l = tl.sum(e, 1)
    s = tl.sum(e * tl.where(valid, z, 0.0), 1)
    row_ok = rn < N
    tl.store(m_ptr + rn * stride_mn + pid_v, m, mask=row_ok)
    tl.store(l_ptr + rn * stride_mn + pid_v, l, mask=row_ok)
    tl.store(s_ptr + rn * stride_mn + pid_v, s, mask=row_ok)
    if WRITE_P:   # the whole tile, zeros past the vocabulary: the P·W kernel reads whole k-blocks
        if ROW_C:   # one rounding of e^(z − c); rows with m − c > 60 are redone (see softmax_stats)
            c = tl.load(c_ptr + rn, mask=row_ok, other=0.0)
            e = e * tl.exp(tl.minimum(m - c, 60.0))[:, None]
        if TMA_STORE:   # rows past N are clipped by the copy engine
            p_ptr.store([pid_n * BN, pid_v * BV], e.to(p_ptr.dtype))
        else:
            tl.store(p_ptr + rn[:, None] * stride_pn + rc[None, :], e.to(p_ptr.dtype.element_ty),
                     mask=row_ok[:, None])


@triton.jit
def _pw_kernel(p_ptr, sc_ptr, inv_l_ptr, w_ptr, o_ptr, mu_ptr, N, H, V,
               stride_pn, stride_sn, stride_wv, stride_on, stride_mun, inv_t,
               TILE_SCALE: tl.constexpr, ROW_SCALE: tl.constexpr, SUB_MU: tl.constexpr, SPLIT: tl.constexpr,
               IEEE: tl.constexpr, TMA: tl.constexpr, GROUP: tl.constexpr,
               TILE_V: tl.constexpr, BN: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr):
    """O[N, H] = diag(row) · (P ⊙ scale) · W over the whole vocabulary (fp32 accumulate),
    stored once in o's dtype; SUB_MU: O = (… − μ) / T (the student's ∂KL/∂h, μ [N, H] fp32).
    Zeros from V to the end of the last tile in P (whole k-blocks are read).

    TILE_SCALE: P holds e^(z − m_tile) per vocabulary tile and scale [N, tiles] = e^(m_tile −
    m_row) re-bases it in registers before each MMA (+37 % on this kernel: 2.07 vs 1.51 ms a
    1,024-row slab on an H100, cuBLAS 1.47); otherwise P holds e^(z − c_row) and needs no
    scale. ROW_SCALE: the fp32 result is multiplied by row [N] (1/l, or e^(c − m)/l) at the end:
    with 1/l folded into the scale before P·scale is rounded to bf16, the top token's weight
    (exactly 1.0 otherwise) picks up rounding, and μ_t's error against float64 went from
    7.2e-4 to 1.7e-3 (H100). SPLIT: P (fp32) split into bf16 hi + lo parts, two tensor-core
    products (~16 mantissa bits instead of 8, for the teacher's μ_t). TMA: p_ptr, w_ptr are
    descriptors over P (blocks [BN, BK]) and W [V, H] (blocks [BK, BH])."""
    pid_n, pid_h = _grouped(tl.program_id(0), tl.cdiv(N, BN), tl.cdiv(H, BH), GROUP)
    rn = pid_n * BN + tl.arange(0, BN)
    rh = pid_h * BH + tl.arange(0, BH)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BN, BH), dtype=tl.float32)
    for k in range(0, V, BK):
        if TMA:
            p = p_ptr.load([pid_n * BN, k])
            w = w_ptr.load([k, pid_h * BH])
        else:
            p = tl.load(p_ptr + rn[:, None] * stride_pn + (k + rk)[None, :],
                        mask=(rn[:, None] < N) & ((k + rk)[None, :] < V), other=0.0)
            w = tl.load(w_ptr + (k + rk)[:, None] * stride_wv + rh[None, :],
                        mask=((k + rk)[:, None] < V) & (rh[None, :] < H), other=0.0)
        if TILE_SCALE:      # BK divides TILE_V: one scale per row for this k-block
            sc = tl.load(sc_ptr + rn * stride_sn + k // TILE_V, mask=rn < N, other=0.0)
            p = p.to(tl.float32) * sc[:, None]
        if IEEE:
            acc = tl.dot(p.to(tl.float32), w, acc, input_precision="ieee")
        else:
            hi = p.to(w.dtype)
            acc = tl.dot(hi, w, acc)
            if SPLIT:
                acc = tl.dot((p.to(tl.float32) - hi.to(tl.float32)).to(w.dtype), w, acc)
    mask = (rn[:, None] < N) & (rh[None, :] < H)
    if ROW_SCALE:
        acc = acc * tl.load(inv_l_ptr + rn, mask=rn < N, other=0.0)[:, None]
    if SUB_MU:
        mu = tl.load(mu_ptr + rn[:, None] * stride_mun + rh[None, :], mask=mask, other=0.0)
        acc = (acc - mu) * inv_t
    tl.store(o_ptr + rn[:, None] * stride_on + rh[None, :], acc.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _merge_kernel(tile_ptr, c_ptr, lse_ptr, spz_ptr, row_ptr, bad_ptr, scale_ptr, N, n_tiles, stride_q,
                  ROW_C: tl.constexpr, WRITE_SCALE: tl.constexpr, BR: tl.constexpr, BT: tl.constexpr):
    """Tile statistics [3, N, n_tiles] (tile max, Σe^(z−m), Σe^(z−m)·z) -> per row lse, Σp·z and
    the P·W epilogue factor: e^(c − m)/l with bad = (m − c outside [−30, 60]) (ROW_C), or 1/l
    and scale [N, n_tiles] = e^(m_tile − m) (WRITE_SCALE). One launch per slab: the ~20 small
    torch ops it replaces took ~2 ms of forward_kl_step's ~47 at N=16384 (H100 profile)."""
    rr = tl.program_id(0) * BR + tl.arange(0, BR)
    rt = tl.arange(0, BT)
    ok = rr < N
    mask = ok[:, None] & (rt < n_tiles)[None, :]
    off = rr[:, None] * n_tiles + rt[None, :]
    tile_m = tl.load(tile_ptr + off, mask=mask, other=float("-inf"))
    tile_l = tl.load(tile_ptr + stride_q + off, mask=mask, other=0.0)
    tile_s = tl.load(tile_ptr + 2 * stride_q + off, mask=mask, other=0.0)
    m = tl.where(ok, tl.max(tile_m, 1), 0.0)        # rows past N: finite, never stored
    sc = tl.exp(tile_m - m[:, None])
    l = tl.where(ok, tl.sum(sc * tile_l, 1), 1.0)
    s = tl.sum(sc * tile_s, 1)
    tl.store(lse_ptr + rr, m + tl.log(l), mask=ok)
    tl.store(spz_ptr + rr, s / l, mask=ok)
    if ROW_C:
        shift = m - tl.load(c_ptr + rr, mask=ok, other=0.0)
        tl.store(row_ptr + rr, tl.exp(-shift) / l, mask=ok)
        good = (shift <= 60.0) & (shift >= -30.0)
        tl.store(bad_ptr + rr, tl.where(good, 0, 1).to(tl.int8), mask=ok)
    else:
        tl.store(row_ptr + rr, 1.0 / l, mask=ok)
    if WRITE_SCALE:
        tl.store(scale_ptr + off, sc, mask=mask)


# general path: two models ---------------------------------------------------------------
@triton.jit
def _dual_stats_kernel(hs_ptr, ws_ptr, ht_ptr, wt_ptr, out_ptr, u_ptr, d_ptr, N, Hs, Ht, v_start, v_end, n_tiles,
                       stride_hs, stride_ws, stride_ht, stride_wt, stride_on, stride_oq, stride_un, inv_t, softcap,
                       WRITE: tl.constexpr, SOFTCAP: tl.constexpr, IEEE: tl.constexpr, TMA: tl.constexpr,
                       GROUP: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr):
    """Per (row, tile): m_s, l_s, m_t, l_t, Σe^(z_s−m_s)(z_s−z_t), Σe^(z_t−m_t)(z_t−z_s).
    WRITE: also u = z_t − m_t and δ = z_s − z_t per element into the workspace (zeros past
    the vocabulary), from which pass 2 rebuilds both log-probabilities without a GEMM."""
    pid_n, pid_v = _grouped(tl.program_id(0), tl.cdiv(N, BN), n_tiles, GROUP)
    rn = pid_n * BN + tl.arange(0, BN)
    rc = pid_v * BV + tl.arange(0, BV)
    rv = v_start + rc
    n0, v0 = pid_n * BN, v_start + pid_v * BV
    zs, _ = _logit_tile(hs_ptr, ws_ptr, n0, v0, rn, rv, N, Hs, v_end, stride_hs, stride_ws, inv_t, softcap,
                        SOFTCAP, IEEE, BN, BV, BK, TMA)
    zt, _ = _logit_tile(ht_ptr, wt_ptr, n0, v0, rn, rv, N, Ht, v_end, stride_ht, stride_wt, inv_t, softcap,
                        SOFTCAP, IEEE, BN, BV, BK, TMA)
    valid = (rv < v_end)[None, :]
    d = tl.where(valid, zs, 0.0) - tl.where(valid, zt, 0.0)
    ms = tl.max(zs, 1)
    es = tl.exp(zs - ms[:, None])
    mt = tl.max(zt, 1)
    et = tl.exp(zt - mt[:, None])
    base = out_ptr + rn * stride_on + pid_v
    ok = rn < N
    tl.store(base, ms, mask=ok)
    tl.store(base + stride_oq, tl.sum(es, 1), mask=ok)
    tl.store(base + 2 * stride_oq, mt, mask=ok)
    tl.store(base + 3 * stride_oq, tl.sum(et, 1), mask=ok)
    tl.store(base + 4 * stride_oq, tl.sum(es * d, 1), mask=ok)
    tl.store(base + 5 * stride_oq, tl.sum(-et * d, 1), mask=ok)
    if WRITE:
        # fp16 (11-bit mantissa) for bf16 models: δ is small near convergence and keeps its
        # relative precision, so p_s − p_t is not the difference of two rounded probabilities
        # (u rounds p_s and p_t by the same factor). Storing δ' = z_s − m_t − fp16(u) instead
        # (one rounding per log-probability) moved the random-input gradient error 2.2e-3 →
        # 2.0e-3 but near convergence 4.4e-4 → 3.7e-3 (fp16 emulation, interpreter). Clamped
        # to stay finite in fp16.
        u = tl.maximum(tl.where(valid, zt - mt[:, None], 0.0), -60000.0).to(u_ptr.dtype.element_ty)
        d = tl.minimum(tl.maximum(d, -60000.0), 60000.0)
        off = rn[:, None] * stride_un + rc[None, :]
        tl.store(u_ptr + off, u, mask=ok[:, None])
        tl.store(d_ptr + off, d.to(d_ptr.dtype.element_ty), mask=ok[:, None])


@triton.jit
def _dual_ws_kernel(u_ptr, d_ptr, mt_ptr, lse_s_ptr, lse_t_ptr, c_ptr, g_ptr, part_ptr, N, V, n_tiles,
                    stride_un, stride_mn, stride_pn, inv_t, softcap, beta,
                    MODE: tl.constexpr, SOFTCAP: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr):
    """Pass 2, elementwise over the workspace (one [BN, BV] block of one vocabulary tile):
    log p_t = u + m_t − lse_t, log p_s = u + δ + m_t − lse_s.
    MODE 0 forward KL, 1 reverse KL, 3 JSD: G = dLoss/dz_s,raw written over δ (g_ptr aliases
    d_ptr, in the GEMM's dtype; zeros past the vocabulary). MODE 2 (JSD value): per-tile
    partial sums of the JSD and of (1−β)·KL(p_s‖m). c [N] is KL(p_s‖p_t) (MODE 1) or
    (1−β)·KL(p_s‖m) (MODE 3)."""
    pid_n = tl.program_id(0) // n_tiles
    pid_v = tl.program_id(0) % n_tiles
    rn = pid_n * BN + tl.arange(0, BN)
    rc = pid_v * BV + tl.arange(0, BV)
    ok = rn < N
    valid = (rc < V)[None, :]
    off = rn[:, None] * stride_un + rc[None, :]
    u = tl.load(u_ptr + off, mask=ok[:, None], other=0.0).to(tl.float32)
    d = tl.load(d_ptr + off, mask=ok[:, None], other=0.0).to(tl.float32)
    mt = tl.load(mt_ptr + rn * stride_mn + pid_v, mask=ok, other=0.0)
    lse_s = tl.load(lse_s_ptr + rn, mask=ok, other=0.0)
    lse_t = tl.load(lse_t_ptr + rn, mask=ok, other=0.0)
    zt = u + mt[:, None]
    log_pt = tl.where(valid, zt - lse_t[:, None], 0.0)
    log_ps = tl.where(valid, zt + d - lse_s[:, None], 0.0)
    ps = tl.where(valid, tl.exp(log_ps), 0.0)
    pt = tl.where(valid, tl.exp(log_pt), 0.0)
    if MODE == 0:
        g = ps - pt
    elif MODE == 1:
        c = tl.load(c_ptr + rn, mask=ok, other=0.0)
        g = ps * (d + (lse_t - lse_s - c)[:, None])     # log p_s − log p_t = δ + lse_t − lse_s
    else:
        mix = beta * pt + (1.0 - beta) * ps
        log_m = tl.log(tl.where(valid, mix, 1.0))
        if MODE == 2:
            val = beta * pt * (log_pt - log_m) + (1.0 - beta) * ps * (log_ps - log_m)
            cs = (1.0 - beta) * ps * (log_ps - log_m)
            tl.store(part_ptr + rn * stride_pn + 2 * pid_v, tl.sum(val, 1), mask=ok)
            tl.store(part_ptr + rn * stride_pn + 2 * pid_v + 1, tl.sum(cs, 1), mask=ok)
        else:
            c = tl.load(c_ptr + rn, mask=ok, other=0.0)
            g = ps * ((1.0 - beta) * (log_ps - log_m) - c[:, None])
    if MODE != 2:
        if SOFTCAP:     # z_s,raw-capped / cap = tanh(raw / cap): the chain factor 1 − tanh²
            t = (zt + d) / (inv_t * softcap)
            g = g * (1.0 - t * t)
        g = g * inv_t
        tl.store(g_ptr + off, g.to(g_ptr.dtype.element_ty), mask=ok[:, None])


# launchers -----------------------------------------------------------------------------------
POISON = False   # tests set this: every buffer a kernel must fully write starts as NaN


def _out(*shape, device, dtype=torch.float32):
    return torch.full(shape, float("nan"), device=device, dtype=dtype) if POISON else \
        torch.empty(shape, device=device, dtype=dtype)


def _cfg(device: torch.device, dual: bool = False, ieee: bool = False, write_p: bool = True) -> dict:
    """Tile shapes. IICL_LOSS_HEAD_CFG="BN,BV,BK,BH,warps,stages[,group,tma,persist,tma_store,ws]"
    overrides the single-model kernels (ws: Triton's warp specialisation of the tile loop; the
    benchmark sweeps with it); IICL_LOSS_HEAD_CFG_NOP, if set, the passes that write no P
    (token log-prob); IICL_LOSS_HEAD_CFG_DUAL="BN,BV,BK,BH,warps,stages,group" the general
    path's; IICL_LOSS_HEAD_TMA,
    IICL_LOSS_HEAD_PERSIST and IICL_LOSS_HEAD_TMA_STORE (0|1) force the tensor-descriptor
    loads, the persistent tile kernel and the descriptor store of P off or on (tests run
    both paths)."""
    if device.type == "cuda":
        env = os.environ.get("IICL_LOSS_HEAD_CFG" if write_p else "IICL_LOSS_HEAD_CFG_NOP") or \
            os.environ.get("IICL_LOSS_HEAD_CFG")
        if ieee:   # fp32 inputs (tests, not the fast path): fp32 stages of 128×256 tiles overflow shared memory
            cfg = dict(BN=64, BV=64, BK=32, BH=64, num_warps=4, num_stages=2, GROUP=8, TMA=True, PERSIST=False, TMA_STORE=False, WS=False)
        elif dual and os.environ.get("IICL_LOSS_HEAD_CFG_DUAL"):
            v = list(map(int, os.environ["IICL_LOSS_HEAD_CFG_DUAL"].split(",")))
            cfg = dict(BN=v[0], BV=v[1], BK=v[2], BH=v[3], num_warps=v[4], num_stages=v[5], GROUP=v[6], TMA=True,
                       PERSIST=False, TMA_STORE=False, WS=False)
        elif dual:
            # two logit tiles live at once: 128×256 tiles spilled (12× the GEMM floor on an
            # H100 vs 2.6× with 128×128, N=4096)
            cfg = dict(BN=128, BV=128, BK=64, BH=256, num_warps=8, num_stages=3, GROUP=16, TMA=True, PERSIST=False, TMA_STORE=False, WS=False)
        elif env:
            v = list(map(int, env.split(",")))
            cfg = dict(BN=v[0], BV=v[1], BK=v[2], BH=v[3], num_warps=v[4], num_stages=v[5],
                       GROUP=v[6] if len(v) > 6 else 16, TMA=bool(v[7]) if len(v) > 7 else True,
                       PERSIST=bool(v[8]) if len(v) > 8 else False, TMA_STORE=bool(v[9]) if len(v) > 9 else False,
                       WS=bool(v[10]) if len(v) > 10 else False)
        elif write_p:
            # H100 sweeps (benchmarks/NOTES.md): 128×256 logit and output tiles, 8 warps. Passes
            # that write P: the persistent tile kernel with 3 stages (forward_kl_step 57.0 ms at
            # N=16384 vs 60.0 one tile per program; a descriptor store of P: 67.8; after the
            # row-shift P the four variants came within ±3 ms of each other, in no stable order).
            # Triton's warp specialisation of the tile loop compiles on sm_90 but did not help
            # (token_logprob 29.4 vs 29.6, forward_kl_step 61.7 vs 57.9 persistent).
            cfg = dict(BN=128, BV=256, BK=64, BH=256, num_warps=8, num_stages=3, GROUP=16, TMA=True, PERSIST=True,
                       TMA_STORE=False, WS=False)
        else:
            # without P (token log-prob): one tile per program, 3 stages (25.6 / 25.8 ms in two
            # sweeps vs 26.6 / 26.4 with 4 stages, 26.3 / 27.7 persistent)
            cfg = dict(BN=128, BV=256, BK=64, BH=256, num_warps=8, num_stages=3, GROUP=16, TMA=True, PERSIST=False,
                       TMA_STORE=False, WS=False)
    else:
        # interpreter: its cost is per program and per op, so few large blocks; the tests cut
        # slabs of 3 row blocks, so GROUP 2 ends each slab in a partial group
        cfg = dict(BN=32, BV=128, BK=32, BH=64, num_warps=1, num_stages=1, GROUP=2, TMA=True, PERSIST=True, TMA_STORE=True, WS=False)
    for key in ("TMA", "PERSIST", "TMA_STORE"):
        env = os.environ.get(f"IICL_LOSS_HEAD_{key}")
        if env is not None:
            cfg[key] = env == "1"
    return cfg


def _num_sms(device: torch.device) -> int:
    """Programs of a persistent kernel: one per multiprocessor (3 in the interpreter, so that
    each program takes several tiles)."""
    if device.type != "cuda":
        return 3
    return torch.cuda.get_device_properties(device).multi_processor_count


def _launch_kw(cfg: dict) -> dict:
    return dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], GROUP=cfg["GROUP"])


def _tma_ok(cfg: dict, *tensors: torch.Tensor) -> bool:
    """Tensor descriptors need 16-byte aligned bases and row strides."""
    return cfg["TMA"] and all(t.data_ptr() % 16 == 0 and t.stride(-1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0
                              for t in tensors)


def _desc(t: torch.Tensor, block: list[int]):
    from triton.tools.tensor_descriptor import TensorDescriptor
    return TensorDescriptor.from_tensor(t, block)


def _slab(n: int, bn: int, row_bytes: int, workspace_bytes: int = 256 << 20) -> int:
    """Rows per slab: a slab's workspace (row_bytes per row) stays under workspace_bytes; a
    multiple of BN. With the whole vocabulary in one slab the P·W GEMM
    writes its output once: vocabulary chunks of 8,192 (the first version) read and wrote
    the fp32 [N, H] accumulator 16 times at V=128256, and split the GEMM into 16 launches."""
    rows = workspace_bytes // max(row_bytes, 1) // bn * bn
    return max(bn, min(rows, triton.cdiv(n, bn) * bn))


def _merge(tile_m, tile_l, tile_s):
    """Tile statistics [rows, tiles] -> row max m, Σe^(z−m) l, Σe^(z−m)·z s [rows] and the
    per-tile factor e^(m_tile − m) [rows, tiles]."""
    m = tile_m.max(1).values
    scale = torch.exp(tile_m - m[:, None])
    return m, (scale * tile_l).sum(1), (scale * tile_s).sum(1), scale


def _row_shift(h: torch.Tensor, w_sample: torch.Tensor, inv_t: float) -> torch.Tensor:
    """c [rows] fp32: the max logit over a sample of the vocabulary (every k-th row of W, 2,048
    of them), a lower bound of the row max m, close to it for any real logit distribution. P is
    stored as e^(z − c): bf16 has fp32's exponent range, so any c with m − c in [−30, 60] keeps
    every probability that matters at full relative precision and no per-tile re-basing is needed."""
    return (h @ w_sample.t()).float().amax(1) * inv_t


def _target_logit(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, inv_t: float,
                  rows: int = 2048) -> torch.Tensor:
    """h [N, H], weight [V, H], targets [N] -> z_y = h·W[y]/T [N] fp32, in row slices."""
    return torch.cat([(h[a:a + rows].float() * weight[targets[a:a + rows]].float()).sum(1)
                      for a in range(0, h.shape[0], rows)]) * inv_t


def softmax_stats(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor | None = None, *,
                  temperature: float = 1.0, expect_w: bool = True, precise_w: bool = False,
                  minus: torch.Tensor | None = None, w_dtype: torch.dtype = torch.float32,
                  max_rows: int | None = None):
    """One pass over the vocabulary for p = softmax(h·Wᵀ/T), in slabs of rows.

    Per slab: the tile kernel writes per-(row, tile) statistics and P into a [rows, V] bf16
    workspace; the statistics merge into lse; one P·W GEMM over the whole vocabulary gives
    E_p[W] (or (E_p[W] − minus)/T, the student's ∂KL/∂h), written once.

    P = e^(z − c_row), c from `_row_shift`, so the P·W GEMM needs only a per-row factor
    e^(c − m)/l in its epilogue. Rows where the sampled max falls short of the true one by more
    than 60 (P could overflow) are redone with per-tile re-basing (P = e^(z − m_tile), scaled
    in registers): found with one host sync per call, at the end. Under CUDA graph capture
    (no sync possible) every row takes the per-tile path, and IICL_LOSS_HEAD_ROW_SHIFT=0 forces
    it: there the top token's weight is exactly 1.0 before the MMA, and E_p[W] comes out ~2×
    closer to float64 (μ_t 8.1e-4 vs 1.6e-3 relative, H=4096, V=128256) for ~6 ms more at
    N=16384 (the P·W GEMM 1.37× slower).

    precise_w: E_p[W] with P kept in fp32 and split into two bf16 products (3 GEMM-equivalents
    instead of 2): the teacher's μ_t enters the forward-KL value lse_s − h_s·μ_t/T − H_t, where
    near convergence bf16 P gave 2.3× the KL itself as error (H=4096, V=128256, KL 4.6e-4).

    max_rows: at most this many rows a slab (the workspace stays the same size whatever N is).

    h [N, H], weight [V, H] (same dtype), targets [N] long or None, minus [N, H] fp32 or None.
    -> lse [N], sum_pz [N] (Σ p·z), z_target [N] or None (fp32), and E_p[W] [N, H] in w_dtype
    (or None without expect_w)."""
    capturing = h.is_cuda and torch.cuda.is_current_stream_capturing()
    row_c = expect_w and not capturing and os.environ.get("IICL_LOSS_HEAD_ROW_SHIFT", "1") != "0"
    lse, spz, zt, out, bad = _softmax_stats(h, weight, targets, temperature, expect_w, precise_w, minus, w_dtype,
                                            row_c, max_rows)
    if row_c and bool(bad.any()):
        idx = bad.nonzero().squeeze(1)
        sub = _softmax_stats(h[idx], weight, None if targets is None else targets[idx], temperature, expect_w,
                             precise_w, None if minus is None else minus[idx], w_dtype, False, max_rows)
        for full, part in zip((lse, spz, zt, out), sub):
            if full is not None:
                full[idx] = part
    return lse, spz, zt, out


def _softmax_stats(h, weight, targets, temperature, expect_w, precise_w, minus, w_dtype, row_c, max_rows=None):
    """softmax_stats without the redo; row_c: P = e^(z − c_row) (else per-tile re-basing).
    -> lse, sum_pz, z_target, E_p[W] as softmax_stats, and the rows to redo [N] bool (row_c)."""
    N, H = h.shape
    V = weight.shape[0]
    dev = h.device
    ieee = h.dtype == torch.float32
    cfg = _cfg(dev, ieee=ieee, write_p=expect_w)
    split = precise_w and not ieee
    if split and dev.type == "cuda":
        # fp32 P: the 128×256 fp32 tile's store buffer beside 3 pipeline stages asked for 272 KiB
        # of shared memory (the H100 has 227): 128-wide vocabulary tiles, one per program
        cfg = {**cfg, "BV": 128, "num_stages": min(cfg["num_stages"], 3), "PERSIST": False}
    BN, BV, BK, BH = cfg["BN"], cfg["BV"], cfg["BK"], cfg["BH"]
    h, weight = h.contiguous(), weight.contiguous()
    tiles = triton.cdiv(V, BV)
    lse, spz = _out(N, device=dev), _out(N, device=dev)
    # the target logit as a row dot product h·W[y]/T (fp32 from the same bf16 inputs), not a
    # gather in the tile epilogue: its compare-select-sum over every 128×256 tile cost ~3 ms of
    # token_logprob's ~27 at N=16384 (H100 profile)
    zt = _target_logit(h, weight, targets, 1.0 / temperature) if targets is not None else None
    out = _out(N, H, device=dev, dtype=w_dtype) if expect_w else None
    bad = torch.zeros(N, dtype=torch.int8, device=dev) if row_c else None
    # 2,048 rows exactly: 2,069 (V // 2048 strided at V=128256) sent cuBLAS to an unaligned
    # sm75 kernel, 0.3 ms a slab (4.7 of teacher_stats' 54 ms on an H100)
    w_sample = weight[::max(1, V // 2048)][:2048].contiguous() if row_c else None
    p_dtype = torch.float32 if split else h.dtype
    if expect_w:
        rows = _slab(N, BN, tiles * BV * p_dtype.itemsize)
    else:      # only the [3, rows, tiles] fp32 statistics, up to 64 MiB of them
        rows = _slab(N, BN, tiles * 12, workspace_bytes=64 << 20)
    if max_rows:
        rows = min(rows, max(BN, max_rows // BN * BN))
    if expect_w:
        p_ws = _out(rows, tiles * BV, device=dev, dtype=p_dtype)
    tma = _tma_ok(cfg, h, weight) and (not expect_w or _tma_ok(cfg, p_ws))
    w_in = _desc(weight, [BV, BK]) if tma else weight
    tma_store = tma and expect_w and cfg["TMA_STORE"]
    if expect_w:
        p_in, w_out = (_desc(p_ws, [BN, BK]), _desc(weight, [BK, BH])) if tma else (p_ws, weight)
        p_store = _desc(p_ws, [BN, BV]) if tma_store else p_ws
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        n = r1 - r0
        hs = h[r0:r1]
        tile = _out(3, n, tiles, device=dev)
        c = _row_shift(hs, w_sample, 1.0 / temperature) if row_c else None
        n_prog = triton.cdiv(n, BN) * tiles
        if cfg["PERSIST"]:
            n_prog = min(n_prog, _num_sms(dev))
        _tile_stats_kernel[(n_prog,)](
            _desc(hs, [BN, BK]) if tma else hs, w_in,
            p_store if expect_w else h, tile[0], tile[1], tile[2], c if row_c else h, n, H, 0, V, tiles, H,
            weight.stride(0), tiles * BV, tiles, 1.0 / temperature,
            WRITE_P=expect_w, ROW_C=row_c, IEEE=ieee, TMA=tma, PERSIST=cfg["PERSIST"],
            NUM_PROGS=n_prog, TMA_STORE=tma_store, BN=BN, BV=BV, BK=BK, WS=cfg["WS"], **_launch_kw(cfg))
        row = _out(n, device=dev)
        tile_scale = expect_w and not row_c
        scale = _out(n, tiles, device=dev) if tile_scale else row
        bt = triton.next_power_of_2(tiles)
        br = max(1, min(16, 4096 // bt))
        _merge_kernel[(triton.cdiv(n, br),)](
            tile, c if row_c else row, lse[r0:r1], spz[r0:r1], row, bad[r0:r1] if row_c else row, scale, n, tiles,
            n * tiles, ROW_C=row_c, WRITE_SCALE=tile_scale, BR=br, BT=bt, num_warps=4)
        if expect_w:
            sub = minus is not None
            _pw_kernel[(triton.cdiv(n, BN) * triton.cdiv(H, BH),)](
                p_in, scale, row, w_out, out[r0:r1], minus[r0:r1] if sub else out,
                n, H, V, tiles * BV, tiles, weight.stride(0), H, H, 1.0 / temperature,
                TILE_SCALE=not row_c, ROW_SCALE=True, SUB_MU=sub, SPLIT=split, IEEE=ieee, TMA=tma, TILE_V=BV,
                BN=BN, BH=BH, BK=BK, **_launch_kw(cfg))
    return lse, spz, zt, out, None if bad is None else bad.bool()


def _dual_ws_dtype(dtype: torch.dtype) -> torch.dtype:
    """The general path's workspace (u, δ): fp16 for bf16 models, whose error against float64
    then stays far below the plain bf16 path's (bf16 logits); fp32 otherwise: for fp16
    models an fp16 workspace gave 2.0–2.4× the plain fp16 path's gradient error on random
    logits (its δ rounds like the plain path's logits, once more on top)."""
    return torch.float16 if dtype == torch.bfloat16 else torch.float32


def dual_loss(h_s, weight_s, h_t, weight_t, *, kind: str, beta: float = 0.5, temperature: float = 1.0,
              softcap: float | None = None, need_grad: bool = True, grad_dtype: torch.dtype = torch.float32):
    """General path: per-token loss [N] (fp32) and dLoss/dh_s [N, H_s] (grad_dtype, or None).

    Teacher logits are computed per vocabulary tile from h_t [N, H_t], weight_t [V, H_t], once.
    Per slab of rows: pass 1 (both logit GEMMs) merges both distributions' statistics over the
    whole vocabulary and stores u = z_t − m_tile and δ = z_s − z_t in a [2, rows, V] workspace
    (fp16 for 16-bit models, fp32 for fp32); pass 2, elementwise over the workspace, writes
    G = dLoss/dz_s over δ; one G·W_s GEMM gives dLoss/dh_s. Three N×H×V GEMM-equivalents (the
    first version recomputed both logit tiles in pass 2: five, 2.1× the 3-GEMM floor). Without
    need_grad (forward / reverse KL) pass 1 alone gives the loss."""
    N, Hs = h_s.shape
    Ht = h_t.shape[1]
    V = weight_s.shape[0]
    dev = h_s.device
    ieee = h_s.dtype == torch.float32
    cfg = _cfg(dev, dual=True, ieee=ieee)
    BN, BV, BK, BH = cfg["BN"], cfg["BV"], cfg["BK"], cfg["BH"]
    h_s, weight_s, h_t, weight_t = (x.contiguous() for x in (h_s, weight_s, h_t, weight_t))
    tiles = triton.cdiv(V, BV)
    write = need_grad or kind == "jsd"
    ws_dtype = _dual_ws_dtype(h_s.dtype)
    # two workspace arrays: the same 1,024-row slabs at V=128256 as the single-model passes
    rows = _slab(N, BN, 2 * tiles * BV * ws_dtype.itemsize, workspace_bytes=512 << 20)
    ws = _out(2, rows, tiles * BV, device=dev, dtype=ws_dtype) if write else None
    # G overwrites δ: in the GEMM's dtype over fp16, else fp32 (the P·W kernel rounds it)
    g_ws = (ws[1].view(weight_s.dtype) if ws_dtype.itemsize == 2 else ws[1]) if write else None
    tma = _tma_ok(cfg, h_s, weight_s, h_t, weight_t) and (g_ws is None or _tma_ok(cfg, g_ws))
    ws_in, wt_in = (_desc(weight_s, [BV, BK]), _desc(weight_t, [BV, BK])) if tma else (weight_s, weight_t)
    if need_grad:
        g_in, w_out = (_desc(g_ws, [BN, BK]), _desc(weight_s, [BK, BH])) if tma else (g_ws, weight_s)
    kw = dict(SOFTCAP=softcap is not None, IEEE=ieee, TMA=tma, BN=BN, BV=BV, BK=BK, **_launch_kw(cfg))
    inv_t, cap = 1.0 / temperature, float(softcap or 1.0)
    bn_ew = 32 if dev.type == "cuda" else BN        # pass 2: [32, BV] blocks, 4 warps
    ew = dict(SOFTCAP=softcap is not None, BN=bn_ew, BV=BV, num_warps=4)
    loss = _out(N, device=dev)
    grad = _out(N, Hs, device=dev, dtype=grad_dtype) if need_grad else None
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        n = r1 - r0
        hs, ht = h_s[r0:r1], h_t[r0:r1]
        hs_in, ht_in = (_desc(hs, [BN, BK]), _desc(ht, [BN, BK])) if tma else (hs, ht)
        # pass 1: both logit tiles, statistics of both distributions, u and δ
        st = _out(6, n, tiles, device=dev)
        _dual_stats_kernel[(triton.cdiv(n, BN) * tiles,)](
            hs_in, ws_in, ht_in, wt_in, st, ws[0] if write else st, ws[1] if write else st, n, Hs, Ht, 0, V, tiles,
            Hs, weight_s.stride(0), Ht, weight_t.stride(0), tiles, n * tiles, tiles * BV, inv_t, cap,
            WRITE=write, **kw)
        ms, ls, a_s, _ = _merge(st[0], st[1], st[4])
        mt, lt, a_t, _ = _merge(st[2], st[3], st[5])
        lse_s, lse_t = ms + torch.log(ls), mt + torch.log(lt)
        c = None
        grid2 = (triton.cdiv(n, bn_ew) * tiles,)
        ws_args = (ws[0], ws[1], st[2], lse_s, lse_t) if write else None
        if kind == "forward":          # Σ p_t (z_t − z_s) − lse_t + lse_s
            loss[r0:r1], mode = a_t / lt - lse_t + lse_s, 0
        elif kind == "reverse":
            c = a_s / ls - lse_s + lse_t
            loss[r0:r1], mode = c, 1
        else:   # JSD needs log m = log(β p_t + (1−β) p_s): one more pass over the workspace
            part = _out(n, tiles, 2, device=dev)
            _dual_ws_kernel[grid2](*ws_args, lse_s, st, part, n, V, tiles, tiles * BV, tiles, 2 * tiles,
                                   inv_t, cap, float(beta), MODE=2, **ew)
            loss[r0:r1] = part[..., 0].sum(1)
            c, mode = part[..., 1].sum(1).contiguous(), 3
        if not need_grad:
            continue
        # pass 2: G = dLoss/dz_s over δ, then dLoss/dh_s = G · W_s
        _dual_ws_kernel[grid2](*ws_args, c if c is not None else lse_s, g_ws, st, n, V, tiles, tiles * BV,
                               tiles, 0, inv_t, cap, float(beta), MODE=mode, **ew)
        _pw_kernel[(triton.cdiv(n, BN) * triton.cdiv(Hs, BH),)](
            g_in, g_ws, g_ws, w_out, grad[r0:r1], grad, n, Hs, V, tiles * BV, 0, weight_s.stride(0), Hs, 0, 1.0,
            TILE_SCALE=False, ROW_SCALE=False, SUB_MU=False, SPLIT=False, IEEE=ieee, TMA=tma, TILE_V=BV, BN=BN, BH=BH,
            BK=BK, **_launch_kw(cfg))
    return loss, grad
