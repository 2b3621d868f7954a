"""Evaluations of a bounded StreamingSession: passkey retrieval and SirLLM's multiple-choice
dialogues (grocery memory, rock-paper-scissors). Used by `iicl-fast session-eval`, the
benchmark and the tests."""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

from tqdm.auto import tqdm

from .config import IICLError
from .retain import POLICIES, StreamingSession

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
# A raw continuation, not a chat turn: with the stream as one chat turn and this question as
# the next, SmolLM2-135M-Instruct answered 0/5 at 2,000 tokens (it invents "a unique code");
# as a plain continuation 5/5.
QUESTION = "\nWhat is the pass key? The pass key is"


def cache_split(cache: int, sink: int = 4, recent: int | None = None) -> tuple[int, int, int]:
    """A cache of `cache` tokens -> (sink, budget, recent): recent defaults to a quarter."""
    recent = cache // 4 if recent is None else recent
    for name, v in (("sink", sink), ("recent", recent)):
        if not isinstance(v, int) or v < 0:
            raise IICLError(f"{name} must be an integer >= 0, got {v!r}")
    budget = cache - sink - recent
    if cache < 1 or budget < sink + recent:
        raise IICLError(f"cache {cache} is too small: its budget {budget} (cache - sink - recent) must be at least "
                        f"sink + recent = {sink + recent}")
    return sink, budget, recent


def passkey_ids(tok, stream_tokens: int, depth: float, key: int) -> tuple[list[int], int]:
    """Token ids of intro + filler with the needle at `depth` (0..1) of the filler, about
    stream_tokens long. -> (ids, index of the needle's first token)."""
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    intro, fill, needle = enc(INTRO), enc(FILLER), enc(NEEDLE.format(key=key))
    reps = max(1, (stream_tokens - len(intro) - len(needle)) // len(fill))
    before = int(round(reps * depth))
    ids = intro + fill * before
    at = len(ids)
    return ids + needle + fill * (reps - before), at


def passkey(model, tok, *, policy: str, stream_tokens: int, cache: int, trials: int = 20, seed: int = 0,
            decay: float = 0.9, sink: int = 4, recent: int | None = None, progress: bool = True) -> dict:
    """Passkey retrieval over `trials` streams with a random 5-digit key at a random depth.

    -> {"accuracy", "tokens_per_s", "peak_cache", "cache_after_fill": [min, max], "trials": [...]}
    tokens_per_s counts the stream's ingestion (the question and answer excluded)."""
    if policy not in POLICIES:
        raise IICLError(f"unknown policy {policy!r}: choose one of {', '.join(POLICIES)}")
    if stream_tokens < 64:
        raise IICLError(f"--stream-tokens must be >= 64, got {stream_tokens}")
    if trials < 1:
        raise IICLError(f"--trials must be >= 1, got {trials}")
    sink, budget, recent = cache_split(cache, sink, recent)
    rng = random.Random(seed)
    q_ids = tok(QUESTION, add_special_tokens=False)["input_ids"]
    rows, feed_s, fed, peak = [], 0.0, 0, 0
    lo, hi = None, 0
    bar = tqdm(range(trials), desc=f"passkey {policy}", disable=not progress)
    for _ in bar:
        key, depth = rng.randint(10000, 99999), rng.random()
        ids, at = passkey_ids(tok, stream_tokens, depth, key)
        sess = StreamingSession(model, tok, policy=policy, sink=sink, budget=budget, recent=recent, decay=decay)
        t = time.perf_counter()
        for s in range(0, len(ids), 1024):       # one turn, fed in blocks to watch the cache size
            sess.feed_tokens(ids[s: s + 1024], new_turn=s == 0)
            if policy != "full" and s + 1024 >= sink + budget + recent:
                lo = sess.cache_tokens if lo is None else min(lo, sess.cache_tokens)
                hi = max(hi, sess.cache_tokens)
        feed_s += time.perf_counter() - t
        fed += len(ids)
        answer = sess.generate_tokens(q_ids, max_new_tokens=8)
        ok = str(key) in answer.replace(" ", "")
        rows.append({"key": key, "depth": round(depth, 4), "needle_at": at, "tokens": len(ids),
                     "needle_in_last_window": len(ids) - at <= sink + budget + recent,
                     "answer": answer, "correct": ok})
        peak = max(peak, sess.peak_cache_tokens)
        bar.set_postfix(acc=f"{sum(r['correct'] for r in rows)}/{len(rows)}")
    return {"task": "passkey", "policy": policy, "stream_tokens": stream_tokens, "cache": cache,
            "sink": sink, "budget": budget, "recent": recent, "decay": decay,
            "accuracy": sum(r["correct"] for r in rows) / len(rows), "tokens_per_s": fed / feed_s,
            "peak_cache": peak, "cache_after_fill": [lo, hi] if lo is not None else None, "trials": rows}


def read_jsonl(path: str) -> list[dict]:
    """SirLLM-schema rows; IICLError naming the file and line for anything else."""
    p = Path(path)
    if not p.is_file():
        raise IICLError(f"no such file: {path}")
    rows = []
    for n, line in enumerate(p.read_text(encoding="utf-8", errors="strict").splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            q = r["question"]
            stem, choices = q["stem"], [c["text"] for c in q["choices"]]
            labels = [c["label"] for c in q["choices"]]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise IICLError(f"{path}:{n}: not a SirLLM row (question.stem, question.choices[label,text]): {e}") from None
        rows.append({"id": str(r.get("id", n)), "stem": stem, "choices": choices, "labels": labels,
                     "answer": r.get("answerKey"), "user_choice": r.get("user_choice")})
    if not rows:
        raise IICLError(f"{path} has no rows")
    return rows


def episodes(rows: list[dict]) -> list[list[dict]]:
    """Grocery-style episodes: from a row whose id starts with "key_" to the "answer_" row."""
    eps, cur = [], None
    for r in rows:
        if r["id"].startswith("key_"):
            cur = [r]
        elif cur is not None:
            cur.append(r)
            if r["id"].startswith("answer_"):
                eps.append(cur)
                cur = None
    return eps


def multiple_choice(model, tok, *, data: str, policy: str, cache: int, trials: int = 20, decay: float = 0.9,
                    sink: int = 4, recent: int | None = None, progress: bool = True) -> dict:
    """Run a SirLLM multiple-choice file: grocery episodes (memory accuracy on the last
    question of each, distractor accuracy on the rest) or one rock-paper-scissors session
    (win / tie / loss rates; after each round the next prompt says what the player did)."""
    rows = read_jsonl(data)
    sink, budget, recent = cache_split(cache, sink, recent)
    mk = lambda: StreamingSession(model, tok, policy=policy, sink=sink, budget=budget,  # noqa: E731
                                  recent=recent, decay=decay)
    t0, peak, fed = time.perf_counter(), 0, 0
    out = {"task": "mc", "data": str(data), "policy": policy, "cache": cache, "decay": decay}
    if rows[0]["user_choice"] is not None:          # rock-paper-scissors: one long session
        sess, res, note = mk(), {"win": 0, "tie": 0, "loss": 0}, ""
        for r in tqdm(rows[:trials], desc=f"rps {policy}", disable=not progress):
            k = sess.choose(note + r["stem"], r["choices"], labels=r["labels"])
            mine, theirs = r["labels"][k], r["user_choice"]
            outcome = "win" if mine == r["answer"] else "tie" if mine == theirs else "loss"
            res[outcome] += 1
            said = {"win": "you win", "tie": "a tie", "loss": "you lose"}[outcome]
            note = (f"I played {r['choices'][r['labels'].index(theirs)]} and you played "
                    f"{r['choices'][k]}: {said}. ")
        n = sum(res.values())
        out.update(rounds=n, **{f"{k}_rate": v / n for k, v in res.items()})
        peak, fed = sess.peak_cache_tokens, sess.tokens_seen
    else:
        eps = episodes(rows)
        if not eps:
            raise IICLError(f"{data}: no episodes (rows from id 'key_*' to 'answer_*')")
        mem_ok, dis_ok, dis_n = 0, 0, 0
        for ep in tqdm(eps[:trials], desc=f"episodes {policy}", disable=not progress):
            sess = mk()
            for r in ep:
                k = sess.choose(r["stem"], r["choices"], labels=r["labels"])
                right = r["labels"][k] == r["answer"]
                if r is ep[-1]:
                    mem_ok += right
                elif r is not ep[0]:
                    dis_ok += right
                    dis_n += 1
            peak, fed = max(peak, sess.peak_cache_tokens), fed + sess.tokens_seen
        n = min(trials, len(eps))
        out.update(episodes=n, memory_accuracy=mem_ok / n, distractor_accuracy=dis_ok / max(dis_n, 1))
    out.update(tokens_per_s=fed / (time.perf_counter() - t0), peak_cache=peak)
    return out
