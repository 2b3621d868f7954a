"""Sweep the decode-attention kernels' launch settings on the 8B heads (32 query, 8 KV, d 128)
after a 5,000-token prefix, at 64, 200 and 400 rows mid-generation (124 own slots of 188:
prompts of 60, 128 new tokens, half decoded — bench_generate.py's shape).

Times are GPU time a layer: 32 calls (one per layer of the 8B shape) captured in one CUDA graph,
replayed, divided by 32 — eager timing of ~20 µs kernels measures Python's launches instead.
Prints cascade_decode as it defaults, in two launches with the merge in the suffix programs or
with the merge kernel after them, with the suffix programs' merge in runtime loops or pipelined
(MERGE_PIPE), in one launch, and with the prefix part through PyTorch's flash op;
--sweep: the prefix and the suffix settings, best first, and the prefix part's split length;
--joint: the prefix part's tile and split length swept together (the split count that fills the
SMs depends on the tile);
--cold: each layer its own caches (a step's reads come from HBM; without it one layer's 20 MB
prefix stays in the L2 across the 32 calls).

    python benchmarks/tune_decode_attention.py [--rows 64 200 400] [--sweep] [--joint] [--cold] [--out FILE]"""
import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from iicl_fast.kernels import prefix_attention as pa  # noqa: E402

LAYERS = 32


def graphed_ms(fn, replays=10):
    """GPU ms of one fn(layer) call: LAYERS calls (layer 0 .. LAYERS-1) captured as one graph, replayed."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(2):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(LAYERS):
            fn(i)
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(replays):
        g.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / replays / LAYERS


def modes(step):
    """-> {mode: ms a layer} for the launch paths of one shape."""
    from iicl_fast.decode import _flash_prefix
    out = {}
    pipe_default = pa.MERGE_PIPE
    for name, one, merge, prefix, unroll, pipe in (
            ("default", None, True, None, True, pipe_default),
            ("two_launches_merge_in_suffix", False, True, None, True, False),
            ("two_launches_merge_in_suffix_loops", False, True, None, False, False),
            ("two_launches_merge_in_suffix_pipe", False, True, None, True, True),
            ("two_launches_merge_kernel", False, False, None, True, False), ("one_launch", True, False, None, True, False),
            ("flash_prefix", None, True, _flash_prefix, True, pipe_default)):
        pa.ONE_LAUNCH, pa.MERGE_IN_SUFFIX, pa.UNROLL_SP, pa.MERGE_PIPE = one, merge, unroll, pipe
        out[name] = graphed_ms(lambda i: step(prefix, i))
    pa.ONE_LAUNCH, pa.MERGE_IN_SUFFIX, pa.UNROLL_SP, pa.MERGE_PIPE = None, True, True, pipe_default
    return out


def sweep(step, B):
    """The prefix part's and the suffix part's settings, each with the other at its default."""
    rows = []
    for bm, bn, nw, ns in itertools.product((64, 128, 256), (32, 64, 128), (4, 8), (2, 3)):
        if (bm * bn >= 128 * 128 or bm == 256) and nw == 4:
            continue
        pa.PREFIX_CFG = dict(block_m=bm, block_n=bn, num_warps=nw, num_stages=ns)
        try:
            rows.append((round(graphed_ms(lambda i: step(None, i)), 4), dict(pa.PREFIX_CFG)))
        except Exception as e:   # noqa: BLE001 (out of shared memory and the like: skip the setting)
            print("skip", pa.PREFIX_CFG, str(e).splitlines()[0][:80], file=sys.stderr)
    pa.PREFIX_CFG = None
    srows = []
    for bn, nw, ns in itertools.product((16, 32, 64, 128), (2, 4, 8), (2, 3)):
        pa.SUFFIX_CFG = dict(block_n=bn, num_warps=nw, num_stages=ns)
        try:
            srows.append((round(graphed_ms(lambda i: step(None, i)), 4), dict(pa.SUFFIX_CFG)))
        except Exception as e:   # noqa: BLE001
            print("skip", pa.SUFFIX_CFG, str(e).splitlines()[0][:80], file=sys.stderr)
    pa.SUFFIX_CFG = None
    splits = {}
    for sl in (None, 313, 417, 625, 834, 1250, 1667, 2500):   # the prefix part's positions a split
        splits[str(sl)] = round(graphed_ms(lambda i: step(None, i, sl)), 4)
    rows.sort(key=lambda r: r[0])
    srows.sort(key=lambda r: r[0])
    return {"prefix_default": pa._prefix_cfg(B * 4), "prefix_best": rows[:4], "prefix_worst": rows[-1:],
            "suffix_default": pa._suffix_cfg(B * 8), "suffix_best": srows[:4], "suffix_worst": srows[-1:],
            "prefix_split_len": splits}


JOINT_TILES = (dict(block_m=64, block_n=64, num_warps=4, num_stages=3), dict(block_m=128, block_n=64, num_warps=4, num_stages=2),
               dict(block_m=128, block_n=64, num_warps=8, num_stages=3), dict(block_m=128, block_n=128, num_warps=8, num_stages=2),
               dict(block_m=64, block_n=128, num_warps=4, num_stages=2))
JOINT_SPLITS = (None, 250, 313, 417, 500, 625, 834, 1000, 1250, 1667, 2500, 5000)


def joint(step, B):
    """The prefix part's tile and its split length together (the sweep above varies the split only
    at the default tile): the tile sets how many programs a split has and how many fit an SM at
    once, so the best split length depends on it. -> rows (ms a layer, tile, split length, splits),
    best first."""
    rows = []
    M = B * 4
    for cfg, sl in itertools.product(JOINT_TILES, JOINT_SPLITS):
        pa.PREFIX_CFG = dict(cfg)
        try:
            ms = graphed_ms(lambda i: step(None, i, sl))
        except Exception as e:   # noqa: BLE001 (out of shared memory and the like: skip the setting)
            print("skip", cfg, sl, str(e).splitlines()[0][:80], file=sys.stderr)
            continue
        bm, row_blocks, psl, S = pa._prefix_grid(M, 5000, 8, cfg["block_m"], sl)
        rows.append((round(ms, 4), cfg, sl, S, 8 * row_blocks * S))
    pa.PREFIX_CFG = None
    rows.sort(key=lambda r: r[0])
    return [dict(ms=r[0], tile=r[1], split_len=r[2], splits=r[3], programs=r[4]) for r in rows]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--rows", type=int, nargs="+", default=[64, 200, 400])
    ap.add_argument("--cold", action="store_true",
                    help="each of the 32 layers its own prefix and own caches (as a step reads them: from HBM, "
                         "not the L2 that one layer's reuse keeps them in)")
    ap.add_argument("--joint", action="store_true",
                    help="the prefix part's tile and split length swept together (JOINT_TILES × JOINT_SPLITS)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = []
    for B in args.rows:
        q = torch.randn(B, 32, 128, device="cuda").bfloat16()
        n = LAYERS if args.cold else 1
        pk, pv = ([torch.randn(8, 5000, 128, device="cuda").bfloat16() for _ in range(n)] for _ in range(2))
        ks, vs = ([torch.randn(B, 8, 188, 128, device="cuda").bfloat16() for _ in range(n)] for _ in range(2))
        lo = torch.randint(0, 40, (B,), dtype=torch.int32, device="cuda")
        cur = torch.tensor([124], dtype=torch.int32, device="cuda")
        o = torch.empty_like(q)

        def step(prefix, i=0, split_len=None):
            i %= n
            return pa.cascade_decode(q, pk[i], pv[i], ks[i], vs[i], lo, cur, 128 ** -0.5, out=o, prefix=prefix,
                                     split_len=split_len)

        ref = step(None).float()
        pa.ONE_LAUNCH, pa.MERGE_IN_SUFFIX = False, False
        diff = (step(None).float() - ref).abs().max().item()
        pa.ONE_LAUNCH, pa.MERGE_IN_SUFFIX = None, True
        r = {"rows": B, "ms_a_layer": modes(step), "default_vs_merge_kernel_max_abs_diff": diff}
        if args.sweep:
            r.update(sweep(step, B))
        if args.joint:
            r["joint"], r["joint_default"] = joint(step, B), pa._prefix_cfg(B * 4)
        print(json.dumps(r), flush=True)
        out.append(r)
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                              "results": out}, indent=1))


if __name__ == "__main__":
    main()
