"""L2 prefetch: a weight's first bytes brought into the GPU's L2 cache ahead of the GEMM that
reads them, on a side stream, while the decoding step's attention runs.

At 64 rows the step's GEMMs stream the weights (15 GB a step at ~3.6 TB/s: 4.1 of ~5.8 ms) and
its attention leaves DRAM mostly idle: ~34 µs a layer reading ~40 MB of prefix and own KV, ~1.2
TB/s (benchmarks/NOTES.md, 29th-31st sessions). The o projection that follows the attention
reads 32 MB of weights (8B shape); brought into L2 during the attention, the GEMM reads them
from there. The same idea for the KV cache: arXiv 2504.06319 (H20).

One program covers BLOCK lanes × SUB bytes; lane j issues one bulk prefetch of its SUB bytes
(`cp.async.bulk.prefetch.L2.global`, sm_90: one instruction a lane, nothing comes back to the
SM, no register or shared memory). HINT "last" marks the lines evict-last (an L2 cache policy),
so the attention's streaming KV does not push them out first.

    l2_prefetch(w, nbytes)          # w: any contiguous CUDA tensor; its first nbytes (rounded
                                    # down to 16) into L2; returns None
    spans = l2_prefetch_spans(w, nbytes)   # the interpreter's stand-in (tests): [lanes, 2] int64,
                                           # each lane's (byte offset from w's first 16-byte-aligned
                                           # byte, size) — what it would prefetch

Reference beside it: the spans tile [0, nbytes) exactly (tests/test_l2_prefetch.py); the
prefetch changes no value (the decoder's tokens with it on equal those with it off)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

SUB = 4096          # bytes a lane prefetches (a multiple of 16; PTX wants size % 16 == 0)
BLOCK = 128         # lanes a program: one a thread at 4 warps
HINTS = ("normal", "last")


@triton.jit
def _prefetch_kernel(ptr, nbytes, spans_ptr, SUB: tl.constexpr, BLOCK: tl.constexpr, LAST: tl.constexpr,
                     RECORD: tl.constexpr):
    """Program p, lane j: bytes [(p·BLOCK + j)·SUB, +size) of ptr (a byte pointer), size =
    min(SUB, nbytes - offset) clipped at 0. RECORD: write (offset, size) to spans_ptr instead.
    Each lane's PTX is predicated off where its size is 0 (past nbytes), so no address beyond
    the tensor is named; $0 is a dummy output (inline asm needs one), is_pure=False keeps it."""
    lane = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    off = lane.to(tl.int64) * SUB
    size = tl.minimum(tl.maximum(nbytes - off, 0), SUB)
    if RECORD:
        tl.store(spans_ptr + 2 * lane, off)
        tl.store(spans_ptr + 2 * lane + 1, size)
    elif LAST:
        tl.inline_asm_elementwise(
            "{ .reg .pred p; .reg .b64 pol; setp.ne.s32 p, $2, 0; "
            "createpolicy.fractional.L2::evict_last.b64 pol, 1.0; "
            "@p cp.async.bulk.prefetch.L2.global.L2::cache_hint [$1], $2, pol; mov.u32 $0, 0; }",
            "=r,l,r", [ptr + off, size.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)
    else:
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
            "=r,l,r", [ptr + off, size.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


def _bytes(w: torch.Tensor, nbytes: int):
    """(w's bytes as uint8 from its first 16-byte-aligned one (the bulk prefetch's alignment; a
    view's storage offset may leave it short of one), nbytes clipped to w's size, less the bytes
    skipped, rounded down to 16; programs)."""
    if not w.is_contiguous():
        raise ValueError(f"l2_prefetch: w must be contiguous; got strides {tuple(w.stride())}")
    if nbytes < 0:
        raise ValueError(f"l2_prefetch: nbytes must be >= 0; got {nbytes}")
    raw = w.reshape(-1).view(torch.uint8)
    skip = min(-raw.data_ptr() % 16, raw.numel())
    raw = raw[skip:]
    n = max(0, min(int(nbytes), raw.numel() + skip) - skip) // 16 * 16
    return raw, n, triton.cdiv(n, BLOCK * SUB)


def l2_prefetch(w: torch.Tensor, nbytes: int, hint: str = "normal") -> None:
    """Issue L2 prefetches of w's first nbytes (CUDA, sm_90) on the current stream."""
    if hint not in HINTS:
        raise ValueError(f"l2_prefetch: hint must be one of {HINTS}; got {hint!r}")
    if not w.is_cuda:
        raise ValueError("l2_prefetch: w must be a CUDA tensor (the interpreter: l2_prefetch_spans)")
    raw, n, programs = _bytes(w, nbytes)
    if programs:
        _prefetch_kernel[(programs,)](raw, n, raw, SUB=SUB, BLOCK=BLOCK, LAST=hint == "last", RECORD=False,
                                      num_warps=4)


def l2_prefetch_spans(w: torch.Tensor, nbytes: int) -> torch.Tensor:
    """The lanes' (byte offset, size) [programs·BLOCK, 2] int64 that l2_prefetch(w, nbytes) issues,
    from the same kernel (RECORD): for tests, and the CPU's stand-in in the decoder."""
    raw, n, programs = _bytes(w, nbytes)
    spans = torch.full((programs * BLOCK, 2), -1, dtype=torch.int64, device=w.device)    # poisoned
    if programs:
        _prefetch_kernel[(programs,)](raw, n, spans, SUB=SUB, BLOCK=BLOCK, LAST=False, RECORD=True, num_warps=4)
    return spans
