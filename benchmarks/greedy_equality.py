"""Greedy tokens of the static decoder (decode.generate_static, what generate uses on CUDA)
against transformers' greedy `generate` on the same rows (one row at a time: no padding),
on the embedded model: fp32 should be identical, bf16 is reported as the rate of rows whose
tokens diverge and where they first do.

    python benchmarks/greedy_equality.py [--model PATH] [--rows 16] [--new 48] [--out results/greedy_equality.json]"""
from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import write_json  # noqa: E402
from iicl_fast.generation import generate  # noqa: E402
from iicl_fast.models import PromptFormat, load_model  # noqa: E402

QUESTIONS = ["What is this text about?", "Summarize the first paragraph.", "Who is the author writing for?",
             "List three claims the text makes.", "What happens at the end?", "Which example does the text give?",
             "Rewrite the opening sentence in simpler words.", "What is the main argument?",
             "Name one thing the text warns against.", "What would a critic say?", "Give a title for this text.",
             "Which word appears most often?", "What question does the text leave open?", "Explain it to a child.",
             "What is the tone of the text?", "Continue the text with one more sentence."]
FALLBACK = ("The lighthouse of Karsk was built in 1871 by Ada Lindqvist. Its lamp burns whale oil. "
            "The keeper feeds seven grey cats every morning. ") * 20


def first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare(model, tok, rows: int = 16, new: int = 48, prefix_tokens: int = 1000) -> dict:
    from transformers import GenerationConfig
    fmt = PromptFormat(tok, model)
    essay = Path(__file__).resolve().parents[1] / ".bench" / "essay.txt"
    text = essay.read_text() if essay.is_file() else FALLBACK
    prefix = fmt.context_prefix(tok.decode(fmt.encode(text)[:prefix_tokens]))
    qs = [fmt.query(q) for q in (QUESTIONS * (rows // len(QUESTIONS) + 1))[:rows]]
    ours = generate(model, qs, prefix=prefix, max_new_tokens=new, sample=False, stop_ids=fmt.stop_ids,
                    pad_id=fmt.pad_id, batch_size=rows)
    gc = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=list(fmt.stop_ids), pad_token_id=fmt.pad_id)
    stops = set(fmt.stop_ids)
    divs, compared = [], 0
    for q, mine in zip(qs, ours):
        ids = torch.tensor([prefix + q], device=next(model.parameters()).device)
        ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gc)[0, ids.shape[1]:].tolist()
        cut = next((i for i, t in enumerate(ref) if t in stops), None)
        ref = ref if cut is None else ref[: cut + 1]
        divs.append(first_divergence(mine, ref))
        compared += len(ref)
    diverged = [d for d in divs if d is not None]
    return {"rows": rows, "new_tokens": new, "prefix_tokens": len(prefix), "dtype": str(next(model.parameters()).dtype),
            "rows_identical": len(divs) - len(diverged), "divergence_rate": round(len(diverged) / len(divs), 3),
            "first_divergence_at": sorted(diverged), "tokens_compared": compared,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    res = []
    for dtype in ("fp32", "bf16"):
        model, tok = load_model(a.model, device="cuda", dtype=dtype)
        r = compare(model, tok, a.rows, a.new)
        print(json.dumps(r), flush=True)
        res.append(r)
        del model
        gc.collect()                        # transformers' models sit in reference cycles
        torch.cuda.empty_cache()
    if a.out:
        write_json(a.out, res)


if __name__ == "__main__":
    main()
