"""The decoding step's GEMMs (8B layers: fused q/k/v, o, fused gate/up, down; the LM head) at
the step's row counts, cuBLAS against cuBLASLt and other layouts, GPU time in a CUDA graph.

    python benchmarks/tune_decode_gemms.py [--rows 64 128 ...] [--lean] [--out FILE]

Why: cuBLAS ran 400 rows as slowly as 512 (595 against 762 TFLOP/s); decode.BLASLT's choice by
rows rests on this table (benchmarks/results/gemm_variants_ae8b4a0.json). Prints, for each row
count, ms a step (32 layers + the head) of each variant over all five GEMMs. --lean: cuBLAS and
cuBLASLt only (row counts a compaction leaves, e.g. 61, 97, 387, probe alignment)."""
import argparse
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gemm_variants.json"))
ap.add_argument("--rows", type=int, nargs="+", default=[64, 128, 200, 256, 320, 400, 448, 512])
ap.add_argument("--lean", action="store_true", help="cuBLAS and cuBLASLt only")
args = ap.parse_args()
def gms(fn, n=20):
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3): fn()
    torch.cuda.current_stream().wait_stream(s); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n): fn()
    g.replay(); torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record(); g.replay(); g.replay(); g.replay(); b.record(); torch.cuda.synchronize()
    return a.elapsed_time(b) / 3 / n
shapes = dict(qkv=(4096, 6144), o=(4096, 4096), gate_up=(4096, 28672), down=(14336, 4096), lm_head=(4096, 128256))
W = {k: torch.randn(n, kk, device="cuda").bfloat16() for k, (kk, n) in shapes.items()}
out = []
for M in args.rows:
    for name, (k, n) in shapes.items():
        x = torch.randn(M, k, device="cuda").bfloat16(); w = W[name]
        ref = F.linear(x, w)
        var = {"linear": lambda: F.linear(x, w),
               "wxT_t_contig": lambda: (w @ x.t()).t().contiguous(),
               "wxT_t": lambda: (w @ x.t()).t(),
               "mm_wt": lambda: torch.mm(x, w.t())}
        if args.lean:
            var = {"linear": var["linear"]}
        if M % 128 and not args.lean:
            P = (M + 127) // 128 * 128
            xp = torch.zeros(P, k, device="cuda").bfloat16(); xp[:M] = x
            var["padded_prealloc"] = lambda: F.linear(xp, w)[:M]
        if M == 400 and not args.lean:
            var["split_384_16"] = lambda: torch.cat([F.linear(x[:384], w), F.linear(x[384:], w)])
            var["split_2x200"] = lambda: torch.cat([F.linear(x[:200], w), F.linear(x[200:], w)])
            var["split_256_144"] = lambda: torch.cat([F.linear(x[:256], w), F.linear(x[256:], w)])
        for vname, fn in list(var.items()):
            err = (fn().float() - ref.float()).abs().max().item()
            r = dict(M=M, op=name, variant=vname, ms=round(gms(fn), 5), err=err)
            out.append(r)
        for lib in ("cublaslt",):
            try:
                torch.backends.cuda.preferred_blas_library(lib)
                r = dict(M=M, op=name, variant="linear_" + lib, ms=round(gms(lambda: F.linear(x, w)), 5),
                         err=(F.linear(x, w).float() - ref.float()).abs().max().item())
                out.append(r)
            except Exception as e:
                print("lib", lib, e)
            finally:
                torch.backends.cuda.preferred_blas_library("cublas")
    tot = {}
    for r in out:
        if r["M"] == M:
            tot.setdefault(r["variant"], {})[r["op"]] = r["ms"]
    print(M, {v: round(32 * sum(ms for op, ms in d.items() if op != "lm_head") + d["lm_head"], 3) for v, d in tot.items() if len(d) == 5}, tot["linear"], flush=True)
Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": out}, indent=1))
