"""iicl_fast/kernels/l2_prefetch.py under the Triton interpreter: the lanes' spans (what each
would prefetch) tile a tensor's first bytes exactly — every 16-byte-aligned byte below the
clipped count once, nothing at or past it — at odd sizes; bad input is one clear error. (The
PTX itself is compiled for sm_90 in test_sm90_compile.py; that it changes no value, in
test_decode.py and on the GPU.)"""
import pytest
import torch

from iicl_fast.kernels import l2_prefetch as P


def _covered(spans: torch.Tensor) -> list[tuple[int, int]]:
    live = spans[spans[:, 1] > 0]
    return sorted((int(o), int(o + n)) for o, n in live.tolist())


@pytest.mark.parametrize("shape,dtype", [((1,), torch.float32), ((7, 3), torch.bfloat16), ((97, 1031), torch.float16),
                                         ((2, P.BLOCK * P.SUB // 4 + 5), torch.float32)])
@pytest.mark.parametrize("frac", [0.0, 0.37, 1.0, 3.0])
def test_spans_tile_the_first_bytes(shape, dtype, frac):
    w = torch.randn(shape).to(dtype)
    size = w.numel() * w.element_size()
    ask = int(size * frac) + (7 if frac else 0)            # ragged: not a multiple of 16
    spans = P.l2_prefetch_spans(w, ask)
    want = min(ask, size) // 16 * 16
    assert (spans >= 0).all()                              # every lane wrote (the buffer starts at -1)
    got = _covered(spans)
    end = 0
    for lo, hi in got:                                     # contiguous, in order, no overlap
        assert lo == end and hi - lo <= P.SUB and lo % 16 == 0 and (hi - lo) % 16 == 0
        end = hi
    assert end == want
    assert spans.shape[0] == (-(-want // (P.BLOCK * P.SUB))) * P.BLOCK


@pytest.mark.parametrize("start", [1, 3, 5])
def test_spans_start_at_the_first_aligned_byte(start):
    """A view that starts off a 16-byte boundary (bf16 at an odd element): the spans begin at its
    first aligned byte and stay inside it."""
    base = torch.randn(4 * P.SUB).to(torch.bfloat16)
    w = base[start:start + 3001]
    skip = -w.data_ptr() % 16
    assert skip                                            # the storage offset left it unaligned
    spans = P.l2_prefetch_spans(w, 10 ** 9)
    got = _covered(spans)
    assert got[0][0] == 0 and got[-1][1] == (w.numel() * 2 - skip) // 16 * 16
    assert sum(hi - lo for lo, hi in got) == got[-1][1]


def test_bad_input_is_one_clear_error():
    w = torch.randn(8, 8)
    with pytest.raises(ValueError, match="contiguous"):
        P.l2_prefetch_spans(w.t(), 64)
    with pytest.raises(ValueError, match="nbytes must be >= 0"):
        P.l2_prefetch_spans(w, -1)
    with pytest.raises(ValueError, match="hint must be one of"):
        P.l2_prefetch(w, 64, hint="first")
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        P.l2_prefetch(w, 64)
