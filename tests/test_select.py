import math

import pytest
import torch

from iicl_fast.select import delta_ppl, select_by_ppl_gap


def test_delta_ppl_is_mean_gap_per_entry():
    lp_t = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.0, -1.0])
    lp_s = torch.tensor([-2.0, -2.0, -4.5, -3.0, -0.0, -2.0])
    offsets = [0, 2, 3, 6]   # entries of 2, 1, 3 tokens
    gaps = delta_ppl(lp_t, lp_s, offsets)
    assert gaps.tolist() == pytest.approx([0.5, 4.0, (0.0 - 1.0 + 1.0) / 3])


def test_empty_response_ranks_last():
    gaps = delta_ppl(torch.tensor([-1.0]), torch.tensor([-2.0]), [0, 0, 1])
    assert math.isinf(gaps[0]) and gaps[0] < 0 and gaps[1] == 1.0
    assert select_by_ppl_gap(gaps, top_k=1) == [1]


def test_select_by_ratio_and_top_k():
    gaps = torch.tensor([0.1, 2.0, -1.0, 0.7, 0.7])
    assert select_by_ppl_gap(gaps, ratio=1.0) == [0, 1, 2, 3, 4]
    assert select_by_ppl_gap(gaps, ratio=0.4) == [1, 3]          # ceil(0.4·5)=2, tie 3 vs 4 → earlier
    assert select_by_ppl_gap(gaps, ratio=0.5) == [1, 3, 4]       # ceil(2.5)=3, original order kept
    assert select_by_ppl_gap(gaps, top_k=1) == [1]
    assert select_by_ppl_gap(gaps, ratio=0.2, top_k=4) == [0, 1, 3, 4]  # top_k wins
    assert select_by_ppl_gap(gaps, top_k=99) == [0, 1, 2, 3, 4]
