"""Memory on disk: format, atomic saves, resume bookkeeping, refusal of foreign memories."""
import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch

import iicl_fast
from iicl_fast import consolidate as consolidate_mod
from iicl_fast import memory as memory_mod
from iicl_fast.driver import split_chunks
from iicl_fast.memory import Memory, sha256_text
from iicl_fast.models import PromptFormat
from iicl_fast.teacher import HiddenSet

from conftest import TINY_CONFIG, make_tiny

DOCS = ["The river Olm freezes every March. Its ferry is painted green.",
        "Professor Tane keeps a clock that runs backwards. It was a gift from her brother Ivo."]


def test_split_chunks_respects_budget_and_keeps_text(smol_tokenizer):
    fmt = PromptFormat(smol_tokenizer)
    text = " ".join(f"Sentence number {i} talks about item {i * 7}." for i in range(40))
    chunks = split_chunks(fmt, text, 50)
    assert len(chunks) > 3
    assert all(len(fmt.encode(c)) <= 55 for c in chunks)
    assert " ".join(chunks).split() == text.split()
    long_sentence = "word " * 300
    assert all(len(fmt.encode(c)) <= 50 for c in split_chunks(fmt, long_sentence, 50))


def test_save_load_roundtrip_and_plain_peft(tiny, tmp_path):
    model, tok = tiny
    mem = Memory(model, tok, iicl_fast.Config(**TINY_CONFIG))
    mem.consolidate(DOCS[0])
    mem.save(tmp_path / "m")
    files = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "manifest.json"} <= files
    man = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert man["chunks"][0]["sha256"] == sha256_text(DOCS[0])
    assert man["base_model"]["fingerprint"] and man["versions"]["torch"] == torch.__version__
    assert man["config"]["lora_r"] == TINY_CONFIG["lora_r"]
    x = torch.tensor([PromptFormat(tok).prompt("When does the river freeze?")])
    with torch.no_grad():
        mem._activate()
        want = mem.model(x).logits

    # a fresh base of the same weights: our loader and plain peft give the same model
    fresh, _ = make_tiny(tok), tok
    back = Memory.load(tmp_path / "m", fresh, tok)
    assert back.chunks == mem.chunks
    with torch.no_grad():
        back._activate()
        torch.testing.assert_close(back.model(x).logits, want)
    from peft import PeftModel
    plain = PeftModel.from_pretrained(make_tiny(tok), str(tmp_path / "m"))
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits, want)
        assert not torch.allclose(make_tiny(tok)(x).logits, want)   # the adapter does something


def test_interrupted_save_keeps_old_memory(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    mem = Memory(model, tok, iicl_fast.Config(**TINY_CONFIG))
    mem.save(tmp_path / "m")
    old_bytes = (tmp_path / "m" / "adapter_model.safetensors").read_bytes()
    mem.consolidate(DOCS[0])

    import safetensors.torch as st
    real = st.save_file

    def dies_midway(tensors, path, metadata=None):
        with open(path, "wb") as f:        # half a file, then the process "dies"
            f.write(b"\x00" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(memory_mod, "save_file", dies_midway, raising=False)
    monkeypatch.setattr(st, "save_file", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        mem.save(tmp_path / "m")
    monkeypatch.setattr(st, "save_file", real)
    assert (tmp_path / "m" / "adapter_model.safetensors").read_bytes() == old_bytes
    assert [p.name for p in tmp_path.iterdir()] == ["m"]          # no temp dir left behind
    assert Memory.load(tmp_path / "m", make_tiny(tok), tok).chunks == []

    # killed between the two renames: the old memory waits at the swap's aside and is what loads
    (tmp_path / "m").rename(tmp_path / ".m.swap-old")
    assert Memory.load(tmp_path / "m", make_tiny(tok), tok).chunks == []
    mem.save(tmp_path / "m")                                      # next save completes the swap
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    assert len(Memory.load(tmp_path / "m", make_tiny(tok), tok).chunks) == 1


def test_swap_of_earlier_builds_recovered_and_user_backup_kept(tiny, tmp_path):
    """Earlier builds left the previous memory at m.old between the renames: it still loads and
    is put back. A complete m beside an m.old of the user's own (a backup copy) leaves it alone:
    recover() took it for a stale swap and deleted it."""
    model, tok = tiny
    mem = Memory(model, tok, iicl_fast.Config(**TINY_CONFIG))
    mem.save(tmp_path / "m")
    (tmp_path / "m").rename(tmp_path / "m.old")                   # an earlier build killed mid-swap
    assert Memory.load(tmp_path / "m", make_tiny(tok), tok).chunks == []
    mem.consolidate(DOCS[0])
    mem.save(tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]    # put back, then replaced
    shutil.copytree(tmp_path / "m", tmp_path / "m.old")           # the user's backup
    (tmp_path / "m.old" / "notes.txt").write_text("mine")
    mem.consolidate(DOCS[1])
    mem.save(tmp_path / "m")
    assert (tmp_path / "m.old" / "notes.txt").read_text() == "mine"
    assert len(Memory.load(tmp_path / "m.old", make_tiny(tok), tok).chunks) == 1
    assert len(Memory.load(tmp_path / "m", make_tiny(tok), tok).chunks) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "m.old"]


def test_stream_checkpoints_and_resumes(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    cfg = iicl_fast.Config(**TINY_CONFIG)
    text = " ".join(DOCS)
    calls = []
    real = memory_mod.consolidate_chunk

    def counting(*a, **k):
        calls.append(a[2])
        return real(*a, **k)

    monkeypatch.setattr(memory_mod, "consolidate_chunk", counting)
    mem = Memory(model, tok, cfg)
    stream = mem.stream(text, chunk_tokens=12, checkpoint_dir=tmp_path / "ck")
    first = next(stream)                         # one chunk done and saved, then "crash"
    assert not first.skipped and len(calls) == 1
    n_chunks = len(split_chunks(mem.fmt, text, 12))
    assert n_chunks >= 3

    again = Memory(make_tiny(tok), tok, cfg)
    reps = list(again.stream(text, chunk_tokens=12, checkpoint_dir=tmp_path / "ck"))
    assert [r.skipped for r in reps] == [True] + [False] * (n_chunks - 1)
    assert len(calls) == n_chunks                # no chunk consolidated twice
    assert [c["index"] for c in again.chunks] == list(range(n_chunks))
    # the same stream a third time does nothing; a new text continues the memory
    third = Memory(make_tiny(tok), tok, cfg)
    assert all(r.skipped for r in third.stream(text, chunk_tokens=12, checkpoint_dir=tmp_path / "ck"))
    reps = list(third.stream("A new fact: the moon of Olm is blue.", chunk_tokens=12, checkpoint_dir=tmp_path / "ck"))
    assert [r.chunk_index for r in reps] == [n_chunks]
    assert len(calls) == n_chunks + 1
    saved = json.loads((tmp_path / "ck" / "manifest.json").read_text())
    assert len(saved["chunks"]) == n_chunks + 1


def test_foreign_and_corrupt_memories_refused(tiny, tmp_path):
    model, tok = tiny
    Memory(model, tok, iicl_fast.Config(**TINY_CONFIG)).save(tmp_path / "m")
    other = make_tiny(tok, seed=1)
    with pytest.raises(iicl_fast.IICLError, match="base model"):
        Memory.load(tmp_path / "m", other, tok)
    (tmp_path / "m" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(iicl_fast.IICLError, match="corrupt adapter"):
        Memory.load(tmp_path / "m", make_tiny(tok), tok)
    with pytest.raises(iicl_fast.IICLError, match="no memory"):
        Memory.load(tmp_path / "missing", make_tiny(tok), tok)
    (tmp_path / "m" / "manifest.json").write_text("{not json")
    with pytest.raises(iicl_fast.IICLError, match="corrupt manifest"):
        Memory.load(tmp_path / "m", make_tiny(tok), tok)


def test_bad_config_and_text(tiny):
    model, tok = tiny
    with pytest.raises(iicl_fast.IICLError, match="loss"):
        iicl_fast.Config(loss="mse")
    with pytest.raises(iicl_fast.IICLError, match="select_ratio"):
        iicl_fast.Config(select_ratio=0)
    mem = Memory(model, tok, iicl_fast.Config(**TINY_CONFIG))
    with pytest.raises(iicl_fast.IICLError, match="empty"):
        mem.consolidate("   \n")
    with pytest.raises(iicl_fast.IICLError, match="empty"):
        list(mem.stream(["", "  "]))


def test_replay_buffer_bounded_trained_and_saved(tiny, tmp_path):
    model, tok = tiny
    mem = Memory(model, tok, iicl_fast.Config(**{**TINY_CONFIG, "replay_entries": 3}))
    first = mem.consolidate(DOCS[0])
    assert first.replayed == 0 and len(mem.replay[0]) == 3
    e1, h1 = mem.replay
    first_rows = {(e.query, tuple(e.response)): h1.h[h1.offsets[i]: h1.offsets[i + 1]].clone() for i, e in enumerate(e1)}
    second = mem.consolidate(DOCS[1])
    assert second.replayed == 3 * mem.config.replay_repeats      # the whole buffer, each entry r times
    entries, hs = mem.replay
    assert len(entries) == 3 and hs.offsets[-1] == hs.h.shape[0] == sum(len(e.response) for e in entries)
    # each replayed row keeps the teacher hidden state it had when its chunk was consolidated
    mem.save(tmp_path / "m")
    back = Memory.load(tmp_path / "m", make_tiny(tok), tok)
    assert [e.query for e in back.replay[0]] == [e.query for e in entries]
    assert back.replay_seen == mem.replay_seen == first.kept + second.kept
    torch.testing.assert_close(back.replay[1].h, hs.h)
    # an entry of the first chunk still in the buffer kept its own teacher rows, bit for bit
    for i, e in enumerate(back.replay[0]):
        key = (e.query, tuple(e.response))
        if key in first_rows:
            assert torch.equal(back.replay[1].h[back.replay[1].offsets[i]: back.replay[1].offsets[i + 1]], first_rows[key])
    none = Memory(make_tiny(tok), tok, iicl_fast.Config(**{**TINY_CONFIG, "replay_entries": 0}))
    none.consolidate(DOCS[0])
    assert none.consolidate(DOCS[1]).replayed == 0 and none.replay[0] == []


def test_replay_by_ppl_gap_keeps_the_highest_gaps_of_the_stream(tiny, tmp_path, monkeypatch):
    """replay_policy "ppl_gap": after each chunk the buffer holds the replay_entries kept
    entries of highest ΔPPL seen so far, with their scores saved and loaded."""
    model, tok = tiny
    kept = []
    real = memory_mod.consolidate_chunk

    def spy(*a, **k):          # the real phases; records what each chunk kept
        rep, entries, teacher = real(*a, **k)
        kept.extend(entries)
        return rep, entries, teacher

    monkeypatch.setattr(memory_mod, "consolidate_chunk", spy)
    mem = Memory(model, tok, iicl_fast.Config(**{**TINY_CONFIG, "replay_entries": 3, "replay_policy": "ppl_gap"}))
    for doc in DOCS[:2]:
        mem.consolidate(doc)
        assert all(e.dppl is not None for e in kept)
        top = sorted((e.dppl for e in kept), reverse=True)[:3]
        assert sorted((e.dppl for e in mem.replay[0]), reverse=True) == top
    mem.save(tmp_path / "m")
    back = Memory.load(tmp_path / "m", make_tiny(tok), tok)
    assert [e.dppl for e in back.replay[0]] == [e.dppl for e in mem.replay[0]]
    with pytest.raises(iicl_fast.IICLError, match="replay_policy"):
        iicl_fast.Config(replay_policy="newest")


def test_balanced_pick_gives_every_chunk_its_share_by_score():
    """An equal share per chunk (the remainder to the oldest), each chunk's highest scores;
    a chunk with fewer entries than its share leaves the rest to the others."""
    from iicl_fast.memory import balanced_pick
    score = [5, 1, 3, 9, 8, 7, 6, 2, 0.5]
    chunk = [0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert balanced_pick(score, chunk, 5) == [0, 2, 3, 4, 7]       # 2 + 2 + 1: the oldest gets the extra
    assert balanced_pick(score, chunk, 4) == [0, 2, 3, 7]
    assert balanced_pick(score, [0, 0, 0, 1, 1, 1, 1, 1, 1], 8) == [0, 1, 2, 3, 4, 5, 6, 7]
    assert balanced_pick(score, [None] * 2 + [3] * 7, 3) == [0, 1, 3]   # unlabelled entries: one group, first
    assert balanced_pick(score, chunk, 20) == list(range(9))
    assert balanced_pick([], [], 4) == []


def test_balanced_replay_keeps_the_first_chunk_in_a_stream(tiny, tmp_path):
    """replay_policy "balanced": after each chunk every chunk so far holds its share of the
    buffer (the reservoir may hold none of the first); chunks are saved and loaded."""
    model, tok = tiny
    mem = Memory(model, tok, iicl_fast.Config(**{**TINY_CONFIG, "replay_entries": 4, "replay_policy": "balanced"}))
    for i, doc in enumerate(DOCS[:3]):
        mem.consolidate(doc)
        counts = [sum(e.chunk == j for e in mem.replay[0]) for j in range(i + 1)]
        assert sum(counts) == min(4, mem.replay_seen) and max(counts) - min(counts) <= 1, counts
    mem.save(tmp_path / "m")
    back = Memory.load(tmp_path / "m", make_tiny(tok), tok)
    assert [e.chunk for e in back.replay[0]] == [e.chunk for e in mem.replay[0]]


def test_interrupted_swap_resumes_and_streams_are_told_apart(tiny, tmp_path):
    """The issue's path: DIR gone and its aside holding the N-chunk memory after a kill between
    the renames. The rerun resumes from it (no chunk redone), sweeps a killed writer's temp
    folder, and leaves nothing beside DIR."""
    model, tok = tiny
    cfg = iicl_fast.Config(**TINY_CONFIG)
    text = " ".join(DOCS)
    ck = tmp_path / "p" / "ck"
    mem = Memory(model, tok, cfg)
    stream = mem.stream(text, chunk_tokens=12, checkpoint_dir=ck)
    next(stream), next(stream)
    stream.close()
    os.replace(ck, ck.with_name(".ck.swap-old"))                 # killed between the two renames
    (tmp_path / "p" / ".ck.tmp-dead").mkdir()                    # and a killed writer's temp folder
    again = Memory(make_tiny(tok), tok, cfg)
    reps = list(again.stream(text, chunk_tokens=12, checkpoint_dir=ck))
    assert [r.skipped for r in reps][:2] == [True, True] and not any(r.skipped for r in reps[2:])
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["ck"]
    n = len(again.chunks)
    # a new stream whose first chunk equals the last recorded one is appended, not skipped
    last = split_chunks(again.fmt, text, 12)[-1]
    third = Memory(make_tiny(tok), tok, cfg)
    msgs = []
    reps = list(third.stream(last, chunk_tokens=12, checkpoint_dir=ck, log=msgs.append))
    assert [r.skipped for r in reps] == [False] and len(third.chunks) == n + 1
    assert msgs and "new stream" in msgs[0]
    # the same text at another chunking is refused, nothing written
    before = (ck / "manifest.json").read_bytes()
    with pytest.raises(iicl_fast.IICLError, match="chunked at 12 tokens, not 30"):
        list(Memory(make_tiny(tok), tok, cfg).stream(text, chunk_tokens=30, checkpoint_dir=ck))
    assert (ck / "manifest.json").read_bytes() == before
    man = json.loads(before)
    assert [s["chunk_tokens"] for s in man["streams"]] == [12, 12] and len(man["streams"][0]["id"]) == 32


def test_second_writer_refused(tiny_dir, tmp_path):
    """Two writers on one DIR: the second gets one line and exit 2, the first is untouched."""
    out = tmp_path / "mem"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from iicl_fast.memory import open_for_write\n"
        f"with open_for_write({str(out)!r}):\n    print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        doc = tmp_path / "d.txt"
        doc.write_text("The mill of Orr grinds rye.")
        proc = subprocess.run([sys.executable, "-m", "iicl_fast", "consolidate", str(doc), "--out", str(out),
                               "--model", str(tiny_dir)], capture_output=True, text=True)
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines()[-1].startswith("iicl-fast: error: another process is writing the memory at")
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()


def test_replay_buffer_checked_on_load(tiny, tmp_path):
    """A replay buffer whose target ids leave the vocabulary, or whose hidden width is not the
    model's, is refused with one line on load."""
    from safetensors.torch import load_file, save_file
    model, tok = tiny
    mem = Memory(model, tok, iicl_fast.Config(**TINY_CONFIG))
    mem.consolidate(DOCS[0])
    mem.save(tmp_path / "m")
    t = load_file(str(tmp_path / "m" / "replay.safetensors"))
    for name, bad, msg in [("targets", t["targets"].clone().fill_(10 ** 6), "outside this model's vocabulary"),
                           ("h", t["h"][:, :32].contiguous(), "hidden width")]:
        d = tmp_path / f"bad_{name}"
        import shutil
        shutil.copytree(tmp_path / "m", d)
        save_file({**t, name: bad}, str(d / "replay.safetensors"))
        with pytest.raises(iicl_fast.IICLError, match=msg):
            Memory.load(d, make_tiny(tok), tok)


def test_gradient_checkpointing_trains_the_same_adapter(smol_tokenizer):
    """Config.gradient_checkpointing (the stress preset's: a chunk's peak memory no longer
    scales with the activations of its longest step) recomputes activations in backward and
    ends with the adapter trained without it, loss curve and weights."""
    out, saved = [], []
    for ckpt in (False, True):
        mem = Memory(make_tiny(smol_tokenizer), smol_tokenizer,
                     iicl_fast.Config(**{**TINY_CONFIG, "gradient_checkpointing": ckpt}))
        n = [0]

        def pack(t):            # what autograd keeps for backward (a checkpointed layer keeps its own)
            n[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            rep = mem.consolidate(DOCS[0])
        out.append((rep.loss_per_epoch, [p.detach().clone() for p in mem.params]))
        saved.append(n[0])
        # the last step's gradients are dead once a chunk is trained: kept, they were 19 MB of
        # every later chunk's elicitation and teacher pass on the H200 (stress preset)
        assert all(p.grad is None for p in mem.params)
    assert 0 < saved[1] < 0.5 * saved[0], saved
    (l0, p0), (l1, p1) = out
    assert l0 == pytest.approx(l1, rel=1e-4)
    assert any(not torch.equal(a, b) for a, b in zip(p0, Memory(make_tiny(smol_tokenizer), smol_tokenizer,
                                                                   iicl_fast.Config(**TINY_CONFIG)).params))
    for a, b in zip(p0, p1):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_replay_sample_trains_a_fixed_share_of_a_larger_buffer(tiny, monkeypatch):
    """replay_sample k: each chunk trains on k entries drawn from the buffer (seeded by the
    chunk), not on all of it; the buffer itself still holds replay_entries."""
    model, tok = tiny
    trained = []
    real = consolidate_mod.train

    def spy(model_, fmt, entries, *a, **k):
        trained.append(list(entries))
        return real(model_, fmt, entries, *a, **k)

    monkeypatch.setattr(consolidate_mod, "train", spy)
    mem = Memory(model, tok, iicl_fast.Config(**{**TINY_CONFIG, "replay_entries": 6, "replay_sample": 2}))
    for doc in DOCS + ["A third note: the lamp in the old tower is blue."]:
        before = list(mem.replay[0])
        rep = mem.consolidate(doc)
        assert rep.replayed == min(2, len(before))
        tail = trained[-1][rep.kept: rep.kept + rep.replayed]
        assert all(any(e is b for b in before) for e in tail)        # drawn from the buffer as it was
        assert len(mem.replay[0]) == min(6, mem.replay_seen)
    with pytest.raises(iicl_fast.IICLError, match="replay_sample"):
        iicl_fast.Config(replay_sample=-1)


def test_replay_repeats_weigh_the_earlier_chunks(tiny, monkeypatch):
    """replay_repeats r: every drawn replay entry is trained r times a chunk, with its own
    teacher rows each time; the chunk's new entries once."""
    model, tok = tiny
    trained = []
    real = consolidate_mod.train

    def spy(model_, fmt, entries, teacher, *a, **k):
        trained.append((list(entries), teacher))
        return real(model_, fmt, entries, teacher, *a, **k)

    monkeypatch.setattr(consolidate_mod, "train", spy)
    mem = Memory(model, tok, iicl_fast.Config(**{**TINY_CONFIG, "replay_entries": 6, "replay_sample": 2,
                                                 "replay_repeats": 3, "replay_repeats_whole": False}))
    mem.consolidate(DOCS[0])
    before = list(mem.replay[0])
    rep = mem.consolidate(DOCS[1])
    entries, teacher = trained[-1]
    drawn = entries[rep.kept: rep.kept + 2]
    assert rep.replayed == 6 and len({id(e) for e in drawn}) == 2 and all(any(e is b for b in before) for e in drawn)
    assert [id(e) for e in entries[rep.kept: rep.kept + 6]] == [id(e) for e in drawn] * 3
    rows = lambda i: teacher.h[teacher.offsets[i]: teacher.offsets[i + 1]]
    for j in range(2):      # the repeats carry the same teacher rows as the first draw
        assert torch.equal(rows(rep.kept + j), rows(rep.kept + j + 2)) and torch.equal(rows(rep.kept + j), rows(rep.kept + j + 4))
    assert len({id(e) for e in entries[: rep.kept]}) == rep.kept        # new entries once
    with pytest.raises(iicl_fast.IICLError, match="replay_repeats"):
        iicl_fast.Config(replay_repeats=0)


def test_replay_repeats_whole_repeats_only_a_whole_buffer():
    """replay_repeats_whole: a buffer replayed whole (no larger than replay_sample) is repeated
    as with replay_repeats alone, entry for entry; a larger one is drawn, each entry once."""
    from iicl_fast.elicit import Entry
    entries = [Entry("qa", f"Question {i}?", [3 + i, 4]) for i in range(10)]
    kept = entries[:2]
    hs = _hidden_for(entries)
    for sample, whole_buffer in ((12, True), (4, False)):
        both = [consolidate_mod.with_replay(kept, _hidden_for(kept), (entries, hs), iicl_fast.Config(
            replay_sample=sample, replay_repeats=2, replay_repeats_whole=w), chunk_index=3) for w in (False, True)]
        (e_rep, h_rep), (e_whole, h_whole) = both
        if whole_buffer:      # the same set, bit for bit
            assert [id(e) for e in e_whole] == [id(e) for e in e_rep] and len(e_whole) == 2 + 2 * 10
            assert torch.equal(h_whole.h, h_rep.h)
        else:                 # the same draw, once instead of twice
            assert len(e_rep) == 2 + 2 * sample and len(e_whole) == 2 + sample
            assert [id(e) for e in e_whole[2:]] == [id(e) for e in e_rep[2: 2 + sample]]
            assert len({id(e) for e in e_whole[2:]}) == sample
    from iicl_fast.config import coerce
    assert coerce("replay_repeats_whole", "true") is True


def test_replay_fill_cycles_a_small_buffer(tiny, monkeypatch):
    """replay_fill: a buffer smaller than replay_sample is replayed whole floor(k/n) times and a
    seeded sample of the rest, k entries in all; a larger buffer is sampled as without it."""
    model, tok = tiny
    trained = []
    real = consolidate_mod.train

    def spy(model_, fmt, entries, teacher, *a, **k):
        trained.append(list(entries))
        return real(model_, fmt, entries, teacher, *a, **k)

    monkeypatch.setattr(consolidate_mod, "train", spy)
    mem = Memory(model, tok, iicl_fast.Config(**{**TINY_CONFIG, "replay_entries": 64, "replay_sample": 7,
                                                 "replay_fill": True, "replay_repeats": 1}))
    mem.consolidate(DOCS[0])
    before = list(mem.replay[0])
    n = len(before)
    assert 0 < n < 7, n          # the test needs a buffer smaller than the sample
    rep = mem.consolidate(DOCS[1])
    drawn = trained[-1][rep.kept: rep.kept + 7]
    assert rep.replayed == 7
    counts = [sum(d is b for d in drawn) for b in before]
    assert sum(counts) == 7 and set(counts) <= {7 // n, 7 // n + 1}      # all of it, evenly
    from iicl_fast.config import coerce
    assert coerce("replay_fill", "1") is True and coerce("replay_fill", "off") is False


def _hidden_for(entries):
    """A HiddenSet whose rows name their entry (h[:, 0] = the entry's index), for tracking draws."""
    offsets = [0]
    for e in entries:
        offsets.append(offsets[-1] + len(e.response))
    h = torch.cat([torch.full((len(e.response), 3), float(i)) for i, e in enumerate(entries)])
    return HiddenSet(h, torch.tensor([t for e in entries for t in e.response]), offsets)


def test_replay_draw_overlap_prefers_what_the_new_chunk_shares():
    """replay_draw "overlap": an earlier entry of the same form as the new chunk's ("the population
    of X is N") scores higher than one that shares only the prompt's fixed words, and the draw takes
    the high-scoring ones far more often than the uniform draw — yet every entry stays drawable, the
    teacher rows follow their entries, and "uniform" draws as before (the seeded plain sample)."""
    from iicl_fast.consolidate import overlap_scores, with_replay
    from iicl_fast.elicit import Entry
    same = [Entry("continuation", f"Continue the passage: The population of Town{i} is", [900 + i, 17, 18, 19])
            for i in range(6)]
    other = [Entry("continuation", f"Continue the passage: The colour of flag{i} was", [500 + i, 30 + i, 40 + i])
             for i in range(18)]
    old = same + other
    new = [Entry("continuation", "Continue the passage: The population of Kelby is", [777, 17, 18, 19])]
    scores = overlap_scores(old, new)
    assert min(scores[:6]) > 0.4 > 0.1 > max(scores[6:]), scores
    hs = _hidden_for(old)
    new_hs = _hidden_for(new)
    counts = {"uniform": 0, "overlap": 0}
    for draw in counts:
        for seed in range(40):
            cfg = iicl_fast.Config(replay_sample=4, replay_draw=draw, seed=seed)
            entries, teacher = with_replay(new, new_hs, (old, hs), cfg, chunk_index=3)
            drawn = entries[1:]
            assert len(drawn) == 4 and len({id(e) for e in drawn}) == 4
            for j, e in enumerate(drawn):      # the teacher rows are the drawn entry's own
                rows = teacher.h[teacher.offsets[1 + j]: teacher.offsets[2 + j], 0]
                assert torch.all(rows == float(next(i for i, o in enumerate(old) if o is e)))
            counts[draw] += sum(any(e is s for s in same) for e in drawn)
            if draw == "uniform":
                idx = sorted(random.Random((seed * 1_000_003 + 3) * 7 + 1).sample(range(len(old)), 4))
                assert [id(e) for e in drawn] == [id(old[i]) for i in idx]
    # uniform: 4 × 6/24 = 1 of 4 a draw expected (40 draws: ~40); overlap (weights 0.6 : 0.1,
    # six against eighteen): ~2.7 of 4
    assert counts["uniform"] < 60 and counts["overlap"] > 2 * counts["uniform"], counts
    with pytest.raises(iicl_fast.IICLError, match="replay_draw"):
        iicl_fast.Config(replay_draw="closest")


def test_ask_refuses_questions_it_would_misread(tiny):
    """A string passed as the list would be asked one character at a time: refused, as are
    empty or non-string questions and a non-string context; ask and a one-item ask_many agree."""
    model, tok = tiny
    mem = Memory(model, tok, iicl_fast.Config(**TINY_CONFIG))
    for bad, msg in [("Who?", "list of questions"), (["Who?", "  "], "question 1 is empty"),
                     ([3], "question 0 must be a string, got int")]:
        with pytest.raises(iicl_fast.IICLError, match=msg):
            mem.ask_many(bad, max_new_tokens=2)
    with pytest.raises(iicl_fast.IICLError, match="context must be a string"):
        mem.ask_many(["Who?"], context=["a document"], max_new_tokens=2)
    for n in (0, -1, 2.5, "8"):     # 0 once meant "the default" (max_new_tokens or ...); -1 a torch traceback
        with pytest.raises(iicl_fast.IICLError, match=f"max_new_tokens must be an integer >= 1.*got {n!r}"):
            mem.ask("Who?", max_new_tokens=n)
    assert mem.ask_many(("Who?" for _ in range(2)), max_new_tokens=3) == [mem.ask("Who?", max_new_tokens=3)] * 2


def test_memory_refuses_arguments_of_the_wrong_kind(tiny):
    """Memory(None, tok), Memory(model, None), a dict as the config, consolidate(bytes) and
    save(None) were AttributeErrors / TypeErrors from deep inside, or "empty text" for bytes:
    each one IICLError naming what was given."""
    model, tok = tiny
    for args, msg in [((None, tok), "needs a causal language model.*got NoneType"),
                      ((model, None), "needs the model's tokenizer, got NoneType"),
                      ((model, tok, {"lr": 1e-3}), "config must be an iicl_fast.Config.*got dict")]:
        with pytest.raises(iicl_fast.IICLError, match=msg):
            Memory(*args)
    mem = Memory(model, tok, iicl_fast.Config(**TINY_CONFIG))
    for text, msg in [(b"The sky is green.", "text must be a string, got bytes"), (None, "got NoneType"),
                      ("  \n", "empty text")]:
        with pytest.raises(iicl_fast.IICLError, match=msg):
            mem.consolidate(text)
    with pytest.raises(iicl_fast.IICLError, match="path must be a str or a path, got NoneType"):
        mem.save(None)
    assert not mem.chunks


def test_target_modules_that_name_no_layer_or_the_output_layer_are_refused(tiny):
    """peft's own error is a traceback, and a LoRA on the output layer would never train (the fused
    loss head reads its base weight): both one IICLError naming the choices."""
    model, tok = tiny
    with pytest.raises(iicl_fast.IICLError, match="'nope_proj' names no layer.*q_proj"):
        Memory(model, tok, iicl_fast.Config(**{**TINY_CONFIG, "target_modules": ["q_proj", "nope_proj"]}))
    with pytest.raises(iicl_fast.IICLError, match="'lm_head' is the output layer"):
        Memory(model, tok, iicl_fast.Config(**{**TINY_CONFIG, "target_modules": ["lm_head"]}))
    # a string is peft's regular expression over full names: one that matches nothing was peft's traceback
    with pytest.raises(iicl_fast.IICLError, match=r"regular expression 'q_proj' matches no module.*give a list: \['q_proj'\]"):
        Memory(model, tok, iicl_fast.Config(**{**TINY_CONFIG, "target_modules": "q_proj"}))
    with pytest.raises(iicl_fast.IICLError, match=r"'\(' is not a regular expression"):
        Memory(model, tok, iicl_fast.Config(**{**TINY_CONFIG, "target_modules": "("}))
    regex = Memory(model, tok, iicl_fast.Config(**{**TINY_CONFIG, "target_modules": r".*\.(q|v)_proj"}))
    assert regex.params and all(".q_proj." in n or ".v_proj." in n
                                for n, p in regex.model.named_parameters() if f".{regex.name}." in n)
    mem = Memory(model, tok, iicl_fast.Config(**{**TINY_CONFIG, "target_modules": ["v_proj"]}))
    assert mem.params and all(".v_proj." in n for n, p in mem.model.named_parameters() if f".{mem.name}." in n)
    again = Memory(model, tok, iicl_fast.Config(**{**TINY_CONFIG, "target_modules": ["o_proj"]}))   # on the wrapped base
    assert again.params


def test_past_the_models_positions_is_one_clear_error(tiny):
    """A chunk or a context longer than the model's max_position_embeddings (4,096 for the tiny
    model) is refused before any decoding, naming the limit: a learned position table would fail
    with an index error there, rotary models silently drift."""
    model, tok = tiny
    mem = Memory(model, tok, iicl_fast.Config(**TINY_CONFIG))
    long = "The mill has four sails and a blue door. " * 500                 # ~5,000 tokens
    with pytest.raises(iicl_fast.IICLError, match="exceed the 4096 the model was built for"):
        mem.consolidate(long)
    assert mem.chunks == []
    with pytest.raises(iicl_fast.IICLError, match="prompts of up to .* exceed the 4096"):
        mem.ask_many(["How many sails?"], context=long, max_new_tokens=4)
    short = "The mill has four sails and a blue door. " * 50
    assert len(mem.ask_many(["How many sails?"], context=short, max_new_tokens=4)) == 1


def test_save_and_stream_refuse_what_they_cannot_use(tiny, tmp_path, monkeypatch):
    """save("") or save("..") would aim the atomic swap at the working directory or its parent,
    and a directory of other files or a file was swapped out and deleted; a non-string among
    stream's texts failed deep in the tokenizer."""
    model, tok = tiny
    mem = Memory(model, tok, iicl_fast.Config(**TINY_CONFIG))
    monkeypatch.chdir(tmp_path)
    for bad in ("", ".", "..", tmp_path / "sub" / ".."):
        with pytest.raises(iicl_fast.IICLError, match="directory name of its own"):
            mem.save(bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    with pytest.raises(iicl_fast.IICLError, match="text 1 is a int"):
        list(iicl_fast.stream(mem, ["A text.", 3]))          # (a generator: checked at the first chunk)
    # chunk_tokens=0 was taken as "the default" and consolidated at 1,024; -3 said "empty text";
    # 2.5 a resume message; None as the texts and a file as the checkpoint dir were tracebacks
    for n in (0, -3, 2.5):
        with pytest.raises(iicl_fast.IICLError, match=f"chunk_tokens must be an integer >= 1.*got {n!r}"):
            list(mem.stream("A text.", chunk_tokens=n))
    with pytest.raises(iicl_fast.IICLError, match="takes a string or a list of strings, got NoneType"):
        list(mem.stream(None))
    # a directory of a user's files was replaced whole by the memory (its files deleted)
    (tmp_path / "thesis").mkdir()
    (tmp_path / "thesis" / "ch1.txt").write_text("precious")
    for call in (lambda: mem.save(tmp_path / "thesis"),
                 lambda: list(mem.stream("A text.", checkpoint_dir=tmp_path / "thesis"))):
        with pytest.raises(iicl_fast.IICLError, match="thesis is a directory that holds no memory"):
            call()
    assert sorted(p.name for p in (tmp_path / "thesis").iterdir()) == ["ch1.txt"]
    assert (tmp_path / "thesis" / "ch1.txt").read_text() == "precious"
    (tmp_path / "empty").mkdir()
    mem.save(tmp_path / "empty")                                  # an empty directory is fine
    mem.save(tmp_path / "empty")                                  # and so is a memory, saved again
    assert (tmp_path / "empty" / "manifest.json").is_file()
    (tmp_path / "notes.txt").write_text("keep me")
    for call in (lambda: list(mem.stream("A text.", checkpoint_dir=tmp_path / "notes.txt")),
                 lambda: mem.save(tmp_path / "notes.txt")):
        with pytest.raises(iicl_fast.IICLError, match="notes.txt is a file, not a memory directory"):
            call()
    assert (tmp_path / "notes.txt").read_text() == "keep me" and not mem.chunks
