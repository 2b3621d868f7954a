"""Sweep the decode-attention kernels' launch settings on the 8B heads (32 query, 8 KV, d 128)
after a 5,000-token prefix, at 64 and 400 rows mid-generation (340 own slots of 600).

    python benchmarks/tune_decode_attention.py [--sweep]
Prints ms per layer of cascade_decode in one launch and in two, and with the prefix part through
PyTorch's flash op (decode._flash_prefix); --sweep: per setting, best first."""
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from iicl_fast.kernels import prefix_attention as pa  # noqa: E402
from profile_decode import events  # noqa: E402


def ms(fn):
    return events(fn, 30)


def main():
    sweep = "--sweep" in sys.argv
    out = []
    for B in (64, 400):
        q = torch.randn(B, 32, 128, device="cuda").bfloat16()
        pk, pv = (torch.randn(8, 5000, 128, device="cuda").bfloat16() for _ in range(2))
        ks, vs = (torch.randn(B, 8, 600, 128, device="cuda").bfloat16() for _ in range(2))
        lo = torch.zeros(B, dtype=torch.int32, device="cuda")
        cur = torch.tensor([339], dtype=torch.int32, device="cuda")
        rows = []
        pa.ONE_LAUNCH = False
        for bm, bn, nw, ns in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3)) if sweep else []:
            if bm == 128 and bn == 128 and nw == 4:
                continue
            pa.PREFIX_CFG = dict(block_m=bm, block_n=bn, num_warps=nw, num_stages=ns)
            try:
                t = ms(lambda: pa.cascade_decode(q, pk, pv, ks, vs, lo, cur, 128 ** -0.5))
            except Exception as e:   # noqa: BLE001 (out of shared memory and the like: skip the setting)
                print("skip", bm, bn, nw, ns, str(e).splitlines()[0][:80])
                continue
            rows.append((t, dict(pa.PREFIX_CFG)))
        rows.sort(key=lambda r: r[0])
        pa.PREFIX_CFG = rows[0][1] if rows else None
        srows = []
        for bn, nw, ns in itertools.product((32, 64), (2, 4, 8), (2, 3)) if sweep else []:
            pa.SUFFIX_CFG = dict(block_n=bn, num_warps=nw, num_stages=ns)
            srows.append((ms(lambda: pa.cascade_decode(q, pk, pv, ks, vs, lo, cur, 128 ** -0.5)), dict(pa.SUFFIX_CFG)))
        srows.sort(key=lambda r: r[0])
        pa.ONE_LAUNCH = True
        one = ms(lambda: pa.cascade_decode(q, pk, pv, ks, vs, lo, cur, 128 ** -0.5))
        pa.ONE_LAUNCH = False                   # the default, for what follows too
        two = ms(lambda: pa.cascade_decode(q, pk, pv, ks, vs, lo, cur, 128 ** -0.5))
        from iicl_fast.decode import _flash_prefix
        flash = ms(lambda: pa.cascade_decode(q, pk, pv, ks, vs, lo, cur, 128 ** -0.5, prefix=_flash_prefix))
        ref = pa.cascade_decode(q, pk, pv, ks, vs, lo, cur, 128 ** -0.5).float()
        flash_diff = (pa.cascade_decode(q, pk, pv, ks, vs, lo, cur, 128 ** -0.5, prefix=_flash_prefix).float()
                      - ref).abs().max().item()
        r = {"rows": B, "one_launch_ms": one, "two_launches_ms": two, "flash_prefix_ms": flash,
             "flash_prefix_max_abs_diff": flash_diff, "prefix_best": rows[:4], "prefix_worst": rows[-1:], "suffix_best": srows[:4], "suffix_worst": srows[-1:]}
        print(json.dumps(r), flush=True)
        out.append(r)
        pa.PREFIX_CFG = pa.SUFFIX_CFG = None


if __name__ == "__main__":
    main()
