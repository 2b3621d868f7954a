"""Where a chunk's passes, training steps and decoding steps go on the 8B shape, A/B:
"plain" (peft's LoRA forward, transformers' RMSNorm and MLP, the teacher's suffix attention
in plain fp32, the prefix part through the flash op) against "fast" (iicl_fast.lora,
iicl_fast.layers, decode.FLASH_SUFFIX and CUDNN_PREFIX); both use the fused AdamW. Then a
torch.profiler table of one training step and one teacher batch of the fast variant.

    python benchmarks/profile_consolidate.py --tokenizer DIR [--entries 96] [--out DIR]"""
import argparse
import contextlib
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_consolidate import llama_8b, prose, warm_kernels  # noqa: E402
import iicl_fast  # noqa: E402
from iicl_fast import Config, decode, layers, lora  # noqa: E402
from iicl_fast.consolidate import subset, train  # noqa: E402
from iicl_fast.elicit import Entry  # noqa: E402
from iicl_fast.generation import cache_kw, cache_of, decoder, lm_head, next_token, sampling_generator, step_logits  # noqa: E402
from iicl_fast.teacher import hidden_logprob, student_hidden_set, teacher_hidden  # noqa: E402


def now():
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def small_llama(device):
    """--small: a 2-layer Llama of the same structure (a smoke run of this script on the CPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device, torch.bfloat16).eval()


def decode_steps(model, prefix, rows, steps):
    """ms per decoding step (median) of `rows` rows after the shared prefix, cascade."""
    body = decoder(model)
    w, b, cap = lm_head(model)
    g = sampling_generator(w.device, 0)
    K = len(prefix)
    with torch.no_grad(), decode.shared_prefix(model, decode.prefix_kv(model, prefix)):  # noqa: SIM117
        dev = next(model.parameters()).device
        ids = torch.randint(0, 49152, (rows, 16), device=dev)
        res = body(input_ids=ids, position_ids=K + torch.arange(16, device=dev)[None].expand(rows, 16), use_cache=True)
        past, h = cache_of(res), res.last_hidden_state[:, -1]
        pos = torch.full((rows, 1), K + 16, device=dev)
        times = []
        for _ in range(steps):
            t = now()
            tok = next_token(step_logits(h, w, b, cap), True, 0.7, 0.9, g)
            r = body(input_ids=tok[:, None], position_ids=pos, use_cache=True, **cache_kw(body, past))
            past, pos, h = cache_of(r), pos + 1, r.last_hidden_state[:, -1]
            times.append((now() - t) * 1e3)
    times.sort()
    return times[len(times) // 2]


def gpu_busy_s(prof) -> float:
    """Seconds in which the GPU ran anything (the union of its kernels' and copies' intervals)."""
    from torch.autograd import DeviceType
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start)
    busy, end = 0.0, float("-inf")
    for a, b in spans:
        if b > end:
            busy += b - max(a, end)
            end = b
    return busy / 1e6


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--entries", type=int, default=96)
    p.add_argument("--train-entries", type=int, default=48)
    p.add_argument("--decode-rows", type=int, default=400)
    p.add_argument("--out", default=".")
    p.add_argument("--small", action="store_true", help="a 2-layer model on the CPU: a smoke run")
    p.add_argument("--variants", default="plain,fast,plain,fast", help="comma list of plain|fast|fast_norope (fast without the fused rotary)|fast_padded (fast, "
                   "training's micro-batches right-padded, not packed in one row), in order")
    p.add_argument("--no-decode", action="store_true", help="skip the decoding-step timing")
    p.add_argument("--trace", action="store_true", help="also write the training step's chrome trace (gzipped)")
    p.add_argument("--cudnn", action="store_true",
                   help="let SDPA pick cuDNN attention (the library turns it off: decode.sdpa_backends)")
    a = p.parse_args()
    backends = contextlib.nullcontext if a.cudnn else decode.sdpa_backends
    peak = (lambda: torch.cuda.max_memory_allocated() / 2**30) if torch.cuda.is_available() else (lambda: float("nan"))
    reset = torch.cuda.reset_peak_memory_stats if torch.cuda.is_available() else (lambda: None)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    model = small_llama("cpu") if a.small else llama_8b()
    chunk = prose(5000, tok)
    cfg = Config.preset("paper", progress=False, epochs=1)
    mem = iicl_fast.Memory(model, tok, cfg)
    fmt = mem.fmt
    rnd = random.Random(0)
    words = chunk.split()
    entries = []
    for i in range(a.entries):
        s = rnd.randrange(len(words) - 60)
        q = "Continue the passage: " + " ".join(words[s: s + rnd.randrange(8, 40)])
        entries.append(Entry("continuation", q, [rnd.randrange(100, 49000) for _ in range(512)]))
    prefix = fmt.context_prefix(chunk)
    compile_s = 0.0 if a.small else warm_kernels(model)
    res = {"compile_s": compile_s, "entries": a.entries}
    for variant in a.variants.split(","):        # default twice, interleaved: the second pair counts
        fast = variant.startswith("fast")
        layers.ROTARY = variant != "fast_norope"
        os.environ["IICL_PACK"] = "0" if variant in ("plain", "fast_padded") else "1"
        (lora.install if fast else lora.uninstall)(mem.model)
        (layers.install if fast else layers.uninstall)(mem.model)
        decode.FLASH_SUFFIX = decode.CUDNN_PREFIX = fast
        reset()
        stack = contextlib.ExitStack()
        stack.enter_context(backends())
        t = now()
        th = teacher_hidden(mem.model, fmt, chunk, entries, batch_size=400, max_tokens=cfg.pass_tokens)
        t_teacher = now() - t
        t = now()
        sh = student_hidden_set(mem.model, fmt, entries, batch_size=400, max_tokens=cfg.pass_tokens)
        t_student = now() - t
        t = now()
        hidden_logprob(mem.model, th, impl="auto")
        hidden_logprob(mem.model, sh, impl="auto")
        t_select = now() - t
        pass_peak = peak()
        reset()
        n = a.train_entries
        sub = subset(th, list(range(n)))
        t = now()
        train(mem.model, fmt, entries[:n], sub, mem.params, cfg)
        t_train = now() - t
        train_peak = peak()
        stack.close()
        ms_step = float("nan") if a.no_decode else decode_steps(mem.model, prefix, a.decode_rows, 12)
        tokens_t = sum(len(fmt.query(e.query)) + len(e.response) for e in entries)
        tokens_s = sum(len(fmt.prompt(e.query)) + len(e.response) for e in entries)
        tokens_train = sum(len(fmt.prompt(e.query)) + len(e.response) for e in entries[:n])
        P = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        r = {"teacher_s": t_teacher, "student_s": t_student, "select_s": t_select, "train_s": t_train,
             "teacher_tflops": 2 * P * tokens_t / t_teacher / 1e12, "student_tflops": 2 * P * tokens_s / t_student / 1e12,
             "train_tflops": 4 * P * tokens_train / t_train / 1e12, "pass_peak_gib": pass_peak,
             "train_peak_gib": train_peak, "decode_ms_per_step": ms_step, "train_steps": -(-n // cfg.batch_size)}
        print(variant, json.dumps({k: round(v, 3) for k, v in r.items()}), flush=True)
        res[variant] = r
    # the fast variant's kernels, one training step and one teacher batch
    os.environ["IICL_PACK"] = "1"
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    # three steps (a fresh optimizer's first step also fills its moments: one step alone
    # showed ~50 ms of optimizer time that the other steps of a chunk do not have)
    n_prof = min(3 * cfg.batch_size, len(entries))
    sub = subset(th, list(range(n_prof)))
    with backends(), profile(activities=acts, record_shapes=True) as prof:
        t = now()
        train(mem.model, fmt, entries[:n_prof], sub, mem.params, cfg)
        span = now() - t
    busy = gpu_busy_s(prof)
    res["profiled_train"] = {"wall_s": span, "gpu_busy_s": busy, "idle_s": span - busy if busy else None}
    print(f"profiled training: wall {span:.3f}s, GPU busy {busy:.3f}s (union of kernel and copy intervals)")
    table = prof.key_averages().table(sort_by=key, row_limit=60, max_name_column_width=70)
    Path(a.out, "profile_train.txt").write_text(table)
    shapes = prof.key_averages(group_by_input_shape=True).table(sort_by=key, row_limit=80, max_name_column_width=50,
                                                               max_shapes_column_width=90)
    Path(a.out, "profile_train_shapes.txt").write_text(shapes)
    if a.trace:
        import gzip
        trace = Path(a.out, "train_trace.json")
        prof.export_chrome_trace(str(trace))
        with open(trace, "rb") as f, gzip.open(str(trace) + ".gz", "wb") as g:
            g.write(f.read())
        trace.unlink()
    print(table[:6000])
    with backends(), profile(activities=acts) as prof:
        teacher_hidden(mem.model, fmt, chunk, entries[:56], batch_size=400, max_tokens=cfg.pass_tokens)
        now()
    table = prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=70)
    Path(a.out, "profile_teacher.txt").write_text(table)
    print(table[:4000])
    Path(a.out, "profile_consolidate.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
