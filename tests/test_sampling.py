"""iicl_fast/kernels/sampling.py (nucleus sampling without a sort) under the Triton interpreter: many
draws on a small vocabulary follow the exact nucleus distribution (reference_sampling.py),
tokens outside the nucleus never come, blocks of the vocabulary ragged at the edge, and
draws are reproducible from the device seed."""

import pytest
import torch

from iicl_fast.kernels import sampling
from iicl_fast.kernels.reference_sampling import top_p_probs_ref
from iicl_fast.kernels.sampling import sample_top_p


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    monkeypatch.setattr(sampling, "POISON", True)


def draws(logits_row, n, temperature, top_p, block_v, seed=1):
    z = logits_row[None].expand(n, -1).contiguous()
    tok = sample_top_p(z, torch.tensor([seed]), temperature, top_p, block_v=block_v)
    assert tok.dtype == torch.int64 and tok.shape == (n,) and (tok >= 0).all()
    return tok


# 1,000 draws a case: the interpreter takes ~20-40 ms a row (every tl.sum / tl.cumsum is a
# nested jit call there)
@pytest.mark.parametrize("top_p,temperature,block_v", [(0.5, 0.7, 16), (0.9, 1.0, 16), (0.9, 1.0, 64), (1.0, 1.3, 64)])
def test_draws_follow_the_nucleus_distribution(top_p, temperature, block_v):
    g = torch.Generator().manual_seed(11)
    V, n = 37, 1000                                         # 37: three blocks of 16, the last ragged
    z = torch.randn(V, generator=g) * 2
    z[5] = float("-inf")                                    # never
    want = top_p_probs_ref(z[None], temperature, top_p)[0]
    tok = draws(z, n, temperature, top_p, block_v)
    freq = torch.bincount(tok, minlength=V).double() / n
    assert freq[want == 0].sum() == 0, "a token outside the nucleus was drawn"
    tol = 5 * torch.sqrt(want * (1 - want) / n) + 1.5 / n
    bad = ((freq - want).abs() > tol).nonzero().flatten().tolist()
    assert not bad, [(i, freq[i].item(), want[i].item()) for i in bad]
    if top_p < 1:                                           # the nucleus is a strict subset here
        assert (want == 0).sum() > 1


def test_seed_reproduces_and_changes_draws():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(20, 101, generator=g)
    a = sample_top_p(z, torch.tensor([7]), 1.0, 0.95)
    b = sample_top_p(z, torch.tensor([7]), 1.0, 0.95)
    c = sample_top_p(z, torch.tensor([8]), 1.0, 0.95)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_keyed_rows_draw_the_same_in_any_order():
    """keys: a row's draw depends on its key, not on its place in the batch (a row sharded to
    another process, or compacted, draws what it would have drawn); without keys, rows with
    equal logits differ by index."""
    g = torch.Generator().manual_seed(4)
    z = torch.randn(9, 53, generator=g)
    keys = torch.tensor([5, 0, 17, 3, 1000, 8, 2, 77, 41])
    a = sample_top_p(z, torch.tensor([7]), 1.0, 0.9, keys=keys)
    perm = torch.tensor([4, 8, 0, 2, 7, 1, 6, 3, 5])
    b = sample_top_p(z[perm], torch.tensor([7]), 1.0, 0.9, keys=keys[perm])
    assert torch.equal(a[perm], b)
    part = sample_top_p(z[2:5], torch.tensor([7]), 1.0, 0.9, keys=keys[2:5])      # a shard
    assert torch.equal(part, a[2:5])
    same = z[:1].expand(8, -1).contiguous()                 # equal rows, distinct keys: not one draw
    assert len(set(sample_top_p(same, torch.tensor([7]), 1.5, 1.0, keys=torch.arange(8) * 3).tolist())) > 1
    with pytest.raises(ValueError, match="keys must be int64"):
        sample_top_p(z, torch.tensor([7]), keys=keys[:3])


def test_one_token_vocab_and_a_peaked_row():
    assert sample_top_p(torch.zeros(3, 1), torch.tensor([0]), 1.0, 0.9).tolist() == [0, 0, 0]
    z = torch.full((2, 97), -30.0)
    z[0, 96], z[1, 0] = 10.0, 10.0                          # the only token of the nucleus
    assert sample_top_p(z, torch.tensor([0]), 0.7, 0.9).tolist() == [96, 0]


def test_bad_inputs_are_named():
    z = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="seed must be one int64"):
        sample_top_p(z, torch.tensor([1.0]), 1.0, 0.9)
    with pytest.raises(ValueError, match="top_p in"):
        sample_top_p(z, torch.tensor([1]), 1.0, 0.0)
    with pytest.raises(ValueError, match=r"logits must be \[B, V\]"):
        sample_top_p(z[0], torch.tensor([1]), 1.0, 0.9)
