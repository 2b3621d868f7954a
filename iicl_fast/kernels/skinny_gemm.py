"""y = x Wᵀ (+ add) for few rows: the decoding step's projections, where the weights are
streamed once per step and the rows are too few to make the GEMM compute-bound.

Why a kernel of our own: at 64 rows the step's GEMMs are 4.3 ms of 6.1 (8B shape, H200) and
cuBLAS streams some shapes far under the bandwidth — graph-timed (tune_decode_gemms.py,
gemm_variants_ae8b4a0.json): fused q/k/v (6,144 × 4,096) at 2.9 TB/s, down (4,096 × 14,336) at
3.3 while gate/up (28,672 × 4,096) reaches 3.85. The narrow outputs give cuBLAS's tiles too few
programs for 132 SMs. Here a program owns BLOCK_N output columns of all M rows (one row block:
M ≤ MAX_ROWS) and one of SPLIT_K ranges of K, so narrow shapes still fill the GPU; each W tile
is read once, x (≤ 128 × K, in L2) many times.

Split K without a second kernel or float atomics on the output (their order would change
the bf16 rounding from run to run): each program writes its fp32 partial to a workspace, then
counts itself in on its column tile's counter (one atomic, acquire-release); the program
that arrives last sums the SPLIT_K partials in split order — the same order whoever arrives
last — adds `add`, writes y in x's dtype and sets the counter back to 0 for the next launch
(a CUDA graph replays the launch with the same counters).

    y = skinny_linear(x, w)           # x [M, K], w [N, K] (an nn.Linear's weight) -> [M, N]
    y = skinny_linear(x, w, add=a)    # a [M, N]: y = round(x Wᵀ + a), one rounding

Inference only (no autograd). Reference beside it: reference_skinny_gemm.py. Launchers take
CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (the tests)."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

POISON = False   # tests set this: every output the kernel must fully write starts as NaN
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_ROWS = 128   # one row block of at most this many rows; more rows are compute-bound (cuBLAS)
SMS = 132        # H200 streaming multiprocessors: splits are chosen to give about twice this
# Launch settings: None chooses by shape (_cfg); a dict forces them (tests, the tune).
CFG: dict | None = None


def _cfg(M: int, N: int, K: int) -> dict:
    """block_n, block_k, split_k, num_warps, num_stages for an [M, K] x [N, K]ᵀ product. Not yet
    tuned on the GPU (benchmarks/tune_skinny_gemm.py sweeps them): 64 columns a program, K split
    until there are about two programs an SM while every split keeps >= 4 blocks of K."""
    if CFG is not None:
        return CFG
    block_n, block_k = 64, 128
    tiles = triton.cdiv(N, block_n)
    split = 1
    while tiles * split < 2 * SMS and K // (2 * split) >= 4 * block_k:
        split *= 2
    return dict(block_n=block_n, block_k=block_k, split_k=split, num_warps=4, num_stages=4)


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, y_ptr, add_ptr, ws_ptr, cnt_ptr, M, N, K, k_per_split,
                   stride_xm, stride_wn, stride_ym, stride_am,
                   HAS_ADD: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """Program (column tile pid_n, split pid_k): acc [BLOCK_M, BLOCK_N] = x[:, ks] W[cols, ks]ᵀ
    over its split's K range ks (EVEN_K: every split a whole number of BLOCK_K, no K mask), then
    the store (SPLIT_K == 1) or the split-K fixup."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = rm < M
    nmask = rn < N
    k0 = pid_k * k_per_split
    k1 = tl.minimum(k0 + k_per_split, K)
    x_rows = x_ptr + rm[:, None].to(tl.int64) * stride_xm
    w_rows = w_ptr + rn[:, None].to(tl.int64) * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k in range(k0, k1, BLOCK_K):
        rk = k + tl.arange(0, BLOCK_K)
        if EVEN_K:
            xt = tl.load(x_rows + rk[None, :], mask=mmask[:, None], other=0.0)
            wt = tl.load(w_rows + rk[None, :], mask=nmask[:, None], other=0.0)
        else:
            kmask = rk < k1
            xt = tl.load(x_rows + rk[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
            wt = tl.load(w_rows + rk[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(xt, tl.trans(wt), input_precision="ieee")
        elif UPCAST:                    # the interpreter's bf16 dot does not compute a product
            acc += tl.dot(xt.to(tl.float32), tl.trans(wt.to(tl.float32)))
        else:
            acc += tl.dot(xt, tl.trans(wt))
    omask = mmask[:, None] & nmask[None, :]
    if SPLIT_K == 1:
        if HAS_ADD:
            acc += tl.load(add_ptr + rm[:, None] * stride_am + rn[None, :], mask=omask, other=0.0).to(tl.float32)
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=omask)
    else:
        ws_tile = ws_ptr + rm[:, None] * N + rn[None, :]            # ws [SPLIT_K, M, N] fp32
        tl.store(ws_tile + pid_k * M * N, acc, mask=omask)
        tl.debug_barrier()               # every thread's partial stored before the count's release
        arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:       # the last of the tile's splits: sum them in split order
            tot = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            for s in range(SPLIT_K):
                tot += tl.load(ws_tile + s * M * N, mask=omask, other=0.0, cache_modifier=".cg")
            if HAS_ADD:
                tot += tl.load(add_ptr + rm[:, None] * stride_am + rn[None, :], mask=omask, other=0.0).to(tl.float32)
            tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], tot.to(y_ptr.dtype.element_ty), mask=omask)
            tl.atomic_xchg(cnt_ptr + pid_n, 0)


_COUNTERS: dict = {}


def _counters(device, n: int) -> torch.Tensor:
    """int32 [>= n] zeros kept per device and stream (each launch leaves them at 0). Per stream:
    two split-K launches that could run at once must not count on the same tiles."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    c = _COUNTERS.get(key)
    if c is None or c.numel() < n:
        c = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
        _COUNTERS[key] = c
    return c


def _check(x: torch.Tensor, w: torch.Tensor, add: torch.Tensor | None):
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"skinny_linear: x must be [M, K] and w [N, K]; got x {tuple(x.shape)}, w {tuple(w.shape)}")
    if not 1 <= x.shape[0] <= MAX_ROWS:
        raise ValueError(f"skinny_linear: x has {x.shape[0]} rows; it takes 1 to {MAX_ROWS} (more rows: torch.mm)")
    if x.dtype != w.dtype or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"skinny_linear: x and w must share a float dtype (fp16, bf16, fp32); got {x.dtype}, {w.dtype}")
    if x.device != w.device:
        raise ValueError(f"skinny_linear: x on {x.device}, w on {w.device}")
    if x.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError(f"skinny_linear: x and w need contiguous rows; got strides x {x.stride()}, w {w.stride()}")
    if add is not None and (add.shape != (x.shape[0], w.shape[0]) or add.stride(1) != 1 or add.device != x.device):
        raise ValueError(f"skinny_linear: add must be [M={x.shape[0]}, N={w.shape[0]}] with contiguous rows on "
                         f"{x.device}; got {tuple(add.shape)} strides {add.stride()} on {add.device}")


def skinny_linear(x: torch.Tensor, w: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (1 <= M <= MAX_ROWS), w [N, K], add [M, N] or None -> y [M, N] in x's dtype:
    x Wᵀ (+ add) accumulated in fp32 and rounded once (bf16 / fp16 on the tensor cores, fp32 with
    exact products)."""
    _check(x, w, add)
    M, K = x.shape
    N = w.shape[0]
    c = _cfg(M, N, K)
    block_m = max(16, triton.next_power_of_2(M))
    block_n, block_k = c["block_n"], c["block_k"]
    split = max(1, min(c["split_k"], triton.cdiv(K, block_k)))
    k_per_split = triton.cdiv(triton.cdiv(K, split), block_k) * block_k
    split = triton.cdiv(K, k_per_split)                      # no split left empty
    tiles = triton.cdiv(N, block_n)
    y = torch.full((M, N), float("nan"), dtype=x.dtype, device=x.device) if POISON else \
        torch.empty((M, N), dtype=x.dtype, device=x.device)
    if split > 1:
        ws = torch.full((split, M, N), float("nan"), dtype=torch.float32, device=x.device) if POISON else \
            torch.empty((split, M, N), dtype=torch.float32, device=x.device)
        cnt = _counters(x.device, tiles)
    else:
        ws = cnt = y                                         # unused
    a = add if add is not None else y
    _skinny_kernel[(tiles, split)](
        x, w, y, a, ws, cnt, M, N, K, k_per_split, x.stride(0), w.stride(0), y.stride(0), a.stride(0),
        HAS_ADD=add is not None, SPLIT_K=split, EVEN_K=K % k_per_split == 0 and k_per_split % block_k == 0,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, IEEE=x.dtype == torch.float32, UPCAST=INTERPRET,
        num_warps=c["num_warps"], num_stages=c["num_stages"])
    return y
