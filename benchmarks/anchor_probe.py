"""Anchor entries against forgetting, one setting per process (CPU-sized: the embedded model):
suite documents consolidated in sequence into one memory with `--anchors N` anchor entries a
chunk; recall of every document after each, general-question accuracy and held-out NLL before
and after, the first answers to general questions. One JSON line on stdout (--out: appended).

    OMP_NUM_THREADS=1 python benchmarks/anchor_probe.py --seed 200 --docs 1 --anchors 16 --device cpu
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import iicl_fast
from iicl_fast import Config, Memory
from iicl_fast.evaluation import fictional_documents, general_questions, heldout_nll, heldout_texts, score


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=200, help="fictional_documents seed")
    ap.add_argument("--docs", type=int, default=1)
    ap.add_argument("--anchors", type=int, default=16)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", default=None, help="a JSON-lines file to append the row to")
    a = ap.parse_args()
    if a.device == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    model, tok = iicl_fast.load_model(a.model, device=a.device)
    docs = fictional_documents(a.seed, a.docs, 6)
    mem = Memory(model, tok, Config(anchor_entries=a.anchors, progress=False))
    gq = general_questions()
    _, texts = heldout_texts(2000)
    row = {"seed": a.seed, "docs": a.docs, "anchors": a.anchors, "device": str(next(model.parameters()).device),
           "general_base": score(mem, gq) / len(gq), "nll_base": heldout_nll(mem, texts, base=True), "seconds": []}
    for i, d in enumerate(docs):
        t = time.perf_counter()
        mem.consolidate(d.text)
        row["seconds"].append(round(time.perf_counter() - t, 1))
        row[f"recall_after_{i}"] = [score(mem, x.questions) / len(x.questions) for x in docs[: i + 1]]
    row.update(general=score(mem, gq) / len(gq), nll=heldout_nll(mem, texts))
    row["nll_rise"] = row["nll"] / row["nll_base"] - 1
    row["answers"] = mem.ask_many([q.question for q in gq[:6]])
    line = json.dumps(row)
    print(line, flush=True)
    if a.out:
        with open(a.out, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
