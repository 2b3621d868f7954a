"""iicl_fast/kernels/prefix_attention.py (decode attention over one shared prefix, GQA) against the
float64 reference, under the Triton interpreter on the CPU: odd prefix lengths (not a
multiple of any block, 1 included), several splits, row blocks with a ragged edge, group
sizes 1/4/8, head dims that are not powers of two, fp32 and bf16. Outputs are NaN-poisoned
by the launcher, so an unwritten element fails."""
import math

import pytest
import torch

from iicl_fast.kernels import prefix_attention as pa
from iicl_fast.kernels.prefix_attention import cascade_decode, prefix_attention
from iicl_fast.kernels.reference_prefix_attention import cascade_decode_ref, prefix_attention_ref


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    monkeypatch.setattr(pa, "POISON", True)

CASES = [  # B, Hq, Hkv, n, K, d, split_len
    (1, 4, 4, 1, 1, 16, None),       # one row, one prefix position, group 1
    (3, 8, 2, 1, 97, 32, 32),        # group 4, four splits (the last 1 long)
    (2, 8, 1, 2, 130, 24, 64),       # group 8, two new positions a row, d not a power of two
    (5, 8, 2, 2, 7, 16, None),       # 40 query vectors, a 7-token prefix
    (9, 8, 1, 1, 65, 16, 16),        # 72 query vectors: two row blocks of 64, a ragged edge
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,Hq,Hkv,n,K,d,split_len", CASES)
def test_prefix_attention_matches_float64(B, Hq, Hkv, n, K, d, split_len, dtype):
    g = torch.Generator().manual_seed(B * 1000 + K)
    q = torch.randn(B, Hq, n, d, generator=g).to(dtype)
    k = torch.randn(Hkv, K, d, generator=g).to(dtype)
    v = torch.randn(Hkv, K, d, generator=g).to(dtype)
    scale = 1 / math.sqrt(d)
    o, lse = prefix_attention(q, k, v, scale, split_len=split_len)
    assert o.shape == (B, Hq, n, d) and lse.shape == (B, Hq, n)
    assert torch.isfinite(o).all() and torch.isfinite(lse).all()
    o64, lse64 = prefix_attention_ref(q, k, v, scale)
    # plain PyTorch in the same dtype, against the same float64 truth
    ot, lt = prefix_attention_ref(q, k, v, scale, dtype=torch.float32 if dtype == torch.float32 else dtype)
    err_o, err_t = (o.double() - o64).abs().max().item(), (ot.double() - o64).abs().max().item()
    err_l, err_lt = (lse.double() - lse64).abs().max().item(), (lt.double() - lse64).abs().max().item()
    floor = 1e-5 if dtype == torch.float32 else 1e-3
    assert err_o <= max(2 * err_t, floor), (err_o, err_t)
    assert err_l <= max(2 * err_lt, floor), (err_l, err_lt)


def test_prefix_attention_merges_with_a_suffix_like_one_softmax():
    """Prefix part + a suffix part merged by their log-sum-exps = attention over both."""
    g = torch.Generator().manual_seed(3)
    B, Hq, Hkv, d, K, T = 2, 4, 2, 16, 33, 5
    q = torch.randn(B, Hq, 1, d, generator=g)
    kp, vp = torch.randn(Hkv, K, d, generator=g), torch.randn(Hkv, K, d, generator=g)
    ks, vs = torch.randn(B, Hkv, T, d, generator=g), torch.randn(B, Hkv, T, d, generator=g)
    o_p, l_p = prefix_attention(q, kp, vp, d ** -0.5, split_len=16)
    rep = lambda t: t.repeat_interleave(Hq // Hkv, dim=1)   # noqa: E731
    s_s = (q.double() @ rep(ks).double().transpose(-1, -2)) * d ** -0.5
    l_s = torch.logsumexp(s_s, -1)
    o_s = torch.softmax(s_s, -1) @ rep(vs).double()
    lse = torch.logaddexp(l_p.double(), l_s)
    o = o_p.double() * (l_p.double() - lse).exp()[..., None] + o_s * (l_s - lse).exp()[..., None]
    k_all = torch.cat([kp[None].expand(B, -1, -1, -1), ks], 2)
    v_all = torch.cat([vp[None].expand(B, -1, -1, -1), vs], 2)
    want = torch.softmax((q.double() @ rep(k_all).double().transpose(-1, -2)) * d ** -0.5, -1) @ rep(v_all).double()
    torch.testing.assert_close(o, want, rtol=1e-5, atol=1e-6)


def test_bad_shapes_are_named():
    q, k = torch.randn(1, 6, 1, 16), torch.randn(4, 8, 16)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        prefix_attention(q, k, k, 0.25)
    with pytest.raises(ValueError, match=r"q must be \[B, Hq, n, d\]"):
        prefix_attention(q[0], k, k, 0.25)


DECODE_CASES = [  # B, Hq, Hkv, K (0: no prefix), S, d, prefix split, suffix split
    (1, 4, 4, 1, 1, 16, None, None),        # one row, group 1, one prefix position, one own slot
    (3, 8, 2, 97, 11, 32, 32, 4),           # group 4; prefix in 4 splits, suffix in 3
    (2, 8, 1, 130, 40, 24, 64, None),       # group 8, d not a power of two
    (5, 9, 3, 7, 9, 16, None, 5),           # group 3 (SmolLM2's), a 7-token prefix
    (4, 8, 2, 0, 13, 16, None, None),       # no prefix at all (answers without a context)
]


@pytest.mark.parametrize("launches", ["one", "two", "merge_in_suffix", "merge_in_suffix_loops", "merge_in_suffix_pipe"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,Hq,Hkv,K,S,d,split_len,suffix_split", DECODE_CASES)
def test_cascade_decode_matches_float64(B, Hq, Hkv, K, S, d, split_len, suffix_split, dtype, launches, monkeypatch):
    """Rows of different suffix lengths (left padding lo[b]) and a current slot short of S:
    slots past it hold garbage that must not be read. Prefix and suffix tiles in one launch,
    in two with the merge kernel after them, or in two with the suffix programs merging (where
    the suffix is one split; otherwise that setting takes the merge kernel too), the prefix
    partials read unrolled, in runtime loops, or as one tile of log-sum-exps and a pipelined loop."""
    monkeypatch.setattr(pa, "ONE_LAUNCH", launches == "one")
    monkeypatch.setattr(pa, "MERGE_IN_SUFFIX", launches.startswith("merge_in_suffix"))
    monkeypatch.setattr(pa, "UNROLL_SP", launches == "merge_in_suffix")
    monkeypatch.setattr(pa, "MERGE_PIPE", launches == "merge_in_suffix_pipe")
    g = torch.Generator().manual_seed(B * 100 + S)
    q = torch.randn(B, Hq, d, generator=g).to(dtype)
    pk = torch.randn(Hkv, K, d, generator=g).to(dtype) if K else None
    pv = torch.randn(Hkv, K, d, generator=g).to(dtype) if K else None
    ks = torch.randn(B, Hkv, S, d, generator=g).to(dtype)
    vs = torch.randn(B, Hkv, S, d, generator=g).to(dtype)
    cur = torch.tensor([max(0, S - 3)], dtype=torch.int32)
    lo = torch.randint(0, int(cur) + 1, (B,), generator=g).to(torch.int32)
    ks[:, :, int(cur) + 1:] = float("nan")          # unwritten slots
    vs[:, :, int(cur) + 1:] = float("nan")
    scale = d ** -0.5
    o = cascade_decode(q, pk, pv, ks, vs, lo, cur, scale, split_len=split_len, suffix_split=suffix_split)
    assert o.shape == (B, Hq, d) and o.dtype == dtype and torch.isfinite(o).all()
    clean = lambda t: torch.nan_to_num(t, nan=0.0)   # noqa: E731  the reference masks them out
    o64 = cascade_decode_ref(q, pk, pv, clean(ks), clean(vs), lo, cur, scale)
    ot = cascade_decode_ref(q, pk, pv, clean(ks), clean(vs), lo, cur, scale, dtype=dtype)   # plain, same dtype
    err, err_t = (o.double() - o64).abs().max().item(), (ot.double() - o64).abs().max().item()
    floor = 1e-5 if dtype == torch.float32 else 1e-3
    assert err <= max(2 * err_t, floor), (err, err_t)


@pytest.mark.parametrize("launches", ["one", "two", "merge_in_suffix", "merge_in_suffix_loops"])
@pytest.mark.parametrize("B,Hq,Hkv,K,S,d,split_len,suffix_split", DECODE_CASES)
def test_cascade_decode_with_16_bit_partials_matches_float64(B, Hq, Hkv, K, S, d, split_len, suffix_split, launches,
                                                            monkeypatch):
    """prefix_attention.PARTIALS_16: the prefix's and the split suffix's partial outputs in bf16
    (rounded once a split, after normalising) — the output still within 2× the plain bf16 path's
    error against float64. A merge that read the 16-bit buffer as fp32 would read garbage."""
    monkeypatch.setattr(pa, "PARTIALS_16", True)
    monkeypatch.setattr(pa, "POISON", True)
    test_cascade_decode_matches_float64(B, Hq, Hkv, K, S, d, split_len, suffix_split, torch.bfloat16, launches,
                                        monkeypatch)


def test_partials_are_16_bit_only_from_min_splits_by_default(monkeypatch):
    """PARTIALS_16 None (the default): the prefix partials in bf16 where the prefix runs in at
    least PARTIALS_16_MIN_SPLITS splits (64 rows of the 8B heads: 8), fp32 below (400 rows: 1,
    where 16-bit measured slower); fp32 models always fp32."""
    monkeypatch.setattr(pa, "PARTIALS_16", None)
    made, orig = [], pa._buffer
    monkeypatch.setattr(pa, "_buffer", lambda shape, device, dtype=torch.float32: made.append((tuple(shape), dtype)) or
                        orig(shape, device, dtype))
    g = torch.Generator().manual_seed(3)
    for dtype, split_len, want in ((torch.bfloat16, 25, torch.bfloat16), (torch.bfloat16, 50, torch.float32),
                                   (torch.float32, 25, torch.float32)):
        q = torch.randn(2, 8, 16, generator=g).to(dtype)
        pk, pv = (torch.randn(2, 100, 16, generator=g).to(dtype) for _ in range(2))
        ks, vs = (torch.randn(2, 2, 5, 16, generator=g).to(dtype) for _ in range(2))
        made.clear()
        cascade_decode(q, pk, pv, ks, vs, torch.zeros(2, dtype=torch.int32), torch.tensor([4], dtype=torch.int32),
                       0.25, split_len=split_len)
        prefix_out = [dt for shape, dt in made if len(shape) == 4 and shape[-1] == 16]   # o_p [Hkv, SP, M, d]
        assert prefix_out == [want], (dtype, split_len, made)


@pytest.mark.parametrize("launches", ["one", "merge_in_suffix"])
def test_prefix_cfg_sets_the_tile_and_the_split_length(launches, monkeypatch):
    """PREFIX_CFG (benchmarks set it: bench_generate --prefix-tile) with a "split_len": the prefix
    runs in that many positions a split — 5 splits of 20 over 97 positions here, where the default
    choice makes one — unless the caller passes split_len; the output still within bounds."""
    monkeypatch.setattr(pa, "ONE_LAUNCH", launches == "one")
    monkeypatch.setattr(pa, "MERGE_IN_SUFFIX", launches == "merge_in_suffix")
    monkeypatch.setattr(pa, "PARTIALS_16", False)
    made, orig = [], pa._buffer
    monkeypatch.setattr(pa, "_buffer", lambda shape, device, dtype=torch.float32: made.append(tuple(shape)) or
                        orig(shape, device, dtype))
    g = torch.Generator().manual_seed(11)
    q = torch.randn(3, 8, 16, generator=g).bfloat16()
    pk, pv = (torch.randn(2, 97, 16, generator=g).bfloat16() for _ in range(2))
    ks, vs = (torch.randn(3, 2, 6, 16, generator=g).bfloat16() for _ in range(2))
    lo, cur = torch.tensor([0, 2, 5], dtype=torch.int32), torch.tensor([5], dtype=torch.int32)
    o64 = cascade_decode_ref(q, pk, pv, ks, vs, lo, cur, 0.25)
    ot = cascade_decode_ref(q, pk, pv, ks, vs, lo, cur, 0.25, dtype=torch.bfloat16)
    floor = max(2 * (ot.double() - o64).abs().max().item(), 1e-3)
    for cfg_split, arg, want in ((None, None, 1), (20, None, 5), (20, 50, 2)):
        cfg = dict(block_m=16, block_n=16, num_warps=4, num_stages=2, **({"split_len": cfg_split} if cfg_split else {}))
        monkeypatch.setattr(pa, "PREFIX_CFG", cfg)
        made.clear()
        o = cascade_decode(q, pk, pv, ks, vs, lo, cur, 0.25, split_len=arg)
        assert [sh[1] for sh in made if len(sh) == 4 and sh[0] == 2] == [want], (cfg_split, arg, made)   # o_p [Hkv, SP, M, d]
        assert (o.double() - o64).abs().max().item() <= floor


@pytest.mark.parametrize("launches", ["one", "two", "merge_in_suffix"])
def test_cascade_decode_skips_empty_suffix_splits(launches, monkeypatch):
    """Suffix splits of 8 slots over a 40-slot cache at cur 12: splits past cur are empty, and
    so is split 0 for rows whose left padding (lo 9, 11) covers it — nothing of them is read
    (the padding holds finite garbage, the slots past cur NaN)."""
    monkeypatch.setattr(pa, "ONE_LAUNCH", launches == "one")
    monkeypatch.setattr(pa, "MERGE_IN_SUFFIX", launches == "merge_in_suffix")
    g = torch.Generator().manual_seed(5)
    B, Hq, Hkv, K, S, d = 3, 8, 2, 20, 40, 16
    q = torch.randn(B, Hq, d, generator=g)
    pk, pv = torch.randn(Hkv, K, d, generator=g), torch.randn(Hkv, K, d, generator=g)
    ks, vs = torch.randn(B, Hkv, S, d, generator=g) * 3, torch.randn(B, Hkv, S, d, generator=g)
    cur = torch.tensor([12], dtype=torch.int32)
    lo = torch.tensor([0, 9, 11], dtype=torch.int32)
    ks[:, :, 13:] = float("nan")
    vs[:, :, 13:] = float("nan")
    o = cascade_decode(q, pk, pv, ks, vs, lo, cur, d ** -0.5, suffix_split=8)
    clean = lambda t: torch.nan_to_num(t, nan=0.0)   # noqa: E731
    o64 = cascade_decode_ref(q, pk, pv, clean(ks), clean(vs), lo, cur, d ** -0.5)
    assert torch.isfinite(o).all() and (o.double() - o64).abs().max().item() < 1e-5


def _plain_prefix(strided: bool):
    """A prefix= for cascade_decode by other means than the kernel: the plain softmax of
    decode.attend_prefix; strided: its o handed over as a view whose query-vector stride is not
    d and in the inputs' dtype (as a fused attention op may return it). In fp32 (the plain bf16
    path rounds the scores to bf16: what is tested here is the stacking and the merge)."""
    from iicl_fast.decode import attend_prefix

    def fn(q, pk, pv, scale):
        o, lse = attend_prefix(q.float(), pk.float(), pv.float(), scale, flash=False)
        if strided:
            o = o.to(q.dtype).transpose(0, 1).contiguous().transpose(0, 1)     # [Hkv, M, d], m stride Hkv·d
        return o, lse
    return fn


@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,Hq,Hkv,K,S,d,split_len,suffix_split", [c for c in DECODE_CASES if c[3]])
def test_cascade_decode_takes_the_prefix_part_from_a_function(B, Hq, Hkv, K, S, d, split_len, suffix_split,
                                                             dtype, strided):
    """prefix=fn (decode's flash op on CUDA): the rows × group stacked per KV head in the
    kernel's order, fn's (o, lse) merged with the suffix partials — against float64 as the
    kernel is; fn -> None: the kernel's own result."""
    g = torch.Generator().manual_seed(B * 100 + S + 1)
    q = torch.randn(B, Hq, d, generator=g).to(dtype)
    pk, pv = (torch.randn(Hkv, K, d, generator=g).to(dtype) for _ in range(2))
    ks, vs = (torch.randn(B, Hkv, S, d, generator=g).to(dtype) for _ in range(2))
    cur = torch.tensor([max(0, S - 3)], dtype=torch.int32)
    lo = torch.randint(0, int(cur) + 1, (B,), generator=g).to(torch.int32)
    scale = d ** -0.5
    o = cascade_decode(q, pk, pv, ks, vs, lo, cur, scale, suffix_split=suffix_split, prefix=_plain_prefix(strided))
    assert o.shape == (B, Hq, d) and o.dtype == dtype and torch.isfinite(o).all()
    o64 = cascade_decode_ref(q, pk, pv, ks, vs, lo, cur, scale)
    ot = cascade_decode_ref(q, pk, pv, ks, vs, lo, cur, scale, dtype=dtype)
    err, err_t = (o.double() - o64).abs().max().item(), (ot.double() - o64).abs().max().item()
    floor = 1e-5 if dtype == torch.float32 else 1e-3
    assert err <= max(2 * err_t, floor), (err, err_t)
    kernel = cascade_decode(q, pk, pv, ks, vs, lo, cur, scale, suffix_split=suffix_split, split_len=split_len)
    none = cascade_decode(q, pk, pv, ks, vs, lo, cur, scale, suffix_split=suffix_split, split_len=split_len,
                          prefix=lambda *a: None)
    assert torch.equal(kernel, none)


def test_cascade_decode_sees_exactly_lo_to_cur():
    """Moving cur by one slot or a row's lo by one changes that row's output (and only it)."""
    g = torch.Generator().manual_seed(7)
    B, H, S, d = 3, 2, 12, 16
    q = torch.randn(B, H, d, generator=g)
    ks, vs = torch.randn(B, H, S, d, generator=g), torch.randn(B, H, S, d, generator=g)
    pk, pv = torch.randn(H, 5, d, generator=g), torch.randn(H, 5, d, generator=g)
    lo = torch.tensor([0, 2, 4], dtype=torch.int32)
    base = cascade_decode(q, pk, pv, ks, vs, lo, torch.tensor([8], dtype=torch.int32), 0.25)
    more = cascade_decode(q, pk, pv, ks, vs, lo, torch.tensor([9], dtype=torch.int32), 0.25)
    assert ((more - base).abs().amax((1, 2)) > 1e-4).all()
    lo2 = lo.clone()
    lo2[1] += 1
    moved = cascade_decode(q, pk, pv, ks, vs, lo2, torch.tensor([8], dtype=torch.int32), 0.25)
    diff = (moved - base).abs().amax((1, 2))
    assert diff[1] > 1e-4 and diff[0] == 0 and diff[2] == 0


def test_cascade_decode_bad_inputs_are_named():
    q, ks = torch.randn(2, 4, 16), torch.randn(2, 2, 8, 16)
    lo, cur = torch.zeros(2, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="lo must be int32"):
        cascade_decode(q, None, None, ks, ks, lo.long(), cur, 0.25)
    with pytest.raises(ValueError, match=r"ks, vs \[B, Hkv, S, d\]"):
        cascade_decode(q, None, None, ks[0], ks[0], lo, cur, 0.25)
    with pytest.raises(ValueError, match="prefix k/v"):
        cascade_decode(q, torch.randn(3, 5, 16), torch.randn(3, 5, 16), ks, ks, lo, cur, 0.25)
