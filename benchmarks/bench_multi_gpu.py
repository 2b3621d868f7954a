"""Consolidation over several GPUs (torchrun) against one: one chunk of the paper preset
(bench_consolidate.py's 8b_paper workload) on 1, 2, 4, 8 GPUs — seconds per phase and the
scaling efficiency t(1) / (N · t(N)) — and `--separate` documents/s by GPU count
(efficiency docs/s(N) / (N · docs/s(1))). Results: benchmarks/results/multi_gpu.json.

    python benchmarks/bench_multi_gpu.py --tokenizer DIR [--gpus 1 2 4 8] [--docs 16]
    python benchmarks/bench_multi_gpu.py --device cpu --workload tiny --tokenizer DIR --gpus 1 2
        (the plumbing on the CPU: gloo, a tiny random Llama, ranks as processes)

The parent launches one `torchrun --standalone` per count (this file with --worker); rank 0 of
each writes its rows. Counts above the GPUs present are recorded as not run. Every rank builds
the same random weights (one seed), so the ranks hold one model."""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
RESULTS = Path(__file__).parent / "results" / "multi_gpu.json"
# --separate: short documents, a light transfer set each (the paper preset's chunk is the other row)
SEPARATE = dict(n_queries=16, n_continuations=16, max_response_tokens=64, select_top_k=16, epochs=1)
TINY = dict(n_queries=4, n_continuations=4, max_query_tokens=8, max_response_tokens=8, epochs=1, batch_size=4,
            lora_r=4, select_top_k=4)


def build(workload: str, tok, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM
    if workload == "8b_paper":
        from bench_consolidate import llama_8b
        return llama_8b(device)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return LlamaForCausalLM(cfg).to(device).eval()


def worker(a) -> None:
    from transformers import AutoTokenizer

    import iicl_fast
    from bench_consolidate import prose, warm_kernels
    from iicl_fast import Config, dist
    dist.init_from_env(a.device)
    W = dist.world()
    device = f"cuda:{torch.cuda.current_device()}" if a.device == "cuda" else "cpu"
    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    model = build(a.workload, tok, device)
    big = a.workload == "8b_paper"
    over = dict(fixed_lengths=True, progress=False, **({} if big else TINY))
    compile_s = warm_kernels(model) if device != "cpu" else 0.0
    chunk = prose(5000 if big else 300, tok)
    rows = []
    # one chunk, every rank on it
    mem = iicl_fast.Memory(model, tok, Config.preset("paper", **over))
    if device != "cpu":
        torch.cuda.reset_peak_memory_stats()
    dist.barrier()
    t = time.perf_counter()
    rep = mem.consolidate(chunk)
    dist.barrier()
    wall = time.perf_counter() - t
    rows.append({"mode": "chunk", "gpus": W, "seconds": {k: round(v, 3) for k, v in rep.seconds.items()},
                 "wall_s": round(wall, 3), "compile_s": round(compile_s, 2), "elicited": rep.elicited, "kept": rep.kept,
                 "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device != "cpu" else None})
    del mem, model, rep                     # the adapter was put into the model: a fresh one for the bank
    gc.collect()                            # transformers' models sit in reference cycles
    if device != "cpu":
        torch.cuda.empty_cache()
    model = build(a.workload, tok, device)
    # --separate: a.docs documents dealt out, each rank its own bank, no collectives inside
    docs = [prose((1000 if big else 120) * (i + 2), tok)[-(4000 if big else 480):] for i in range(a.docs)]
    mine = dist.shard(docs)
    cfg = Config.preset("paper", **{**over, **({} if not big else SEPARATE)})
    dist.barrier()
    t = time.perf_counter()
    if mine:
        with dist.local():
            iicl_fast.consolidate_many(model, tok, mine, cfg)
    dist.barrier()
    wall = time.perf_counter() - t
    rows.append({"mode": "separate", "gpus": W, "docs": a.docs, "wall_s": round(wall, 3),
                 "docs_per_s": round(a.docs / wall, 4)})
    if dist.is_main():
        with open(a.rows, "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))


def efficiency(rows: list[dict]) -> None:
    """Scaling efficiency of each row against the 1-GPU row of its mode, in place."""
    one = {r["mode"]: r for r in rows if r.get("gpus") == 1 and "wall_s" in r}
    for r in rows:
        base = one.get(r["mode"])
        if base is None or "wall_s" not in r:
            continue
        r["efficiency"] = round(base["wall_s"] / (r["gpus"] * r["wall_s"]), 3) if r["mode"] == "chunk" else \
            round(r["docs_per_s"] / (r["gpus"] * base["docs_per_s"]), 3)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--workload", choices=("8b_paper", "tiny"), default="8b_paper")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tokenizer", required=True, help="a tokenizer dir (the 8B shape takes any; its vocab is 128,256)")
    p.add_argument("--docs", type=int, default=16, help="--separate: documents")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rows", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a)
        return 0
    if a.device == "cuda" and not torch.cuda.is_available():
        print("bench_multi_gpu: no CUDA device here (use --device cpu for the plumbing)", file=sys.stderr)
        return 2
    have = torch.cuda.device_count() if a.device == "cuda" else os.cpu_count()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        out_rows = Path(tmp) / "rows.jsonl"
        for n in a.gpus:
            if n > have:
                rows.append({"mode": "chunk", "gpus": n, "not_run": f"{have} {a.device} devices here"})
                continue
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", __file__,
                   "--worker", "--rows", str(out_rows), "--workload", a.workload, "--device", a.device,
                   "--tokenizer", a.tokenizer, "--docs", str(a.docs)]
            env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                   "NVSHMEM_DISABLE_NVLS": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
            t = time.perf_counter()
            res = subprocess.run(cmd, env=env, capture_output=True, text=True)
            print(f"{n} {a.device}: rc {res.returncode} in {time.perf_counter() - t:.1f}s", flush=True)
            if res.returncode != 0:
                print(res.stderr[-3000:], file=sys.stderr)
                return 1
        rows += [json.loads(line) for line in out_rows.read_text().splitlines()]
    efficiency(rows)
    from bench_consolidate import commit
    meta = {"device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu", "torch": torch.__version__,
            "commit": commit(), "workload": a.workload}
    rows = [{**r, **meta} for r in sorted(rows, key=lambda r: (r["mode"], r["gpus"]))]
    for r in rows:
        print(json.dumps(r))
    tmp_out = Path(a.out).with_suffix(".tmp")
    tmp_out.write_text(json.dumps(rows, indent=1) + "\n")
    tmp_out.replace(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
