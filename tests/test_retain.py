"""SirLLM retention: scores, decay, eviction, position shift, bad input (tiny random Llama)."""
import math

import pytest
import torch

import iicl_fast
from iicl_fast import IICLError, StreamingSession
from iicl_fast.generation import decoder
from iicl_fast.retain import keep_indices, rope_cos_sin, rotate

from conftest import TINY_CONFIG, make_tiny

TEXT = ("The lighthouse of Karsk was built in 1871 by Ada Lindqvist. Its lamp burns whale oil. "
        "The keeper feeds seven grey cats every morning and counts the ships at night. ")


def plain_surprisal(model, ids):
    """-log p(x_i | x_<i) for i >= 1 from one plain forward of the whole sequence, float64."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    return -logits[:-1].log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)


def test_scores_are_surprisal_of_each_token_at_its_own_position(tiny):
    model, tok = tiny
    sess = StreamingSession(model, tok, policy="entropy", sink=4, budget=2000, recent=64, step=7, chat=False)
    sess.feed(TEXT, role=None)
    sess.feed(TEXT, role=None)                       # a second turn: first turn's scores decay by 0.9
    ids = sess.ids.tolist()
    n1 = len(tok(TEXT, add_special_tokens=False)["input_ids"])
    ref = plain_surprisal(model, ids)
    expect = torch.cat([torch.zeros(1, dtype=torch.float64), ref])
    expect[:n1] *= 0.9
    assert sess.scores[0] == 0                       # the session's first token has no prediction
    torch.testing.assert_close(sess.scores.double(), expect, rtol=1e-4, atol=1e-4)
    # the off-by-one of the public SirLLM code (score of x_i from the distribution at i) differs
    shifted = -model(input_ids=torch.tensor([ids])).logits[0, 1:-1].double().log_softmax(-1).gather(
        1, torch.tensor(ids[1:-1])[:, None]).squeeze(1)
    assert not torch.allclose(shifted, ref[1:], rtol=1e-2, atol=1e-2)


def test_decay_arithmetic_over_turns(tiny):
    model, tok = tiny
    sess = StreamingSession(model, tok, policy="entropy", sink=4, budget=2000, recent=64, decay=0.5, chat=False)
    turns = ["Alpha beta gamma delta.", " Epsilon zeta eta theta.", " Iota kappa lambda mu."]
    raw, sizes = [], []
    for t in turns:
        before = sess.scores.clone()
        sess.feed(t, role=None)
        sizes.append(sess.cache_tokens - before.numel())
        if raw:
            torch.testing.assert_close(sess.scores[: before.numel()], before * 0.5)
        raw.append(sess.scores[-sizes[-1]:].clone())
    a, b = sizes[0], sizes[0] + sizes[1]
    torch.testing.assert_close(sess.scores[:a], raw[0] * 0.25)
    torch.testing.assert_close(sess.scores[a:b], raw[1] * 0.5)
    torch.testing.assert_close(sess.scores[b:], raw[2])


@pytest.mark.parametrize("n_new", [0, 1, 5, 16])
def test_keep_indices_is_sinks_top_budget_and_recent(n_new):
    g = torch.Generator().manual_seed(n_new)
    L, sink, budget, recent = 97, 4, 20, 16
    scores = torch.rand(L, generator=g)
    keep = keep_indices(scores, sink=sink, budget=budget, recent=recent, n_new=n_new)
    n_rec = recent - n_new
    mid = torch.arange(sink, L - n_rec)
    top = mid[scores[mid].argsort(descending=True)[:budget]]
    expect = sorted(list(range(sink)) + top.tolist() + list(range(L - n_rec, L)))
    assert keep.tolist() == expect
    assert keep.numel() + n_new == sink + budget + recent
    rec = keep_indices(scores, sink=sink, budget=budget, recent=recent, n_new=n_new, policy="recent")
    assert rec.tolist() == list(range(sink)) + list(range(L - (budget + recent - n_new), L))
    # everything fits: nothing goes
    assert keep_indices(scores[:20], sink=sink, budget=budget, recent=recent, n_new=n_new).tolist() == list(range(20))


def test_keep_indices_ties_keep_the_newer_token():
    keep = keep_indices(torch.ones(20), sink=1, budget=3, recent=2)
    assert keep.tolist() == [0, 15, 16, 17, 18, 19]


def test_session_keeps_sinks_recent_and_the_surprising_token(tiny):
    model, tok = tiny
    sess = StreamingSession(model, tok, policy="entropy", sink=3, budget=12, recent=8, step=8, chat=False)
    stream = tok(TEXT * 6, add_special_tokens=False)["input_ids"]
    sess.feed_tokens(stream)
    ids = sess.ids.tolist()
    assert sess.cache_tokens == sess.peak_cache_tokens == 3 + 12 + 8
    assert ids[:3] == stream[:3] and ids[-8:] == stream[-8:]
    it = iter(stream)                                 # a subsequence of the stream, in order
    assert all(any(x == y for y in it) for x in ids)
    assert sess.evicted == len(stream) - sess.cache_tokens
    # every kept middle token scores at least as high as the lowest-scored one ever evicted
    # from the middle is not observable here; what is: the kept middle is the top of what stayed
    mid = sess.scores[3:-8]
    assert mid.numel() == 12 and bool((mid > 0).all())


def test_every_eviction_keeps_the_top_budget_of_the_middle(tiny, monkeypatch):
    """Spy on each eviction of a real session: the middle it keeps scores at least as high as
    every middle token it drops (ties: the newer stays). One feed is one turn (no decay), so
    the final middle is the top 12 of every token that ever reached the middle."""
    from iicl_fast import retain
    model, tok = tiny
    calls = []
    real = retain.keep_indices

    def spy(scores, **kw):
        keep = real(scores, **kw)
        calls.append((scores.clone(), kw, keep))
        return keep

    monkeypatch.setattr(retain, "keep_indices", spy)
    sess = StreamingSession(model, tok, policy="entropy", sink=3, budget=12, recent=8, step=8, chat=False)
    sess.feed_tokens(tok(TEXT * 6, add_special_tokens=False)["input_ids"])
    evictions = [c for c in calls if c[2].numel() < c[0].numel()]
    assert len(evictions) >= 5
    dropped_ever = []
    for scores, kw, keep in evictions:
        L, n_rec = scores.numel(), max(kw["recent"] - kw.get("n_new", 0), 0)
        mid = set(range(kw["sink"], L - n_rec))
        kept_mid = [i for i in keep.tolist() if i in mid]
        dropped = sorted(mid - set(kept_mid))
        assert dropped and min(float(scores[i]) for i in kept_mid) >= max(float(scores[i]) for i in dropped)
        dropped_ever += [float(scores[i]) for i in dropped]
    assert float(sess.scores[3:-8].min()) >= max(dropped_ever)


def test_generate_matches_plain_greedy_before_any_eviction(tiny):
    model, tok = tiny
    for role in (None, "user"):
        sess = StreamingSession(model, tok, policy="entropy", sink=4, budget=500, recent=64, step=5)
        sess.feed(TEXT, role="user")
        before = sess.ids.tolist()
        out = sess.generate("Who built the lighthouse?", max_new_tokens=12, role=role)
        assert sess.evicted == 0
        prompt = sess.ids.tolist()[len(before):]
        # plain greedy from a full forward of everything the session has seen
        seq = list(before)
        gen_ids = []
        p_ids, _ = sess._chat_prompt("Who built the lighthouse?", role)
        seq += p_ids
        with torch.no_grad():
            for _ in range(12):
                t = int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
                gen_ids.append(t)
                seq.append(t)
                if t == tok.eos_token_id:
                    break
        assert out == tok.decode(gen_ids, skip_special_tokens=True).strip()
        assert prompt[: len(p_ids) + len(gen_ids)] == p_ids + gen_ids


def test_rotate_matches_rope_at_the_new_position(tiny):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    model, _ = tiny
    rope = model.model.rotary_emb
    k = torch.randn(1, 2, 9, 16)
    old = torch.tensor([0, 3, 4, 50, 51, 700, 701, 2000, 4000])
    new = torch.arange(9)
    x = torch.zeros(1, 9, 16)
    k_old, _ = apply_rotary_pos_emb(k, k, *rope(x, old[None]))
    k_new, _ = apply_rotary_pos_emb(k, k, *rope(x, new[None]))
    cos, sin = rope_cos_sin(rope.inv_freq, new - old)
    torch.testing.assert_close(rotate(k_old, cos, sin), k_new, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_positions_stay_contiguous_past_the_model_maximum(smol_tokenizer, dtype):
    """After evictions the cache is exactly what a fresh pass would put at positions 0..L-1
    for layer 0 (its keys depend only on the token and its position): the shift is right,
    and it stays right (no rounding pile-up) far past max_position_embeddings."""
    tok = smol_tokenizer
    model = make_tiny(tok).to(dtype)
    model.config.max_position_embeddings = 64
    sess = StreamingSession(model, tok, policy="entropy", sink=4, budget=24, recent=16, step=16, chat=False)
    stream = tok(TEXT * 12, add_special_tokens=False)["input_ids"]
    assert len(stream) > 5 * 64
    sess.feed_tokens(stream)
    L = sess.cache_tokens
    assert L == 44 and sess.cache.get_seq_length() == L and int(sess.key_pos.max()) < 44
    with torch.no_grad():
        fresh = decoder(model)(input_ids=sess.ids[None], use_cache=True).past_key_values
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1.6e-2)
    torch.testing.assert_close(sess.cache.layers[0].keys, fresh.layers[0].keys, **tol)
    torch.testing.assert_close(sess.cache.layers[0].values, fresh.layers[0].values, **tol)


def test_full_policy_refuses_to_run_past_the_maximum(smol_tokenizer):
    tok = smol_tokenizer
    model = make_tiny(tok)
    model.config.max_position_embeddings = 64
    sess = StreamingSession(model, tok, policy="full", chat=False)
    with pytest.raises(IICLError, match="maximum of 64 positions"):
        sess.feed(TEXT * 4, role=None)


def test_recent_policy_keeps_the_newest(tiny):
    model, tok = tiny
    sess = StreamingSession(model, tok, policy="recent", sink=2, budget=10, recent=6, step=4, chat=False)
    stream = tok(TEXT * 3, add_special_tokens=False)["input_ids"]
    sess.feed_tokens(stream)
    assert sess.ids.tolist() == stream[:2] + stream[-16:]


def test_bad_input(tiny):
    model, tok = tiny
    with pytest.raises(IICLError, match="budget 4 is smaller than sink \\+ recent = 8"):
        StreamingSession(model, tok, sink=4, budget=4, recent=4)
    with pytest.raises(IICLError, match="unknown policy 'lru'"):
        StreamingSession(model, tok, policy="lru")
    with pytest.raises(IICLError, match="decay"):
        StreamingSession(model, tok, decay=0.0)
    sess = StreamingSession(model, tok)
    for bad in ("", "   \n"):
        with pytest.raises(IICLError, match="empty feed"):
            sess.feed(bad)
    with pytest.raises(IICLError, match="empty feed"):
        sess.feed_tokens([])
    with pytest.raises(IICLError, match="empty prompt"):
        sess.generate(" ")
    with pytest.raises(IICLError, match="unknown role"):
        sess.feed("hello", role="narrator")
    assert sess.cache_tokens == 0


def test_choose_returns_a_valid_choice_and_keeps_the_turn(tiny):
    model, tok = tiny
    sess = StreamingSession(model, tok, sink=4, budget=200, recent=32)
    choices = ["stone", "apple", "chair"]
    # the oracle: plain transformers greedy decoding of the same prompt, then SirLLM's rule
    from iicl_fast.retain import match_choice
    body = "Which is a fruit?\n" + "\n".join(f"{l}. {c}" for l, c in zip("ABC", choices))
    ids, _ = sess._chat_prompt(body + "\nAnswer with the letter of the best choice.", "user")
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=8, do_sample=False,
                             pad_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)[0, len(ids):]
        first = model(x).logits[0, -1].float().log_softmax(-1)
    expected = match_choice(tok.decode(out, skip_special_tokens=True).strip(), choices, list("ABC"))
    if expected is None:
        expected = int(torch.stack([first[tok(l, add_special_tokens=False)["input_ids"][0]] for l in "ABC"]).argmax())
    k = sess.choose("Which is a fruit?", choices)
    assert k == expected
    assert "Which is a fruit?" in sess.cached_text()
    from iicl_fast.retain import match_choice
    assert match_choice("B. apple", ["stone", "apple"], ["A", "B"]) == 1
    assert match_choice("(A)", ["stone", "apple"], ["A", "B"]) == 0
    assert match_choice("It is an apple.", ["stone", "apple"], ["A", "B"]) == 1
    assert match_choice("All of them", ["stone", "apple"], ["A", "B"]) is None


def test_session_on_a_memory_uses_its_adapter_and_the_plain_model_does_not(tiny):
    model, tok = tiny
    mem = iicl_fast.Memory(model, tok, iicl_fast.Config(**TINY_CONFIG))
    with torch.no_grad():
        for p in mem.params:
            p.add_(torch.randn_like(p) * 0.5)           # an adapter that changes the outputs
    on_mem = StreamingSession(mem, policy="entropy", sink=4, budget=200, recent=32, chat=False)
    plain = StreamingSession(model, tok, policy="entropy", sink=4, budget=200, recent=32, chat=False)
    on_mem.feed(TEXT, role=None)
    plain.feed(TEXT, role=None)
    ids = plain.ids.tolist()
    with mem.model.disable_adapter():
        ref = plain_surprisal(mem.model.get_base_model(), ids)
    torch.testing.assert_close(plain.scores[1:].double(), ref, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(on_mem.scores[1:].double(), ref, rtol=1e-2, atol=1e-2)


def test_memory_retained_window(tiny, tmp_path):
    model, tok = tiny
    cfg = iicl_fast.Config(**TINY_CONFIG, retain=0.2, retain_decay=0.5, retain_unit="token")
    mem = iicl_fast.Memory(model, tok, cfg)
    mem.consolidate(TEXT)
    n = len(mem.fmt.encode(TEXT.strip()))
    assert len(mem.retained_ids) == math.ceil(0.2 * n)
    # the window is the top-scored tokens of the chunk, in order, scored by the memory itself
    ids = mem.fmt.head + mem.fmt.encode(TEXT.strip())
    with torch.no_grad():
        ref = plain_surprisal(mem.model, ids)[len(mem.fmt.head) - 1:]
    top = sorted(ref.argsort(descending=True)[: len(mem.retained_ids)].tolist())
    chunk = mem.fmt.encode(TEXT.strip())
    assert mem.retained_ids == [chunk[i] for i in top]
    torch.testing.assert_close(torch.tensor(mem.retained_scores, dtype=torch.float64), ref[top], rtol=1e-4, atol=1e-4)
    p = mem.prompt_ids("Who?")
    assert p[len(mem.fmt.head): len(mem.fmt.head) + len(mem.retained_ids)] == mem.retained_ids
    # a second chunk: old scores x 0.5 compete with the new ones, window stays ceil(0.2 n2)
    old = list(zip(mem.retained_ids, mem.retained_scores))
    mem.consolidate("Short second chunk about grey cats.")
    n2 = len(mem.fmt.encode("Short second chunk about grey cats."))
    assert len(mem.retained_ids) == math.ceil(0.2 * n2)
    # save / load keeps the window; a corrupt one is refused
    mem.save(tmp_path / "m")
    back = iicl_fast.Memory.load(tmp_path / "m", model, tok)
    assert back.retained_ids == mem.retained_ids and back.retained_scores == mem.retained_scores
    (tmp_path / "m" / "retained.json").write_text('{"ids": [1, 2], "scores": [0.5]}')
    with pytest.raises(IICLError, match="corrupt retained window"):
        iicl_fast.Memory.load(tmp_path / "m", model, tok)
    assert old  # the first window existed before the second chunk replaced it


def test_memory_retains_whole_sentences(tiny, tmp_path):
    """retain_unit "sentence": the window holds whole sentences of the chunk, those of the
    highest mean surprisal (scored by the memory), filled until the budget is reached."""
    from iicl_fast.elicit import sentences
    model, tok = tiny
    cfg = iicl_fast.Config(**TINY_CONFIG, retain=0.3, retain_decay=0.5, retain_unit="sentence")
    mem = iicl_fast.Memory(model, tok, cfg)
    mem.consolidate(TEXT)
    sents = sentences(TEXT.strip())
    parts = [mem.fmt.encode(s if i == 0 else " " + s) for i, s in enumerate(sents)]
    ids = [t for p in parts for t in p]
    with torch.no_grad():
        ref = plain_surprisal(mem.model, mem.fmt.head + ids)[len(mem.fmt.head) - 1:]
    means, at = [], 0
    for p in parts:
        means.append(float(ref[at: at + len(p)].mean()))
        at += len(p)
    budget = math.ceil(0.3 * len(ids))
    chosen, total = [], 0
    for i in sorted(range(len(parts)), key=lambda i: -means[i]):
        if total >= budget:
            break
        chosen.append(i)
        total += len(parts[i])
    chosen.sort()
    assert 1 < len(chosen) < len(parts)            # a real choice at this budget
    assert mem.retained_units == [len(parts[i]) for i in chosen]
    assert mem.retained_ids == [t for i in chosen for t in parts[i]]
    assert mem.retained_units and sum(mem.retained_units) - max(mem.retained_units) < budget <= len(mem.retained_ids)
    at = 0
    for i, n in zip(chosen, mem.retained_units):
        assert mem.retained_scores[at: at + n] == pytest.approx([means[i]] * n, rel=1e-4, abs=1e-4)
        at += n
    # the next chunk's sentences compete with the kept ones at half their scores
    second = "Grey cats sleep on the warm roof. The baker's code is QZ-9931."
    mem.consolidate(second)
    assert sum(mem.retained_units) == len(mem.retained_ids)
    mem.save(tmp_path / "m")
    back = iicl_fast.Memory.load(tmp_path / "m", model, tok)
    assert (back.retained_ids, back.retained_units) == (mem.retained_ids, mem.retained_units)
    (tmp_path / "m" / "retained.json").write_text('{"ids": [1, 2], "scores": [0.5, 0.5], "units": [3]}')
    with pytest.raises(IICLError, match="unit lengths"):
        iicl_fast.Memory.load(tmp_path / "m", model, tok)
