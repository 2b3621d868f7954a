"""Loss-head benchmark on one GPU: iicl_fast vs the GEMM floor, plain PyTorch and peers.

    python benchmarks/bench_loss_head.py [--n 4096 16384] [--commit SHA]

Writes benchmarks/results/loss_head.json (timing rows, as the issue specifies) and
benchmarks/results/loss_head_precision.json (errors against float64), prints a table last.
Shapes: H=4096, V=128256 (Llama-3-8B head), bf16, random weights."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import triton

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from iicl_fast import ops  # noqa: E402

H, V = 4096, 128256
DT = torch.bfloat16
DEV = "cuda"
ROUNDS, REP_MS = 3, 500      # interleaved rounds per case; do_bench repetition time (ms)


# ---- plain PyTorch paths (bf16 GEMM, fp32 softmax) -------------------------------------
def naive_fkl(h_s, h_t, W):
    return naive_div(h_s, h_t, W, "forward")


def chunked_fkl(h_s, h_t, W, chunk=2048):
    from torch.utils.checkpoint import checkpoint
    parts = [checkpoint(naive_fkl, h_s[a:a + chunk], h_t[a:a + chunk], W, use_reentrant=False)
             for a in range(0, h_s.shape[0], chunk)]
    return torch.cat(parts)


@torch.no_grad()
def naive_stats(h, W):
    z = (h @ W.t()).float()
    lse = torch.logsumexp(z, -1)
    p = torch.softmax(z, -1)
    return lse, lse - (p * z).sum(-1), (p.to(DT) @ W).float()


@torch.no_grad()
def chunked_stats(h, W, chunk=2048):
    outs = [naive_stats(h[a:a + chunk], W) for a in range(0, h.shape[0], chunk)]
    return [torch.cat(x) for x in zip(*outs)]


@torch.no_grad()
def naive_logprob(h, W, y):
    logp = torch.log_softmax((h @ W.t()).float(), -1)
    return logp.gather(1, y[:, None]).squeeze(1), -(logp.exp() * logp).sum(-1)


@torch.no_grad()
def chunked_logprob(h, W, y, chunk=2048):
    outs = [naive_logprob(h[a:a + chunk], W, y[a:a + chunk]) for a in range(0, h.shape[0], chunk)]
    return [torch.cat(x) for x in zip(*outs)]


# ---- measurement --------------------------------------------------------------------------
def measure(fn):
    """-> (median ms, peak GiB allocated during fn beyond what was allocated before)."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
    ms = triton.testing.do_bench(fn, warmup=25, rep=REP_MS, return_mode="median")
    return ms, peak


def step(loss_fn, h_s):
    def run():
        loss = loss_fn()
        (g,) = torch.autograd.grad(loss.sum(), h_s)
        return g
    return run


def peers():
    found = {}
    try:
        from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD
        found["liger"] = LigerFusedLinearJSD(jsd_beta=0.0, temperature=1.0)
    except Exception as e:  # noqa: BLE001 - reported, the row is left out
        print("liger unavailable:", e)
    try:
        from cut_cross_entropy import linear_cross_entropy
        found["cce"] = linear_cross_entropy
    except Exception as e:  # noqa: BLE001
        print("cce unavailable:", e)
    return found


def timing_rows(N, meta, peer):
    g = torch.Generator(device=DEV).manual_seed(N)
    W = (torch.randn(V, H, device=DEV, generator=g) * 3 / H ** 0.5).to(DT)
    h_t = torch.randn(N, H, device=DEV, generator=g).to(DT)
    h_s = (h_t.float() + 0.5 * torch.randn(N, H, device=DEV, generator=g)).to(DT).requires_grad_(True)
    y = torch.randint(0, V, (N,), device=DEV, generator=g)
    P = torch.rand(N, V, device=DEV, generator=g).to(DT)      # floor only: a stand-in for P
    st = ops.teacher_stats(h_t, W)
    gemm1 = lambda: h_s.detach() @ W.t()
    gemm2 = lambda: P @ W
    cases = {
        ("forward_kl_step", "floor"): lambda: (gemm1(), gemm2()),
        ("forward_kl_step", "iicl_fast"): step(lambda: ops.forward_kl(h_s, W, st), h_s),
        ("forward_kl_step", "torch_naive"): step(lambda: naive_fkl(h_s, h_t, W), h_s),
        ("forward_kl_step", "torch_chunked"): step(lambda: chunked_fkl(h_s, h_t, W), h_s),
        ("teacher_stats", "floor"): lambda: (gemm1(), gemm2()),
        ("teacher_stats", "iicl_fast"): lambda: ops.teacher_stats(h_t, W),
        ("teacher_stats", "torch_naive"): lambda: naive_stats(h_t, W),
        ("teacher_stats", "torch_chunked"): lambda: chunked_stats(h_t, W),
        ("token_logprob", "floor"): gemm1,
        ("token_logprob", "iicl_fast"): torch.no_grad()(lambda: ops.token_logprob(h_t, W, y)),
        ("token_logprob", "torch_naive"): lambda: naive_logprob(h_t, W, y),
        ("token_logprob", "torch_chunked"): lambda: chunked_logprob(h_t, W, y),
        ("kl_divergence_forward", "floor"): lambda: (gemm1(), gemm1(), gemm2()),
        ("kl_divergence_forward", "iicl_fast"): step(lambda: ops.kl_divergence(h_s, W, h_t, W), h_s),
        ("kl_divergence_forward", "torch_naive"): step(lambda: naive_fkl(h_s, h_t, W), h_s),
        ("kl_divergence_forward", "torch_chunked"): step(lambda: chunked_fkl(h_s, h_t, W), h_s),
    }
    if "liger" in peer:
        for op in ("forward_kl_step", "kl_divergence_forward"):
            cases[(op, "liger")] = step(lambda: peer["liger"](h_s, W, h_t, W, None), h_s)
    if "cce" in peer:
        cases[("token_logprob", "cce")] = torch.no_grad()(
            lambda: peer["cce"](h_t, W, y, reduction="none"))
    # Every case is timed in ROUNDS interleaved rounds and its fastest median kept: the same two
    # cuBLAS GEMMs measured 57.4 and 48.8 ms in one run, forward_kl_step 53.4 (sweep) and 58.4
    # (table) in another (clocks under a long GEMM load); interleaving gives every impl the
    # same chances.
    runs, peaks = {k: [] for k in cases}, {}
    for rnd in range(ROUNDS):
        for key, fn in cases.items():
            if rnd and not runs[key]:
                continue                      # out of memory in the first round
            try:
                if rnd == 0:
                    ms, peaks[key] = measure(fn)
                else:
                    ms = triton.testing.do_bench(fn, warmup=25, rep=REP_MS, return_mode="median")
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                continue
            runs[key].append(round(ms, 3))
            print(f"round {rnd}: {key[0]:24s} {key[1]:14s} N={N:6d} {ms:9.2f} ms", flush=True)
    rows = []
    for (op, impl), ms in runs.items():
        rows.append({"op": op, "impl": impl, "N": N, "H": H, "V": V, "dtype": "bfloat16",
                     "ms": min(ms) if ms else float("nan"), "runs_ms": ms,
                     "peak_extra_gib": round(peaks.get((op, impl), float("nan")), 3), **meta})
    del P
    torch.cuda.empty_cache()
    return rows


# ---- precision against float64 -------------------------------------------------------------
def divergence(logp, logq, kind, beta=0.5):
    """Per-token KL(p‖q) ("forward"), KL(q‖p) ("reverse") or JSD_β from log-probabilities
    (p teacher, q student), in their dtype."""
    if kind == "forward":
        return (logp.exp() * (logp - logq)).sum(-1)
    if kind == "reverse":
        return (logq.exp() * (logq - logp)).sum(-1)
    logm = (beta * logp.exp() + (1 - beta) * logq.exp()).log()
    return beta * (logp.exp() * (logp - logm)).sum(-1) + (1 - beta) * (logq.exp() * (logq - logm)).sum(-1)


def naive_div(h_s, h_t, W, kind):
    """The plain bf16 path of any kind (bf16 GEMM, fp32 softmax)."""
    with torch.no_grad():
        logp = torch.log_softmax((h_t @ W.t()).float(), -1)
    return divergence(logp, torch.log_softmax((h_s @ W.t()).float(), -1), kind)


def div64(h_s, h_t, W, kind="forward", chunk=64):
    """float64 values and gradient, token slices (of the bf16-rounded inputs)."""
    val, grad = [], []
    W64 = W.double()
    for a in range(0, h_s.shape[0], chunk):
        hs = h_s[a:a + chunk].double().requires_grad_(True)
        logq = torch.log_softmax(hs @ W64.t(), -1)
        logp = torch.log_softmax(h_t[a:a + chunk].double() @ W64.t(), -1)
        v = divergence(logp, logq, kind)
        grad.append(torch.autograd.grad(v.sum(), hs)[0])
        val.append(v.detach())
    return torch.cat(val), torch.cat(grad)


def tile_rebased(fn):
    """fn() with P re-based per vocabulary tile (IICL_LOSS_HEAD_ROW_SHIFT=0)."""
    os.environ["IICL_LOSS_HEAD_ROW_SHIFT"] = "0"
    try:
        return fn()
    finally:
        os.environ.pop("IICL_LOSS_HEAD_ROW_SHIFT")


def rel(a, b):
    return float((a.double() - b).norm() / b.norm())


def precision(N=512):
    out = {}
    g = torch.Generator(device=DEV).manual_seed(0)
    W = (torch.randn(V, H, device=DEV, generator=g) * 3 / H ** 0.5).to(DT)
    h_t = torch.randn(N, H, device=DEV, generator=g).to(DT)
    y = torch.randint(0, V, (N,), device=DEV, generator=g)
    for case, noise in (("random", 0.5), ("near_convergence", 0.01)):
        h_s = (h_t.float() + noise * torch.randn(N, H, device=DEV, generator=g)).to(DT)
        res = {}
        for kind in ("forward", "reverse", "jsd"):
            ref, g_ref = div64(h_s, h_t, W, kind)
            res[f"{kind}_mean_fp64"] = float(ref.mean())
            impls = {
                f"iicl_fast_kl_divergence_{kind}": lambda h: ops.kl_divergence(h, W, h_t, W, kind=kind),
                f"torch_bf16_{kind}": lambda h: naive_div(h, h_t, W, kind),
            }
            if kind == "forward":
                impls["iicl_fast_forward_kl"] = lambda h: ops.forward_kl(h, W, ops.teacher_stats(h_t, W))
                impls["iicl_fast_forward_kl_row_shift_off"] = lambda h: tile_rebased(
                    lambda: ops.forward_kl(h, W, ops.teacher_stats(h_t, W)))
            for name, f in impls.items():
                h = h_s.clone().requires_grad_(True)
                val = f(h)
                (gr,) = torch.autograd.grad(val.sum(), h)
                res[name] = {"rel_err": rel(val.detach(), ref), "grad_rel_err": rel(gr.float(), g_ref)}
        out[case] = res
        print(case, json.dumps(res), flush=True)
    # token log-prob and teacher statistics
    W64 = W.double()
    lp_ref, mu_ref = [], []
    for a in range(0, N, 64):
        logp = torch.log_softmax(h_t[a:a + 64].double() @ W64.t(), -1)
        lp_ref.append(logp.gather(1, y[a:a + 64, None]).squeeze(1))
        mu_ref.append(logp.exp() @ W64)
    lp_ref, mu_ref = torch.cat(lp_ref), torch.cat(mu_ref)
    lp, _ = ops.token_logprob(h_t, W, y)
    lp_t, _ = naive_logprob(h_t, W, y)
    st = ops.teacher_stats(h_t, W)
    _, _, mu_t = naive_stats(h_t, W)
    out["token_logprob"] = {"iicl_fast": rel(lp, lp_ref), "torch_bf16": rel(lp_t, lp_ref)}
    out["teacher_mu"] = {"iicl_fast": rel(st.mu, mu_ref), "torch_bf16": rel(mu_t, mu_ref),
                         "iicl_fast_row_shift_off": rel(tile_rebased(lambda: ops.teacher_stats(h_t, W)).mu, mu_ref),
                         "iicl_fast_precise": rel(ops.teacher_stats(h_t, W, precise=True).mu, mu_ref)}
    print("token_logprob", out["token_logprob"], "teacher_mu", out["teacher_mu"], flush=True)
    return out


# BN,BV,BK,BH,warps,stages,group,tma,persist,tma_store[,ws] (earlier sweeps are in NOTES.md)
SWEEP = ["128,256,64,256,8,4,16,1,0,0", "128,256,64,256,8,3,16,1,1,0", "128,256,64,256,8,4,16,1,1,0",
         "128,256,64,256,8,3,16,1,0,0"]


def sweep(N=16384):
    """Tile shapes (BN,BV,BK,BH,warps,stages,group,tma,persist,tma_store[,ws]) of the loss-head
    kernels: token_logprob (the tile kernel, no P) and forward_kl_step (tile kernel writing P,
    then P·W). -> (best for the passes with P, best for those without), set as
    IICL_LOSS_HEAD_CFG and IICL_LOSS_HEAD_CFG_NOP."""
    g = torch.Generator(device=DEV).manual_seed(1)
    W = (torch.randn(V, H, device=DEV, generator=g) * 3 / H ** 0.5).to(DT)
    h_t = torch.randn(N, H, device=DEV, generator=g).to(DT)
    h_s = (h_t.float() + 0.5 * torch.randn(N, H, device=DEV, generator=g)).to(DT).requires_grad_(True)
    y = torch.randint(0, V, (N,), device=DEV, generator=g)
    best_p = best_nop = None
    runs = []
    for cfg in SWEEP:
        os.environ["IICL_LOSS_HEAD_CFG"] = cfg
        try:
            st = ops.teacher_stats(h_t, W)
            lp = triton.testing.do_bench(torch.no_grad()(lambda: ops.token_logprob(h_t, W, y)), rep=100)
            fk = triton.testing.do_bench(step(lambda: ops.forward_kl(h_s, W, st), h_s), rep=100)
        except Exception as e:  # noqa: BLE001 - a config that does not compile is skipped
            print(f"cfg {cfg}: failed {type(e).__name__}: {str(e)[:120]}", flush=True)
            continue
        print(f"cfg {cfg}: token_logprob {lp:.2f} ms  forward_kl_step {fk:.2f} ms (N={N})", flush=True)
        runs.append({"cfg": cfg, "N": N, "token_logprob_ms": round(lp, 3), "forward_kl_step_ms": round(fk, 3)})
        if best_p is None or fk < best_p[1]:
            best_p = (cfg, fk)
        if best_nop is None or lp < best_nop[1]:
            best_nop = (cfg, lp)
    os.environ.pop("IICL_LOSS_HEAD_CFG")
    del W, h_t, h_s
    torch.cuda.empty_cache()
    return best_p[0], best_nop[0], runs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--commit", default=os.environ.get("IICL_COMMIT"))
    ap.add_argument("--skip-precision", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="pick the kernels' tile shapes first")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    commit = args.commit
    if not commit:
        try:
            commit = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True).strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "commit": commit}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.sweep:
        cfg_p, cfg_nop, runs = sweep()
        os.environ["IICL_LOSS_HEAD_CFG"], os.environ["IICL_LOSS_HEAD_CFG_NOP"] = cfg_p, cfg_nop
        (out / "loss_head_sweep.json").write_text(json.dumps({**meta, "runs": runs}, indent=1))
    meta["kernel_cfg"] = os.environ.get("IICL_LOSS_HEAD_CFG", "default")
    meta["kernel_cfg_no_p"] = os.environ.get("IICL_LOSS_HEAD_CFG_NOP", meta["kernel_cfg"])
    print("kernel cfg (BN,BV,BK,BH,warps,stages,group,tma,persist,tma_store[,ws]): with P", meta["kernel_cfg"],
          "without P", meta["kernel_cfg_no_p"], flush=True)
    if not args.skip_precision:
        prec = precision()
        (out / "loss_head_precision.json").write_text(json.dumps({**meta, "N": 512, "H": H, "V": V, **prec}, indent=1))
    peer = peers()
    rows = []
    for N in args.n:
        t = time.time()
        rows += timing_rows(N, meta, peer)
        print(f"N={N} done in {time.time() - t:.0f} s", flush=True)
        (out / "loss_head.json").write_text(json.dumps(rows, indent=1))
    floors = {(r["op"], r["N"]): r["ms"] for r in rows if r["impl"] == "floor"}
    print(f"\n{meta['device']}  torch {meta['torch']}  triton {meta['triton']}  commit {commit[:10]}")
    print(f"{'op':24s} {'impl':14s} {'N':>6s} {'ms':>9s} {'x floor':>8s} {'peak GiB':>9s}")
    for r in rows:
        x = r["ms"] / floors[(r["op"], r["N"])]
        print(f"{r['op']:24s} {r['impl']:14s} {r['N']:6d} {r['ms']:9.2f} {x:8.2f} {r['peak_extra_gib']:9.2f}")


if __name__ == "__main__":
    main()
