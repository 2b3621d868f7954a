"""The evaluation suite: seeded documents, scoring, every suite's plumbing on the tiny model,
the CLI, and a small recall slice on the embedded model (asserted)."""
import contextlib
import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from conftest import TINY_CONFIG
from iicl_fast import Config, Memory
from iicl_fast.evaluation import (ABLATIONS, SUITES, Question, Sizes, _drop, answer_logprob, correct, fictional_documents,
                                  gain_kept, heldout_nll, reasoning_stream, run_suite, skill_documents, write_result)


def test_documents_are_seeded_confusable_and_answerable():
    a, b = fictional_documents(0, 3, 6), fictional_documents(0, 3, 6)
    assert [d.text for d in a] == [d.text for d in b]                       # reproducible
    assert a[0].text != fictional_documents(1, 1, 6)[0].text                 # a new seed is a new document
    for d in a:
        assert len(d.questions) >= 6
        for q in d.questions:   # every accepted answer is written in its own document, and in no other
            assert any(x in d.text for x in q.answers), (q, d.text)
    kinds = [{s.split()[1] for s in d.text.split(". ")} for d in a]
    assert kinds[0] & kinds[1]                                               # shared wording: confusable
    chunks, qs = reasoning_stream(0, 4)
    assert len(chunks) == 4 and len(qs) == 6
    for q in qs:
        if q.wrong:     # a comparison: both options, in different chunks
            assert q.answers[0] in " ".join(chunks) and q.wrong[0] in " ".join(chunks)
        else:           # two-hop: the answer only in the last chunk, the person only in the first
            assert q.answers[0] in chunks[-1] and q.question.split(" was born")[0].split("was ")[-1]
    for d in skill_documents(0):
        for q in d.questions:
            assert not any(x in d.text for x in q.answers)                   # new inputs, not the examples


def test_documents_fill_the_default_suite_sizes():
    """The suites' streams at their default sizes (20 chunks of 6 facts, seeds 200+ and 300+)
    draw fresh entities throughout: the 10 pet names alone ran out at the 15th pet."""
    from iicl_fast.evaluation import PETS
    sizes = Sizes()
    for seed in (200, 201, 202, 300, 301, 302):
        docs = fictional_documents(seed, sizes.stream_chunks, sizes.facts)
        assert len(docs) == sizes.stream_chunks
        pets = [q.answers[0] for d in docs for q in d.questions if q.question.startswith("What is the name of")]
        assert len(pets) > len(PETS) and len(set(pets)) == len(pets)
        for d in docs:
            for q in d.questions:
                assert any(x in d.text for x in q.answers)
    # documents with up to 10 pets are drawn as before the fallback existed
    assert fictional_documents(100, 3, 6)[0].text.startswith(fictional_documents(100, 1, 6)[0].text)


def test_correct_scores_answers_and_choices():
    q = Question("Who founded Torholt?", ["Talsen"])
    assert correct(q, "It was founded by Rhea talsen.") and not correct(q, "Rhea Bergard")
    c = Question("Which is older, A or B?", ["Varstad"], ["Belford"])
    assert correct(c, "The lighthouse of Varstad is older than the one of Belford.")
    assert not correct(c, "Belford is older than Varstad.")
    assert not correct(c, "Neither.")


def test_every_suite_runs_on_the_tiny_model(tiny, tmp_path):
    model, tok = tiny
    cfg = Config(**{**TINY_CONFIG, "epochs": 1, "answer_max_new_tokens": 6})
    sizes = Sizes.quick()
    out = {}
    for suite in SUITES:
        res = run_suite(suite, model, tok, cfg, seeds=[0, 1] if suite == "recall" else [0], sizes=sizes,
                        variants=["default", "loss_jsd", "select_random", "teacher_adapted"], progress=False)
        paths = write_result(res, tmp_path)
        assert json.loads(paths[0].read_text())["results"] == json.loads(json.dumps(res["results"]))
        out[suite] = res["results"]
    r = out["recall"]
    assert len(r["full_context"]["values"]) == 2 and r["questions_per_seed"] >= 3
    s = out["sequence"]
    assert [len(row) for row in s["matrix"][0]] == [1, 2]                     # recall of every doc seen so far
    lp = s["answer_logprob"]["runs"][0]
    assert [len(row) for row in lp["matrix"]] == [1, 2] and len(lp["single_doc"]) == len(lp["base"]) == 2
    assert all(isinstance(x, float) and x < 0 for row in lp["matrix"] for x in row)
    assert len(s["first_chunk_by_chunks_since"]) == sizes.stream_chunks
    assert s["forgetting"]["base_nll_per_token"] > 0
    assert set(out["skills"]) == {"cipher", "units", "plural"}
    assert set(out["ablations"]) == {"default", "loss_jsd", "select_random", "teacher_adapted"}
    assert all(v["seconds_per_chunk"] > 0 for v in out["ablations"].values())
    assert out["forgetting"]["base_nll_per_token"] > 0
    peft_model = model.__dict__["_iicl_peft"]
    assert len(peft_model.peft_config) == 1                                  # finished memories dropped ...
    assert peft_model.active_adapter in peft_model.peft_config               # ... and the base still usable
    Memory(model, tok, cfg).base_info()


def test_forgetting_after_a_one_chunk_stream(tiny):
    """--stream-chunks 1 (forgetting after one document only): the first chunk is also the
    last, and both figures come from that one measurement (it raised KeyError: 'nll_stream')."""
    model, tok = tiny
    cfg = Config(**{**TINY_CONFIG, "epochs": 1, "answer_max_new_tokens": 6})
    res = run_suite("forgetting", model, tok, cfg, seeds=[0], sizes=Sizes(stream_chunks=1, facts=3), progress=False)
    f = res["results"]
    assert f["nll_rise"]["one_doc"]["values"] == f["nll_rise"]["stream"]["values"]
    assert f["general_accuracy"]["one_doc"]["values"] == f["general_accuracy"]["stream"]["values"]


def test_sequence_with_the_long_stream_only(tiny):
    """--sequence-docs 0: the long stream alone (its curve and forgetting), no three-document
    figures; the ratio is the last point of the curve over its first."""
    model, tok = tiny
    cfg = Config(**{**TINY_CONFIG, "epochs": 1, "answer_max_new_tokens": 6})
    res = run_suite("sequence", model, tok, cfg, seeds=[0], progress=False,
                    sizes=Sizes(sequence_docs=0, stream_chunks=2, facts=3))["results"]
    assert "final_recall" not in res and "matrix" not in res
    curve = [x["mean"] for x in res["first_chunk_by_chunks_since"]]
    assert len(curve) == 2 and len(res["recall_by_position_at_end"]) == 2
    assert res["first_chunk_kept"] == (round(curve[-1] / curve[0], 3) if curve[0] > 0 else None)
    assert set(res["forgetting"]["nll_rise"]) == {"one_doc", "stream"}
    right_after = [x["mean"] for x in res["recall_by_position_right_after"]]
    assert len(right_after) == 2 and right_after[0] == curve[0]
    assert res["early_chunks"] == 1 and res["early_chunks_kept"] == res["first_chunk_kept"]
    lp = res["answer_logprob_stream"]
    st = lp["per_stream"][0]
    assert len(st["first_chunk_logprob"]) == len(st["by_position_logprob"]) == len(st["base_logprob"]) == 2
    assert st["right_after_logprob"][0] == st["first_chunk_logprob"][0]
    assert st["by_position_logprob"][0] == st["first_chunk_logprob"][-1]    # the same memory, the same doc
    assert lp["first_chunk_kept"] == gain_kept([st["first_chunk_logprob"][-1]], [st["first_chunk_logprob"][0]],
                                               [st["base_logprob"][0]])


def test_gain_kept_pools_the_gain_over_the_base():
    assert gain_kept([-3.0, -2.0], [-2.0, -1.0], [-5.0, -4.0]) == round((2 + 2) / (3 + 3), 3)
    assert gain_kept([-3.0, None], [-2.0, -1.0], [-5.0, -4.0]) == round(2 / 3, 3)   # incomplete entries left out
    assert gain_kept([-3.0], [-5.0], [-5.0]) is None                                  # nothing gained to keep


def test_answer_logprob_reads_the_answer_where_its_sentence_states_it(tiny):
    """Batched and right-padded, the figure equals a plain forward of each question's prompt +
    sentence up to its answer, one at a time, with the adapter and (base=True) without."""
    model, tok = tiny
    doc = fictional_documents(5, 1, 3)[0]
    assert all(q.source and q.answers[0] in q.source and q.source in doc.text for q in doc.questions)
    mem = Memory(model, tok, Config(**{**TINY_CONFIG, "epochs": 1}))
    mem.consolidate(doc.text)
    qs = doc.questions + [Question("Which is older, A or B?", ["A"], ["B"], source="A is older than B."),
                          Question("What is the plural of 'tarn'?", ["tarnek"])]

    def plain(q, base):
        a = q.answers[0]
        before = q.source[: q.source.find(a)].rstrip()
        lead = mem.fmt.prompt(q.question) + (mem.fmt.encode(before) if before else [])
        ans = mem.fmt.encode((" " if before else "") + a)
        x = torch.tensor([lead + ans])
        with mem.model.disable_adapter() if base else contextlib.nullcontext(), torch.no_grad():
            lp = torch.log_softmax(mem.model(input_ids=x).logits[0].double(), -1)
        return float(torch.stack([lp[len(lead) - 1 + j, t] for j, t in enumerate(ans)]).mean())

    for base in (False, True):
        got = answer_logprob(mem, qs, base=base, batch=2)
        assert got[-2:] == [None, None]                    # a choice, and a question with no sentence
        want = [plain(q, base) for q in doc.questions]
        assert max(abs(g - w) for g, w in zip(got, want)) < 1e-4, (got, want)
    assert answer_logprob(mem, doc.questions) != answer_logprob(mem, doc.questions, base=True)
    _drop(mem)


def test_early_chunks_kept_pools_the_first_quarter():
    """The stream's retention over its first quarter of chunks: recall at the end over recall
    right after, summed over those chunks and the streams."""
    from iicl_fast.evaluation import early_chunks_kept
    s1 = {"by_position": [0.5, 0.25, 0.0, 1.0, 1, 1, 1, 1], "right_after": [1.0, 0.5, 0.5, 1.0, 1, 1, 1, 1]}
    s2 = {"by_position": [0.0, 0.5] + [1] * 6, "right_after": [0.5, 0.5] + [1] * 6}
    r = early_chunks_kept([s1, s2])
    assert r["early_chunks"] == 2
    assert r["early_chunks_kept"] == round((0.75 + 0.5) / (1.5 + 1.0), 3)
    assert r["early_chunks_kept_per_stream"] == [0.5, 0.5]
    # nothing recalled right after: no ratio (it printed 333333333.333 before), not a number
    s3 = {"by_position": [0.25] + [1] * 7, "right_after": [0.0] + [1] * 7}
    r = early_chunks_kept([s3])
    assert r["early_chunks"] == 2 and r["early_chunks_kept"] == 1.25 / 1.0
    s4 = {"by_position": [0.25, 0.5] + [1] * 6, "right_after": [0.0, 0.0] + [1] * 6}
    r = early_chunks_kept([s4])
    assert r["early_chunks_kept"] is None and r["early_chunks_kept_per_stream"] == [None]


def test_heldout_nll_sees_the_adapter(tiny):
    model, tok = tiny
    mem = Memory(model, tok, Config(**TINY_CONFIG))
    text = ["The town library opened its doors early on Saturdays, and the first people were nearly always the same."]
    base = heldout_nll(mem, text, base=True)
    assert heldout_nll(mem, text) == pytest.approx(base, rel=1e-6)            # LoRA B = 0: the base
    with torch.no_grad():
        for p in mem.params:
            p.add_(0.05 * torch.randn_like(p))
    assert abs(heldout_nll(mem, text) - base) > 1e-4
    assert heldout_nll(mem, text, base=True) == pytest.approx(base, rel=1e-6)


def test_teacher_base_elicits_and_teaches_with_the_adapter_off(tiny):
    """teacher_base: the transfer set and teacher rows of chunk 2 are the base model's, not θ_1's."""
    from iicl_fast.consolidate import prepare_chunk
    model, tok = tiny
    cfg = Config(**TINY_CONFIG)
    mem = Memory(model, tok, replace(cfg, teacher_base=True))
    with torch.no_grad():
        for p in mem.params:
            p.add_(0.5 * torch.randn_like(p))
    doc = fictional_documents(0, 1, 3)[0].text
    on = prepare_chunk(mem.model, mem.fmt, doc, cfg, chunk_index=1)
    off = prepare_chunk(mem.model, mem.fmt, doc, replace(cfg, teacher_base=True), chunk_index=1,
                        base_view=mem.model.disable_adapter)
    with mem.model.disable_adapter():
        base = prepare_chunk(mem.model, mem.fmt, doc, cfg, chunk_index=1)
    assert [e.response for e in off[1]] == [e.response for e in base[1]]
    assert [e.response for e in on[1]] != [e.response for e in base[1]]
    torch.testing.assert_close(off[2].h, base[2].h)


def test_ablation_configs_are_valid():
    for name, over in ABLATIONS.items():
        Config(**over)                      # every ablation is a valid Config
    with pytest.raises(Exception, match="unknown selection"):
        Config(selection="best")


def test_variants_parse_and_name_bad_fields(tiny, tmp_path):
    """--variant NAME:field=value,...: an ad-hoc ablation row with coerced values; a bad field
    or value is one IICLError naming it."""
    from iicl_fast.cli import ablation_rows
    from iicl_fast.config import IICLError
    from iicl_fast.evaluation import parse_variant
    assert parse_variant("tb:teacher_base=true,lr=2e-3, source_entries=16") == (
        "tb", {"teacher_base": True, "lr": 2e-3, "source_entries": 16})
    rows = ablation_rows("default,loss_jsd", ["fast:epochs=1"])
    assert rows == {"default": {}, "loss_jsd": {"loss": "jsd"}, "fast": {"epochs": 1}}
    assert ablation_rows(None, []) is None
    for bad, msg in (("x:nope=1", "unknown Config field: nope"), ("x:epochs=two", "bad value for Config field epochs"),
                     ("x", "expected NAME:field=value"), ("x:epochs", "is not field=value")):
        with pytest.raises(IICLError, match=msg):
            parse_variant(bad)
    model, tok = tiny
    cfg = Config(**{**TINY_CONFIG, "epochs": 2, "answer_max_new_tokens": 6})
    res = run_suite("ablations", model, tok, cfg, seeds=[0], sizes=Sizes.quick(), progress=False,
                    variants={"one_epoch": {"epochs": 1}})["results"]
    assert list(res) == ["one_epoch"] and res["one_epoch"]["overrides"] == {"epochs": 1}


def test_cli_eval_quick_on_the_tiny_model(tiny_dir, tmp_path):
    sets = [a for k, v in {**TINY_CONFIG, "epochs": 1, "progress": False}.items() for a in ("--set", f"{k}={v}")]
    p = subprocess.run([sys.executable, "-m", "iicl_fast", "eval", "--suite", "reasoning", "--quick", "--seeds", "1",
                        "--model", str(tiny_dir), "--device", "cpu", "--out", str(tmp_path), "--quiet"] + sets,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads((tmp_path / "eval_reasoning.json").read_text())
    assert res["suite"] == "reasoning" and res["config"]["epochs"] == 1 and res["device"] == "cpu"
    assert "reasoning (cpu, float32" in p.stdout
    bad = subprocess.run([sys.executable, "-m", "iicl_fast", "eval", "--suite", "recall", "--set", "lr=-1",
                          "--model", str(tiny_dir)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("iicl-fast: error: lr must be > 0")
    bad = subprocess.run([sys.executable, "-m", "iicl_fast", "eval", "--suite", "ablations", "--variant", "x:lr=fast",
                          "--model", str(tiny_dir)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "bad value for Config field lr" in bad.stderr.strip().splitlines()[-1]


def test_recall_slice_on_the_embedded_model(smol):
    """A small slice of the recall suite on the embedded model (a lighter transfer set than
    the default, for CI's time): the documents are answerable with the document in the window
    and not without it, and every setting is scored."""
    model, tok = smol
    cfg = Config(n_queries=8, n_continuations=4, epochs=2, progress=False)
    res = run_suite("recall", model, tok, cfg, seeds=[0], sizes=Sizes(docs=1, facts=4), progress=False)["results"]
    print(json.dumps(res))
    assert res["full_context"]["mean"] >= 0.5 and res["no_context"]["mean"] <= 0.2, res
    assert set(res) >= {"consolidated", "consolidated_retained", "consolidated_over_full", "seconds_per_chunk"}


def test_gguf_cache_loads_the_same_model(tmp_path, monkeypatch):
    """The dequantised embedded model is kept as a plain HF directory: the second load reads
    it (seconds, not the 20-45 s of dequantising) and is the same model, tokenizer included."""
    import iicl_fast
    from iicl_fast.models import fingerprint
    monkeypatch.setenv("IICL_CACHE", str(tmp_path))
    m1, t1 = iicl_fast.load_model(device="cpu")
    m2, t2 = iicl_fast.load_model(device="cpu")
    assert not m1._iicl_from_cache and m2._iicl_from_cache
    assert [p.name for p in (tmp_path / "gguf").iterdir()] == [m1._iicl_file_sha256[:32]]   # no temp dir left
    assert fingerprint(m1) == fingerprint(m2) and m1._iicl_file_sha256 == m2._iicl_file_sha256
    ids = t1("The lighthouse keeper feeds seven cats.")["input_ids"]
    assert ids == t2("The lighthouse keeper feeds seven cats.")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(m1(torch.tensor([ids])).logits, m2(torch.tensor([ids])).logits, rtol=0, atol=0)
