"""iicl-fast: demo, consolidate, ask, eval, session-eval. Errors: one line on stderr, exit code 2."""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from importlib.resources import files
from pathlib import Path

from . import dist
from .config import PRESETS, Config, IICLError, check_fields, coerce


def read_text_file(path: str) -> str:
    """UTF-8 text of a user file, or IICLError naming the problem."""
    p = Path(path)
    if p.is_dir():
        raise IICLError(f"{path} is a directory, not a text file")
    if not p.is_file():
        raise IICLError(f"no such file: {path}")
    data = p.read_bytes()
    if b"\x00" in data:
        raise IICLError(f"{path} is a binary file, not text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise IICLError(f"{path} is not UTF-8 text (byte {e.start})") from None
    if not text.strip():
        raise IICLError(f"{path} is empty")
    return text


def demo_material() -> tuple[str, list[dict]]:
    doc = files("iicl_fast").joinpath("data/demo.txt").read_text(encoding="utf-8")
    qs = json.loads(files("iicl_fast").joinpath("data/demo_questions.json").read_text(encoding="utf-8"))
    return doc, qs


def recall(questions: list[dict], answers: list[str]) -> int:
    """Questions whose answer contains one of the accepted strings (case-insensitive)."""
    return sum(any(a.lower() in ans.lower() for a in q["answers"]) for q, ans in zip(questions, answers))


def log(msg: str) -> None:
    if dist.is_main():                                    # several ranks (torchrun): rank 0 speaks
        sys.stderr.write(msg + "\n")                      # one write (print writes the newline apart,
        sys.stderr.flush()                               # and another rank's line lands between)


def read_config_file(path: str) -> dict:
    """Config fields from a JSON or TOML file (a flat table of field = value)."""
    text = read_text_file(path)
    if path.endswith(".toml"):
        try:
            import tomllib
        except ImportError:                      # Python 3.10
            raise IICLError(f"{path}: reading TOML needs Python >= 3.11; give the config as JSON") from None
        try:
            d = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise IICLError(f"{path} is not valid TOML: {e}") from None
    else:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise IICLError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise IICLError(f"{path} must hold one table of Config fields")
    check_fields(d)
    return d


def config_overrides(args) -> dict:
    """Fields given on the command line: --config FILE, then each --set field=value, then
    --chunk-tokens (later wins)."""
    fields = dict(read_config_file(args.config)) if getattr(args, "config", None) else {}
    for item in getattr(args, "set", None) or []:
        if "=" not in item:
            raise IICLError(f"--set {item!r}: write it as field=value")
        k, v = item.split("=", 1)
        fields[k.strip()] = v
    if getattr(args, "chunk_tokens", None):
        fields["chunk_tokens"] = args.chunk_tokens
    check_fields(fields)
    return {k: coerce(k, v) for k, v in fields.items()}


def build_config(args, **extra) -> Config:
    """The run's Config: --preset (default small), then the command line's overrides."""
    cfg = Config.preset(getattr(args, "preset", None) or "small", **{**extra, **config_overrides(args)})
    cfg.progress = cfg.progress and dist.is_main()        # several ranks: one progress bar, rank 0's
    return cfg


def model_kw(args) -> dict:
    return dict(device=getattr(args, "device", "auto"), dtype=getattr(args, "dtype", "auto"))


def log_config(cfg: Config, model) -> None:
    dev = next(model.parameters())
    log(f"config ({dev.device}, {str(dev.dtype).replace('torch.', '')}): " + json.dumps(cfg.to_dict()))


def cmd_demo(args) -> int:
    from . import Memory, load_model
    doc, qs = demo_material()
    t = time.perf_counter()
    cfg = build_config(args, seed=args.seed)              # bad flags fail before the model loads
    model, tok = load_model(args.model, **model_kw(args))
    load_s = time.perf_counter() - t
    log_config(cfg, model)
    mem = Memory(model, tok, cfg)
    questions = [q["question"] for q in qs]
    t = time.perf_counter()
    before = mem.ask_many(questions)
    full = mem.ask_many(questions, context=doc)
    ask_s = time.perf_counter() - t
    rep = mem.consolidate(doc)
    after = mem.ask_many(questions)
    result = {"questions": len(qs), "recall_no_context": recall(qs, before),
              "recall_full_context": recall(qs, full), "recall_consolidated": recall(qs, after),
              "seconds": {"load": round(load_s, 1), "ask_baselines": round(ask_s, 1),
                          **{k: round(v, 1) for k, v in rep.seconds.items()}},
              "elicited": rep.elicited, "kept": rep.kept, "loss_per_epoch": [round(x, 4) for x in rep.loss_per_epoch]}
    if args.json:
        result["answers"] = [{"question": q, "no_context": b, "full_context": f, "consolidated": a}
                             for q, b, f, a in zip(questions, before, full, after)]
        print(json.dumps(result))
        return 0
    print("Document:\n  " + doc.strip() + "\n")
    for q, b, f, a in zip(questions, before, full, after):
        print(f"Q: {q}\n  no context   : {b}\n  full context : {f}\n  consolidated : {a}\n")
    n = len(qs)
    print(f"recall without context        : {result['recall_no_context']}/{n}")
    print(f"recall with full context      : {result['recall_full_context']}/{n}")
    print(f"recall after consolidation    : {result['recall_consolidated']}/{n}  (document not in the window)")
    print(rep.summary())
    print("seconds: " + ", ".join(f"{k} {v}" for k, v in result["seconds"].items()))
    return 0


def check_fsdp(args) -> None:
    if args.fsdp and not dist.several():
        raise IICLError("--fsdp needs several processes: run under torchrun --nproc-per-node N (N >= 2)")


def cmd_consolidate(args) -> int:
    from . import Memory, load_model
    from .driver import stream
    from .memory import open_for_write
    texts = [read_text_file(f) for f in args.files]        # every file checked before any work
    if args.fsdp and args.separate:
        raise IICLError("--fsdp shards one base over the ranks, --separate gives each rank its own "
                        "documents: use one of them")
    check_fsdp(args)
    if args.separate:
        return consolidate_separate(args, texts)
    out = Path(args.out)
    cfg = build_config(args)                             # bad flags fail before the model loads
    if out.exists() and not out.is_dir():
        raise IICLError(f"{out} exists and is not a memory directory")
    with open_for_write(out):                            # locked; an interrupted save finished
        dist.barrier()                                   # (by rank 0, before any rank reads it)
        if out.exists() and not (out / "manifest.json").is_file():
            raise IICLError(f"{out} exists and is not a memory directory")
        model, tok = load_model(args.model, **model_kw(args))
        if out.exists():
            mem = Memory.load(out, model, tok)          # continue it: its LoRA layout and config ...
            given = config_overrides(args)
            if args.preset:
                given = {**PRESETS[args.preset], **given}
            fixed = {k for k in ("lora_r", "lora_alpha", "target_modules") if k in given and given[k] != getattr(mem.config, k)}
            if fixed:
                raise IICLError(f"{out} holds an adapter with "
                                f"{', '.join(f'{k}={getattr(mem.config, k)!r}' for k in sorted(fixed))}: "
                                "a continued memory keeps its LoRA layout")
            mem.config = Config(**{**mem.config.to_dict(), **given})     # ... with the flags given now
            mem.config.progress = mem.config.progress and dist.is_main()
        else:
            mem = Memory(model, tok, cfg)
        if args.fsdp:
            log(mem.shard_base())
        log_config(mem.config, model)
        done = skipped = 0
        for rep in stream(mem, texts, checkpoint_dir=out, log=log):
            log(rep.summary())
            done += not rep.skipped
            skipped += rep.skipped
    log(f"memory {out}: {len(mem.chunks)} chunks ({done} consolidated now, {skipped} already there)")
    return 0


def consolidate_separate(args, texts: list[str]) -> int:
    """One memory per file at DIR/<file stem>/, all trained together (consolidate_many).
    A stem whose memory already holds exactly that file's chunks is skipped (resume). Under
    several ranks each takes every W-th file (its own memories, its own bank)."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise IICLError(f"{out} exists and is not a directory")
    stems = [Path(f).stem for f in args.files]
    seen = {}
    for f, st in zip(args.files, stems):
        if st in seen:
            raise IICLError(f"{seen[st]} and {f} share the stem {st!r}: --separate writes one memory per stem")
        seen[st] = f
    cfg = build_config(args)                              # (progress bars: rank 0's)
    if dist.active():            # several ranks: each takes every W-th document, its own memories
        mine = dist.shard(list(range(len(texts))))
        with dist.local():
            done = _separate_locked(args, cfg, [texts[i] for i in mine], [stems[i] for i in mine], out) if mine else 0
        total = dist.all_reduce_sum([float(done), float(len(mine))])
        log(f"{int(total[0])} memories written under {out} by {dist.world()} ranks "
            f"({int(total[1] - total[0])} already there)")
        return 0
    done = _separate_locked(args, cfg, texts, stems, out)
    log(f"{done} memories written under {out} ({len(stems) - done} already there)")
    return 0


def _separate_locked(args, cfg, texts, stems, out) -> int:
    from .memory import open_for_write
    with contextlib.ExitStack() as locks:
        for st in stems:                                  # every memory locked before any work
            locks.enter_context(open_for_write(out / st))
        return _separate(args, texts, stems, cfg, out)


def _separate(args, texts, stems, cfg, out) -> int:
    from . import consolidate_many, load_model
    from .driver import split_chunks
    from .memory import MANIFEST, read_manifest, sha256_text
    from .models import PromptFormat
    model, tok = load_model(args.model, **model_kw(args))
    log_config(cfg, model)
    fmt = PromptFormat(tok, model)
    todo = []
    for text, st in zip(texts, stems):
        d = out / st
        if d.exists():
            if not (d / MANIFEST).is_file():
                raise IICLError(f"{d} exists and is not a memory directory")
            done = [c["sha256"] for c in read_manifest(d).get("chunks", [])]
            if done == [sha256_text(c) for c in split_chunks(fmt, text, cfg.chunk_tokens)]:
                log(f"{d}: already consolidated, skipped")
                continue
            raise IICLError(f"{d} holds another consolidation: remove it, or consolidate into it without --separate")
        todo.append((text, st))
    if todo:
        mems = consolidate_many(model, tok, [t for t, _ in todo], cfg)
        for mem, (_, st) in zip(mems, todo):
            mem.save(out / st)
            log(f"{out / st}: {mem.report.summary()}")
    return len(todo)


def cmd_ask(args) -> int:
    from . import Memory, load_model
    if args.questions:
        questions = [line.strip() for line in read_text_file(args.questions).splitlines() if line.strip()]
    elif args.question and args.question.strip():
        questions = [args.question]
    else:
        raise IICLError("give a QUESTION or --questions FILE")
    context = read_text_file(args.context) if args.context else None
    over = config_overrides(args)                        # bad flags fail before the model loads
    if args.memory:
        mem = (Memory.load(args.memory, **model_kw(args)) if args.model is None
               else Memory.load(args.memory, *load_model(args.model, **model_kw(args))))
        if over:
            mem.config = Config(**{**mem.config.to_dict(), **over})
    else:
        cfg = build_config(args, progress=False)
        mem = Memory(*load_model(args.model, **model_kw(args)), cfg)
    answers = mem.ask_many(questions, context=context)
    if args.questions:
        for q, a in zip(questions, answers):
            print(json.dumps({"question": q, "answer": a}), flush=True)
    else:
        print(answers[0])
    return 0


def cmd_session_eval(args) -> int:
    from . import load_model
    from .retain import POLICIES, check_cache
    from .session_eval import cache_split, multiple_choice, passkey, read_jsonl
    if args.policy not in POLICIES:
        raise IICLError(f"unknown policy {args.policy!r}: choose one of {', '.join(POLICIES)}")
    sink, budget, recent = cache_split(args.cache, args.sink, args.recent)
    check_cache(args.policy, sink, budget, recent, args.decay)      # bad settings fail before the model loads
    if args.task == "mc":
        if not args.data:
            raise IICLError("--task mc needs --data FILE.jsonl")
        read_jsonl(args.data)
    elif args.stream_tokens is None:
        raise IICLError("--task passkey needs --stream-tokens N")
    model, tok = load_model(args.model, **model_kw(args))
    kw = dict(policy=args.policy, cache=args.cache, trials=args.trials, decay=args.decay, sink=args.sink,
              recent=args.recent, progress=not args.quiet)
    if args.task == "passkey":
        res = passkey(model, tok, stream_tokens=args.stream_tokens, seed=args.seed, **kw)
        if not args.verbose:
            res.pop("trials")
    else:
        res = multiple_choice(model, tok, data=args.data, **kw)
    print(json.dumps(res), flush=True)
    return 0


def cmd_stress(args) -> int:
    from . import load_model
    from .memory import check_dir_path
    from .stress import essays, run_stress
    if args.facts < 1 or args.tokens < 1000:
        raise IICLError(f"--facts must be >= 1 and --tokens >= 1000; got {args.facts}, {args.tokens}")
    check_fsdp(args)
    essays()                                             # the haystack is there before the model loads
    cfg = build_config(args, **({"chunk_tokens": args.chunk_tokens} if args.chunk_tokens else {}))
    check_dir_path(args.out)
    model, tok = load_model(args.model, **model_kw(args))
    log_config(cfg, model)
    res = run_stress(model, tok, cfg, args.out, tokens=args.tokens, facts=args.facts, seed=args.seed,
                     max_chunks=args.max_chunks, max_minutes=args.max_minutes, full_context=not args.no_full_context,
                     fsdp=args.fsdp)
    if dist.is_main():
        print(json.dumps({k: v for k, v in res.items() if k != "memory_chunk_positions"}), flush=True)
    return 0


def ablation_rows(names: str | None, adhoc: list[str]) -> dict | None:
    """--ablations A,B and --variant NAME:field=value,... -> the ablation rows to run
    ({name: overrides}; None = every ABLATIONS row). Bad names or fields -> IICLError."""
    from .evaluation import ABLATIONS, parse_variant
    if not names and not adhoc:
        return None
    rows = {}
    for name in (v.strip() for v in (names or "").split(",") if v.strip()):
        if name not in ABLATIONS:
            raise IICLError(f"unknown ablation {name!r}: choose from {', '.join(ABLATIONS)}")
        rows[name] = ABLATIONS[name]
    for text in adhoc:
        name, over = parse_variant(text)
        rows[name] = over
    return rows


def cmd_eval(args) -> int:
    from . import load_model
    from .evaluation import SUITES, Sizes, run_suite, table, write_result
    from .memory import check_dir_path
    suites = list(SUITES) if args.suite == "all" else [args.suite]
    if args.suite != "all" and args.suite not in SUITES:
        raise IICLError(f"unknown suite {args.suite!r}: choose one of {', '.join(SUITES)} or all")
    variants = ablation_rows(args.ablations, args.variant)
    if args.seeds < 1:
        raise IICLError(f"--seeds must be >= 1, got {args.seeds}")
    sizes = Sizes.quick() if args.quick else Sizes()
    for name in ("docs", "facts", "sequence_docs", "stream_chunks", "stream_seeds"):
        v = getattr(args, name)
        if v is not None:
            least = 0 if name in ("stream_seeds", "sequence_docs") else 1
            if v < least:
                raise IICLError(f"--{name.replace('_', '-')} must be >= {least}, got {v}")
            setattr(sizes, name, v)
    cfg = build_config(args)                             # bad flags fail before the model loads
    out = Path(args.out)
    check_dir_path(out)                                  # (and an --out the results can't go to)
    model, tok = load_model(args.model, **model_kw(args))
    log_config(cfg, model)
    for suite in suites:
        res = run_suite(suite, model, tok, cfg, seeds=range(args.seed, args.seed + args.seeds), sizes=sizes,
                        variants=variants, progress=not args.quiet)
        paths = write_result(res, out)
        print(table(res), flush=True)
        log("wrote " + ", ".join(str(p) for p in paths))
    return 0


def add_model_args(p, config: bool = True) -> None:
    p.add_argument("--model", default=None, help="local HF model dir or .gguf (default: embedded SmolLM2-135M)")
    p.add_argument("--device", default="auto", help="auto (CUDA where a GPU is present) | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on the CPU) | bf16 | fp16 | fp32")
    if config:
        p.add_argument("--preset", default=None,
                       help="small (the embedded model on 2 CPU cores; default) | quality (small with 48 continuations: "
                            "better recall, ~45%% more time a chunk) | paper (InfiniteICL's setting) | "
                            "stress (2M-token streams, embedded model, one GPU)")
        p.add_argument("--config", default=None, metavar="FILE", help="a JSON or TOML file of Config fields")
        p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                       help="set one Config field (repeatable; wins over --config)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="iicl-fast", description="Consolidate long contexts into LoRA memories.")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="consolidate a bundled fictional document and compare recall")
    add_model_args(d)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    d.set_defaults(func=cmd_demo)
    c = sub.add_parser("consolidate", help="consolidate FILEs, in order, into the memory at --out (or one each: --separate)")
    c.add_argument("files", nargs="+", metavar="FILE")
    c.add_argument("--out", required=True, metavar="DIR")
    add_model_args(c)
    c.add_argument("--chunk-tokens", type=int, default=None, metavar="N")
    c.add_argument("--separate", action="store_true",
                   help="one memory per FILE at DIR/<file stem>/, all trained together in one batched run")
    c.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the base's layers over the ranks (FSDP2) for a base that does "
                        "not fit one GPU; every rank then does the whole chunk (memory scales, time does not)")
    c.set_defaults(func=cmd_consolidate)
    a = sub.add_parser("ask", help="greedy answer from a memory (or the base model)")
    a.add_argument("question", nargs="?")
    a.add_argument("--questions", metavar="FILE", help="one question per line; prints JSON lines")
    a.add_argument("--memory", metavar="DIR")
    a.add_argument("--context", metavar="FILE", help="put this file's text in the window first")
    add_model_args(a)
    a.set_defaults(func=cmd_ask)
    v = sub.add_parser("eval", help="the evaluation suite: recall, sequence, reasoning, skills, forgetting, ablations")
    v.add_argument("--suite", required=True, metavar="NAME",
                   help="recall | sequence | reasoning | skills | forgetting | ablations | all")
    v.add_argument("--out", default="eval_results", metavar="DIR", help="where eval_<suite>.json/.png go")
    v.add_argument("--seeds", type=int, default=3, metavar="K", help="document sets (seeds) per figure")
    v.add_argument("--seed", type=int, default=0, help="the first seed")
    v.add_argument("--quick", action="store_true", help="small sizes for the CPU (1 document, 3 facts, 3-chunk stream)")
    v.add_argument("--docs", type=int, default=None, metavar="N", help="documents per seed (recall)")
    v.add_argument("--facts", type=int, default=None, metavar="N", help="facts per document")
    v.add_argument("--sequence-docs", type=int, default=None, metavar="N",
                   help="documents consolidated one after another (sequence; default 3, 0: the long stream only)")
    v.add_argument("--stream-chunks", type=int, default=None, metavar="N", help="chunks of the long stream")
    v.add_argument("--stream-seeds", type=int, default=None, metavar="K", help="seeds of the long stream (default 1)")
    v.add_argument("--ablations", default=None, metavar="A,B", help="only these ablations (default: all)")
    v.add_argument("--variant", action="append", default=[], metavar="NAME:FIELD=V,...",
                   help="an extra ablation row: the config with these fields changed (repeatable)")
    v.add_argument("--quiet", action="store_true", help="no progress bar")
    add_model_args(v)
    v.set_defaults(func=cmd_eval)
    e = sub.add_parser("session-eval", help="bounded-cache session (SirLLM) on passkey or multiple-choice data")
    e.add_argument("--task", choices=("passkey", "mc"), required=True)
    e.add_argument("--stream-tokens", type=int, default=None, metavar="N", help="passkey: stream length")
    e.add_argument("--data", metavar="FILE.jsonl", help="mc: a SirLLM-schema file (grocery keys, rock-paper-scissors)")
    e.add_argument("--cache", type=int, default=256, metavar="N", help="cache size: sink + budget + recent")
    e.add_argument("--policy", default="entropy", help="entropy (SirLLM) | recent (StreamingLLM) | full")
    e.add_argument("--trials", type=int, default=20, metavar="K", help="passkey streams, mc episodes or rounds")
    e.add_argument("--decay", type=float, default=0.9, help="score decay per turn (rho)")
    e.add_argument("--sink", type=int, default=4)
    e.add_argument("--recent", type=int, default=None, help="newest tokens always kept (default: cache/4)")
    e.add_argument("--seed", type=int, default=0)
    add_model_args(e, config=False)
    e.add_argument("--verbose", action="store_true", help="passkey: include every trial in the JSON")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_session_eval)
    t = sub.add_parser("stress", help="a long stream of real prose with planted facts: consolidate it (resumable), "
                                      "then recall by position")
    t.add_argument("--tokens", type=int, default=2_000_000, help="stream length in tokens")
    t.add_argument("--out", required=True, metavar="DIR", help="run directory (the same command resumes it)")
    t.add_argument("--facts", type=int, default=100, metavar="K", help="planted facts, evenly spread")
    t.add_argument("--chunk-tokens", type=int, default=None, metavar="N")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--max-chunks", type=int, default=None, metavar="N", help="stop (resumable) after N chunks this run")
    t.add_argument("--max-minutes", type=float, default=None, metavar="M", help="stop (resumable) after M minutes this run")
    t.add_argument("--no-full-context", action="store_true", help="skip asking each fact with its own chunk in view")
    t.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the base's layers over the ranks (FSDP2), as consolidate --fsdp")
    add_model_args(t)
    t.set_defaults(func=cmd_stress)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("chunk_tokens", "stream_tokens", "trials", "cache", "max_chunks"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            print(f"iicl-fast: error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    try:
        dist.init_from_env(getattr(args, "device", "auto"))   # torchrun: one of several processes
        return args.func(args)
    except (IICLError, OSError) as e:
        # A file system refusal (a path under a file, no permission, a full disk) is the user's
        # to fix, not a bug: one line naming the path; saves go to a temp file then rename, so
        # what was saved before is intact.
        if isinstance(e, OSError):
            e = f"{e.filename}: {e.strerror}" if e.filename and e.strerror else f"{type(e).__name__}: {e}"
        who = f"rank {dist.rank()}: " if dist.several() else ""
        print(f"iicl-fast: error: {who}{e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("iicl-fast: interrupted (the last saved memory is intact)", file=sys.stderr)
        return 130
    finally:
        dist.close()


if __name__ == "__main__":
    sys.exit(main())
