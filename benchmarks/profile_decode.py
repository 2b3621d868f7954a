"""Where one step of the static decoder goes: 8B shape, R rows after one shared prefix.

    python benchmarks/profile_decode.py [--rows 400 64] [--prefix 5000] [--own 300] [--out FILE]

Per row count: the captured step's replay time (CUDA events, cur held at prompt + own
slots, i.e. mid-generation), the sampler's time on that step's logits, the floor, the GPU
time of the replayed graph's kernels by family (torch.profiler records the kernels a graph
launches; replay time minus their sum is the gaps between them) and of one eager step. The
weights laid out as Memory lays them (layers.fuse_projections); IICL_DECODE_GEMM=triton: the
layers' GEMMs through kernels/skinny_gemm.py (its own family in the table)."""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_consolidate import llama_8b  # noqa: E402
from bench_generate import floor_ms, write_json  # noqa: E402
from iicl_fast import layers  # noqa: E402
from iicl_fast.decode import _dims, _Static, _static_mode, _Step, prefix_kv  # noqa: E402
from iicl_fast.generation import decoder  # noqa: E402
from iicl_fast.kernels.sampling import sample_top_p  # noqa: E402

FAMILIES = (("gemm (skinny_gemm)", ("_skinny_kernel",)), ("gemm", ("gemm", "nvjet", "cutlass", "sm90", "cublas")), ("prefix attention", ("_prefix_kernel",)),
            ("suffix attention", ("_suffix_kernel",)), ("suffix attention + merge", ("_suffix_merge_kernel",)), ("merge", ("_merge_kernel",)), ("attention, one launch", ("_both_kernel",)), ("rope + cache write", ("rope_write",)), ("rmsnorm", ("rmsnorm",)),
            ("silu·up", ("swiglu",)), ("cache write", ("index_copy", "indexcopy", "index_put")))


def family(name: str) -> str:
    low = name.lower()
    for fam, keys in FAMILIES:
        if any(k in low for k in keys):
            return fam
    return "other elementwise"


def events(fn, n):
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    a.record()
    for _ in range(n):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / n


def profile_rows(model, kv, R, K, own, P=40):
    L, kvh, d = _dims(model)
    S = P + own + 8
    st = _Static(kv, [torch.zeros(R, kvh, S, d, device="cuda", dtype=torch.bfloat16) for _ in range(L)],
                 [torch.zeros(R, kvh, S, d, device="cuda", dtype=torch.bfloat16) for _ in range(L)],
                 torch.zeros(R, dtype=torch.int32, device="cuda"), True)
    tok = torch.randint(10, 120000, (R,), device="cuda")
    pos = torch.full((R,), K + P + own, device="cuda")
    with torch.no_grad(), _static_mode(model, st):
        ids = torch.randint(10, 120000, (R, P), device="cuda")
        decoder(model)(input_ids=ids, position_ids=K + torch.arange(P, device="cuda")[None].expand(R, P), use_cache=False)
        st.cur.fill_(P + own)
        st.n = P + own
        captured = _Step(model, st, R, True, None)
        ms_graph = events(lambda: captured(tok, pos), 20)
        z = captured(tok, pos).clone()
        seed = torch.zeros(1, dtype=torch.long, device="cuda")
        ms_sample = events(lambda: sample_top_p(z, seed, 0.7, 0.9), 20)
        ms_argmax = events(lambda: z.argmax(-1), 20)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as gprof:
            for _ in range(3):
                captured(tok, pos)
            torch.cuda.synchronize()
        captured = None                          # frees the graph's pool before the eager step
        eager = _Step(model, st, R, False, None)
        eager(tok, pos)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                eager(tok, pos)
            torch.cuda.synchronize()
    gfam = defaultdict(float)
    for e in gprof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if e.device_type == torch.autograd.DeviceType.CUDA:
            gfam[family(e.key)] += t / 3 / 1e3
    fam, other = defaultdict(float), []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if e.device_type == torch.autograd.DeviceType.CUDA:
            fam[family(e.key)] += t / 3 / 1e3
            if family(e.key) == "other elementwise":
                other.append((round(t / 3 / 1e3, 3), e.count // 3, e.key[:90]))
    res = {"rows": R, "prefix_tokens": K, "own_slots": P + own, "graph_step_ms": round(ms_graph, 2),
           "sample_top_p_ms": round(ms_sample, 3), "argmax_ms": round(ms_argmax, 3),
           "floor_ms": round(floor_ms(model, R, K, P + own, 0), 2),
           "graph_gpu_ms_by_family": {k: round(v, 3) for k, v in sorted(gfam.items(), key=lambda x: -x[1])},
           "graph_kernels_ms": round(sum(gfam.values()), 2),
           "eager_step_gpu_ms_by_family": {k: round(v, 3) for k, v in sorted(fam.items(), key=lambda x: -x[1])},
           "eager_step_gpu_ms": round(sum(fam.values()), 2), "other_top": sorted(other, reverse=True)[:12],
           "device": torch.cuda.get_device_name()}
    print(json.dumps(res), flush=True)
    return res


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, nargs="+", default=[400, 64])
    p.add_argument("--prefix", type=int, default=5000)
    p.add_argument("--own", type=int, default=300)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    model = llama_8b().requires_grad_(False)     # frozen, as Memory's base is (the fused norm wants it)
    layers.install(model)
    layers.fuse_projections(model)               # as Memory does on CUDA
    prefix = torch.randint(10, 120000, (a.prefix,)).tolist()
    kv = prefix_kv(model, prefix)
    res = [profile_rows(model, kv, R, a.prefix, a.own) for R in a.rows]
    if a.out:
        write_json(a.out, res)


if __name__ == "__main__":
    main()
