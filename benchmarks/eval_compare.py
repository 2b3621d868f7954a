"""Compare settings on the sequence suite's result files, with the noise beside every figure.

    python benchmarks/eval_compare.py [FILES...] [--control LABEL]   # default: benchmarks/results/eval_sequence_*.json

Every file of `eval_suite.py --suite sequence` (or an `eval_sweep.py` row) holds some document
sequences (three documents into one memory, a seed each) and/or 20-chunk streams (a seed each).
Files are grouped by the setting they ran, read from the Config recorded in each file (not
from the file name: the same setting was run under several names), compared with the current
defaults (`small`), and the figures are pooled over every sequence / stream of a setting:

  three documents: after the third / alone (the issue's ≥ 0.9× target), after the third /
                   right after, and right after / alone (how well later documents are learnt);
  streams:         the first five chunks' recall at the end / right after (pooled), the first
                   chunk's, all 20 chunks at the end, held-out NLL rise, general accuracy;
  and, in files that have them, the same ratios on the answers' log-probability: the gain over
  the base model that is kept (evaluation.answer_logprob / gain_kept) — whether the documents'
  text is still held, beside whether their questions are still answered;
  and each file's seconds a chunk (its cost; rows that shared a GPU slowed each other).

Each figure has a 90 % interval from a bootstrap over the sequences (streams) — one sequence's
documents are not independent of each other, so the sequence is the unit — and each setting
a paired difference from the defaults on the seeds both ran (same documents, so most of the
documents' own difficulty cancels). Why: at 7–9 questions a document, one sequence's after /
alone ranged 0.58–1.41 over the defaults' 10 sequences (sd 0.24), and the 18th–20th sessions'
choices were made on 3–10 units.

Writes a markdown table to stdout (and --json PATH)."""
from __future__ import annotations

import argparse
import glob
import json
import os
import random
import sys
from dataclasses import fields

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from iicl_fast.config import Config  # noqa: E402

# what a field meant in files written before it existed (the behaviour of the code then)
BEFORE_IT_EXISTED = {"lr_decay_after": 0, "prose_anchors": 0, "lr_decay_chunks": 0, "lr_floor": 0.5,
                     "replay_sample": 0, "retain_unit": "token", "anchor_entries": 0,
                     "replay_repeats": 1, "qa_response": "answer", "replay_fill": False,
                     "replay_draw": "uniform", "replay_repeats_whole": False}
# fields that change the speed, not what is computed (draws are keyed by row; the decoder's
# states are the teacher pass's up to the kernels' rounding), or only the recall suite's window
NOT_THE_SETTING = {"gen_batch_size", "progress", "seed", "retain", "retain_decay", "retain_unit",
                   "teacher_from_elicit"}


def setting(cfg: dict) -> dict:
    """The file's Config as the fields that decide the result, missing ones filled in with what
    they meant before they existed, fields without effect under the others dropped."""
    full = {f.name: cfg.get(f.name, BEFORE_IT_EXISTED.get(f.name, "?")) for f in fields(Config)}
    if not full["lr_decay_chunks"]:
        full.pop("lr_floor"), full.pop("lr_decay_after")
    if not full["replay_entries"]:
        full.pop("replay_sample"), full.pop("replay_policy")
    return {k: v for k, v in full.items() if k not in NOT_THE_SETTING}


def label(s: dict, base: dict) -> str:
    diff = [f"{k}={s[k]}" for k in sorted(s) if s.get(k) != base.get(k)]
    diff += [f"{k}=-" for k in sorted(base) if k not in s]
    return ",".join(diff) or "small (defaults)"


def units(path: str) -> tuple[str, list[dict], list[dict]]:
    """-> (model/dtype key, sequences, streams) of one file; each unit carries its seed."""
    d = json.load(open(path))
    r, seeds = d["results"], d["seeds"]
    key = f"{os.path.basename(str(d.get('model')))}/{d.get('dtype')}"
    seqs = []
    for k, m in enumerate(r.get("matrix") or []):
        n = len(m)
        seqs.append({"seed": seeds[k], "after": sum(m[-1]) / n, "right": sum(m[i][i] for i in range(n)) / n,
                     "alone": sum(r["single_doc"][k]) / n})
        if "answer_logprob" in r:       # the gain of answer log-probability over the base, summed
            lp = r["answer_logprob"]["runs"][k]
            docs = [j for j in range(n) if None not in (lp["matrix"][-1][j], lp["matrix"][j][j],
                                                        lp["single_doc"][j], lp["base"][j])]
            gain = lambda xs: sum(xs[j] - lp["base"][j] for j in docs)
            seqs[-1].update(lp_after=gain(lp["matrix"][-1]), lp_right=gain([lp["matrix"][j][j] if j in docs else 0
                                                                            for j in range(n)]),
                            lp_alone=gain(lp["single_doc"]))
    streams = []
    if r.get("stream_seeds") and "recall_by_position_right_after" in r:
        ra = [p["values"] for p in r["recall_by_position_right_after"]]
        ae = [p["values"] for p in r["recall_by_position_at_end"]]
        fo = r["forgetting"]
        early = r.get("early_chunks", 5)
        for k in range(r["stream_seeds"]):
            streams.append({"seed": seeds[k], "early_end": sum(ae[c][k] for c in range(early)),
                            "early_right": sum(ra[c][k] for c in range(early)),
                            "first_end": ae[0][k], "first_right": ra[0][k],
                            "all_end": sum(ae[c][k] for c in range(len(ae))) / len(ae),
                            "nll": fo["nll_rise"]["stream"]["values"][k],
                            "general": fo["general_accuracy"]["stream"]["values"][k]})
            if "answer_logprob_stream" in r:
                st = r["answer_logprob_stream"]["per_stream"][k]
                end, right, base = st["by_position_logprob"], st["right_after_logprob"], st["base_logprob"]
                ok = [c for c in range(early) if None not in (end[c], right[c], base[c])]
                streams[-1].update(lp_early_end=sum(end[c] - base[c] for c in ok),
                                   lp_early_right=sum(right[c] - base[c] for c in ok))
                if 0 in ok:
                    streams[-1].update(lp_first_end=end[0] - base[0], lp_first_right=right[0] - base[0])
    sec = r.get("seconds_per_chunk")     # the file's, shared by its units (cost beside quality)
    if sec is not None:
        for u in seqs + streams:
            u["sec"] = float(sec)
    return key, seqs, streams


def having(us: list[dict], num: str, den: str | None) -> list[dict]:
    """The units that carry the figure (files written before answer log-probabilities do not)."""
    return [u for u in us if num in u and (den is None or den in u)]


def pooled(us: list[dict], num: str, den: str | None) -> float | None:
    if not us:
        return None
    a = sum(u[num] for u in us)
    if den is None:
        return a / len(us)
    b = sum(u[den] for u in us)
    return a / b if b > 0 else None


def interval(us: list[dict], num: str, den: str | None, rounds: int = 4000, seed: int = 0):
    """90 % bootstrap interval of pooled(us, num, den), resampling units."""
    rng = random.Random(seed)
    vals = []
    for _ in range(rounds):
        v = pooled([us[rng.randrange(len(us))] for _ in us], num, den)
        if v is not None:
            vals.append(v)
    vals.sort()
    return (vals[int(0.05 * len(vals))], vals[int(0.95 * len(vals)) - 1]) if vals else (None, None)


def paired(us: list[dict], ctrl: list[dict], num: str, den: str | None, rounds: int = 4000, seed: int = 1):
    """pooled(variant) - pooled(control) on the seeds both ran, with its 90 % bootstrap interval
    (the same seeds drawn for both)."""
    cs = {u["seed"]: u for u in ctrl}
    both = [(u, cs[u["seed"]]) for u in us if u["seed"] in cs]
    if not both:
        return None
    def diff(pairs):
        a, b = pooled([p[0] for p in pairs], num, den), pooled([p[1] for p in pairs], num, den)
        return None if a is None or b is None else a - b
    rng = random.Random(seed)
    vals = sorted(v for v in (diff([both[rng.randrange(len(both))] for _ in both]) for _ in range(rounds))
                  if v is not None)
    d = diff(both)
    return {"n": len(both), "diff": d, "lo": vals[int(0.05 * len(vals))] if vals else None,
            "hi": vals[int(0.95 * len(vals)) - 1] if vals else None}


SEQ_FIGURES = [("after 3 / alone", "after", "alone"), ("after 3 / right after", "after", "right"),
               ("right after / alone", "right", "alone"),
               # the same on answer log-probability: the gain over the base kept (evaluation.gain_kept)
               ("logprob after 3 / alone", "lp_after", "lp_alone"), ("logprob after 3 / right after", "lp_after", "lp_right"),
               ("s a chunk", "sec", None)]
STREAM_FIGURES = [("first 5 kept", "early_end", "early_right"), ("first chunk kept", "first_end", "first_right"),
                  ("all 20 at end", "all_end", None), ("NLL rise", "nll", None), ("general acc.", "general", None),
                  ("logprob first 5 kept", "lp_early_end", "lp_early_right"),
                  ("logprob first chunk kept", "lp_first_end", "lp_first_right"), ("s a chunk", "sec", None)]


def compare(paths: list[str], control: str = "small (defaults)") -> dict:
    """control: the setting's label that the paired differences are taken against."""
    base = setting({f.name: getattr(Config(), f.name) for f in fields(Config)})
    groups: dict = {}
    for p in paths:
        d = json.load(open(p))
        if d.get("suite") != "sequence" or "config" not in d:
            continue
        key, seqs, streams = units(p)
        s = setting(d["config"])
        g = groups.setdefault((key, json.dumps(s, sort_keys=True)), {"label": label(s, base), "model": key,
                                                                     "seqs": {}, "streams": {}, "files": []})
        g["files"].append(os.path.basename(p))
        for u in seqs:        # a seed run twice (the same setting under two names) counts once
            g["seqs"].setdefault(u["seed"], u)
        for u in streams:
            g["streams"].setdefault(u["seed"], u)
    out = []
    for (key, s), g in sorted(groups.items(), key=lambda kv: kv[1]["label"]):
        ctrl = next((h for (k2, s2), h in groups.items() if k2 == key and h["label"] == control), None)
        row = {"setting": g["label"], "model": key, "files": sorted(g["files"])}
        for kind, figs in (("seqs", SEQ_FIGURES), ("streams", STREAM_FIGURES)):
            us = list(g[kind].values())
            if not us:
                continue
            row[kind] = {"n": len(us), "seeds": sorted(g[kind])}
            for name, num, den in figs:
                have = having(us, num, den)
                if not have:
                    continue
                lo, hi = interval(have, num, den)
                fig = {"value": pooled(have, num, den), "lo": lo, "hi": hi, "n": len(have)}
                if ctrl is not None and ctrl is not g and having(list(ctrl[kind].values()), num, den):
                    fig["vs_small"] = paired(have, having(list(ctrl[kind].values()), num, den), num, den)
                row[kind][name] = fig
        out.append(row)
    return {"settings": out, "control": control}


def _f(x, nd=3):
    return "—" if x is None else f"{x:.{nd}f}"


def table(res: dict) -> str:
    lines = []
    for kind, figs, title in (("seqs", SEQ_FIGURES, "Three documents in sequence (unit: one sequence)"),
                              ("streams", STREAM_FIGURES, "20-chunk streams (unit: one stream)")):
        rows = [r for r in res["settings"] if kind in r]
        figs = [f for f in figs if any(f[0] in r[kind] for r in rows)]     # columns some setting has
        if not rows:
            continue
        lines += [f"### {title}", "", "| setting | model | n | " + " | ".join(f[0] for f in figs) + " |",
                  "|---|---|---|" + "---|" * len(figs)]
        for r in rows:
            cells = []
            for name, _, _ in figs:
                f = r[kind].get(name)
                if f is None:
                    cells.append("—")
                    continue
                c = f"{_f(f['value'])} [{_f(f['lo'])}, {_f(f['hi'])}]" + (f" (n {f['n']})" if f["n"] < r[kind]["n"] else "")
                v = f.get("vs_small")
                if v:
                    c += f"; Δ {_f(v['diff'], 3)} [{_f(v['lo'])}, {_f(v['hi'])}] on {v['n']}"
                cells.append(c)
            lines.append(f"| {r['setting']} | {r['model']} | {r[kind]['n']} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append(f"Pooled over the units; [90 % bootstrap interval]; Δ: minus `{res.get('control')}` on the seeds both ran. "
                 "s a chunk: each file's seconds_per_chunk, as logged — rows sharing one GPU (eval_sweep.py) "
                 "slow each other, so compare it only between rows of one call.")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", help="result files (default: benchmarks/results/eval_sequence_*.json)")
    ap.add_argument("--json", help="also write the comparison here")
    ap.add_argument("--control", default="small (defaults)",
                    help="the setting (its label in the table) the paired differences are taken against; "
                         "e.g. 'replay_repeats=1,replay_repeats_whole=False' for the defaults before the 25th session")
    args = ap.parse_args(argv)
    paths = args.files or sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                        "results", "eval_sequence_*.json")))
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        print(f"eval_compare: no such file: {missing[0]}", file=sys.stderr)
        return 2
    try:
        res = compare(paths, args.control)
    except (KeyError, ValueError, TypeError, IndexError) as e:
        print(f"eval_compare: not a sequence-suite result file ({type(e).__name__}: {e})", file=sys.stderr)
        return 2
    print(table(res))
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(res, f, indent=1)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
