"""The decoding step's layer GEMMs at few rows: kernels/skinny_gemm.py's launch settings against
cuBLAS and cuBLASLt, GPU time in a CUDA graph with the weights cold (each op cycles through
copies of its weight that together exceed the L2 several times, as a step's 15 GB do).

    python benchmarks/tune_skinny_gemm.py [--rows 16 32 64 97 128] [--sweep] [--out FILE]

Why: at 64 rows cuBLAS streams the 8B q/k/v at 2.9 TB/s and down at 3.3 where gate/up
reaches 3.85 (tune_decode_gemms.py, whose weights stay L2-hot for the small ops). Prints, for
each row count, ms a step (32 layers of fused q/k/v, o, fused gate/up, down) of cuBLAS,
cuBLASLt, the kernel's default settings and (--sweep, at the first row count; the best three
per op then at the others) the best settings per op, with TB/s. Every variant's error against
float64 is checked to be within 2× cuBLAS's."""
import argparse
import itertools
import json
import os
import subprocess
from pathlib import Path

import torch
import torch.nn.functional as F

from iicl_fast.kernels import skinny_gemm as sg

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--rows", type=int, nargs="+", default=[64, 16, 32, 97, 128])
ap.add_argument("--sweep", action="store_true", help="sweep the launch settings at the first row count")
ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "skinny_gemm.json"))
args = ap.parse_args()

SHAPES = dict(qkv=(6144, 4096), down=(4096, 14336), o=(4096, 4096), gate_up=(28672, 4096))   # N, K; narrowest first
COLD_BYTES = 256 << 20          # each op's weight copies together: > 5× the H200's 50 MB L2
REPS = 24


def graph_ms(fns) -> float:
    """GPU ms of one call, the calls cycling through fns (one per weight copy), in a CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(REPS):
            fns[i % len(fns)]()
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(3):
        g.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / 3 / REPS


def cfgs():
    for bn, bk, split, stages in itertools.product((32, 64, 128), (128, 256), (1, 2, 4, 8), (3, 5)):
        yield dict(block_n=bn, block_k=bk, split_k=split, num_warps=8 if bn == 128 else 4, num_stages=stages)


def commit():
    try:
        return os.environ.get("IICL_COMMIT") or subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                                                         stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def save():
    """The results so far to args.out (temp file, then rename): a run cut short keeps what it measured."""
    tmp = Path(args.out + ".tmp")
    tmp.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                               "commit": commit(), "rows": out, "best_cfgs": best}, indent=1))
    tmp.replace(args.out)


W = {}
for op, (n, k) in SHAPES.items():
    copies = max(2, -(-COLD_BYTES // (n * k * 2)))
    W[op] = [torch.randn(n, k, device="cuda").div_(k ** 0.5).bfloat16() for _ in range(copies)]
out, best = [], {}
for mi, M in enumerate(args.rows):
    step = {}
    for op, (n, k) in SHAPES.items():
        x = torch.randn(M, k, device="cuda").bfloat16()
        ref = (x.double() @ W[op][0].double().t())
        cublas_err = (F.linear(x, W[op][0]).double() - ref).abs().max().item()
        bound = 2 * max(cublas_err, torch.finfo(torch.bfloat16).eps / 2 * ref.abs().max().item())   # as the tests bound it
        gb = n * k * 2 / 1e9

        def add(variant, fns, check, cfg=None):
            err = (check().double() - ref).abs().max().item()
            if err > bound:
                print(f"M={M} {op} {variant} {cfg}: error {err:.3g} > {bound:.3g} (2 × cuBLAS's, at least one ulp)", flush=True)
                return None
            ms = graph_ms(fns)
            r = dict(M=M, op=op, variant=variant, cfg=cfg, ms=round(ms, 5), tb_s=round(gb / ms, 3), err=err, cublas_err=cublas_err)
            out.append(r)
            return r

        add("cublas", [lambda w=w: F.linear(x, w) for w in W[op]], lambda: F.linear(x, W[op][0]))
        torch.backends.cuda.preferred_blas_library("cublaslt")
        try:
            add("cublaslt", [lambda w=w: F.linear(x, w) for w in W[op]], lambda: F.linear(x, W[op][0]))
        finally:
            torch.backends.cuda.preferred_blas_library("cublas")
        def skinny(variant, c):
            sg.CFG = c
            try:
                return add(variant, [lambda w=w: sg.skinny_linear(x, w) for w in W[op]], lambda: sg.skinny_linear(x, W[op][0]),
                           cfg=sg._cfg(M, n, k))
            except Exception as e:           # settings past the shared memory: skipped
                print(f"M={M} {op} {c}: {type(e).__name__} {str(e).splitlines()[0][:100] if str(e) else ''}", flush=True)
                return None
            finally:
                sg.CFG = None

        default = skinny("skinny_default", None)
        tried = list(cfgs()) if (args.sweep and mi == 0) else best.get(op, [])
        got = [default] if default else []
        for c in tried:
            r = skinny("skinny", c)
            if r:
                got.append(r)
        got.sort(key=lambda r: r["ms"])
        if mi == 0:
            best[op] = [r["cfg"] for r in got[:3]]
        for r in out:
            if r["M"] == M and r.get("op") == op and r["variant"] in ("cublas", "cublaslt"):
                step.setdefault(r["variant"], 0.0)
                step[r["variant"]] += 32 * r["ms"]
        for key, r in (("skinny_default", default), ("skinny_best", got[0] if got else None)):
            step[key] = None if r is None or step.get(key, 0.0) is None else step.get(key, 0.0) + 32 * r["ms"]
        print(f"M={M} {op}: " + ", ".join(f"{r['variant']} {r['ms']:.4f} ms {r['tb_s']:.2f} TB/s"
                                         for r in out if r["M"] == M and r.get("op") == op and r["variant"] != "skinny")
              + (f"; best {got[0]['ms']:.4f} ms {got[0]['tb_s']:.2f} TB/s {got[0]['cfg']}" if got else ""), flush=True)
        save()
    print(f"M={M} ms a step (32 layers): " + ", ".join(f"{k} {v:.3f}" if v is not None else f"{k} -" for k, v in step.items()),
          flush=True)
    out.append(dict(M=M, step_ms={k: None if v is None else round(v, 3) for k, v in step.items()}))
    save()
