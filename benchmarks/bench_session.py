"""Short-term memory benchmark: passkey retrieval through a bounded cache (SirLLM vs
StreamingLLM vs full), and the hybrid with consolidated memory.

    python benchmarks/bench_session.py [--device cpu|cuda] [--stream 2000 4000 20000] [--trials 20]
                                       [--hybrid] [--mc] [--commit SHA] [--out DIR]

Writes benchmarks/results/session[_DEVICE].json: rows {"task", "policy", "stream_tokens", "cache",
"accuracy", "tokens_per_s", "peak_cache", "cache_after_fill", "trials", "device", "torch",
"transformers", "commit"}; prints a table last.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import iicl_fast  # noqa: E402
from iicl_fast.session_eval import multiple_choice, passkey  # noqa: E402


def device_name(dev: str) -> str:
    if dev == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:  # noqa: BLE001
        return "unknown"


def hybrid(model, tok, retains=(0.1, 0.3)) -> dict:
    """The demo document consolidated once; recall asked with no window (retain=0) and with
    the retained window of each ρ in front. Retention does not touch training, so one
    consolidation serves every ρ: Config(retain=ρ) would train the same adapter (same seed)
    and then compute the same window. Baselines from the base model before consolidation."""
    from iicl_fast.cli import demo_material, recall
    doc, qs = demo_material()
    questions = [q["question"] for q in qs]
    mem = iicl_fast.Memory(model, tok, iicl_fast.Config(progress=False))
    base_none, base_full = recall(qs, mem.ask_many(questions)), recall(qs, mem.ask_many(questions, context=doc))
    t = time.perf_counter()
    mem.consolidate(doc)
    secs = time.perf_counter() - t
    out = {"task": "hybrid", "questions": len(qs), "base_no_context": base_none, "base_full_context": base_full,
           "consolidate_s": round(secs, 1), "recall": {}, "windows": {}, "answers": {}}
    for rho in (0.0,) + tuple(retains):
        mem.retained_ids, mem.retained_scores = [], []
        if rho > 0:
            mem.config.retain = rho
            mem._retain(doc.strip())
        answers = mem.ask_many(questions)
        out["recall"][str(rho)] = recall(qs, answers)
        out["windows"][str(rho)] = tok.decode(mem.retained_ids)
        out["answers"][str(rho)] = answers
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--stream", type=int, nargs="*", default=[2000, 4000, 20000])
    ap.add_argument("--policies", nargs="+", default=["entropy", "recent", "full"])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--cache", type=int, default=256)
    ap.add_argument("--long", type=int, default=0, help="also one entropy run this long (few trials)")
    ap.add_argument("--hybrid", action="store_true", help="demo document with retain=0 vs retain=0.1")
    ap.add_argument("--mc", type=int, default=0,
                    help="also run the SirLLM files: this many grocery episodes, 25x as many rock-paper-scissors rounds")
    ap.add_argument("--commit", default=None)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--name", default=None, help="output file name (default session[_DEVICE].json)")
    args = ap.parse_args()

    model, tok = iicl_fast.load_model(device=args.device)
    import transformers
    meta = {"device": device_name(args.device), "torch": torch.__version__, "transformers": transformers.__version__,
            "commit": args.commit or commit()}
    rows = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / (args.name or ("session.json" if args.device == "cpu" else f"session_{args.device}.json"))

    def emit(r):
        r.update(meta)
        rows.append(r)
        print(json.dumps({k: v for k, v in r.items() if k not in ("trials", "answers", "windows")}), flush=True)
        tmp = path.with_suffix(".json.tmp")          # after every row: a cut-off run keeps what it did
        tmp.write_text(json.dumps(rows, indent=1))
        os.replace(tmp, path)

    for n in args.stream:
        for pol in args.policies:
            maxpos = model.config.max_position_embeddings
            if pol == "full" and n + 32 > maxpos:
                emit({"task": "passkey", "policy": pol, "stream_tokens": n, "cache": None, "accuracy": None,
                      "note": f"does not fit: the model's maximum is {maxpos} positions"})
                continue
            r = passkey(model, tok, policy=pol, stream_tokens=n, cache=args.cache, trials=args.trials, progress=False)
            if pol == "full":
                r["cache"] = None
            emit(r)
    if args.long:
        emit(passkey(model, tok, policy="entropy", stream_tokens=args.long, cache=args.cache,
                     trials=max(1, args.trials // 4), progress=False))
    if args.mc:
        data = Path(__file__).resolve().parents[2] / "shared" / "data" / "sirllm"
        for f, n in (("keys.jsonl", args.mc), ("rock_paper_scissors_dominant_rock.jsonl", 25 * args.mc)):
            for pol in ("entropy", "recent"):
                emit(multiple_choice(model, tok, data=str(data / f), policy=pol, cache=args.cache,
                                     trials=n, progress=False))
    if args.hybrid:
        emit(hybrid(model, tok))

    print(f"\n{meta['device']}  torch {meta['torch']}  transformers {meta['transformers']}  commit {meta['commit']}")
    print(f"{'task':8} {'policy':8} {'stream':>7} {'cache':>5} {'acc':>6} {'tok/s':>8} {'peak':>5} {'fill[min,max]':>14}")
    for r in rows:
        if r["task"] == "passkey":
            acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.2f}"
            tps = f"{r['tokens_per_s']:.0f}" if "tokens_per_s" in r else r.get("note", "")
            print(f"{'passkey':8} {r['policy']:8} {r['stream_tokens']:>7} {str(r['cache']):>5} {acc:>6} {tps:>8} "
                  f"{str(r.get('peak_cache', '-')):>5} {str(r.get('cache_after_fill', '-')):>14}")
        elif r["task"] == "hybrid":
            n = r["questions"]
            print(f"hybrid   base model: no context {r['base_no_context']}/{n}, full context {r['base_full_context']}/{n};"
                  " consolidated, recall by retain: " + ", ".join(f"{k}: {v}/{n}" for k, v in r["recall"].items()))
        else:
            print("mc      ", json.dumps({k: v for k, v in r.items() if k not in meta}))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
