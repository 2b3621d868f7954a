"""Issue 11 on the CPU: presets and user config, device/dtype resolution, the sampler's
generator on the model's device, per-chunk seeds, elicitation spread over the whole chunk,
every stop id, token-budget batching with gradient accumulation, the driver module."""
import json
import re

import pytest
import torch

import iicl_fast
from iicl_fast import Config, IICLError, cli
from iicl_fast import elicit as elicit_mod
from iicl_fast.elicit import OPENING_WORDS, continuation_queries, elicit, sentences, spread
from iicl_fast.generation import generate
from iicl_fast.models import PromptFormat, resolve_device, resolve_dtype
from iicl_fast.teacher import token_batches

from conftest import TINY_CONFIG, make_tiny

DOC = ("The lighthouse of Karsk was built in 1871 by Ada Lindqvist. Its lamp burns whale oil. "
       "The keeper feeds seven grey cats every morning.")


def test_presets_and_overrides():
    small, paper = Config.preset("small"), Config.preset("paper")
    assert small == Config()
    assert (paper.chunk_tokens, paper.n_queries, paper.n_continuations, paper.max_response_tokens) == (5000, 200, 200, 512)
    assert (paper.select_top_k, paper.epochs, paper.loss) == (200, 3, "forward_kl")
    assert Config.preset("paper", epochs="2", select_top_k="none").epochs == 2
    quality = Config.preset("quality")
    assert quality.n_continuations == 2 * small.n_continuations and quality.lr == small.lr == 2e-3
    assert Config.preset("stress").lr == 1e-3      # the 2M runs' setting, kept when small's lr moved
    with pytest.raises(IICLError, match="unknown preset 'huge'"):
        Config.preset("huge")
    with pytest.raises(IICLError, match=r"unknown Config field: lrr \(did you mean lr\?\)"):
        Config.preset("small", lrr=1)
    with pytest.raises(IICLError, match=r"unknown Config fields: lora_rank \(did you mean lora_r\?\), zzz$"):
        Config.preset("small", zzz=1, lora_rank=4)
    with pytest.raises(IICLError, match="bad value for Config field epochs: 'two'"):
        Config.preset("small", epochs="two")
    # from Python, no coercion: the wrong type is named (lr="0.1" was a TypeError at a comparison,
    # epochs=2.5 and progress=1 were accepted); numpy scalars become Python's (a manifest is JSON)
    for field, value, want in [("lr", "0.1", "a number"), ("epochs", 2.5, "an int"), ("epochs", True, "an int"),
                               ("progress", 1, "True or False"), ("select_top_k", 2.0, "an int or None"),
                               ("target_modules", ["q_proj", 3], "a list of module names"), ("loss", 3, "a string")]:
        with pytest.raises(IICLError, match=f"Config field {field} must be .*{re.escape(want)}.*, got {re.escape(repr(value))}$"):
            Config(**{field: value})
    import numpy as np
    c = Config(epochs=np.int64(2), lr=np.float32(0.5), progress=np.bool_(False), select_top_k=np.int32(3))
    assert (type(c.epochs), type(c.lr), type(c.progress), type(c.select_top_k)) == (int, float, bool, int)
    assert Config.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    for field, value in [("lr", 0), ("elicit_temperature", -1.0), ("elicit_top_p", 1.5), ("lora_alpha", 0),
                         ("train_tokens", 0), ("temperature", 0.0)]:
        with pytest.raises(IICLError, match=field):
            Config(**{field: value})


def test_learning_rate_by_chunk(tiny, monkeypatch):
    """lr_decay_chunks: chunk i of a memory trains at lr · max(lr_floor, (1 + i/τ)^-½); the
    optimizer of each chunk gets it (0: every chunk at lr)."""
    c = Config(lr=2e-3, lr_decay_chunks=4, lr_floor=0.5)
    assert c.chunk_lr(0) == 2e-3 and c.chunk_lr(4) == pytest.approx(2e-3 / 2 ** 0.5)
    assert c.chunk_lr(12) == pytest.approx(1e-3) and c.chunk_lr(100) == pytest.approx(1e-3)
    assert Config(lr=2e-3, lr_decay_chunks=0).chunk_lr(50) == 2e-3
    # lr_decay_after k: chunks 0..k at lr, then chunk i decays as chunk i - k
    d = Config(lr=2e-3, lr_decay_chunks=4, lr_floor=0.5, lr_decay_after=2)
    assert [d.chunk_lr(i) for i in range(3)] == [2e-3] * 3
    assert d.chunk_lr(6) == pytest.approx(c.chunk_lr(4)) and d.chunk_lr(14) == pytest.approx(1e-3)
    assert Config().lr_decay_after == 0 and Config().chunk_lr(1) < Config().lr
    with pytest.raises(IICLError, match="lr_decay_after"):
        Config(lr_decay_after=-1)
    # the presets measured before the decay and the balanced buffer keep what they ran with
    for name in ("paper", "stress"):
        p = Config.preset(name)
        assert p.chunk_lr(50) == p.lr and p.replay_sample == 0 and p.replay_policy != "balanced"
        assert p.prose_anchors == 0 and p.anchor_entries == 0
    assert Config().prose_anchors == 16
    with pytest.raises(IICLError, match="lr_floor"):
        Config(lr_floor=0.0)
    with pytest.raises(IICLError, match="lr_decay_chunks"):
        Config(lr_decay_chunks=-1)
    seen, real = [], torch.optim.AdamW

    def spy(params, lr, **kw):
        seen.append(lr)
        return real(params, lr=lr, **kw)
    monkeypatch.setattr(torch.optim, "AdamW", spy)
    model, tok = tiny
    mem = iicl_fast.Memory(model, tok, Config(**{**TINY_CONFIG, "epochs": 1, "lr": 4e-3, "lr_decay_chunks": 1}))
    mem.consolidate(DOC)
    mem.consolidate(DOC + " Again.")
    assert seen == [4e-3, pytest.approx(4e-3 / 2 ** 0.5)]


def test_device_and_dtype_resolution():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("bf16") == torch.bfloat16
    with pytest.raises(IICLError, match="unknown dtype 'fp7'"):
        resolve_dtype("fp7")
    with pytest.raises(IICLError, match="unknown device"):
        resolve_device("tpu:x")
    if not torch.cuda.is_available():
        with pytest.raises(IICLError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_a_cuda_index_past_the_gpus_is_named(monkeypatch):
    """cuda:N with N GPUs or fewer would fail at the first tensor moved there, in torch's words."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1") and resolve_device("cuda").index is None
    with pytest.raises(IICLError, match=r"cuda:2.*2 CUDA GPU\(s\) here \(cuda:0 .. cuda:1\)"):
        resolve_device("cuda:2")


def test_sampler_generator_on_model_device_and_per_chunk_seeds(tiny, monkeypatch):
    model, tok = tiny
    fmt = PromptFormat(tok, model)
    seen = []
    real = elicit_mod.generate

    def spy(*args, **kw):               # records what elicit hands the sampler, then runs it
        seen.append((kw["keyed_seed"], kw["row_keys"]))
        return real(*args, **kw)

    monkeypatch.setattr(elicit_mod, "generate", spy)
    cfg = Config(**TINY_CONFIG)
    a = elicit(model, fmt, DOC, cfg, chunk_index=0)
    b = elicit(model, fmt, DOC, cfg, chunk_index=0)
    c = elicit(model, fmt, DOC, cfg, chunk_index=3)
    assert [e.response for e in a] == [e.response for e in b]           # reproducible
    assert [e.response for e in a] != [e.response for e in c]           # each chunk its own stream
    seeds = [s for s, _ in seen]
    assert seeds[:2] == seeds[2:4] and len(set(seeds[:2] + seeds[4:])) == 4   # per chunk and phase
    assert all(keys == list(range(len(keys))) for _, keys in seen)       # one process: every row
    # the transfer set does not depend on how many rows decode at once
    d = elicit(model, fmt, DOC, Config(**{**TINY_CONFIG, "gen_batch_size": 1}), chunk_index=0)
    assert [(e.query, e.response) for e in d] == [(e.query, e.response) for e in a]
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 50)
    from iicl_fast.generation import next_token

    class Elsewhere:                     # a generator of another device type is refused by name
        device = torch.device("meta")
    with pytest.raises(ValueError, match="generator is on meta"):
        next_token(logits, True, 1.0, 1.0, Elsewhere())
    assert next_token(logits, True, 1.0, 1.0, g).shape == (2,)


def test_elicitation_covers_the_whole_chunk(tiny, monkeypatch):
    model, tok = tiny
    fmt = PromptFormat(tok, model)
    chunk = " ".join(f"Fact number {i} says that item {i} is kept in box {i}." for i in range(60))
    sents = sentences(chunk)
    assert len(sents) == 60
    asked = []
    real = elicit_mod.generate
    monkeypatch.setattr(elicit_mod, "generate", lambda *a, **k: (asked.append([tok.decode(p) for p in a[1]]), real(*a, **k))[1])
    elicit(model, fmt, chunk, Config(**{**TINY_CONFIG, "n_queries": 40, "n_continuations": 24}))
    q_sents = {i for i, s in enumerate(sents) for p in asked[0] if s in p}
    assert len(q_sents) == 40 and min(q_sents) == 0 and max(q_sents) >= 57      # evenly spread, no repeats
    conts = continuation_queries(chunk, 24, torch.Generator().manual_seed(0))
    starts = {int(m.group(1)) for q in conts for m in [re.search(r"number (\d+)", q)] if m}
    assert max(starts) >= 50 and min(starts) == 0
    long = " ".join(["word"] * 300) + "."
    assert all(len(q.split('"')[1].split()) <= OPENING_WORDS for q in continuation_queries(long, 8, torch.Generator()))
    code = "\n".join("x = 1 + 2 * y" for _ in range(3)) + " " + " ".join(f"tok{i}" for i in range(500))
    assert all(len(s.split()) <= 40 for s in sentences(code)) and len(sentences(code)) > 5
    assert spread(4, 10) == [0, 2, 5, 7] and spread(12, 4) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    # open prompts name their chunk, so replayed entries of two chunks never share a query
    other = continuation_queries("Another story begins here with a dog. It barks at night loudly.", 24, torch.Generator())
    assert not {q for q in conts if not q.startswith("Continue")} & set(other)


def test_source_entries_are_the_chunks_own_text(tiny):
    """Config.source_entries: responses are the chunk's sentences as written, packed whole up to
    max_tokens - 1 tokens (then the stop id), spread over the whole chunk, queries quoting only
    a unit's opening words; with n >= the unit count every sentence is in exactly one entry."""
    from iicl_fast.elicit import source_entries, source_units
    model, tok = tiny
    fmt = PromptFormat(tok, model)
    chunk = " ".join(f"Fact number {i} says that item {i} is kept in box {i}." for i in range(30))
    sents = sentences(chunk)
    units = source_units(fmt, sents, 63)
    assert 5 < len(units) < 30 and all(len(ids) <= 63 for _, ids in units)
    every = source_entries(fmt, chunk, 100, 64)                           # n >= units: each unit once
    assert len(every) == len(units)
    assert all(e.kind == "source" and e.response[-1] == fmt.stop_ids[0] and len(e.response) <= 64 for e in every)
    assert " ".join(tok.decode(e.response[:-1]) for e in every) == " ".join(sents)   # every sentence, whole, in order
    ents = source_entries(fmt, chunk, 4, 64)
    firsts = [int(re.search(r"number (\d+)", tok.decode(e.response)).group(1)) for e in ents]
    assert firsts == [units[i * len(units) // 4][0] for i in range(4)]   # spread, in order
    for e, i in zip(ents, firsts):
        assert tok.decode(e.response[:-1]).startswith(sents[i])          # as written, from a sentence's start
        assert e.query.startswith("Continue the passage:") and sents[i] not in e.query
    # a fact after a sentence that nearly fills a unit is taught whole (pairs cut at max_tokens lost it)
    long = "The committee met on many long afternoons to argue about the colour of the new bicycle shed roof again."
    fact = "The vault code of the amber heron room is 4721."
    got = [tok.decode(e.response[:-1]) for e in source_entries(fmt, f"{long} {fact} Then it rained.", 10, 32)]
    assert any(fact in g for g in got) and " ".join(got) == f"{long} {fact} Then it rained."
    # a sentence longer than a unit is cut into pieces that together are the sentence
    huge = " ".join(f"word{i}" for i in range(30)) + "."     # one sentence (< SPAN_WORDS words)
    pieces = source_entries(fmt, huge, 100, 16)
    assert len(pieces) > 1 and all(len(e.response) <= 16 for e in pieces)
    assert fmt.encode(huge) == [t for e in pieces for t in e.response[:-1]]
    got = elicit(model, fmt, chunk, Config(**{**TINY_CONFIG, "n_queries": 0, "n_continuations": 0, "source_entries": 4}))
    assert [e.kind for e in got] == ["source"] * 4


def test_questions_answered_by_their_sentence(tiny, monkeypatch):
    """qa_response="sentence": each model-written question's response is the sentence it was
    written about, as written, then the stop id; the questions are the ones "answer" asks
    (same draws), and no answer is decoded."""
    model, tok = tiny
    fmt = PromptFormat(tok, model)
    chunk = " ".join(f"Fact number {i} says that item {i} is kept in box {i}." for i in range(12))
    sents = sentences(chunk)
    base = {**TINY_CONFIG, "n_queries": 6, "n_continuations": 2, "source_entries": 0, "fixed_lengths": True}
    answered = elicit(model, fmt, chunk, Config(**base))
    calls = []
    real = elicit_mod.generate
    monkeypatch.setattr(elicit_mod, "generate", lambda *a, **k: (calls.append(len(a[1])), real(*a, **k))[1])
    got = elicit(model, fmt, chunk, Config(**{**base, "qa_response": "sentence"}))
    qa = [e for e in got if e.kind == "qa"]
    assert [e.query for e in qa] == [e.query for e in answered if e.kind == "qa"] and len(qa) == 6
    for e, i in zip(qa, spread(6, len(sents))):
        assert e.response == fmt.encode(sents[i])[: base["max_response_tokens"] - 1] + [fmt.stop_ids[0]]
    assert [e.response for e in got if e.kind == "continuation"] == [e.response for e in answered if e.kind == "continuation"]
    assert calls == [6, 2]                     # the questions, then the continuations only
    with pytest.raises(IICLError, match="qa_response"):
        Config(qa_response="both")


def test_generation_stops_on_every_stop_id(tiny):
    model, tok = tiny
    fmt = PromptFormat(tok, model)
    p = [fmt.query("Who built the lighthouse?")]
    free = generate(model, p, max_new_tokens=6, pad_id=fmt.pad_id, eos_id=fmt.eos_id, sample=False)[0]
    assert len(free) == 6 and fmt.eos_id not in free
    stopped = generate(model, p, max_new_tokens=6, pad_id=fmt.pad_id, stop_ids=[fmt.eos_id, free[2]], sample=False)[0]
    assert stopped == free[: free.index(free[2]) + 1]            # up to and including its first stop id
    forced = generate(model, p, max_new_tokens=6, pad_id=fmt.pad_id, stop_ids=[free[0]], sample=False, min_new_tokens=6)[0]
    assert len(forced) == 6 and free[0] not in forced
    model.generation_config.eos_token_id = [fmt.eos_id, 7, 11]        # chat models end turns with several ids
    assert PromptFormat(tok, model).stop_ids == sorted({fmt.eos_id, 7, 11})


def test_token_batches_and_gradient_accumulation(smol_tokenizer):
    lengths = [5, 50, 7, 48, 3, 20]
    b = token_batches(lengths, 100)
    assert sorted(i for x in b for i in x) == list(range(6))
    assert all(max(lengths[i] for i in x) * len(x) <= 100 or len(x) == 1 for x in b)
    assert b[0][0] == 1                                             # longest first
    assert token_batches([500, 3], 100) == [[0], [1]]               # a row over the budget goes alone
    assert all(len(x) <= 2 for x in token_batches([1] * 9, 100, max_rows=2))
    tok = smol_tokenizer
    curves, weights = [], []
    for budget in (1 << 20, 40):                 # one micro-batch a step vs several (accumulated)
        mem = iicl_fast.Memory(make_tiny(tok), tok, Config(**TINY_CONFIG, train_tokens=budget))
        rep = mem.consolidate(DOC)
        curves.append(rep.loss_per_epoch)
        weights.append(torch.cat([p.detach().flatten() for p in mem.params]))
    torch.testing.assert_close(torch.tensor(curves[0]), torch.tensor(curves[1]), rtol=1e-4, atol=1e-5)
    moved = (weights[0] - torch.cat([p.detach().flatten() for p in iicl_fast.Memory(
        make_tiny(tok), tok, Config(**TINY_CONFIG)).params])).norm()
    assert (weights[0] - weights[1]).norm() <= 0.1 * moved


def test_driver_stream_and_cli_config_flags(tiny_dir, tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC + " " + DOC.replace("Karsk", "Vell"))
    cfgfile = tmp_path / "cfg.json"
    cfgfile.write_text(json.dumps({**{k: v for k, v in TINY_CONFIG.items()}, "epochs": 3}))
    toml = tmp_path / "cfg.toml"
    toml.write_text("epochs = 1\nlr = 0.002\n")
    out = tmp_path / "mem"
    code = cli.main(["consolidate", str(doc), "--out", str(out), "--model", str(tiny_dir), "--device", "cpu",
                     "--config", str(cfgfile), "--set", "epochs=2", "--chunk-tokens", "24"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "config (cpu, float32): " in err
    printed = json.loads(err.split("config (cpu, float32): ")[1].splitlines()[0])
    man = json.loads((out / "manifest.json").read_text())
    assert printed == man["config"] and man["config"]["epochs"] == 2 and man["config"]["chunk_tokens"] == 24
    assert len(man["chunks"]) >= 2 and [c["index"] for c in man["chunks"]] == list(range(len(man["chunks"])))
    code = cli.main(["consolidate", str(doc), "--out", str(tmp_path / "m2"), "--model", str(tiny_dir),
                     "--config", str(toml), "--set", "n_queries=2", "--set", "n_continuations=2",
                     "--set", "max_response_tokens=4", "--set", "max_query_tokens=4", "--set", "progress=false"])
    assert code == 0
    m2 = json.loads((tmp_path / "m2" / "manifest.json").read_text())["config"]
    assert (m2["epochs"], m2["lr"], m2["progress"]) == (1, 0.002, False)
    for argv, msg in [(["--set", "epochs=zero"], "bad value for Config field epochs"),
                      (["--set", "nope=1"], "unknown Config field: nope"),
                      (["--set", "lr"], "write it as field=value"),
                      (["--preset", "huge"], "unknown preset 'huge'"),
                      (["--dtype", "fp7"], "unknown dtype 'fp7'"),
                      (["--set", "lr=-1"], "lr must be > 0"),
                      (["--config", str(tmp_path / "missing.json")], "no such file")]:
        code = cli.main(["consolidate", str(doc), "--out", str(tmp_path / "bad"), "--model", str(tiny_dir), *argv])
        err = capsys.readouterr().err
        lines = [x for x in err.replace("\r", "\n").splitlines() if "error" in x.lower()]
        assert code == 2 and len(lines) == 1 and msg in lines[0], (argv, err)
        assert not (tmp_path / "bad").exists()
    code = cli.main(["consolidate", str(doc), "--out", str(out), "--model", str(tiny_dir), "--set", "lora_r=8"])
    assert code == 2 and "keeps its LoRA layout" in capsys.readouterr().err


def test_tokenizer_without_pad_token_and_either_padding_side(tiny):
    """Rows are padded by the library, not the tokenizer: with no pad token the pad is eos,
    and the tokenizer's padding_side changes nothing. Each row of a batch of different
    lengths decodes as it does alone."""
    import copy
    model, tok = tiny
    prompts = ["Who built the lighthouse?", "Why?", "Name the harbour town in the third story of the book."]
    alone = [generate(model, [PromptFormat(tok, model).query(q)], max_new_tokens=5, pad_id=tok.eos_token_id,
                      stop_ids=[-1], sample=False)[0] for q in prompts]
    for side in ("left", "right"):
        t = copy.deepcopy(tok)
        t.pad_token = None
        t.padding_side = side
        assert t.pad_token_id is None
        fmt = PromptFormat(t, model)
        assert fmt.pad_id == t.eos_token_id
        rows = [fmt.query(q) for q in prompts]
        assert len({len(r) for r in rows}) == 3
        assert generate(model, rows, max_new_tokens=5, pad_id=fmt.pad_id, stop_ids=[-1], sample=False) == alone


def test_chat_template_that_rewrites_the_message_falls_back_to_plain_lines(tiny):
    """A template that does not render the message verbatim (here it lower-cases it) cannot
    be split around the question: PromptFormat uses plain Question:/Answer: lines, and the
    chunk stays an exact token prefix of the teacher's prompt."""
    import copy
    model, tok = tiny
    t = copy.deepcopy(tok)
    t.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | lower }}<|im_end|>\n" \
                      "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    fmt = PromptFormat(t, model)
    assert fmt.head == fmt.encode("Question: ") and fmt.tail == fmt.encode("\nAnswer:")
    chunk, q = "The keeper of the lighthouse was Ada Brun.", "Who kept the lighthouse?"
    full = fmt.prompt(q, context=chunk)
    assert full[: len(fmt.context_prefix(chunk))] == fmt.context_prefix(chunk)
    assert full == fmt.context_prefix(chunk) + fmt.query(q)
    assert PromptFormat(tok, model).head != fmt.head           # the verbatim template is used as is
