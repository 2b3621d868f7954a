"""Training's attention on the 8B shape, forward + backward, by SDPA backend, beside its FLOP
floor, and each backend's first call at a new shape: which backend a training step should
take (the library keeps cuDNN off, decode.sdpa_backends: a plan of ~100 ms per new shape,
kept for the process; cudnn_pad64 pads the length to a multiple of 64 to bound the shapes).

    python benchmarks/bench_train_attention.py [--batch 16] [--lengths 593,577,601] [--out DIR]

q [B, 32, T, 128], k and v [B, 8, T, 128], bf16, causal, grouped KV heads (enable_gqa: what
transformers passes without a mask). One layer; the step's figure is 32 layers."""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_consolidate import PEAK_FLOPS, commit  # noqa: E402

# (efficient attention has no grouped KV heads: "No available kernel" on the H200)
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}


def time_ms(fn, reps=20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lengths", default="593,577,601,1031,313")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    B, Hq, Hk, d, layers = a.batch, 32, 8, 128, 32
    rows = []
    for T in (int(x) for x in a.lengths.split(",")):
        q = torch.randn(B, Hq, T, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(B, Hk, T, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(B, Hk, T, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        go = torch.randn(B, Hq, T, d, device="cuda", dtype=torch.bfloat16)
        flops = 3 * 4 * B * Hq * d * T * (T + 1) / 2          # forward QKᵀ, PV; backward twice that
        row = {"B": B, "T": T, "floor_ms": flops / PEAK_FLOPS * 1e3}
        for name, be in [*BACKENDS.items(), ("cudnn_pad64", SDPBackend.CUDNN_ATTENTION)]:
            pad = -T % 64 if name.endswith("pad64") else 0

            def step():
                qq, kk, vv = (torch.nn.functional.pad(x, (0, 0, 0, pad)) if pad else x for x in (q, k, v))
                with sdpa_kernel([be]):
                    o = torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=True)
                torch.autograd.grad(o[:, :, :T] if pad else o, (q, k, v), go)
            try:
                t = time.perf_counter()
                step()
                torch.cuda.synchronize()
                row[name + "_first_ms"] = (time.perf_counter() - t) * 1e3      # cuDNN: its plan built here
                row[name + "_ms"] = time_ms(step)
            except RuntimeError as e:
                row[name + "_ms"] = None
                print(f"T={T} {name}: {str(e).splitlines()[0][:100]}")
        rows.append(row)
        names = [*BACKENDS, "cudnn_pad64"]
        print(f"T={T}: floor {row['floor_ms']:.3f} ms/layer; " + ", ".join(
            f"{n} {row[n + '_ms']:.3f} ms ({row[n + '_ms'] / row['floor_ms']:.2f}x, first call {row[n + '_first_ms']:.1f})"
            for n in names if row.get(n + "_ms")) + f"; x{layers} layers a step", flush=True)
    if a.out:
        res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": commit(), "rows": rows}
        Path(a.out, "train_attention.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
