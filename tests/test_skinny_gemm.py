"""iicl_fast/kernels/skinny_gemm.py (x Wᵀ for few rows, split K with an in-kernel fixup) against
float64, under the Triton interpreter on the CPU: 1, 7, 16 and 97 rows, N and K that are
multiples of no block, one split and several (the last ragged), with and without the added
term, fp32 / fp16 / bf16. The output and the workspace are NaN-poisoned by the launcher, so an
unwritten element or an unwritten partial fails."""
import pytest
import torch

from iicl_fast.kernels import skinny_gemm as sg
from iicl_fast.kernels.reference_skinny_gemm import skinny_linear_ref
from iicl_fast.kernels.skinny_gemm import skinny_linear


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    monkeypatch.setattr(sg, "POISON", True)


def _inputs(M, N, K, dtype, seed, add):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype)
    a = torch.randn(M, N, generator=g).to(dtype) if add else None
    return x, w, a


def _bound(x, w, a):
    """(float64 result, the plain path's error in the same dtype against it: fp32 accumulation,
    one rounding; at least half an ulp of the largest output — a few elements can all round
    closely by chance). The kernel may be at most twice it: the interpreter casts to bf16 by
    truncation (one ulp, where a GPU rounds to nearest)."""
    want = skinny_linear_ref(x, w, a, dtype=torch.float64)
    plain = skinny_linear_ref(x.float(), w.float(), None if a is None else a.float()).to(x.dtype)
    half_ulp = torch.finfo(x.dtype).eps / 2 * want.abs().max().item()
    return want, max((plain.double() - want).abs().max().item(), half_ulp)


CASES = [  # M, N, K, cfg
    (1, 1, 5, dict(block_n=16, block_k=16, split_k=1, num_warps=4, num_stages=2)),
    (7, 97, 130, dict(block_n=32, block_k=32, split_k=1, num_warps=4, num_stages=2)),
    (7, 97, 130, dict(block_n=32, block_k=32, split_k=3, num_warps=4, num_stages=2)),   # splits 64, 64, 2
    (16, 40, 256, dict(block_n=16, block_k=32, split_k=4, num_warps=4, num_stages=2)),  # every split whole
    (97, 33, 515, dict(block_n=32, block_k=64, split_k=2, num_warps=4, num_stages=2)),
    (5, 300, 200, None),                                                                  # the default choice
]


@pytest.mark.parametrize("add", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,N,K,cfg", CASES)
def test_skinny_linear_matches_float64(monkeypatch, M, N, K, cfg, dtype, add):
    monkeypatch.setattr(sg, "CFG", cfg)
    x, w, a = _inputs(M, N, K, dtype, M * 1000 + N + K, add)
    y = skinny_linear(x, w, a)
    assert y.shape == (M, N) and y.dtype == dtype and torch.isfinite(y).all()
    want, plain_err = _bound(x, w, a)
    err = (y.double() - want).abs().max().item()
    if dtype == torch.float32:
        assert err <= 1e-5 * max(1.0, want.abs().max().item())
    else:                                  # both round an fp32 sum once: the same error, up to order
        assert err <= 2 * plain_err + 1e-6, (err, plain_err)


def test_split_k_leaves_its_counters_at_zero_and_repeats_exactly(monkeypatch):
    """The fixup's counters return to 0 (a second launch, as a graph replay, counts afresh) and
    the split-order sum makes repeated launches bit-identical."""
    monkeypatch.setattr(sg, "CFG", dict(block_n=16, block_k=16, split_k=5, num_warps=4, num_stages=2))
    x, w, a = _inputs(9, 50, 77, torch.bfloat16, 3, True)
    y1 = skinny_linear(x, w, a)
    assert int(sg._counters(x.device, 4)[:8].abs().sum()) == 0
    y2 = skinny_linear(x, w, a)
    assert torch.equal(y1, y2)
    want, plain_err = _bound(x, w, a)
    assert (y1.double() - want).abs().max().item() <= 2 * plain_err + 1e-6


def test_default_choice_splits_narrow_outputs():
    """The default settings give a narrow, deep product (the 8B down projection's shape) several
    splits and a wide one (gate/up) none."""
    down = sg._cfg(64, 4096, 14336)
    wide = sg._cfg(64, 28672, 4096)
    assert down["split_k"] > 1 and wide["split_k"] == 1
    assert -(-4096 // down["block_n"]) * down["split_k"] >= sg.SMS      # programs: column tiles × splits


@pytest.mark.parametrize("bad,match", [
    (lambda: (torch.zeros(3, 4), torch.zeros(5, 6), None), r"x must be \[M, K\] and w \[N, K\]"),
    (lambda: (torch.zeros(129, 4), torch.zeros(5, 4), None), "129 rows"),
    (lambda: (torch.zeros(3, 4), torch.zeros(5, 4, dtype=torch.float64), None), "share a float dtype"),
    (lambda: (torch.zeros(4, 3).t(), torch.zeros(5, 4), None), "contiguous rows"),
    (lambda: (torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(3, 4)), r"add must be \[M=3, N=5\]"),
])
def test_bad_inputs_name_the_problem(bad, match):
    with pytest.raises(ValueError, match=match):
        skinny_linear(*bad())
