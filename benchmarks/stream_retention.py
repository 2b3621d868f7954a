"""Retention in a stream, setting by setting: the stress stream's first chunks (essays with one
planted fact a chunk), consolidated one chunk at a time; after every chunk, every fact seen so
far is asked without the text. -> recall right after each fact's chunk, recall at the end, the
curve by chunks since, the code's log-prob at the end, and how many fact sentences the replay
buffer holds (issues 13 and 17: why a stream does not keep its facts).

    python benchmarks/stream_retention.py --model smol.gguf --device cuda --chunks 20 \\
        --setting stress: --setting lr3e-3:lr=3e-3 --budget-min 6

A setting is NAME:field=value,field=value over --preset; settings run in the order given
until --budget-min is spent (the next one starts only if the last one's time still fits).
Results: benchmarks/results/stream_retention.json (one row per setting)."""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from iicl_fast import Config, Memory  # noqa: E402
from iicl_fast.config import coerce, check_fields  # noqa: E402
from iicl_fast.driver import split_chunks  # noqa: E402
from iicl_fast.models import PromptFormat, load_model  # noqa: E402
from iicl_fast.stress import FACT, build_stream  # noqa: E402

LEAD = FACT.split("{code}")[0]          # "The vault code of the {entity} room is "


def parse_setting(s: str) -> tuple[str, dict]:
    name, _, rest = s.partition(":")
    fields = dict(kv.split("=", 1) for kv in rest.split(",") if kv.strip())
    check_fields(fields)
    return name, {k: coerce(k, v) for k, v in fields.items()}


def code_logprob(mem: Memory, facts: list[dict]) -> list[float]:
    """log P(" CODE." | the question's prompt + "The vault code of the X room is"), summed, per fact."""
    out = []
    fmt = mem.fmt
    dev = next(mem.model.parameters()).device
    mem._activate()
    for f in facts:
        ids = mem.prompt_ids(f["question"]) + fmt.encode(LEAD.format(entity=f["entity"]).rstrip())
        tgt = fmt.encode(" " + f["code"] + ".")
        x = torch.tensor([ids + tgt], device=dev)
        with torch.no_grad():
            lp = mem.model(input_ids=x).logits[0, len(ids) - 1: -1].float().log_softmax(-1)
        out.append(round(float(lp.gather(1, torch.tensor(tgt, device=dev)[:, None]).sum()), 2))
    return out


def run_setting(args, name: str, overrides: dict, text: str, facts: list[dict], chunks: list[str]) -> dict:
    model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    cfg = Config.preset(args.preset, progress=False, **overrides)
    mem = Memory(model, tok, cfg)
    kept_fact = {}
    update = mem._update_replay

    def spy(kept, teacher, chunk_index):        # which chunk's fact sentence was selected
        kept_fact[chunk_index] = sum("vault code of the" in mem.tokenizer.decode(e.response) for e in kept)
        update(kept, teacher, chunk_index)
    mem._update_replay = spy
    by_chunk = {}
    for f in facts:
        by_chunk.setdefault(f["chunk"], []).append(f)
    hits_after, rows, t0 = {}, [], time.perf_counter()
    seen: list[dict] = []
    for j, c in enumerate(chunks):
        t = time.perf_counter()
        rep = mem.consolidate(c, chunk_index=j)
        secs = time.perf_counter() - t
        seen += by_chunk.get(j, [])
        answers = mem.ask_many([f["question"] for f in seen]) if seen else []
        ok = [f["code"] in a for f, a in zip(seen, answers)]
        for f, o in zip(seen, ok):
            hits_after.setdefault(f["entity"], []).append(o)
        in_buf = sum("vault code of the" in mem.tokenizer.decode(e.response) for e in mem.replay[0])
        rows.append({"chunk": j, "seconds": round(secs, 2), "train_s": round(rep.seconds.get("train", 0), 2),
                     "recall_so_far": round(sum(ok) / len(ok), 3) if ok else None, "facts_so_far": len(ok),
                     "fact_entries_kept": kept_fact.get(j), "fact_entries_in_replay": in_buf,
                     "loss": rep.loss_per_epoch})
        print(f"[{name}] chunk {j}: {secs:.1f}s, recall so far {sum(ok)}/{len(ok)}, fact entries kept "
              f"{kept_fact.get(j)}, in replay {in_buf}", flush=True)
    final = [f["code"] in a for f, a in zip(facts, mem.ask_many([f["question"] for f in facts]))]
    answers = mem.ask_many([f["question"] for f in facts[:4]])
    right_after = [hits_after[f["entity"]][0] for f in facts]
    n = len(chunks)
    curve = []                         # recall by chunks since the fact's chunk (0 = right after)
    for k in range(n):
        xs = [hits_after[f["entity"]][k] for f in facts if len(hits_after[f["entity"]]) > k]
        curve.append(round(sum(xs) / len(xs), 3) if xs else None)
    lp = code_logprob(mem, facts)
    res = {"setting": name, "overrides": overrides, "chunks": n, "facts": len(facts),
           "recall_end": round(sum(final) / len(final), 3), "recall_right_after": round(sum(right_after) / len(right_after), 3),
           "first_fact_right_after": right_after[0], "first_fact_end": final[0],
           "recall_by_chunks_since": curve, "code_logprob_mean": round(sum(lp) / len(lp), 2), "code_logprob": lp,
           "fact_entries_kept": sum(r["fact_entries_kept"] or 0 for r in rows),
           "fact_entries_in_replay_end": rows[-1]["fact_entries_in_replay"],
           "seconds_per_chunk": round(sum(r["seconds"] for r in rows) / n, 2),
           "train_s_per_chunk": round(sum(r["train_s"] for r in rows) / n, 2),
           "wall_s": round(time.perf_counter() - t0, 1), "sample_answers": answers, "per_chunk": rows}
    with mem.model.disable_adapter():
        base = [f["code"] in a for f, a in zip(facts, mem.ask_many([f["question"] for f in facts]))]
        res["baseline"] = round(sum(base) / len(base), 3)
        res["base_code_logprob_mean"] = round(sum(code_logprob(mem, facts)) / len(facts), 2)
    print(f"[{name}] recall right after {res['recall_right_after']}, at end {res['recall_end']} (no memory "
          f"{res['baseline']}); code log-prob {res['code_logprob_mean']} (base {res['base_code_logprob_mean']}); "
          f"{res['seconds_per_chunk']} s/chunk", flush=True)
    del mem, model
    gc.collect()                            # transformers' models sit in reference cycles
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--preset", default="stress")
    ap.add_argument("--chunk-tokens", type=int)
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--setting", action="append", default=[])
    ap.add_argument("--budget-min", type=float, default=1e9)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/stream_retention.json"))
    args = ap.parse_args(argv)
    settings = [parse_setting(s) for s in (args.setting or ["default:"])]
    ct = args.chunk_tokens or Config.preset(args.preset).chunk_tokens
    model, tok = load_model(args.model, device="cpu")
    fmt = PromptFormat(tok, model)
    del model
    # one fact a chunk: a stream of `chunks` chunks with `chunks` facts at (i + 0.5) / chunks
    text, facts = build_stream(fmt.encode, args.chunks * ct, args.chunks, args.seed)
    chunks = split_chunks(fmt, text, ct)
    for f in facts:
        f["chunk"] = next(i for i, c in enumerate(chunks) if f["sentence"] in c)
    print(f"{len(chunks)} chunks of <= {ct} tokens, {len(facts)} facts in chunks {[f['chunk'] for f in facts]}", flush=True)
    out, t0, last = [], time.perf_counter(), 0.0
    for name, ov in settings:
        if time.perf_counter() - t0 + last > 60 * args.budget_min:
            print(f"[{name}] skipped: the budget of {args.budget_min} min would be exceeded", flush=True)
            continue
        t = time.perf_counter()
        out.append(run_setting(args, name, ov, text, facts, chunks))
        last = time.perf_counter() - t
        p = Path(args.out)
        p.parent.mkdir(parents=True, exist_ok=True)
        dev = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "cpu"
        doc = {"device": dev, "torch": torch.__version__, "commit": os.environ.get("IICL_COMMIT", "unknown"),
               "preset": args.preset, "chunk_tokens": ct, "model": args.model or "embedded", "results": out}
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
