"""consolidate_many (a LoraBank trained together) matches consolidating each text alone."""
import pytest
import torch

import iicl_fast
from iicl_fast import IICLError

from conftest import TINY_CONFIG, make_tiny

DOCS = ["The lighthouse of Karsk was built in 1871 by Ada Lindqvist. Its lamp burns whale oil.",
        "The keeper feeds seven grey cats every morning.",
        "Harbour master Olle Brand counts the ships at night and writes their names in a red book."]


def peaked_tiny(tok):
    """The tiny random Llama with its (tied) embeddings ×10, so that its next-token
    distributions are peaked (top-1 ≈ 0.64 on average) instead of near-uniform over 49K
    tokens. On the plain tiny model, top-p 0.9 keeps ~42,700 tokens of ~2e-5 each: a change
    of the adapter in its last bits moves the sampler's CDF across a boundary, so the second
    round's transfer set differs between two correct implementations (measured: entry 10 of
    12 differed from its 3rd token on, 2 threads; bit-identical with OMP_NUM_THREADS=1)."""
    model = make_tiny(tok)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(10.0)
    return model


@pytest.fixture
def one_thread():
    """torch on one intra-op thread inside (restored after): the comparison below must not depend
    on the machine's cores. Run alone on 2 cores (2 threads), the anchors=3 case's logits differed
    by 2.66e-3 at 2 of 491,520 elements (over its 2e-3); with one thread, or inside the whole
    suite, it passed (34th session)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("anchors", [0, 3])
def test_consolidate_many_matches_one_at_a_time(smol_tokenizer, anchors, one_thread):
    """Same transfer sets, same loss curves, same function; weights equal up to what Adam does
    with rounding-level gradient differences.

    The bank trains every document's micro-batch in one padded forward, so its sums run in
    another order than one document's alone (and, with intra-op threads, in other blocks):
    last-bit differences. The tiny model's KL is ~3e-5, its gradients ~1e-5, and Adam's
    normalised step g/(√v+eps) turns a rounding-level difference in a near-zero gradient
    into up to a whole step of lr. Measured over seeds 0–7: ‖Δw‖/‖w − w0‖ per tensor 1.6e-5 …
    5.2e-2 (seed 0: 2.0e-3), against 0.07 … 1.3 between two different documents' adapters."""
    tok = smol_tokenizer
    # the first text is two chunks: two rounds; with anchors, prose anchors too (the default's 16 at 0)
    cfg = dict(TINY_CONFIG, chunk_tokens=12, anchor_entries=anchors, prose_anchors=anchors)
    alone = []
    for d in DOCS:
        mem = iicl_fast.Memory(peaked_tiny(tok), tok, iicl_fast.Config(**cfg))
        reps = list(mem.stream(d))
        alone.append((reps, mem))
    model = peaked_tiny(tok)
    w0 = [p.detach().clone() for p in iicl_fast.Memory(peaked_tiny(tok), tok, iicl_fast.Config(**cfg)).params]
    mems = iicl_fast.consolidate_many(model, tok, DOCS, iicl_fast.Config(**cfg))
    assert len(mems) == 3 and len({m.name for m in mems}) == 3
    assert len(mems[0].chunks) >= 2 and len(mems[1].chunks) == 1          # rounds with a document missing
    assert all(float(p.detach().abs().max()) > 0 for m in mems for n, p in m.model.named_parameters()
               if f"lora_B.{m.name}." in n)                              # every adapter trained
    ids = torch.tensor([tok(DOCS[0], add_special_tokens=False)["input_ids"][:10]])
    for (reps, single), many in zip(alone, mems):
        assert many.chunks == single.chunks
        assert many.report.kept == reps[-1].kept and many.report.anchored == reps[-1].anchored == 2 * anchors
        # every round's kept entries (the replay buffer holds all of them here), token for token
        assert [(e.query, e.response) for e in many.replay[0]] == [(e.query, e.response) for e in single.replay[0]]
        # loss curves of the last round: the KL (~3e-5) is lse − h·μ − H, whose fp32 cancellation
        # leaves ~1e-7 absolute
        torch.testing.assert_close(torch.tensor(many.report.loss_per_epoch), torch.tensor(reps[-1].loss_per_epoch),
                                   rtol=1e-4, atol=1e-5)
        moved = torch.cat([(a - z).flatten() for a, z in zip(single.params, w0)]).norm()
        diff = torch.cat([(a - b).flatten() for a, b in zip(single.params, many.params)]).norm()
        assert diff <= 0.1 * moved, f"adapters differ by {float(diff / moved):.3g} of what training moved"
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
    with pytest.raises(IICLError, match="text 1 is a NoneType, not a string"):
        iicl_fast.consolidate_many(model, tok, ["a text.", None], iicl_fast.Config(**TINY_CONFIG))
    with pytest.raises(IICLError, match="list of texts"):        # not one document a character
        iicl_fast.consolidate_many(model, tok, "a text.", iicl_fast.Config(**TINY_CONFIG))


def test_bank_training_keeps_padded_rows_where_packing_is_the_default(smol_tokenizer, monkeypatch):
    """student_hidden packs a micro-batch in one row by default on CUDA; the bank routes each
    row (sequence) to its document's adapter, so its training forward must keep padded rows.
    With packing forced on here (the passes of each document pack, on the CPU's per-sequence
    attention), a bank round runs and trains every adapter."""
    from iicl_fast import teacher
    monkeypatch.setattr(teacher, "pack_by_default", lambda model, device: True)
    tok = smol_tokenizer
    mems = iicl_fast.consolidate_many(peaked_tiny(tok), tok, DOCS[:2], iicl_fast.Config(**TINY_CONFIG))
    assert all(m.report.loss_per_epoch for m in mems)
    assert all(float(p.detach().abs().max()) > 0 for m in mems for n, p in m.model.named_parameters()
               if f"lora_B.{m.name}." in n)
