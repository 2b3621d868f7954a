"""consolidate_many (a LoraBank trained together) matches consolidating each text alone."""
import pytest
import torch

import iicl_fast
from iicl_fast import IICLError

from conftest import TINY_CONFIG, make_tiny

DOCS = ["The lighthouse of Karsk was built in 1871 by Ada Lindqvist. Its lamp burns whale oil.",
        "The keeper feeds seven grey cats every morning.",
        "Harbour master Olle Brand counts the ships at night and writes their names in a red book."]


def test_consolidate_many_matches_one_at_a_time(smol_tokenizer):
    tok = smol_tokenizer
    cfg = dict(TINY_CONFIG, chunk_tokens=12)               # the first text is two chunks: two rounds
    alone = []
    for d in DOCS:
        model = make_tiny(tok)
        mem = iicl_fast.Memory(model, tok, iicl_fast.Config(**cfg))
        reps = list(mem.stream(d))
        alone.append((reps, mem))
    model = make_tiny(tok)
    mems = iicl_fast.consolidate_many(model, tok, DOCS, iicl_fast.Config(**cfg))
    assert len(mems) == 3 and len({m.name for m in mems}) == 3
    assert len(mems[0].chunks) >= 2 and len(mems[1].chunks) == 1          # rounds with a document missing
    assert all(float(p.detach().abs().max()) > 0 for m in mems for n, p in m.model.named_parameters()
               if f"lora_B.{m.name}." in n)                              # every adapter trained
    ids = torch.tensor([tok(DOCS[0], add_special_tokens=False)["input_ids"][:10]])
    for (reps, single), many in zip(alone, mems):
        assert many.chunks == single.chunks
        assert many.report.kept == reps[-1].kept
        # loss curves of the last round within 1e-4 relative (fp32; batch padding differs)
        torch.testing.assert_close(torch.tensor(many.report.loss_per_epoch), torch.tensor(reps[-1].loss_per_epoch),
                                   rtol=1e-4, atol=1e-5)
        for a, b in zip(single.params, many.params):
            torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-4)
        many._activate()
        single._activate()
        with torch.no_grad():
            torch.testing.assert_close(many.model(input_ids=ids).logits, single.model(input_ids=ids).logits,
                                       rtol=2e-3, atol=2e-3)


def test_consolidate_many_bad_input(tiny):
    model, tok = tiny
    with pytest.raises(IICLError, match="no texts"):
        iicl_fast.consolidate_many(model, tok, [], iicl_fast.Config(**TINY_CONFIG))
    with pytest.raises(IICLError, match="text 1 is empty"):
        iicl_fast.consolidate_many(model, tok, ["a text.", "  "], iicl_fast.Config(**TINY_CONFIG))
