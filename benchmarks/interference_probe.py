"""Where a stream's first chunk loses recall: the suite's stream (evaluation.fictional_documents,
seed 200 + SEED, as `eval --suite sequence` builds it) consolidated chunk by chunk with the
defaults; after each chunk, every earlier chunk's questions asked, and each answer that was right
right after its chunk and is wrong now classified: replaced by a later chunk's answer to a
question of the same form (interference between confusable facts), or other.

    python benchmarks/interference_probe.py --seed 13 --chunks 3 [--device cpu] [--out FILE.json]

The stream's recall of the first chunk fell 0.51 -> 0.34 at the very next chunk on the H200
and then held (benchmarks/NOTES.md, 23rd session): this tells what the lost answers became."""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import iicl_fast  # noqa: E402
from iicl_fast import Config, Memory  # noqa: E402
from iicl_fast.evaluation import correct, fictional_documents  # noqa: E402


def form(question: str) -> str:
    """A question's form with its entities blanked (capitalised words and numbers): 'What is the
    code of the bell in Varnost?' -> 'What is the code of the bell in _?'."""
    return re.sub(r"\b([A-Z][a-z]+|\d[\d,]*)\b", "_", question[0].lower() + question[1:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--chunks", type=int, default=3)
    ap.add_argument("--facts", type=int, default=6)
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.device == "cpu":
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    model, tok = iicl_fast.load_model(a.model, device=a.device)
    from iicl_fast.config import coerce
    over = {k: coerce(k, v) for k, v in (s.split("=", 1) for s in a.set)}
    cfg = replace(Config(**over), seed=a.seed, progress=False)
    docs = fictional_documents(200 + a.seed, a.chunks, a.facts)
    mem = Memory(model, tok, cfg)
    right_after: list[list[bool]] = []
    steps = []
    for i, doc in enumerate(docs):
        t0 = time.perf_counter()
        mem.consolidate(doc.text)
        secs = time.perf_counter() - t0
        asked = [q for d in docs[: i + 1] for q in d.questions]
        answers = mem.ask_many([q.question for q in asked])
        ok = [correct(q, x) for q, x in zip(asked, answers)]
        at = 0
        per_doc = []
        for d in docs[: i + 1]:
            per_doc.append(ok[at: at + len(d.questions)])
            at += len(d.questions)
        right_after.append(per_doc[i])
        lost = []
        at = 0
        for j, d in enumerate(docs[: i]):
            for k, q in enumerate(d.questions):
                if right_after[j][k] and not per_doc[j][k]:
                    x = answers[at + k]
                    later = [(m, p) for m in range(j + 1, i + 1) for p in docs[m].questions
                             if form(p.question) == form(q.question) and correct(p, x)]
                    lost.append({"chunk": j, "question": q.question, "answer": x.strip()[:120],
                                 "accepted": q.answers, "replaced_by_chunk": later[0][0] if later else None})
            at += len(d.questions)
        step = {"after_chunk": i, "seconds": round(secs, 1),
                "recall": [round(sum(p) / len(p), 3) for p in per_doc],
                "lost": lost, "lost_to_a_later_fact": sum(x["replaced_by_chunk"] is not None for x in lost)}
        steps.append(step)
        print(json.dumps({k: v for k, v in step.items() if k != "lost"}), flush=True)
        for x in lost:
            print("   lost:", json.dumps(x), flush=True)
    p = next(model.parameters())
    res = {"seed": a.seed, "chunks": a.chunks, "facts": a.facts, "config": over, "device": str(p.device),
           "dtype": str(p.dtype).replace("torch.", ""), "torch": torch.__version__,
           "commit": os.environ.get("IICL_COMMIT", "unknown"), "steps": steps}
    if a.out:
        tmp = Path(a.out + ".tmp")
        tmp.write_text(json.dumps(res, indent=1))
        tmp.replace(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
