"""The nucleus sampler's block size and warps on the decoding step's logits: B rows of the 8B
vocabulary (128,256; fp32, and the defaults on bf16), temperature 0.7, top-p 0.9 (elicitation's settings).

    python benchmarks/tune_sampler.py [--rows 64 200 400] [--out FILE]

Logits are drawn so that a row's distribution is as peaked as a language model's (a few
tokens hold most of the mass), since the rejection rounds depend on it. GPU ms a call (CUDA
events over 50 calls, one program a row)."""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from iicl_fast.kernels import sampling  # noqa: E402

V = 128256


def ms(fn, n=50):
    fn()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / n


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[64, 200, 400])
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    out = []
    default = sampling.BLOCK_V, sampling.WARPS
    for B in a.rows:
        g = torch.Generator(device="cuda").manual_seed(B)
        z = torch.randn(B, V, device="cuda", generator=g) * 2.5          # peaked rows: top tokens hold most mass
        seed = torch.zeros(1, dtype=torch.int64, device="cuda")
        r = {"rows": B}
        for bv, w in ((4096, 8), (8192, 8), (8192, 16), (16384, 16), (32768, 32)):
            sampling.BLOCK_V, sampling.WARPS = bv, w
            try:
                r[f"{bv}x{w}"] = round(ms(lambda: sampling.sample_top_p(z, seed, 0.7, 0.9)), 4)
            except Exception as e:     # noqa: BLE001 (out of resources: skip the setting)
                r[f"{bv}x{w}"] = str(e).splitlines()[0][:60]
        sampling.BLOCK_V, sampling.WARPS = default
        # decode.LOGITS_16 hands the sampler the head's bf16 logits (the same values): at 64 rows
        # bench_generate measured its step 10.94 ms against 6.13 with fp32 (19ad70f) — is it here?
        zb = z.bfloat16()
        r["default_fp32"] = round(ms(lambda: sampling.sample_top_p(z, seed, 0.7, 0.9)), 4)
        r["default_bf16"] = round(ms(lambda: sampling.sample_top_p(zb, seed, 0.7, 0.9)), 4)
        r["argmax_fp32"] = round(ms(lambda: z.argmax(-1)), 4)
        r["argmax_bf16"] = round(ms(lambda: zb.argmax(-1)), 4)
        r["cast_to_fp32"] = round(ms(lambda: zb.float()), 4)
        print(json.dumps(r), flush=True)
        out.append(r)
    if a.out:
        Path(a.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                           "results": out}, indent=1))


if __name__ == "__main__":
    main()
