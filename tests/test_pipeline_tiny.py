"""The whole pipeline on a tiny random Llama built from a config (no download)."""
import pytest
import torch

import iicl_fast
from iicl_fast.elicit import Entry
from iicl_fast.generation import generate
from iicl_fast.models import PromptFormat
from iicl_fast.teacher import teacher_hidden

from conftest import TINY_CONFIG, make_tiny

DOC = ("The lighthouse of Karsk was built in 1871 by Ada Lindqvist. Its lamp burns whale oil. "
       "The keeper feeds seven grey cats every morning.")


def test_prefix_reuse_teacher_matches_full_forward(tiny):
    model, tok = tiny
    fmt = PromptFormat(tok)
    entries = [Entry("qa", "Who built it?", fmt.encode("Ada Lindqvist built it.") + [fmt.eos_id]),
               Entry("qa", "What does the keeper feed every single morning?", fmt.encode("Seven cats.")),
               Entry("continuation", "Continue", fmt.encode("The lamp burns whale oil and more text"))]
    a = teacher_hidden(model, fmt, DOC, entries, batch_size=2, prefix_reuse=True, cascade=False)
    b = teacher_hidden(model, fmt, DOC, entries, batch_size=3, prefix_reuse=False)
    c = teacher_hidden(model, fmt, DOC, entries, batch_size=2, prefix_reuse=True, cascade=True)
    assert a.h.shape == (sum(len(e.response) for e in entries), 64)
    torch.testing.assert_close(a.h, b.h, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(c.h, b.h, rtol=1e-4, atol=1e-5)      # one prefix copy (decode.py)
    assert a.targets.tolist() == [t for e in entries for t in e.response]
    lengths = [len(e.response) for e in entries]
    assert a.offsets == b.offsets == [0, lengths[0], lengths[0] + lengths[1], sum(lengths)]


def test_teacher_states_from_the_decoder_equal_the_teacher_pass(tiny):
    """elicit(keep_hidden=True) hands the states its decoder computed for the rows it wrote;
    teacher_hidden(known=...) puts them in place and runs the pass over the rest (the source
    entries) only: the set equals the full pass (fp32), and a known state is what lands there."""
    from iicl_fast.elicit import elicit
    model, tok = tiny
    fmt = PromptFormat(tok)
    cfg = iicl_fast.Config(**{**TINY_CONFIG, "n_queries": 2, "source_entries": 2})
    entries, known = elicit(model, fmt, DOC, cfg, keep_hidden=True)
    assert [(e.kind, e.query, e.response) for e in entries] == [
        (e.kind, e.query, e.response) for e in elicit(model, fmt, DOC, cfg)]
    decoded = [e.kind in ("qa", "continuation") for e in entries]
    assert [k is not None for k in known] == decoded and sum(decoded) >= 4 and not all(decoded)
    full = teacher_hidden(model, fmt, DOC, entries, batch_size=3)
    reused = teacher_hidden(model, fmt, DOC, entries, batch_size=3, known=known)
    torch.testing.assert_close(reused.h, full.h, rtol=1e-4, atol=1e-5)
    assert torch.equal(reused.targets, full.targets) and reused.offsets == full.offsets
    shifted = teacher_hidden(model, fmt, DOC, entries, batch_size=3, known=[k if k is None else k + 1 for k in known])
    for i, k in enumerate(known):
        a, b = full.offsets[i], full.offsets[i + 1]
        torch.testing.assert_close(shifted.h[a:b], reused.h[a:b] + (0 if k is None else 1), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="known states for"):
        teacher_hidden(model, fmt, DOC, entries, known=known[:-1])
    bad = next(i for i, k in enumerate(known) if k is not None)
    with pytest.raises(ValueError, match=rf"known\[{bad}\] has shape"):
        teacher_hidden(model, fmt, DOC, entries, known=[k[:-1] if i == bad else k for i, k in enumerate(known)])


def test_consolidation_with_the_decoders_states_as_teacher(smol_tokenizer):
    """Config.teacher_from_elicit (default): the chunk's report counts only the source entries'
    tokens in the teacher pass, and selection and training go as with every entry through the
    pass (the same entries kept, losses within fp32 rounding)."""
    reps = []
    for reuse in (True, False):
        cfg = iicl_fast.Config(**{**TINY_CONFIG, "teacher_from_elicit": reuse, "anchor_entries": 0, "prose_anchors": 0})
        reps.append(iicl_fast.Memory(make_tiny(smol_tokenizer), smol_tokenizer, cfg).consolidate(DOC))
    on, off = reps
    assert on.elicited == off.elicited and on.kept == off.kept
    assert on.work["teacher_reused_tokens"] > 0 == off.work["teacher_reused_tokens"]
    assert on.work["teacher_tokens"] < off.work["teacher_tokens"]
    assert abs(on.dppl_kept - off.dppl_kept) < 1e-4 * max(1.0, abs(off.dppl_kept))
    assert on.loss_per_epoch == pytest.approx(off.loss_per_epoch, rel=1e-3)


def test_anchor_teacher_states_from_the_decoder(tiny, monkeypatch):
    """The anchors (chat prompts answered greedily, prose continued sampled; no chunk) take the
    decoder's states as their teacher too: no student pass runs over them, and the set equals
    the one the pass makes (fp32)."""
    from iicl_fast import teacher as T
    from iicl_fast.consolidate import anchor_set
    model, tok = tiny
    fmt = PromptFormat(tok)
    ran = []
    orig = T.student_hidden
    monkeypatch.setattr(T, "student_hidden", lambda m, f, es, *a, **k: ran.append(len(es)) or orig(m, f, es, *a, **k))
    sets = {}
    for reuse in (True, False):
        cfg = iicl_fast.Config(**{**TINY_CONFIG, "anchor_entries": 3, "prose_anchors": 3, "teacher_from_elicit": reuse})
        sets[reuse] = anchor_set(model, fmt, cfg, chunk_index=1)
        assert bool(ran) == (not reuse)
    (on, h_on), (off, h_off) = sets[True], sets[False]
    assert len(on) >= 4 and {e.kind for e in on} == {"anchor", "prose"}
    assert [(e.kind, e.query, e.response, e.raw) for e in on] == [(e.kind, e.query, e.response, e.raw) for e in off]
    torch.testing.assert_close(h_on.h, h_off.h, rtol=1e-4, atol=1e-5)
    assert h_on.offsets == h_off.offsets and torch.equal(h_on.targets, h_off.targets)


def test_generation_with_shared_prefix_matches_plain(tiny):
    model, tok = tiny
    fmt = PromptFormat(tok)
    prefix = fmt.context_prefix(DOC)
    queries = [fmt.query("Who built the lighthouse?"), fmt.query("Cats?"), fmt.query("Tell me about the lamp oil")]
    kw = dict(max_new_tokens=6, eos_id=fmt.eos_id, pad_id=fmt.pad_id, sample=False)
    shared = generate(model, queries, prefix=prefix, batch_size=2, cascade=False, **kw)
    cascade = generate(model, queries, prefix=prefix, batch_size=3, cascade=True, **kw)   # one prefix copy
    plain = [generate(model, [prefix + q], batch_size=1, **kw)[0] for q in queries]
    assert shared == plain
    assert cascade == plain
    # and against the model's own forward: greedy = argmax of the full-sequence logits
    seq = prefix + queries[0]
    for t in plain[0]:
        nxt = model(torch.tensor([seq])).logits[0, -1].argmax().item()
        assert nxt == t
        seq.append(t)


def test_pipeline_runs_and_loss_falls(tiny):
    model, tok = tiny
    cfg = iicl_fast.Config(**{**TINY_CONFIG, "epochs": 6, "lr": 3e-3})
    mem = iicl_fast.Memory(model, tok, cfg)
    before = [p.detach().clone() for p in mem.params]
    rep = mem.consolidate(DOC)
    assert rep.elicited > 0 and 0 < rep.kept <= rep.elicited
    assert rep.kept == -(-rep.elicited * 7 // 8)
    assert len(rep.loss_per_epoch) == 6
    assert rep.loss_per_epoch[-1] < 0.7 * rep.loss_per_epoch[0]
    assert set(rep.seconds) == {"elicit", "teacher", "select", "train"}
    assert any(not torch.equal(a, p) for a, p in zip(before, mem.params))
    assert isinstance(mem.ask("Who built the lighthouse?"), str)
    assert mem.chunks == [{"index": 0, "tokens": rep.chunk_tokens, "sha256": iicl_fast.memory.sha256_text(DOC)}]


def test_reverse_kl_and_seqkd_run(tiny):
    model, tok = tiny
    for loss in ("reverse_kl", "seqkd"):
        mem = iicl_fast.Memory(model, tok, iicl_fast.Config(**TINY_CONFIG, loss=loss))
        rep = mem.consolidate(DOC)
        assert rep.loss_per_epoch[-1] < rep.loss_per_epoch[0]


def test_frozen_base_only_lora_changes(tiny):
    model, tok = tiny
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    mem = iicl_fast.Memory(model, tok, iicl_fast.Config(**TINY_CONFIG))
    mem.consolidate(DOC)
    for n, p in mem.model.named_parameters():
        if "lora_" not in n:
            key = n.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(p, base[key]), n


def test_fused_and_reference_losses_agree(smol_tokenizer):
    """Same seeds: the fused ops (loss-head identity) and the plain losses select the same
    entries and give the same loss curve."""
    tok = smol_tokenizer
    from conftest import make_tiny
    reps = {}
    for impl in ("reference", "fused"):
        for loss in ("forward_kl", "reverse_kl", "seqkd"):
            mem = iicl_fast.Memory(make_tiny(tok), tok, iicl_fast.Config(**TINY_CONFIG, loss=loss, loss_impl=impl))
            reps[impl, loss] = mem.consolidate(DOC)
    for loss in ("forward_kl", "reverse_kl", "seqkd"):
        a, b = reps["reference", loss], reps["fused", loss]
        assert (a.elicited, a.kept) == (b.elicited, b.kept)
        assert abs(a.dppl_kept - b.dppl_kept) < 1e-4
        torch.testing.assert_close(torch.tensor(a.loss_per_epoch), torch.tensor(b.loss_per_epoch), rtol=1e-4, atol=1e-5)


def test_fused_forward_kl_in_row_pieces_equals_one_call(smol_tokenizer, monkeypatch):
    """Training's loss head runs in slabs of LOSS_ROWS rows (teacher stats in pieces of 8 slabs;
    its workspace the same for every chunk): teacher stats, loss and gradient equal one call
    over all rows."""
    from conftest import make_tiny
    from iicl_fast import consolidate as C
    from iicl_fast.teacher import HiddenSet
    model = make_tiny(smol_tokenizer)
    H = model.config.hidden_size
    g = torch.Generator().manual_seed(3)
    teacher = HiddenSet(torch.randn(23, H, generator=g), torch.randint(0, 1000, (23,), generator=g), [0, 9, 23])
    rows = torch.tensor([13, 2, 7, 22, 0, 5, 11, 19, 3, 8, 16])
    h_s = torch.randn(len(rows), H, generator=g)
    cfg = iicl_fast.Config(**TINY_CONFIG, loss="forward_kl", loss_impl="fused")
    out = {}
    for pieces in (10 ** 9, 4):
        monkeypatch.setattr(C, "LOSS_ROWS", pieces)
        stats = C.loss_stats(model, teacher, cfg)
        h = h_s.clone().requires_grad_()
        loss = C.hidden_loss(model, h, teacher, rows, cfg, stats)
        loss.backward()
        out[pieces] = (stats, loss.detach(), h.grad)
    (s1, l1, g1), (s2, l2, g2) = out[10 ** 9], out[4]
    for a, b in zip(s1[:3], s2[:3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-8)
    assert l1 > 0 and g1.abs().max() > 0
