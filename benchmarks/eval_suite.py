"""The evaluation suite on one device -> benchmarks/results/eval_<suite>.json (+ .png where
matplotlib is installed), with the device, versions and commit.

    python benchmarks/eval_suite.py --suite all --seeds 3 --set gen_batch_size=64      # one GPU, minutes
    python benchmarks/eval_suite.py --suite recall --quick --device cpu                  # the CPU

Same sizes and flags as `iicl-fast eval` (iicl_fast/evaluation.py holds the suites); the
commit is IICL_COMMIT when set (the GPU machine's copy of the tree has a stale git HEAD)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import transformers

import iicl_fast
from iicl_fast.cli import ablation_rows, build_config, log_config, model_kw
from iicl_fast.evaluation import ABLATIONS, SUITES, Sizes, run_suite, table, write_result

RESULTS = Path(__file__).parent / "results"


def commit() -> str:
    if os.environ.get("IICL_COMMIT"):
        return os.environ["IICL_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def headline(suite: str, res: dict) -> dict:
    """The figures a variant row is compared on (mean ± std over seeds)."""
    r = res["results"]
    if suite == "forgetting":
        return {"nll_rise": {k: v["mean"] for k, v in r["nll_rise"].items()},
                "general_accuracy": {k: v["mean"] for k, v in r["general_accuracy"].items()},
                "s_per_chunk": r["seconds_per_chunk"], "wall_s": res["wall_s"]}
    keys = {"recall": ("full_context", "consolidated", "consolidated_retained"),
            "sequence": ("just_after_recall", "final_recall", "single_doc_recall")}[suite]
    out = {k: f"{r[k]['mean']:.3f}±{r[k]['std']:.3f}" for k in keys if k in r}
    if suite == "sequence" and "first_chunk_kept" in r:
        out["first_chunk_kept"] = r["first_chunk_kept"]
        out["first_chunk"] = [x["mean"] for x in r["first_chunk_by_chunks_since"]]
        out["early_chunks_kept"] = r["early_chunks_kept"]
        out["right_after"] = [x["mean"] for x in r["recall_by_position_right_after"]]
        out["at_end"] = [x["mean"] for x in r["recall_by_position_at_end"]]
        out["nll_rise"] = {k: v["mean"] for k, v in r["forgetting"]["nll_rise"].items()}
    return {**out, "s_per_chunk": r["seconds_per_chunk"], "wall_s": res["wall_s"]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--suite", default="all", help=" | ".join(SUITES) + " | all (or a comma list)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--docs", type=int, default=None)
    ap.add_argument("--facts", type=int, default=None)
    ap.add_argument("--sequence-docs", type=int, default=None, help="0: the long stream only")
    ap.add_argument("--stream-chunks", type=int, default=None)
    ap.add_argument("--stream-seeds", type=int, default=None)
    ap.add_argument("--ablations", default=None, help="comma list (default: all)")
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME:field=value,... an extra ablation row; with --suite recall, sequence or forgetting "
                         "the suite is run once per variant (eval_<suite><tag>_<NAME>.json)")
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--preset", default=None)
    ap.add_argument("--config", default=None)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--tag", default="", help="suffix of the result files (eval_<suite><tag>.json)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    suites = list(SUITES) if args.suite == "all" else args.suite.split(",")
    sizes = Sizes.quick() if args.quick else Sizes()
    for name in ("docs", "facts", "sequence_docs", "stream_chunks", "stream_seeds"):
        if getattr(args, name) is not None:
            setattr(sizes, name, getattr(args, name))
    variants = ablation_rows(args.ablations, args.variant)
    cfg = build_config(args)
    t = time.perf_counter()
    model, tok = iicl_fast.load_model(args.model, **model_kw(args))
    print(f"model loaded in {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
    log_config(cfg, model)
    dev = next(model.parameters()).device
    meta = {"device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__, "commit": commit(),
            "model": args.model or "embedded SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)"}
    seeds = range(args.seed, args.seed + args.seeds)
    for suite in suites:
        if suite == "ablations":      # row by row, the file rewritten after each (a cut-off call keeps its rows)
            res = None
            for name, over in (variants or ablation_rows(",".join(ABLATIONS), [])).items():
                part = run_suite(suite, model, tok, cfg, seeds=seeds, sizes=sizes, variants={name: over})
                if res is None:
                    res = {**part, **meta}
                else:
                    res["results"].update(part["results"])
                    res["wall_s"] = round(res["wall_s"] + part["wall_s"], 1)
                write_result(res, Path(args.out), name=suite + args.tag)
                print(json.dumps({name: part["results"][name]}), flush=True)
        elif variants and suite in ("recall", "sequence", "forgetting"):   # the suite once per --variant row
            for name, over in variants.items():
                res = {**run_suite(suite, model, tok, replace(cfg, **over), seeds=seeds, sizes=sizes),
                       **meta, "variant": {name: over}}
                write_result(res, Path(args.out), name=f"{suite}{args.tag}_{name}")
                print(json.dumps({"variant": name, "overrides": over, **headline(suite, res)}), flush=True)
        else:
            res = {**run_suite(suite, model, tok, cfg, seeds=seeds, sizes=sizes), **meta}
            write_result(res, Path(args.out), name=suite + args.tag)
        print(table(res), flush=True)
        print(json.dumps({"suite": suite + args.tag, "wall_s": res["wall_s"]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
