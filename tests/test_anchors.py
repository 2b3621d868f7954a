"""Anchor entries (Config.anchor_entries): general prompts answered by the base without the
chunk, the base's own distribution as the teacher, trained beside the chunk's entries."""
import torch

from conftest import TINY_CONFIG, make_tiny
from iicl_fast import Config, Memory
from iicl_fast.elicit import anchor_entries, anchor_prompts, prompt_ids, prose_anchor_entries, prose_openings
from iicl_fast.evaluation import fictional_documents, general_questions, heldout_texts
from iicl_fast.generation import generate
from iicl_fast.models import PromptFormat

DOC = fictional_documents(7, 1, 4)[0].text


def test_anchor_prompts_rotate_and_are_not_the_eval_questions(tiny):
    model, tok = tiny
    fmt = PromptFormat(tok, model)
    prompts = anchor_prompts()
    asked = {q.question.lower() for q in general_questions()}
    assert len(set(prompts)) == len(prompts) >= 32 and not asked & {p.lower() for p in prompts}
    cfg = Config(**{**TINY_CONFIG, "anchor_entries": 5})
    e0, e1 = anchor_entries(model, fmt, cfg, chunk_index=0), anchor_entries(model, fmt, cfg, chunk_index=1)
    assert [e.query for e in e0] == prompts[:5] and [e.query for e in e1] == prompts[5:10]
    assert all(e.kind == "anchor" for e in e0)
    last = anchor_entries(model, fmt, cfg, chunk_index=len(prompts) // 5)     # wraps around the list
    assert [e.query for e in last] == [prompts[(len(prompts) // 5 * 5 + i) % len(prompts)] for i in range(5)]
    greedy = generate(model, [fmt.prompt(q) for q in prompts[:5]], max_new_tokens=cfg.max_response_tokens,
                      pad_id=fmt.pad_id, sample=False, stop_ids=fmt.stop_ids)
    assert [e.response for e in e0] == greedy                             # the model's own answers, no chunk


def _kl_to_base(mem: Memory, fmt: PromptFormat, entries) -> float:
    """Mean KL(base || student) over the response tokens of entries, no chunk in view."""
    total, n = 0.0, 0
    with torch.no_grad():
        for e in entries:
            p = prompt_ids(fmt, e)
            ids = torch.tensor([p + e.response])
            s = mem.model(input_ids=ids).logits[0, len(p) - 1: -1].float().log_softmax(-1)
            with mem.model.disable_adapter():
                b = mem.model(input_ids=ids).logits[0, len(p) - 1: -1].float().log_softmax(-1)
            total += float((b.exp() * (b - s)).sum())
            n += len(e.response)
    return total / n


def test_anchors_hold_the_student_near_the_base_on_general_prompts(smol_tokenizer):
    """A chunk trained hard (lr 2e-2) moves the tiny model's answers to general prompts; the
    same chunk with anchors on those prompts moves them less, and the report counts them."""
    tok = smol_tokenizer
    base = dict(TINY_CONFIG, lr=2e-2, epochs=4, replay_entries=0, source_entries=0, prose_anchors=0)
    kl = {}
    for n in (0, 8):
        model = make_tiny(tok)
        mem = Memory(model, tok, Config(**base, anchor_entries=n))
        rep = mem.consolidate(DOC)
        assert rep.anchored == n and rep.seconds["elicit"] > 0
        with mem.model.disable_adapter():
            probe = anchor_entries(mem.model, mem.fmt, Config(**base, anchor_entries=8), chunk_index=0)
        kl[n] = _kl_to_base(mem, mem.fmt, probe)
    assert kl[0] > 0.0 and kl[8] < 0.5 * kl[0], kl


def test_epoch_order_deals_anchors_over_the_steps():
    """The last `dealt` entries (anchors) are spread over an epoch's steps: every step of a
    batch takes within one of its even share, and without anchors the order is randperm's."""
    from iicl_fast.consolidate import epoch_order
    for n, dealt, bs in [(55 + 16, 16, 8), (7, 1, 8), (10, 3, 2), (16, 16, 8), (97, 13, 5)]:
        order = epoch_order(n, dealt, torch.Generator().manual_seed(n))
        assert sorted(order) == list(range(n))
        for s in range(0, n, bs):
            step = order[s: s + bs]
            share = dealt * len(step) / n
            assert abs(sum(i >= n - dealt for i in step) - share) <= 1.0, (n, dealt, bs, s)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert epoch_order(40, 0, g1) == torch.randperm(40, generator=g2).tolist()


def test_prose_anchors_are_raw_text_the_base_continues(tiny):
    """Prose anchors: openings of plain prose in turn, their ids the raw text (no chat
    template), each continued by the model's own sampled draws (keyed by seed and chunk),
    none of them from the held-out text forgetting is measured on."""
    model, tok = tiny
    fmt = PromptFormat(tok, model)
    openings = prose_openings()
    assert len(set(openings)) == len(openings) >= 64
    held = " ".join(heldout_texts()[1])
    assert not any(o in held for o in openings)
    cfg = Config(**{**TINY_CONFIG, "prose_anchors": 6, "anchor_entries": 0})
    e0, e1 = (prose_anchor_entries(model, fmt, cfg, chunk_index=i) for i in (0, 1))
    assert [e.query for e in e0] == openings[:6] and [e.query for e in e1] == openings[6:12]
    assert all(e.kind == "prose" and e.raw == fmt.encode(e.query) == prompt_ids(fmt, e) for e in e0)
    assert fmt.prompt(e0[0].query) != prompt_ids(fmt, e0[0])             # not the chat prompt
    again = prose_anchor_entries(model, fmt, cfg, chunk_index=0)
    assert [e.response for e in again] == [e.response for e in e0]      # seeded
    assert [e.response for e in e1] != [e.response for e in e0]
    other = prose_anchor_entries(model, fmt, Config(**{**TINY_CONFIG, "prose_anchors": 6, "seed": 1}), chunk_index=0)
    assert [e.response for e in other] != [e.response for e in e0]       # sampled, not greedy
    assert prose_anchor_entries(model, fmt, Config(**{**TINY_CONFIG, "prose_anchors": 0}), chunk_index=0) == []


def test_prose_anchors_hold_the_student_near_the_base_on_raw_text(smol_tokenizer):
    """A chunk trained hard moves the tiny model on plain prose; with prose anchors (their
    teacher the base, their sequences raw ids in the student's padded and packed passes) it
    moves less, and the report counts them among the anchored. (On the tiny model's random
    weights the pull is weak: KL 0.028 -> 0.021 on the taught prose; the chat anchors' test
    halves it.)"""
    from iicl_fast.teacher import _packed_hidden, student_batch, student_hidden
    tok = smol_tokenizer
    base = dict(TINY_CONFIG, lr=2e-2, epochs=4, replay_entries=0, source_entries=0, anchor_entries=0)
    kl = {}
    for n in (0, 12):
        model = make_tiny(tok)
        mem = Memory(model, tok, Config(**base, prose_anchors=n))
        rep = mem.consolidate(DOC)
        assert rep.anchored == n
        with mem.model.disable_adapter():
            taught = prose_anchor_entries(mem.model, mem.fmt, Config(**base, prose_anchors=12), chunk_index=0)
        kl[n] = _kl_to_base(mem, mem.fmt, taught)
    assert kl[0] > 0.0 and kl[12] < 0.85 * kl[0], kl
    ids, _, starts = student_batch(mem.fmt, taught[:3], "cpu")
    for row, st, e in zip(ids.tolist(), starts, taught[:3]):
        assert row[: st + len(e.response)] == e.raw + e.response
    with torch.no_grad():
        torch.testing.assert_close(_packed_hidden(mem.model, mem.fmt, taught[:3], torch.device("cpu")),
                                   student_hidden(mem.model, mem.fmt, taught[:3], packed=False), atol=1e-4, rtol=1e-4)
