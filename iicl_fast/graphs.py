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


def side_stream(device=None) -> torch.cuda.Stream:
    """The process's one side stream on device (default: the current CUDA device)."""
    idx = torch.cuda.current_device() if device is None else torch.device(device).index
    idx = torch.cuda.current_device() if idx is None else idx
    if idx not in _STREAMS:
        _STREAMS[idx] = torch.cuda.Stream(device=idx)
    return _STREAMS[idx]


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
