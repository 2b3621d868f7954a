"""Decoding many rows after one shared prefix, 8B shape, one GPU: ms per step against the floor.

    python benchmarks/bench_generate.py [--rows 64 200 400] [--new 128 512] [--prefix 5000]
        [--baselines [--hf-static]] [--unfused] [--flash-prefix] [--blas] [--gemm] [--merge-pipe] [--prefetch]
        [--l2-persist-mb MiB] [--prefix-tile BM,BN,W,S[,SPLIT]] [--lora R [--lora-tail]]
        [--out benchmarks/results/generate.json]

Rows: iicl_fast (decode.generate_static: one prefix KV, static caches, CUDA-graph step,
Triton attention and sampler, q/k/v and gate/up one GEMM each up to
decode.FUSED_PROJ_MAX_ROWS rows; --unfused adds iicl_fast_unfused, one GEMM a projection, and
iicl_fast_fused, one GEMM a group at any row count; --flash-prefix adds iicl_fast_flash_prefix, the
prefix part through PyTorch's flash op where decode.FLASH_PREFIX_MIN_M allows, and
iicl_fast_cudnn_prefix, the same through cuDNN's attention (FA3-class on Hopper; decode.CUDNN_PREFIX); --blas adds
iicl_fast_cublas and iicl_fast_cublaslt, the layers' GEMMs through one library at any row count,
iicl_fast_cublaslt_rows (decode.BLASLT "rows") and iicl_fast_lt_rows_logits16 (with decode.LOGITS_16);
--gemm adds iicl_fast_skinny, the layers' GEMMs through kernels/skinny_gemm.py up to
decode.SKINNY_MAX_ROWS rows; --merge-pipe adds iicl_fast_merge_pipe, the suffix programs' merge
pipelined (prefix_attention.MERGE_PIPE), iicl_fast_logits16 (decode.LOGITS_16: the step's logits
to the sampler in bf16), iicl_fast_partials16 (prefix_attention.PARTIALS_16: the attention's
partials in bf16), with --blas too iicl_fast_lt_rows_logits16_partials16, and with --gemm
iicl_fast_skinny_pipe); --prefetch adds iicl_fast_prefetch16 / _prefetch32 / _prefetch32_last
(decode.PREFETCH_MB: each layer's o then gate/up weights into L2 during its attention, 16 or 32 MiB,
"last": the lines marked evict-last), iicl_fast_prefetch_kv (decode.PREFETCH_KV: the next layer's
prefix K and V during each MLP) and iicl_fast_prefetch32_kv (both; all at any row count here,
decode.PREFETCH_MAX_ROWS lifted); --lora R puts a rank-R adapter on every linear layer (impls get
_loraR) and --lora-tail adds iicl_fast_tail (decode.LORA_TAIL: its A in rows after each projection's
weights, one GEMM for x Wᵀ and x Aᵀ); generate_today (the cascade path it replaces: per-row
DynamicCache, eager steps), hf_generate (transformers generate over [C; q] rows, prefix
recomputed per row, dynamic cache) and with --hf-static hf_generate_static (the same with
transformers' static cache, whose decoding forward transformers compiles itself: one untimed
call compiles it, compile_s). Every row samples as elicitation does (T 0.7, top-p 0.9)
and decodes exactly new_tokens (stop ids masked until then). ms_per_step = decoding time /
steps: prefill (and for hf_generate, the per-row prefix) is timed apart, in prefill_s. Each of
our rows runs its setting once untimed first (its kernels compile outside the timed steps).

Floor of a step: max(bytes / 4.3 TB/s, FLOPs / 790 TFLOP/s) (an H100: 3.0 TB/s) with bytes = every GEMM weight +
one prefix KV + the rows' own KV at the step's mean length, FLOPs = 2 · rows · GEMM weights +
4 · rows · hidden · layers · (prefix + mean own length) (QKᵀ and PV)."""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_consolidate import commit, device_rates, linear_params, llama_8b  # noqa: E402
from iicl_fast import decode, layers  # noqa: E402
from iicl_fast.kernels import prefix_attention as pa  # noqa: E402
from iicl_fast.decode import generate_static, prefix_kv  # noqa: E402
from iicl_fast.generation import generate, sampling_generator  # noqa: E402

STOP = 2
SAMPLE = dict(sample=True, temperature=0.7, top_p=0.9)


def floor_ms(model, rows, K, P, new) -> float:
    c = model.config
    d = c.hidden_size // c.num_attention_heads
    kv_tok = 2 * c.num_hidden_layers * c.num_key_value_heads * d * 2          # bytes of one token's K and V
    own = P + new / 2                                                         # mean own length over the steps
    bytes_ = 2 * linear_params(model) + kv_tok * (K + rows * own)
    flops = 2 * rows * linear_params(model) + 4 * rows * c.hidden_size * c.num_hidden_layers * (K + own)
    peak_flops, peak_bw = device_rates()         # an H100: the same matrix rate, 3.0 TB/s
    return max(bytes_ / peak_bw, flops / peak_flops) * 1e3


def write_json(path, obj) -> None:
    """obj as JSON at path, through a temp file and a rename (never half-written)."""
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, 120000, (int(torch.randint(20, 61, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def record(impl, rows, new, K, P, ms, floor, prefill_s, total_s, **extra):
    r = {"impl": impl, "rows": rows, "new_tokens": new, "prefix_tokens": K, "prompt_tokens_max": P,
         "ms_per_step": round(ms, 2), "floor_ms_per_step": round(floor, 2), "x_floor": round(ms / floor, 2),
         "prefill_s": round(prefill_s, 2), "total_s": round(total_s, 2),
         "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2), "device": torch.cuda.get_device_name(),
         "torch": torch.__version__, "commit": commit(), **extra}
    print(json.dumps(r), flush=True)
    return r


def run_ours(model, prefix, qs, new, seed=0):
    kv = prefix_kv(model, prefix)
    stats = {}
    t0 = time.perf_counter()
    out = generate_static(model, qs, prefix=kv, max_new_tokens=new, pad_id=0, stops=torch.tensor([STOP], device="cuda"),
                          generator=sampling_generator("cuda", seed), min_new_tokens=new, stats=stats, **SAMPLE)
    torch.cuda.synchronize()
    assert all(len(r) == new for r in out)
    return stats, time.perf_counter() - t0


def set_persisting_l2(mib: float) -> int:
    """cudaDeviceSetLimit(cudaLimitPersistingL2CacheSize, mib MiB) through the process's own
    libcudart (found in /proc/self/maps: torch loads it privately) -> the limit it then reports,
    bytes. The L2 set aside for evict-last (persisting) lines; CUDA's default is 0."""
    import ctypes
    paths = sorted({line.split()[-1] for line in open("/proc/self/maps") if "libcudart" in line})
    if not paths:
        raise SystemExit("bench_generate: --l2-persist-mb: no libcudart loaded in this process")
    rt = ctypes.CDLL(paths[0])
    limit = 0x06                                                # cudaLimitPersistingL2CacheSize
    err = rt.cudaDeviceSetLimit(ctypes.c_int(limit), ctypes.c_size_t(int(mib * 2 ** 20)))
    got = ctypes.c_size_t(0)
    err = err or rt.cudaDeviceGetLimit(ctypes.byref(got), ctypes.c_int(limit))
    if err:
        raise SystemExit(f"bench_generate: --l2-persist-mb: cudaDeviceSetLimit failed (error {err})")
    return got.value


def timed(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


class Saved(list):
    """The rows, each appended one also written to `path` (None: not written) with the rows of an
    earlier run of other (impl, rows, new_tokens) kept."""

    def __init__(self, path):
        super().__init__()
        self.path = Path(path) if path else None
        old = json.loads(self.path.read_text()) if self.path is not None and self.path.exists() else []
        self.old = old

    def append(self, r):
        super().append(r)
        if self.path is not None:
            mine = {(x["impl"], x["rows"], x["new_tokens"]) for x in self}
            write_json(self.path, [x for x in self.old if (x["impl"], x["rows"], x["new_tokens"]) not in mine] + list(self))


# Each row's settings: what it changes from the defaults, {(module, name): value}.
VARIANTS = {
    "iicl_fast": {},
    "iicl_fast_unfused": {(decode, "FUSED_PROJ"): False},
    "iicl_fast_fused": {(decode, "FUSED_PROJ_MAX_ROWS"): 10 ** 9},
    "iicl_fast_flash_prefix": {(decode, "FLASH_PREFIX"): True},
    "iicl_fast_cudnn_prefix": {(decode, "FLASH_PREFIX"): True, (decode, "CUDNN_PREFIX"): True},
    "iicl_fast_cublas": {(decode, "BLASLT"): "off"},
    "iicl_fast_cublaslt": {(decode, "BLASLT"): "on"},
    "iicl_fast_cublaslt_rows": {(decode, "BLASLT"): "rows"},
    "iicl_fast_lt_rows_logits16": {(decode, "BLASLT"): "rows", (decode, "LOGITS_16"): True},
    "iicl_fast_skinny": {(decode, "GEMM"): "triton"},
    "iicl_fast_merge_pipe": {(pa, "MERGE_PIPE"): True},
    "iicl_fast_partials16": {(pa, "PARTIALS_16"): True},
    "iicl_fast_lt_rows_logits16_partials16": {(decode, "BLASLT"): "rows", (decode, "LOGITS_16"): True,
                                              (pa, "PARTIALS_16"): True},
    "iicl_fast_lt_small_logits16": {(decode, "BLASLT"): "small", (decode, "LOGITS_16"): True},
    "iicl_fast_logits16": {(decode, "LOGITS_16"): True},
    "iicl_fast_skinny_pipe": {(decode, "GEMM"): "triton", (pa, "MERGE_PIPE"): True, (decode, "LOGITS_16"): True},
    "iicl_fast_prefetch16": {(decode, "PREFETCH_MB"): 16.0, (decode, "PREFETCH_MAX_ROWS"): 10 ** 9},
    "iicl_fast_prefetch32": {(decode, "PREFETCH_MB"): 32.0, (decode, "PREFETCH_MAX_ROWS"): 10 ** 9},
    "iicl_fast_prefetch32_last": {(decode, "PREFETCH_MB"): 32.0, (decode, "PREFETCH_MAX_ROWS"): 10 ** 9,
                                  (decode, "PREFETCH_HINT"): "last"},
    "iicl_fast_prefetch_kv": {(decode, "PREFETCH_KV"): True, (decode, "PREFETCH_MAX_ROWS"): 10 ** 9},
    "iicl_fast_prefetch32_kv": {(decode, "PREFETCH_MB"): 32.0, (decode, "PREFETCH_KV"): True,
                                (decode, "PREFETCH_MAX_ROWS"): 10 ** 9},
    "iicl_fast_tail": {(decode, "LORA_TAIL"): True},
}


def with_lora(model, r: int):
    """model wrapped as Memory wraps a base (peft LoRA on every linear layer, rank r, alpha 2r,
    iicl_fast's LoRA forward), B drawn nonzero so no product is skipped as zero."""
    from peft import LoraConfig, get_peft_model
    from iicl_fast import lora
    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", task_type="CAUSAL_LM"))
    g = torch.Generator(device="cpu").manual_seed(2)
    for n, p in pm.named_parameters():
        if ".lora_B." in n:
            p.data.copy_(torch.randn(p.shape, generator=g) * 1e-3)
    lora.install(pm)
    return pm.eval()


def prefix_tile(text: str) -> dict:
    """"BM,BN,WARPS,STAGES[,SPLIT_LEN]" -> a prefix_attention.PREFIX_CFG."""
    try:
        v = [int(x) for x in text.split(",")]
        if len(v) not in (4, 5) or min(v) < 1:
            raise ValueError
    except ValueError:
        raise SystemExit(f"bench_generate: --prefix-tile {text!r}: give BM,BN,WARPS,STAGES[,SPLIT_LEN], positive integers")
    return dict(block_m=v[0], block_n=v[1], num_warps=v[2], num_stages=v[3], **({"split_len": v[4]} if len(v) == 5 else {}))


@contextlib.contextmanager
def settings(changes: dict):
    """The module attributes in `changes` set inside, restored after."""
    old = {key: getattr(*key) for key in changes}
    for (mod, name), value in changes.items():
        setattr(mod, name, value)
    try:
        yield
    finally:
        for (mod, name), value in old.items():
            setattr(mod, name, value)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[64, 200, 400])
    ap.add_argument("--new", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--prefix", type=int, default=5000)
    ap.add_argument("--baselines", action="store_true", help="also generate_today and hf_generate at the first row count")
    ap.add_argument("--baseline-new", type=int, default=128)
    ap.add_argument("--hf-static", action="store_true",
                    help="with --baselines: also transformers generate with its static cache, compiled (hf_generate_static)")
    ap.add_argument("--unfused", action="store_true",
                    help="also each iicl_fast row with one GEMM a projection (impl iicl_fast_unfused)")
    ap.add_argument("--flash-prefix", action="store_true",
                    help="also each iicl_fast row with the prefix part through the flash op and through cuDNN "
                         "(iicl_fast_flash_prefix, iicl_fast_cudnn_prefix)")
    ap.add_argument("--blas", action="store_true",
                    help="also each iicl_fast row with the layers' GEMMs forced through cuBLAS and through cuBLASLt "
                         "(iicl_fast_cublas, iicl_fast_cublaslt; iicl_fast: as decode.BLASLT says, off unless IICL_DECODE_BLASLT), "
                         "cuBLASLt at <= 96 and >= 320 rows (iicl_fast_cublaslt_rows) and that with bf16 logits to "
                         "the sampler (iicl_fast_lt_rows_logits16)")
    ap.add_argument("--gemm", action="store_true",
                    help="also each iicl_fast row with the layers' GEMMs through kernels/skinny_gemm.py where "
                         "decode.SKINNY_MAX_ROWS allows (iicl_fast_skinny; iicl_fast: as decode.GEMM says)")
    ap.add_argument("--merge-pipe", action="store_true",
                    help="also each iicl_fast row with the suffix programs' merge pipelined (iicl_fast_merge_pipe), "
                         "with bf16 logits to the sampler (iicl_fast_logits16); with --gemm also iicl_fast_skinny_pipe, all three")
    ap.add_argument("--prefetch", action="store_true",
                    help="also each iicl_fast row with each layer's o then gate/up weights prefetched into L2 during "
                         "its attention (iicl_fast_prefetch16, iicl_fast_prefetch32, iicl_fast_prefetch32_last), the "
                         "next layer's prefix KV during each MLP (iicl_fast_prefetch_kv) and both (iicl_fast_prefetch32_kv)")
    ap.add_argument("--l2-persist-mb", type=float, default=None,
                    help="set aside this many MiB of L2 for evict-last (persisting) lines for the whole run "
                         "(cudaLimitPersistingL2CacheSize; CUDA's default 0): rows get l2_persist_bytes")
    ap.add_argument("--lora", type=int, default=0, metavar="R",
                    help="every linear layer with a rank-R LoRA adapter (peft, all-linear, B nonzero), as Memory "
                         "elicits with θ_{i-1}: each iicl_fast row's impl gets _loraR (the floor stays the base's)")
    ap.add_argument("--lora-tail", action="store_true",
                    help="with --lora: also each iicl_fast row with the adapter's A in the rows reserved after "
                         "each projection's weights, one GEMM for x Wᵀ and x Aᵀ (decode.LORA_TAIL; iicl_fast_tail_loraR)")
    ap.add_argument("--prefix-tile", action="append", default=[], metavar="BM,BN,WARPS,STAGES[,SPLIT_LEN]",
                    help="also each iicl_fast row with the prefix attention's tile (and positions a split) set "
                         "(iicl_fast_tile_<...>; tune_decode_attention.py --joint finds candidates); repeatable")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.lora_tail and not a.lora:
        raise SystemExit("bench_generate: --lora-tail needs --lora R (the base model has no adapter to place)")
    for text in a.prefix_tile:
        VARIANTS["iicl_fast_tile_" + text.replace(",", "_")] = {(pa, "PREFIX_CFG"): prefix_tile(text)}
    torch.zeros(1, device="cuda")                # the CUDA runtime loaded, for --l2-persist-mb
    persist = {} if a.l2_persist_mb is None else {"l2_persist_bytes": set_persisting_l2(a.l2_persist_mb)}
    model = llama_8b().requires_grad_(False)     # frozen, as Memory's base is (the fused norm wants it)
    if a.lora:
        model = with_lora(model, a.lora)
    layers.install(model)
    layers.fuse_projections(model)               # as Memory does on CUDA
    prefix = torch.randint(10, 120000, (a.prefix,), generator=torch.Generator().manual_seed(1)).tolist()
    results = Saved(a.out)                                      # written after every row: a run cut short keeps them
    run_ours(model, prefix, prompts(8), 4)                       # compile the kernels once
    for rows in a.rows:
        qs = prompts(rows)
        P = max(len(q) for q in qs)
        for new in a.new:
            impls = ["iicl_fast"] + (["iicl_fast_unfused", "iicl_fast_fused"] if a.unfused else []) + \
                (["iicl_fast_flash_prefix", "iicl_fast_cudnn_prefix"] if a.flash_prefix else []) + \
                (["iicl_fast_cublas", "iicl_fast_cublaslt", "iicl_fast_cublaslt_rows", "iicl_fast_lt_rows_logits16",
                  "iicl_fast_lt_small_logits16"] if a.blas else []) + \
                (["iicl_fast_skinny"] if a.gemm and rows <= decode.SKINNY_MAX_ROWS else []) + \
                (["iicl_fast_merge_pipe", "iicl_fast_logits16", "iicl_fast_partials16"] if a.merge_pipe else []) + \
                (["iicl_fast_lt_rows_logits16_partials16"] if a.merge_pipe and a.blas else []) + \
                (["iicl_fast_skinny_pipe"] if a.gemm and a.merge_pipe and rows <= decode.SKINNY_MAX_ROWS else []) + \
                (["iicl_fast_prefetch16", "iicl_fast_prefetch32", "iicl_fast_prefetch32_last", "iicl_fast_prefetch_kv",
                  "iicl_fast_prefetch32_kv"] if a.prefetch else []) + \
                ["iicl_fast_tile_" + t.replace(",", "_") for t in a.prefix_tile] + \
                (["iicl_fast_tail"] if a.lora_tail else [])
            for impl in impls:
                with settings(VARIANTS[impl]):
                    # Each setting's kernels compiled before its timed run, at its batch size: at
                    # 19ad70f iicl_fast_logits16 measured 10.94 ms a step at 64 rows against 6.13 —
                    # the sampler's bf16 build compiling inside the timed steps (0.6 s); the same
                    # setting warm at 400 rows was 0.17 ms faster than the default.
                    run_ours(model, prefix, qs, 2)
                    torch.cuda.reset_peak_memory_stats()
                    st, total = run_ours(model, prefix, qs, new)
                ms = st["decode_s"] * 1e3 / max(1, st["steps"] - 1)
                results.append(record(impl + (f"_lora{a.lora}" if a.lora else ""), rows, new, a.prefix, P, ms,
                                      floor_ms(model, rows, a.prefix, P, new),
                                      st["prefill_s"], total, capture_s=round(st["capture_s"], 2), batches=st["batches"],
                                      **persist))
    if a.baselines:
        rows, new = a.rows[0], a.baseline_new
        qs = prompts(rows)
        P = max(len(q) for q in qs)
        fl = floor_ms(model, rows, a.prefix, P, new)
        kw = dict(pad_id=0, stop_ids=[STOP], batch_size=rows, **SAMPLE)
        for impl, call in (("generate_today", lambda n: generate(model, qs, max_new_tokens=n, min_new_tokens=n, prefix=prefix,
                                                                 cascade=True, generator=sampling_generator("cuda", 0), **kw)),):
            torch.cuda.reset_peak_memory_stats()
            t1 = timed(lambda: call(1))
            tn = timed(lambda: call(new))
            results.append(record(impl, rows, new, a.prefix, P, (tn - t1) * 1e3 / (new - 1), fl, t1, tn))
        layers.uninstall(model)                                  # transformers as it ships
        full = [prefix + q for q in qs]

        def hf(n, **extra):
            ids = torch.full((rows, max(map(len, full))), 0, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, s in enumerate(full):                         # left padding, as generate wants
                ids[i, ids.shape[1] - len(s):] = torch.tensor(s)
                mask[i, ids.shape[1] - len(s):] = 1
            model.generate(input_ids=ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=n, min_new_tokens=n,
                           do_sample=True, temperature=0.7, top_p=0.9, pad_token_id=0, eos_token_id=STOP, **extra)
        for impl, extra in (("hf_generate", {}),) + ((("hf_generate_static", {"cache_implementation": "static"}),)
                                                       if a.hf_static else ()):
            torch.cuda.reset_peak_memory_stats()
            try:
                compile_s = timed(lambda: hf(new, **extra)) if extra else None     # compiles the decoding forward
                t1 = timed(lambda: hf(1, **extra))
                tn = timed(lambda: hf(new, **extra))
                results.append(record(impl, rows, new, a.prefix, P, (tn - t1) * 1e3 / (new - 1), fl, t1, tn,
                                      **({"compile_s": round(compile_s - tn, 1)} if extra else {})))
            except Exception as e:       # out of memory, or a compile failure: the row says so and the run goes on
                print(json.dumps({"impl": impl, "rows": rows, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}))
            gc.collect()
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
