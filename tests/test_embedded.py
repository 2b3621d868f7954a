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
    mem = iicl_fast.Memory(model, tok, iicl_fast.Config(n_queries=24, n_continuations=16, progress=False))
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
