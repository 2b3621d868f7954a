"""Where one decoding step's time goes: 8B shape, R rows after one shared prefix (cascade).

    python benchmarks/profile_decode.py [--rows 400] [--prefix 5000] [--steps 20]"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_consolidate import llama_8b  # noqa: E402
from iicl_fast.decode import prefix_kv, shared_prefix  # noqa: E402
from iicl_fast.generation import decoder, lm_head, next_token, sampling_generator, step_logits  # noqa: E402


def timed(fn, n):
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        out = fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / n, out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=400)
    p.add_argument("--prefix", type=int, default=5000)
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args()
    model = llama_8b()
    body = decoder(model)
    w, bias, cap = lm_head(model)
    g = sampling_generator("cuda", 0)
    prefix = torch.randint(0, 49152, (a.prefix,)).tolist()
    with torch.no_grad(), shared_prefix(model, prefix_kv(model, prefix)):
        ids = torch.randint(0, 49152, (a.rows, 16), device="cuda")
        res = body(input_ids=ids, position_ids=a.prefix + torch.arange(16, device="cuda")[None].expand(a.rows, 16),
                   use_cache=True)
        past, h = res.past_key_values, res.last_hidden_state[:, -1]
        tok = ids[:, -1]
        pos = torch.full((a.rows, 1), a.prefix + 16, device="cuda")
        fwd = []
        for _ in range(a.steps):          # the cache grows: time each step, keep the median
            t0 = time.perf_counter()
            r = body(input_ids=tok[:, None], position_ids=pos, past_key_values=past, use_cache=True)
            torch.cuda.synchronize()
            fwd.append((time.perf_counter() - t0) * 1e3)
            past, pos = r.past_key_values, pos + 1
        h = r.last_hidden_state[:, -1]
        t_logits, z = timed(lambda: step_logits(h, w, bias, cap), a.steps)
        t_greedy, _ = timed(lambda: next_token(z, False, 1.0, 1.0), a.steps)
        t_full, _ = timed(lambda: next_token(z, True, 0.7, 1.0, g), a.steps)
        t_nucleus, _ = timed(lambda: next_token(z, True, 0.7, 0.9, g), a.steps)
    fwd.sort()
    floor = max(2 * sum(x.numel() for x in model.parameters()) / 4.3e12,
                2 * a.rows * sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)) / 790e12) * 1e3
    print(f"rows {a.rows} prefix {a.prefix}: forward {fwd[len(fwd) // 2]:.2f} ms (min {fwd[0]:.2f}), logits {t_logits:.2f}, "
          f"argmax {t_greedy:.2f}, sample {t_full:.2f}, sample top-p {t_nucleus:.2f} ms; step floor {floor:.2f} ms")


if __name__ == "__main__":
    main()
