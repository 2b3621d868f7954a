"""Decode attention over one shared prefix plus each row's own suffix (cascade attention), GQA.

Every row of a chunk's elicitation batch attends to the same K prefix positions. For one KV
head, all its query vectors — rows × group (query heads per KV head) × new positions — form
one [M, d] matrix, so a program loads a [BLOCK_N, d] tile of the prefix's K and V once and
uses it for BLOCK_M query vectors (a GEMM, not M matrix-vector products): the prefix is read
once per row block instead of once per row and query head. The prefix is split into
`split` ranges (flash-decoding) so that a few KV heads still fill the GPU; each (KV head,
split, row block) program runs an online softmax over its range and writes its partial
output and log-sum-exp.

The suffix part (cascade_decode): each row's own keys live in a static cache
[B, Hkv, S, d]; row b sees slots lo[b] .. cur (lo: its left padding; cur: a device scalar,
the slot written this step, so a captured CUDA graph replays without a host sync). One
program per (row, KV head, split) runs the same online softmax for the row's query group.
A merge kernel combines the prefix and suffix partials by their log-sum-exps into the
attention output in the query's dtype.

    o, lse = prefix_attention(q, k, v, scale)     # q [B, Hq, n, d], k/v [Hkv, K, d]
    o = cascade_decode(q, pk, pv, ks, vs, lo, cur, scale)   # q [B, Hq, d] -> [B, Hq, d]

Reference beside it: reference_prefix_attention.py. Launchers take CUDA tensors, or CPU
tensors under TRITON_INTERPRET=1 (the tests)."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

POISON = False   # tests set this: every buffer a kernel must fully write starts as NaN
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Launch settings of the decode step's kernels, None: by batch size, as swept on the H200
# (benchmarks/tune_decode_attention.py --sweep, 8B heads, 5,000-token prefix, 124 own slots of 188,
# GPU ms a layer in a CUDA graph, d333e69): the prefix part with 64×64 tiles, 3 stages, 0.041 at
# 64 rows (M = 256) against 0.049 with the 128×32 tiles an eager sweep had chosen, 0.173 at 400
# (128×64 0.172, the worst 0.33); the suffix part 64 slots a block, 4 warps, 2 stages (0.046 at 64
# rows against 0.049 with 32, 8 warps, 3; at 400 rows all the good settings within 1 %). Swept
# again at 64 rows with the base-2 tiles (28th session): the same choices (0.0347; 64×32 tiles
# 0.0366; the best four suffix settings 0.0347-0.0351).
PREFIX_CFG: dict | None = None      # may also say "split_len" (positions a split; default: _split_len's choice)
SUFFIX_CFG: dict | None = None
# The prefix and suffix tiles in one launch (_both_kernel), so that compute-bound and
# memory-bound tiles share the SMs: True / False force it, None decides by M = rows × group:
# one launch from ONE_LAUNCH_MIN_M on (IICL_DECODE_ONE_LAUNCH_MIN_M; default: never). In a CUDA
# graph (tune_decode_attention.py, ms a layer, one launch against two with the merge in the
# suffix programs): at 8de74d3 0.161 / 0.172 at 400 rows (M = 1,600), 0.091 / 0.097 at 200; since
# the tiles run in base 2 with whole blocks unmasked (28th session) 0.152 / 0.147 at 400, 0.087 /
# 0.083 at 200, and bench_generate's step 17.22 / 17.11 ms at 400 rows, 9.60 / 9.56 at 200.
ONE_LAUNCH: bool | None = None
ONE_LAUNCH_MIN_M = int(os.environ.get("IICL_DECODE_ONE_LAUNCH_MIN_M", str(1 << 30)))
# The merge done by the suffix programs (_suffix_merge_kernel) in the two-launch path where the
# suffix is one split (the decoding step's caches are a few hundred slots: always): one launch
# and one round trip of the suffix partials fewer a layer. In a CUDA graph (8de74d3, ms a layer,
# two launches): 0.0372 against 0.0382 with the merge kernel at 64 rows, 0.172 / 0.180 at 400
# (with the eighth session's tiles it was the slower one at 64 rows: 0.049 / 0.047).
# IICL_DECODE_MERGE_IN_SUFFIX=0: the merge kernel.
MERGE_IN_SUFFIX = os.environ.get("IICL_DECODE_MERGE_IN_SUFFIX", "1") != "0"
# The suffix programs' merge reads the prefix partials unrolled (the split count a compile-time
# constant, one kernel build per count) up to UNROLL_SP_MAX splits; above it, or with
# IICL_DECODE_UNROLL_SP=0, in runtime loops. Graph-timed, ms a layer (28th session, base-2
# tiles): 400 rows (1 split) 0.147 unrolled / 0.153 loops, 200 (2 splits) 0.083 / 0.085, 64 (8
# splits) 0.041 / 0.035 — many unrolled reads cost more than the waits they save.
UNROLL_SP = os.environ.get("IICL_DECODE_UNROLL_SP", "1") != "0"
UNROLL_SP_MAX = 2
# Above UNROLL_SP_MAX splits, the suffix programs' merge with its loads overlapped instead of
# one after another (MERGE_PIPE): the prefix partials' log-sum-exps read as one [splits, group]
# tile after the suffix part (one round trip for what the loops read in 2·SP dependent ones; not
# held through the suffix part's loop, as the unrolled merge held them), their outputs in a loop
# the compiler pipelines (tl.range num_stages: cp.async two loads ahead, checked in the sm_90 PTX).
# Why: at 64 rows (8 splits) the suffix + merge is 0.70 ms of the 6.13 ms step (graph profile,
# 7701404) where the suffix KV it reads takes ~0.16 ms at bandwidth; 16 dependent L2 round trips a
# program are ~10 µs of its ~22 µs a layer. Not yet measured on the GPU: off by default
# (IICL_DECODE_MERGE_PIPE=1: on; tune_decode_attention.py times it).
MERGE_PIPE = os.environ.get("IICL_DECODE_MERGE_PIPE", "0") == "1"
MERGE_PIPE_STAGES = 3
# The partial outputs that the prefix (and split suffix) programs hand to the merge, in q's
# 16-bit dtype instead of fp32 (their log-sum-exps stay fp32; each partial is normalised, so
# rounding it costs what rounding the output costs, once per split). Why: at 64 rows of the 8B
# heads the prefix runs in 8 splits and its fp32 partials are 8.4 MB a layer written and read
# back (~5 µs of the ~40 µs that attention takes a layer, 31st session's arithmetic). Measured
# (H200, bench_generate, fcb0f89, ms a step): 64 rows (8 splits) 6.10 -> 6.02, with cuBLASLt and
# bf16 logits 5.84 -> 5.78; 400 rows (1 split) 17.10 -> 17.26. None (default): 16-bit where the
# prefix runs in at least PARTIALS_16_MIN_SPLITS splits; True / False: always / never
# (IICL_DECODE_PARTIALS16=1 / 0). The GPU test's error at 64 rows: 3.67e-4 against 3.31e-4 with
# fp32 partials (plain bf16: 1.03e-3).
PARTIALS_16 = {"1": True, "0": False}.get(os.environ.get("IICL_DECODE_PARTIALS16", "auto"))
PARTIALS_16_MIN_SPLITS = 4


def _prefix_cfg(M: int) -> dict:
    if PREFIX_CFG is not None:
        return PREFIX_CFG
    return dict(block_m=64, block_n=64, num_warps=4, num_stages=3)


def _suffix_cfg(programs: int) -> dict:
    if SUFFIX_CFG is not None:
        return SUFFIX_CFG
    return dict(block_n=64, num_warps=4, num_stages=2)


SMS = 132        # H200 streaming multiprocessors: splits are chosen to fill about twice this


def _buffer(shape, device, dtype=torch.float32):
    return torch.full(shape, float("nan"), device=device, dtype=dtype) if POISON else \
        torch.empty(shape, device=device, dtype=dtype)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """a·b with fp32 accumulation: exact fp32 products for fp32 models (IEEE; tensor-core tf32
    would change greedy tokens), the operands' own dtype (bf16 tensor cores) otherwise; under
    the interpreter (UPCAST) in fp32, as its bf16 dot does not compute a product."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    elif UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        return tl.dot(a, b)


@triton.jit
def _online_block(q, k_ptrs, v_ptrs, nmask, dmask, m_i, l_i, acc, qk_scale, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                  MASK_N: tl.constexpr):
    """One block of keys / values (pointers [BLOCK_N, BLOCK_D]; MASK_N: rows past nmask
    ignored, else the block is whole) into the running (max m_i, normaliser l_i, unnormalised
    output acc) of q's online softmax, in base 2: qk_scale = scale · log2(e), m_i in those
    units (lse = m_i · ln 2 + ln l_i). Operands in the cache's dtype (bf16 on the tensor
    cores), accumulated in fp32."""
    if MASK_N:
        kt = tl.load(k_ptrs, mask=nmask[:, None] & dmask[None, :], other=0.0)
        vt = tl.load(v_ptrs, mask=nmask[:, None] & dmask[None, :], other=0.0)
        s = _dot(q, tl.trans(kt), IEEE, UPCAST) * qk_scale
        s = tl.where(nmask[None, :], s, float("-inf"))
    else:
        kt = tl.load(k_ptrs, mask=dmask[None, :], other=0.0)
        vt = tl.load(v_ptrs, mask=dmask[None, :], other=0.0)
        s = _dot(q, tl.trans(kt), IEEE, UPCAST) * qk_scale
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(vt.dtype), vt, IEEE, UPCAST)
    return m_new, l_i, acc


@triton.jit
def _online_range(q, k_base, v_base, stride_kn, rd, dmask, start, end, m_i, l_i, acc, qk_scale,
                  BLOCK_N: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """Positions start .. end-1 of one head's keys / values (k_base, v_base: that head's first
    position) into the running online softmax: whole blocks without masks, then the ragged
    last one masked. A suffix split can be empty (past cur, or inside a row's left padding)."""
    full_end = start + tl.maximum(end - start, 0) // BLOCK_N * BLOCK_N      # an empty range (end <= start): none
    for n0 in range(start, full_end, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        off = rn[:, None] * stride_kn + rd[None, :]
        m_i, l_i, acc = _online_block(q, k_base + off, v_base + off, rn < end, dmask, m_i, l_i, acc, qk_scale,
                                      IEEE, UPCAST, False)
    if full_end < end:
        rn = full_end + tl.arange(0, BLOCK_N)
        off = rn[:, None] * stride_kn + rd[None, :]
        m_i, l_i, acc = _online_block(q, k_base + off, v_base + off, rn < end, dmask, m_i, l_i, acc, qk_scale,
                                      IEEE, UPCAST, True)
    return m_i, l_i, acc


@triton.jit
def _prefix_tile(h, sp, mb, q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, M, K, D, GN, NQ, split_len, scale,
                 stride_qb, stride_qh, stride_qn, stride_kh, stride_kn, stride_oh, stride_os, stride_om,
                 stride_lh, stride_ls, G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """One (KV head h, prefix split sp, row block mb): online softmax of q·kᵀ·scale over the
    split's positions -> partial o [BLOCK_M, D] (normalised) and its lse [BLOCK_M]. Query
    vector m of KV head h is (row m // GN, query head h·G + (m % GN) // NQ, new position
    m % NQ): read in place through q's strides (no gathered copy)."""
    rm = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    dmask = rd < D
    r = rm % GN
    q_off = (rm // GN) * stride_qb + (h * G + r // NQ) * stride_qh + (r % NQ) * stride_qn
    q = tl.load(q_ptr + q_off[:, None] + rd[None, :], mask=(rm[:, None] < M) & dmask[None, :], other=0.0)
    start = sp * split_len
    end = tl.minimum(start + split_len, K)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    m_i, l_i, acc = _online_range(q, k_ptr + h * stride_kh, v_ptr + h * stride_kh, stride_kn, rd, dmask, start, end,
                                  m_i, l_i, acc, scale * 1.4426950408889634, BLOCK_N, IEEE, UPCAST)
    o = acc / l_i[:, None]
    tl.store(o_ptr + h * stride_oh + sp * stride_os + rm[:, None] * stride_om + rd[None, :], o,
             mask=(rm[:, None] < M) & dmask[None, :])
    tl.store(lse_ptr + h * stride_lh + sp * stride_ls + rm, m_i * 0.6931471805599453 + tl.log(l_i), mask=rm < M)


@triton.jit
def _prefix_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, M, K, D, GN, NQ, split_len, scale,
                   stride_qb, stride_qh, stride_qn, stride_kh, stride_kn, stride_oh, stride_os, stride_om,
                   stride_lh, stride_ls, G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    _prefix_tile(tl.program_id(0), tl.program_id(1), tl.program_id(2), q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
                 M, K, D, GN, NQ, split_len, scale, stride_qb, stride_qh, stride_qn, stride_kh, stride_kn,
                 stride_oh, stride_os, stride_om, stride_lh, stride_ls, G, BLOCK_M, BLOCK_N, BLOCK_D, IEEE, UPCAST)


@triton.jit
def _suffix_part(b, h, sp, q_ptr, k_ptr, v_ptr, lo_ptr, cur_ptr, D, split_len, scale,
                 stride_qb, stride_qh, stride_kb, stride_kh, stride_kn,
                 G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """One (row b, KV head h, split sp): the row's G query heads against its own cached keys
    in slots max(lo[b], split start) .. min(cur + 1, split end) -> partial o [BLOCK_G, BLOCK_D]
    (normalised), lse [BLOCK_G] (o 0 and lse -inf where the range is empty)."""
    rg = tl.arange(0, BLOCK_G)
    rd = tl.arange(0, BLOCK_D)
    gmask = rg < G
    dmask = rd < D
    q = tl.load(q_ptr + b * stride_qb + (h * G + rg[:, None]) * stride_qh + rd[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)
    lo = tl.load(lo_ptr + b)
    hi = tl.load(cur_ptr) + 1
    start = tl.maximum(lo, sp * split_len)
    end = tl.minimum(hi, (sp + 1) * split_len)
    m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
    base = b * stride_kb + h * stride_kh
    m_i, l_i, acc = _online_range(q, k_ptr + base, v_ptr + base, stride_kn, rd, dmask, start, end, m_i, l_i, acc,
                                  scale * 1.4426950408889634, BLOCK_N, IEEE, UPCAST)
    seen = l_i > 0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i * 0.6931471805599453 + tl.log(tl.where(seen, l_i, 1.0)), float("-inf"))
    return o, lse


@triton.jit
def _suffix_tile(b, h, sp, q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, lo_ptr, cur_ptr, D, split_len, scale,
                 stride_qb, stride_qh, stride_kb, stride_kh, stride_kn,
                 stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
                 G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """_suffix_part's partial o [G, D], lse [G] stored for the merge kernel."""
    o, lse = _suffix_part(b, h, sp, q_ptr, k_ptr, v_ptr, lo_ptr, cur_ptr, D, split_len, scale,
                          stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, G, BLOCK_G, BLOCK_N, BLOCK_D,
                          IEEE, UPCAST)
    rg = tl.arange(0, BLOCK_G)
    rd = tl.arange(0, BLOCK_D)
    gmask = rg < G
    tl.store(o_ptr + b * stride_ob + h * stride_oh + sp * stride_os + rg[:, None] * D + rd[None, :], o,
             mask=gmask[:, None] & (rd < D)[None, :])
    tl.store(lse_ptr + b * stride_lb + h * stride_lh + sp * G + rg, lse, mask=gmask)


@triton.jit
def _suffix_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, lo_ptr, cur_ptr, D, split_len, scale,
                   stride_qb, stride_qh, stride_kb, stride_kh, stride_kn,
                   stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
                   G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   IEEE: tl.constexpr, UPCAST: tl.constexpr):
    _suffix_tile(tl.program_id(0), tl.program_id(1), tl.program_id(2), q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
                 lo_ptr, cur_ptr, D, split_len, scale, stride_qb, stride_qh, stride_kb, stride_kh, stride_kn,
                 stride_ob, stride_oh, stride_os, stride_lb, stride_lh, G, BLOCK_G, BLOCK_N, BLOCK_D, IEEE, UPCAST)


@triton.jit
def _suffix_merge_kernel(q_ptr, k_ptr, v_ptr, lo_ptr, cur_ptr, op_ptr, lp_ptr, out_ptr, D, split_len, SP, scale,
                         stride_qb, stride_qh, stride_kb, stride_kh, stride_kn,
                         stride_oph, stride_ops, stride_opm, stride_lph, stride_lps, stride_outb,
                         G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         IEEE: tl.constexpr, UPCAST: tl.constexpr, UNROLL_SP: tl.constexpr, BLOCK_SP: tl.constexpr,
                         PIPE: tl.constexpr = False, PIPE_STAGES: tl.constexpr = 3):
    """One (row b, KV head h) when the suffix is one split: its part, then the SP prefix
    partials of the row's G query vectors (m = b·G + j, written by the launch before) merged
    in by their log-sum-exps -> out[b, h·G + j, :] in out's dtype. Saves the merge kernel's
    launch and the suffix partials' round trip through memory. UNROLL_SP (SP == UNROLL_SP, a
    compile-time count): the partials' log-sum-exps are read as one tile before the suffix part
    and their outputs in an unrolled loop, so the reads overlap instead of waiting one after
    another (2·SP dependent round trips a program in the runtime loops; 0: those loops). PIPE
    (UNROLL_SP 0, SP <= BLOCK_SP): the log-sum-exps read as one tile after the suffix part, the
    outputs in a loop pipelined PIPE_STAGES deep (MERGE_PIPE)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    rg = tl.arange(0, BLOCK_G)
    rd = tl.arange(0, BLOCK_D)
    gmask = rg < G
    dmask = rd < D
    m = b * G + rg
    if UNROLL_SP > 0:
        rs = tl.arange(0, BLOCK_SP)
        lp = tl.load(lp_ptr + h * stride_lph + rs[:, None] * stride_lps + m[None, :],
                     mask=(rs < UNROLL_SP)[:, None] & gmask[None, :], other=float("-inf"))     # [BLOCK_SP, BLOCK_G]
    o, lse = _suffix_part(b, h, 0, q_ptr, k_ptr, v_ptr, lo_ptr, cur_ptr, D, split_len, scale,
                          stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, G, BLOCK_G, BLOCK_N, BLOCK_D,
                          IEEE, UPCAST)
    if PIPE and UNROLL_SP == 0:
        rs = tl.arange(0, BLOCK_SP)
        lp = tl.load(lp_ptr + h * stride_lph + rs[:, None] * stride_lps + m[None, :],
                     mask=(rs < SP)[:, None] & gmask[None, :], other=float("-inf"))            # [BLOCK_SP, BLOCK_G]
    if UNROLL_SP > 0 or PIPE:
        big = tl.maximum(lse, tl.max(lp, 0))
        big = tl.where(big == float("-inf"), 0.0, big)
        wp = tl.exp(lp - big[None, :])                                 # [BLOCK_SP, BLOCK_G]
        w = tl.exp(lse - big)
        den = w + tl.sum(wp, 0)
        acc = o * w[:, None]
        if UNROLL_SP > 0:
            for s in tl.static_range(UNROLL_SP):
                ws = tl.sum(tl.where(rs[:, None] == s, wp, 0.0), 0)
                op = tl.load(op_ptr + h * stride_oph + s * stride_ops + m[:, None] * stride_opm + rd[None, :],
                             mask=gmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
                acc += op * ws[:, None]
        else:
            for s in tl.range(0, SP, num_stages=PIPE_STAGES):
                ws = tl.sum(tl.where(rs[:, None] == s, wp, 0.0), 0)
                op = tl.load(op_ptr + h * stride_oph + s * stride_ops + m[:, None] * stride_opm + rd[None, :],
                             mask=gmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
                acc += op * ws[:, None]
    else:
        big = lse
        for s in range(0, SP):
            big = tl.maximum(big, tl.load(lp_ptr + h * stride_lph + s * stride_lps + m, mask=gmask, other=float("-inf")))
        big = tl.where(big == float("-inf"), 0.0, big)
        w = tl.exp(lse - big)
        den = w
        acc = o * w[:, None]
        for s in range(0, SP):
            w = tl.exp(tl.load(lp_ptr + h * stride_lph + s * stride_lps + m, mask=gmask, other=float("-inf")) - big)
            op = tl.load(op_ptr + h * stride_oph + s * stride_ops + m[:, None] * stride_opm + rd[None, :],
                         mask=gmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            acc += op * w[:, None]
            den += w
    den = tl.where(gmask, den, 1.0)
    tl.store(out_ptr + b * stride_outb + (h * G + rg[:, None]) * D + rd[None, :],
             (acc / den[:, None]).to(out_ptr.dtype.element_ty), mask=gmask[:, None] & dmask[None, :])


@triton.jit
def _both_kernel(q_ptr, pk_ptr, pv_ptr, op_ptr, lp_ptr, M, K, D, GN, split_len, scale,
                 stride_qb, stride_qh, stride_pkh, stride_pkn, stride_oph, stride_ops, stride_opm, stride_lph, stride_lps,
                 NPS, NPM, ks_ptr, vs_ptr, os_ptr, ls_ptr, lo_ptr, cur_ptr, s_split_len, NSH, NSS,
                 stride_kb, stride_kh, stride_kn, stride_osb, stride_osh, stride_oss, stride_lsb, stride_lsh,
                 G: tl.constexpr, BLOCK_M: tl.constexpr, P_BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
                 S_BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """The prefix tiles and the suffix tiles of one decoding step in one launch: programs
    0 .. NP-1 are prefix tiles (compute-bound, launched first), the rest suffix tiles
    (memory-bound), so the scheduler runs the two kinds side by side on the SMs instead of
    one kernel after the other."""
    pid = tl.program_id(0)
    n_prefix = NSH * NPS * NPM                     # KV heads × prefix splits × row blocks
    if pid < n_prefix:
        h = pid // (NPS * NPM)
        rest = pid % (NPS * NPM)
        _prefix_tile(h, rest // NPM, rest % NPM, q_ptr, pk_ptr, pv_ptr, op_ptr, lp_ptr, M, K, D, GN, 1, split_len,
                     scale, stride_qb, stride_qh, 0, stride_pkh, stride_pkn, stride_oph, stride_ops, stride_opm,
                     stride_lph, stride_lps, G, BLOCK_M, P_BLOCK_N, BLOCK_D, IEEE, UPCAST)
    else:
        j = pid - n_prefix
        b = j // (NSH * NSS)
        rest = j % (NSH * NSS)
        _suffix_tile(b, rest // NSS, rest % NSS, q_ptr, ks_ptr, vs_ptr, os_ptr, ls_ptr, lo_ptr, cur_ptr, D,
                     s_split_len, scale, stride_qb, stride_qh, stride_kb, stride_kh, stride_kn,
                     stride_osb, stride_osh, stride_oss, stride_lsb, stride_lsh, G, BLOCK_G, S_BLOCK_N, BLOCK_D,
                     IEEE, UPCAST)


@triton.jit
def _merge_kernel(op_ptr, lp_ptr, os_ptr, ls_ptr, out_ptr, D, SP, SS,
                  stride_oph, stride_ops, stride_opm, stride_lph, stride_lps,
                  stride_osb, stride_osh, stride_oss, stride_lsb, stride_lsh, stride_outb,
                  HKV: tl.constexpr, G: tl.constexpr, BLOCK_D: tl.constexpr):
    """One (row b, query head hq): the SP prefix partials and SS suffix partials merged by
    their log-sum-exps -> out[b, hq, :] in out's dtype."""
    b = tl.program_id(0)
    hq = tl.program_id(1)
    h = hq // G
    gi = hq % G
    rd = tl.arange(0, BLOCK_D)
    dmask = rd < D
    m = b * G + gi                                  # the query vector's index in the prefix partials
    big = tl.full((), float("-inf"), tl.float32)
    for s in range(0, SP):
        big = tl.maximum(big, tl.load(lp_ptr + h * stride_lph + s * stride_lps + m))
    for s in range(0, SS):
        big = tl.maximum(big, tl.load(ls_ptr + b * stride_lsb + h * stride_lsh + s * G + gi))
    big = tl.where(big == float("-inf"), 0.0, big)
    den = tl.zeros((), tl.float32)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for s in range(0, SP):
        w = tl.exp(tl.load(lp_ptr + h * stride_lph + s * stride_lps + m) - big)
        o = tl.load(op_ptr + h * stride_oph + s * stride_ops + m * stride_opm + rd, mask=dmask, other=0.0).to(tl.float32)
        acc += w * o
        den += w
    for s in range(0, SS):
        w = tl.exp(tl.load(ls_ptr + b * stride_lsb + h * stride_lsh + s * G + gi) - big)
        o = tl.load(os_ptr + b * stride_osb + h * stride_osh + s * stride_oss + gi * D + rd, mask=dmask, other=0.0)
        acc += w * o
        den += w
    tl.store(out_ptr + b * stride_outb + hq * D + rd, (acc / den).to(out_ptr.dtype.element_ty), mask=dmask)


def _split_len(K: int, programs: int, split_len: int | None, least: int = 256) -> int:
    """Positions per split: enough programs to fill the SMs about twice, ranges of at least
    `least` positions (shorter ones spend more on the merge than they save)."""
    if split_len is not None:
        return max(1, split_len)
    want = max(1, (2 * SMS) // max(1, programs))
    return max(least, triton.cdiv(K, want))


def _prefix_grid(M: int, K: int, Hkv: int, block_m: int, split_len: int | None):
    """-> (block_m, row blocks, positions per split, splits) of the prefix part."""
    block_m = max(16, min(block_m, triton.next_power_of_2(M)))
    row_blocks = triton.cdiv(M, block_m)
    sl = _split_len(K, Hkv * row_blocks, split_len)
    return block_m, row_blocks, sl, triton.cdiv(K, sl)          # every split non-empty


def _prefix_partials(q, k, v, scale, B, g, n, block_m, block_n, split_len, num_warps=4, num_stages=2):
    """q [B, Hq, n, d] (any strides with a unit last one), k/v [Hkv, K, d] ->
    o [Hkv, S, M, d] fp32, lse [Hkv, S, M] fp32 with M = B·g·n (row-major over b, group, position)."""
    Hkv, K, d = k.shape
    M = B * g * n
    k, v = k.contiguous(), v.contiguous()
    block_m, row_blocks, sl, S = _prefix_grid(M, K, Hkv, block_m, split_len)
    o_part = _buffer((Hkv, S, M, d), q.device)
    lse_part = _buffer((Hkv, S, M), q.device)
    _prefix_kernel[(Hkv, S, row_blocks)](
        q, k, v, o_part, lse_part, M, K, d, g * n, n, sl, float(scale),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
        o_part.stride(0), o_part.stride(1), o_part.stride(2), lse_part.stride(0), lse_part.stride(1),
        G=g, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(d)),
        IEEE=q.dtype == torch.float32, UPCAST=INTERPRET, num_warps=num_warps, num_stages=num_stages)
    return o_part, lse_part


def _check_q(q, k, want_dim, name):
    if q.dim() != want_dim or k.dim() != 3:
        shape = "[B, Hq, n, d]" if want_dim == 4 else "[B, Hq, d]"
        raise ValueError(f"{name}: q must be {shape} and k, v [Hkv, K, d]; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if q.stride(-1) != 1:
        q = q.contiguous()
    d, (Hkv, K, dk) = q.shape[-1], k.shape
    if dk != d or q.shape[1] % Hkv or K < 1:
        raise ValueError(f"{name}: head dims {d}/{dk}, heads {q.shape[1]}/{Hkv} (Hq must be a multiple of Hkv), "
                         f"prefix length {K} (must be >= 1)")
    return q


def prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, *,
                     block_m: int = 64, block_n: int = 64, split_len: int | None = None):
    """q [B, Hq, n, d] (n new positions per row), k/v [Hkv, K, d] (the shared prefix, K ≥ 1)
    -> (o [B, Hq, n, d] fp32, lse [B, Hq, n] fp32) of softmax(q·kᵀ·scale)·v over the prefix."""
    if v.shape != k.shape:
        raise ValueError(f"prefix_attention: v {tuple(v.shape)} must have k's shape {tuple(k.shape)}")
    q = _check_q(q, k, 4, "prefix_attention")
    B, Hq, n, d = q.shape
    Hkv = k.shape[0]
    g = Hq // Hkv
    o_part, lse_part = _prefix_partials(q, k, v, scale, B, g, n, block_m, block_n, split_len)
    lse = torch.logsumexp(lse_part, 1)                          # [Hkv, M]
    o = (o_part * torch.exp(lse_part - lse[:, None]).unsqueeze(-1)).sum(1)
    o = o.reshape(Hkv, B, g, n, d).permute(1, 0, 2, 3, 4).reshape(B, Hq, n, d)
    return o, lse.reshape(Hkv, B, g, n).permute(1, 0, 2, 3).reshape(B, Hq, n)


def cascade_decode(q: torch.Tensor, pk: torch.Tensor | None, pv: torch.Tensor | None, ks: torch.Tensor,
                   vs: torch.Tensor, lo: torch.Tensor, cur: torch.Tensor, scale: float, *,
                   split_len: int | None = None, suffix_split: int | None = None,
                   out: torch.Tensor | None = None, prefix=None) -> torch.Tensor:
    """One decoding step's attention: q [B, Hq, d] (one new position a row) against the shared
    prefix pk/pv [Hkv, K, d] (None: no prefix) and the rows' own caches ks/vs [B, Hkv, S, d],
    of which row b sees slots lo[b] .. cur[0] (lo int32 [B], cur int32 [1], both on q's
    device) -> o [B, Hq, d] in q's dtype (written into `out` if given). prefix: None (the Triton
    prefix kernel) or a function (q [Hkv, M, d] with M = B·g, query vector m = b·g + j of KV head
    h being q[b, h·g + j]; pk; pv; scale) -> (o [Hkv, M, d], lse [Hkv, M, 1]) or None (then the
    kernel): the prefix part by other means (decode passes PyTorch's fused attention)."""
    if ks.dim() != 4 or vs.shape != ks.shape or q.dim() != 3 or ks.shape[0] != q.shape[0]:
        raise ValueError(f"cascade_decode: q must be [B, Hq, d] and ks, vs [B, Hkv, S, d]; got q {tuple(q.shape)}, "
                         f"ks {tuple(ks.shape)}, vs {tuple(vs.shape)}")
    if lo.shape != (q.shape[0],) or cur.numel() != 1 or lo.dtype != torch.int32 or cur.dtype != torch.int32:
        raise ValueError(f"cascade_decode: lo must be int32 [B] and cur int32 [1]; got lo {lo.dtype} "
                         f"{tuple(lo.shape)}, cur {cur.dtype} {tuple(cur.shape)}")
    if q.stride(-1) != 1:
        q = q.contiguous()
    B, Hq, d = q.shape
    _, Hkv, S, dk = ks.shape
    if dk != d or Hq % Hkv:
        raise ValueError(f"cascade_decode: head dims {d}/{dk}, heads {Hq}/{Hkv} (Hq must be a multiple of Hkv)")
    g = Hq // Hkv
    bd = max(16, triton.next_power_of_2(d))
    ieee = q.dtype == torch.float32
    ks_, vs_ = ks, vs
    if ks_.stride(-1) != 1 or vs_.stride() != ks_.stride():
        ks_, vs_ = ks.contiguous(), vs.contiguous()
    sl = _split_len(S, B * Hkv, suffix_split, least=128)
    SS = triton.cdiv(S, sl)
    short = q.dtype in (torch.float16, torch.bfloat16)
    part_dtype = q.dtype if short and PARTIALS_16 else torch.float32
    o_s = _buffer((B, Hkv, SS, g, d), q.device, part_dtype)
    l_s = _buffer((B, Hkv, SS, g), q.device)
    suffix_args = (lo, cur, d, sl, float(scale), q.stride(0), q.stride(1), ks_.stride(0), ks_.stride(1), ks_.stride(2),
                   o_s.stride(0), o_s.stride(1), o_s.stride(2), l_s.stride(0), l_s.stride(1))
    bg = max(16, triton.next_power_of_2(g))
    if pk is None:
        o_p = torch.zeros((Hkv, 0, B * g, d), device=q.device)
        l_p = torch.zeros((Hkv, 0, B * g), device=q.device)
    elif pk.shape[0] != Hkv or pk.shape[2] != d or pv.shape != pk.shape:
        raise ValueError(f"cascade_decode: prefix k/v must be [Hkv={Hkv}, K, d={d}]; got {tuple(pk.shape)}, "
                         f"{tuple(pv.shape)}")
    else:
        pk, pv = pk.contiguous(), pv.contiguous()
        M, K = B * g, pk.shape[1]
    part = None
    if pk is not None and prefix is not None:     # the caller's prefix part: q stacked m = b·g + j a KV head
        part = prefix(q.view(B, Hkv, g, d).transpose(0, 1).reshape(Hkv, B * g, d), pk, pv, scale)
    if part is not None:
        o_p, l_p = part[0].unsqueeze(1), part[1].reshape(Hkv, 1, B * g)
    elif pk is not None:
        c = _prefix_cfg(M)
        block_m, row_blocks, psl, SP = _prefix_grid(M, K, Hkv, c["block_m"],
                                                    split_len if split_len is not None else c.get("split_len"))
        many = PARTIALS_16 if PARTIALS_16 is not None else SP >= PARTIALS_16_MIN_SPLITS
        o_p = _buffer((Hkv, SP, M, d), q.device, q.dtype if short and many else torch.float32)
        l_p = _buffer((Hkv, SP, M), q.device)
        if ONE_LAUNCH if ONE_LAUNCH is not None else M >= ONE_LAUNCH_MIN_M:
            _both_kernel[(Hkv * SP * row_blocks + B * Hkv * SS,)](
                q, pk, pv, o_p, l_p, M, K, d, g, psl, float(scale), q.stride(0), q.stride(1), pk.stride(0),
                pk.stride(1), o_p.stride(0), o_p.stride(1), o_p.stride(2), l_p.stride(0), l_p.stride(1),
                SP, row_blocks, ks_, vs_, o_s, l_s, lo, cur, sl, Hkv, SS, ks_.stride(0), ks_.stride(1), ks_.stride(2),
                o_s.stride(0), o_s.stride(1), o_s.stride(2), l_s.stride(0), l_s.stride(1),
                G=g, BLOCK_M=block_m, P_BLOCK_N=c["block_n"], BLOCK_G=bg, S_BLOCK_N=32, BLOCK_D=bd, IEEE=ieee,
                UPCAST=INTERPRET, num_warps=c["num_warps"], num_stages=c["num_stages"])
            suffix_args = None
        else:
            _prefix_kernel[(Hkv, SP, row_blocks)](
                q, pk, pv, o_p, l_p, M, K, d, g, 1, psl, float(scale), q.stride(0), q.stride(1), 0, pk.stride(0),
                pk.stride(1), o_p.stride(0), o_p.stride(1), o_p.stride(2), l_p.stride(0), l_p.stride(1),
                G=g, BLOCK_M=block_m, BLOCK_N=c["block_n"], BLOCK_D=bd, IEEE=ieee, UPCAST=INTERPRET,
                num_warps=c["num_warps"], num_stages=c["num_stages"])
    if out is None:
        out = _buffer((B, Hq, d), q.device, q.dtype)
    if suffix_args is not None and SS == 1 and MERGE_IN_SUFFIX:
        sc = _suffix_cfg(B * Hkv)
        SP = o_p.shape[1]
        unroll = SP if UNROLL_SP and 0 < SP <= UNROLL_SP_MAX else 0
        pipe = MERGE_PIPE and not unroll
        _suffix_merge_kernel[(B, Hkv)](
            q, ks_, vs_, lo, cur, o_p, l_p, out, d, sl, o_p.shape[1], float(scale), q.stride(0), q.stride(1),
            ks_.stride(0), ks_.stride(1), ks_.stride(2), o_p.stride(0), o_p.stride(1), o_p.stride(2),
            l_p.stride(0), l_p.stride(1), out.stride(0), G=g, BLOCK_G=bg, BLOCK_N=sc["block_n"], BLOCK_D=bd,
            IEEE=ieee, UPCAST=INTERPRET, UNROLL_SP=unroll,
            BLOCK_SP=max(2, triton.next_power_of_2(max(1, SP if pipe else unroll))), PIPE=pipe,
            PIPE_STAGES=MERGE_PIPE_STAGES, num_warps=sc["num_warps"], num_stages=sc["num_stages"])
        return out
    if suffix_args is not None:
        sc = _suffix_cfg(B * Hkv * SS)
        _suffix_kernel[(B, Hkv, SS)](
            q, ks_, vs_, o_s, l_s, *suffix_args, G=g, BLOCK_G=bg, BLOCK_N=sc["block_n"], BLOCK_D=bd, IEEE=ieee,
            UPCAST=INTERPRET, num_warps=sc["num_warps"], num_stages=sc["num_stages"])
    _merge_kernel[(B, Hq)](
        o_p, l_p, o_s, l_s, out, d, o_p.shape[1], SS,
        o_p.stride(0), o_p.stride(1), o_p.stride(2), l_p.stride(0), l_p.stride(1),
        o_s.stride(0), o_s.stride(1), o_s.stride(2), l_s.stride(0), l_s.stride(1), out.stride(0),
        HKV=Hkv, G=g, BLOCK_D=bd)
    return out
