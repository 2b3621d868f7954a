"""CUDA graph capture on one side stream per device, for the whole process.

A capture is preceded by a warm-up on a side stream (compiling kernels and setting up cuBLAS
are not allowed inside a capture). PyTorch gives every (cuBLAS handle, stream) pair its own
workspace (32 MiB on Hopper) and keeps it until the process ends, so a fresh
torch.cuda.Stream per capture left 32 MiB allocated behind every capture: a stress stream's
memory grew ~64 MB a chunk (two captures a chunk; found on the H200 with
benchmarks/check_stress_memory.py). Every warm-up and capture here runs on one stream per
device instead."""
from __future__ import annotations

import torch

_STREAMS: dict[int, torch.cuda.Stream] = {}
_PREFETCH_STREAMS: dict[int, torch.cuda.Stream] = {}


def _stream(table: dict, device) -> torch.cuda.Stream:
    idx = torch.cuda.current_device() if device is None else torch.device(device).index
    idx = torch.cuda.current_device() if idx is None else idx
    if idx not in table:
        table[idx] = torch.cuda.Stream(device=idx)
    return table[idx]


def side_stream(device=None) -> torch.cuda.Stream:
    """The process's one side stream on device (default: the current CUDA device)."""
    return _stream(_STREAMS, device)


def prefetch_stream(device=None) -> torch.cuda.Stream:
    """The process's one stream for L2 prefetches on device, forked from and joined back into
    the stream that runs (or captures) a decoding step: the side stream itself cannot be, it is
    the capture's. Only Triton kernels run on it (no cuBLAS workspace is held for it)."""
    return _stream(_PREFETCH_STREAMS, device)


def warm_up(fn, times: int = 1, device=None):
    """Run fn() `times` times on the side stream, ordered after and before the current
    stream's work; -> its last result."""
    side = side_stream(device)
    side.wait_stream(torch.cuda.current_stream())
    out = None
    with torch.cuda.stream(side):
        for _ in range(times):
            out = fn()
    torch.cuda.current_stream().wait_stream(side)
    return out


def capture(graph: torch.cuda.CUDAGraph, pool=None, device=None):
    """torch.cuda.graph(graph, pool) on the side stream (a context manager)."""
    return torch.cuda.graph(graph, pool=pool, stream=side_stream(device))


def touch_workspaces(device=None) -> None:
    """Allocate now the cuBLAS workspaces a stream's chunks will hold for the rest of the
    process: one per (handle, stream), handles being per thread, and backward runs on the
    autograd engine's own thread. Without this the first chunk of a process (a fresh run's
    or a resumed one's) peaked ~32 MiB below every later chunk (chunks 60 and 142 of the
    second 2M run: 0.650 and 0.649 GiB against 0.678-0.684), which alone broke max/min ≤ 1.05
    (benchmarks/NOTES.md, eleventh session).

    Each dtype the passes use, forward on the current and the side stream, forward and
    backward (through the autograd thread) on the current stream."""
    dev = torch.device("cuda", torch.cuda.current_device() if device is None else torch.device(device).index)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        a = torch.ones(64, 64, device=dev, dtype=dtype, requires_grad=True)
        bias = torch.zeros(64, device=dev, dtype=dtype)
        (torch.addmm(bias, a, a) @ a).sum().backward()        # addmm: the cuBLASLt path
        warm_up(lambda: torch.addmm(bias, a.detach(), a.detach()) @ a.detach(), device=dev)
    torch.cuda.synchronize(dev)
