"""End to end with the embedded SmolLM2-135M-Instruct: consolidation must carry the facts.

These fail when consolidation does nothing: without the document in the window the model
answers none of these fictional-fact questions."""
import json

import pytest

import iicl_fast
from iicl_fast import cli

pytestmark = pytest.mark.slow

SEQUENTIAL_DOCS = [
    ("The Ostrava Glass Choir was founded by Lenka Hradil. The Ostrava Glass Choir sings only inside the salt mine of Velka.",
     [{"question": "Who founded the Ostrava Glass Choir?", "answers": ["Hradil"]},
      {"question": "In which salt mine does the Ostrava Glass Choir sing?", "answers": ["Velka"]}]),
    ("The captain of the airship Calder Wren is Ruth Abernethy. The airship Calder Wren flies to the island of Fennick.",
     [{"question": "Who is the captain of the airship Calder Wren?", "answers": ["Abernethy"]},
      {"question": "To which island does the airship Calder Wren fly?", "answers": ["Fennick"]}]),
]


def test_demo_consolidation_recalls_without_context(capsys):
    assert cli.main(["demo", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    print(json.dumps(res, indent=1))
    assert res["recall_consolidated"] >= res["recall_full_context"] - 1
    assert res["recall_consolidated"] > res["recall_no_context"]
    assert res["recall_full_context"] >= res["questions"] // 2   # the task is answerable at all


def test_sequential_documents_first_still_recalled(smol):
    """Two documents consolidated in order into one memory: the first is still recalled
    after the second, and each is recalled about as well as with it in the window."""
    model, tok = smol
    # the defaults (continuations only: the 24 model-written questions this test once pinned
    # took ~60 s a chunk of the CI's 2 cores to elicit, and the default no longer asks them)
    mem = iicl_fast.Memory(model, tok, iicl_fast.Config(progress=False))
    recall = lambda qs, doc=None: cli.recall(qs, mem.ask_many([q["question"] for q in qs], context=doc))
    none = [recall(qs) for _, qs in SEQUENTIAL_DOCS]
    full = [recall(qs, doc) for doc, qs in SEQUENTIAL_DOCS]
    for doc, _ in SEQUENTIAL_DOCS:
        mem.consolidate(doc)
    after = [recall(qs) for _, qs in SEQUENTIAL_DOCS]
    print(f"recall per document: no context {none}, full context {full}, after both consolidated {after}")
    assert len(mem.chunks) == len(SEQUENTIAL_DOCS)
    assert after[0] > none[0] and after[0] >= full[0] - 1      # the first survives the second
    assert all(a >= f - 1 for a, f in zip(after, full))


def test_passkey_at_the_start_of_a_long_stream_survives_only_with_entropy(smol):
    """A pass key buried at the start of a 4,000-token stream, 256-token cache: SirLLM's
    entropy retention keeps it, StreamingLLM's recent window loses it."""
    from iicl_fast.retain import StreamingSession
    from iicl_fast.session_eval import QUESTION, passkey_ids
    model, tok = smol
    ids, at = passkey_ids(tok, 4000, 0.0, 58213)
    assert len(ids) >= 3900 and at < 64
    answers = {}
    for policy in ("entropy", "recent"):
        sess = StreamingSession(model, tok, policy=policy, sink=4, budget=188, recent=64)
        sess.feed_tokens(ids)
        assert sess.peak_cache_tokens == 256
        answers[policy] = sess.generate_tokens(tok(QUESTION, add_special_tokens=False)["input_ids"], max_new_tokens=8)
    print(answers)
    assert "58213" in answers["entropy"].replace(" ", "")
    assert "58213" not in answers["recent"].replace(" ", "")


def test_separate_memories_trained_together_each_recall_their_document(smol, tmp_path, capsys):
    """`consolidate A B --separate`: one memory per file, trained in one batched run
    (consolidate_many); each memory answers its own document's questions."""
    model, tok = smol
    files = []
    for k, (doc, _) in enumerate(SEQUENTIAL_DOCS):
        f = tmp_path / f"doc{k}.txt"
        f.write_text(doc)
        files.append(str(f))
    # the defaults, as test_sequential_documents_first_still_recalled
    assert cli.main(["consolidate", *files, "--out", str(tmp_path / "mems"), "--separate"]) == 0
    base = iicl_fast.Memory(model, tok, iicl_fast.Config(progress=False))
    results = []
    for k, (doc, qs) in enumerate(SEQUENTIAL_DOCS):
        questions = [q["question"] for q in qs]
        mem = iicl_fast.Memory.load(tmp_path / "mems" / f"doc{k}", model, tok)
        none = cli.recall(qs, base.ask_many(questions))
        full = cli.recall(qs, base.ask_many(questions, context=doc))
        mine = cli.recall(qs, mem.ask_many(questions))
        results.append((none, full, mine))
    print(f"--separate recall per document (no context, full context, own memory): {results}")
    for none, full, mine in results:
        assert mine > none and mine >= full - 1
