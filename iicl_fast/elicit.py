"""Phase 1: hybrid prompting. With the chunk C in its window the model writes a transfer
set: questions about C answered with C in view, and open-ended C-grounded continuations."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib.resources import files

import torch
from tqdm.auto import tqdm

from . import dist
from .config import Config
from .decode import cascade_unsupported, prefix_kv
from .generation import check_positions, generate
from .models import PromptFormat

# One question per sentence of C: a 135M model asked for "a question about the text" wrote
# off-topic questions for ~half its samples; pointing it at a sentence gives questions that
# cover every fact.
QUESTION_PROMPT = 'Write one question that is answered by this sentence of the text: "{sentence}"'
# Open prompts name the passage by its opening words, so that entries of different chunks
# (kept together in the replay buffer) never share one query with conflicting targets.
OPEN_PROMPTS = (
    'Repeat the passage that begins "{opening}" word for word.',
    'Summarize the passage that begins "{opening}" in a few sentences.',
    'List the key facts of the passage that begins "{opening}".',
    'What is the passage that begins "{opening}" about?',
)
SPAN_WORDS = 40        # text without sentence punctuation (code, tables, CJK) goes in spans of this many words
OPENING_WORDS = 8      # at most this many quoted words open a continuation (a 300-word sentence put 134 in)
CJK_SPAN_CHARS = 80    # a span of unbroken text with no spaces (CJK) is cut every this many characters


@dataclass
class Entry:
    """One transfer-set entry: the query the student sees and the response ids [L]."""
    kind: str            # "qa" | "continuation" | "source" | "anchor" | "prose"
    query: str
    response: list[int]
    dppl: float | None = None   # its ΔPPL once selection has scored it (replay_policy "ppl_gap")
    chunk: int | None = None    # the chunk it was kept from, once in the replay buffer (policy "balanced")
    raw: list[int] | None = None  # prose anchors: the prompt's ids as raw text, no chat template


def prompt_ids(fmt: PromptFormat, e: Entry) -> list[int]:
    """The ids the student sees before e's response: the chat prompt of its query, or its raw
    ids (prose anchors)."""
    return e.raw if e.raw is not None else fmt.prompt(e.query)


def _spans(part: str) -> list[str]:
    words = part.split()
    if len(words) == 1 and len(part) > CJK_SPAN_CHARS:
        return [part[i: i + CJK_SPAN_CHARS] for i in range(0, len(part), CJK_SPAN_CHARS)]
    return [" ".join(words[i: i + SPAN_WORDS]) for i in range(0, len(words), SPAN_WORDS)]


def sentences(text: str) -> list[str]:
    """Sentences (or lines) of text with >= 3 words; longer runs without punctuation are cut
    into spans of at most SPAN_WORDS words."""
    parts = re.split(r"(?<=[.!?。！？])\s*|\n+", text.strip())
    out = []
    for p in parts:
        p = p.strip()
        if not p:
            continue
        for s in _spans(p):
            if len(s.split()) >= 3 or len(s) >= 12:
                out.append(s)
    return out or [text.strip()[: CJK_SPAN_CHARS * 4]]


def spread(n: int, m: int) -> list[int]:
    """n indices into m items, evenly spread over all of them (each used n//m or n//m + 1 times)."""
    return [(i * m) // n for i in range(n)] if m else []


def clean_question(text: str) -> str | None:
    """The first line up to its question mark, or None if it is not a question."""
    line = text.strip().split("\n")[0].strip().strip('"').strip()
    line = re.sub(r"^(question|q)\s*[:.\-]\s*", "", line, flags=re.I)
    if "?" not in line:
        return None
    line = line[: line.index("?") + 1]
    return line if len(line.split()) >= 3 else None


def _opening(sentence: str, cut: int) -> str:
    words = sentence.split()
    if len(words) == 1:                        # unspaced text: characters
        return sentence[: max(2, min(cut * 2, len(sentence) * 2 // 3))]
    return " ".join(words[:cut])


def continuation_queries(chunk: str, n: int, rng: torch.Generator) -> list[str]:
    """Open-ended queries: continue a passage from a sentence's opening words (3 of 4),
    recall / summary prompts naming the passage by its opening (1 of 4). Sentences are
    spread evenly over the whole chunk. The student sees only the query, never C."""
    sents = sentences(chunk)
    n_open = n // 4
    starts = spread(n - n_open, len(sents))
    openers = spread(n_open, len(sents))
    queries, a, b = [], 0, 0
    for i in range(n):
        if i % 4 == 3 and b < n_open:
            s = sents[openers[b]]
            queries.append(OPEN_PROMPTS[b % len(OPEN_PROMPTS)].format(opening=_opening(s, 6)))
            b += 1
            continue
        words = sents[starts[a]].split()
        a += 1
        hi = max(3, min(OPENING_WORDS, len(words) * 2 // 3))
        cut = int(torch.randint(2, hi + 1, (1,), generator=rng))
        queries.append(f'Continue the passage: "{_opening(" ".join(words), cut)}"')
    return queries


def source_units(fmt: PromptFormat, sents: list[str], max_tokens: int) -> list[tuple[int, list[int]]]:
    """The sentences packed in order into units of at most max_tokens tokens each: as many
    whole consecutive sentences as fit, a sentence longer than max_tokens cut into pieces of
    max_tokens. -> [(index of the unit's first sentence, its ids)]: every token of every
    sentence is in exactly one unit."""
    units, start, ids = [], 0, []
    for i, s in enumerate(sents):
        if ids:
            joined = fmt.encode(" ".join(sents[start: i + 1]))
            if len(joined) <= max_tokens:
                ids = joined
                continue
            units.append((start, ids))
        start, ids = i, fmt.encode(s)
        while len(ids) > max_tokens:
            units.append((i, ids[:max_tokens]))
            ids = ids[max_tokens:]
    if ids:
        units.append((start, ids))
    return units


def source_entries(fmt: PromptFormat, chunk: str, n: int, max_tokens: int) -> list[Entry]:
    """n entries whose response is the chunk's own text: 'Continue the passage: "<opening>"'
    with consecutive sentences as written, packed up to max_tokens - 1 tokens (then the stop
    id; source_units). The units are spread evenly over the whole chunk; with n at least the
    unit count every sentence of the chunk is taught as written, none cut short. (Pairs of
    sentences cut at max_tokens, as before, left a fact after a long sentence out, and 256
    pairs missed a fifth of a 7,168-token chunk of the essays: 6 of 16 planted facts had no
    entry at all.)"""
    sents = sentences(chunk)
    units = source_units(fmt, sents, max_tokens - 1)
    out = []
    for i, ids in (units[j] for j in spread(min(n, len(units)), len(units))):
        words = fmt.tok.decode(ids).split()
        cut = max(2, min(OPENING_WORDS, len(words) // 2))
        out.append(Entry("source", f'Continue the passage: "{_opening(" ".join(words), cut)}"', ids + [fmt.stop_ids[0]]))
    return out


def elicit(model, fmt: PromptFormat, chunk: str, config: Config, *, chunk_index: int = 0,
           keep_hidden: bool = False):
    """-> the transfer set for one chunk: up to n_queries question→answer pairs (questions
    deduplicated) and n_continuations continuations; empty responses dropped.

    keep_hidden: -> (entries, hidden), hidden[i] the final hidden states [len(response), H]
    that this process's decoder computed for entry i's response with the chunk in view
    (generation.generate's hidden), None for entries it did not decode (source entries, sentence
    answers; under data parallelism, the other ranks' rows): the teacher's states for those
    rows, which teacher_hidden then need not recompute (consolidate.sharded_hidden hands each
    decoded row to the rank that holds its states).

    Random streams are seeded by config.seed + chunk_index: every chunk draws its own. The
    draws are keyed by row (generation.generate's keyed_seed): a transfer set does not depend
    on gen_batch_size, and under torch.distributed each rank generates every W-th row of each
    phase and the rows are gathered — the set one process would make."""
    device = next(model.parameters()).device
    seed = config.seed + chunk_index
    rng = torch.Generator().manual_seed(seed)                 # query construction (CPU)
    prefix = fmt.context_prefix(chunk)
    check_positions(model, len(prefix), 0, 1)     # before encoding it (generate checks each call's rows)
    kv = None
    if device.type == "cuda" and cascade_unsupported(model) is None:
        kv = prefix_kv(model, prefix)        # C encoded once for the questions and the answers
    sample = dict(sample=True, temperature=config.elicit_temperature, top_p=config.elicit_top_p,
                  batch_size=config.gen_batch_size, stop_ids=fmt.stop_ids, pad_id=fmt.pad_id,
                  prefix=prefix, prefix_kv=kv)

    def sharded(prompts: list[list[int]], phase: int, first_key: int = 0, hidden: bool = False, **kw):
        """Continuations of prompts, rows keyed by first_key + their index; each rank its share.
        hidden: -> (rows, per row its states where this rank decoded it, else None)."""
        keys = dist.shard(list(range(len(prompts))))
        got = generate(model, [prompts[k] for k in keys], keyed_seed=seed * 1_000_003 + phase,
                       row_keys=[first_key + k for k in keys], hidden=hidden, **kw, **sample) if keys else []
        mine, states = (got or ([], [])) if hidden else (got, None)
        if hidden:                          # row k's states at k (one process, FSDP: every row)
            at = [None] * len(prompts)
            for k, st in zip(keys, states or []):
                at[k] = st
            states = at
        if dist.fsdp():                     # every rank made all rows: rank 0's, so what follows agrees
            rows = dist.broadcast(mine)
            if hidden and not dist.all_agree(rows == mine):      # states of other rows: none kept, on any rank
                states = [None] * len(rows)
            return (rows, states) if hidden else rows
        rows = dist.gather_shards(mine, len(prompts))
        return (rows, states) if hidden else rows
    bar = tqdm(total=2 * config.n_queries + config.n_continuations, desc="elicit",
               disable=not config.progress, leave=False)

    questions: list[str] = []
    about: list[str] = []                    # the sentence each question was written about
    if config.n_queries:
        sents = sentences(chunk)
        picked = spread(config.n_queries, len(sents))
        asks = [fmt.query(QUESTION_PROMPT.format(sentence=sents[i])) for i in picked]
        written = sharded(asks, 0, max_new_tokens=config.max_query_tokens, progress=bar,
                          min_new_tokens=config.max_query_tokens if config.fixed_lengths else 0)
        seen = set()
        for i, ids in zip(picked, written):
            text = fmt.tok.decode(ids, skip_special_tokens=True)
            q = text.strip().replace("\n", " ") or "?" if config.fixed_lengths else clean_question(text)
            if q and (config.fixed_lengths or q.lower() not in seen):
                seen.add(q.lower())
                questions.append(q)
                about.append(sents[i])

    by_sentence = []
    if config.qa_response == "sentence":     # answered by the sentence as written: nothing to decode
        by_sentence = [Entry("qa", q, fmt.encode(a)[: config.max_response_tokens - 1] + [fmt.stop_ids[0]])
                       for q, a in zip(questions, about)]
        questions = []
    queries = [("qa", q) for q in questions]
    queries += [("continuation", q) for q in continuation_queries(chunk, config.n_continuations, rng)]
    bar.total = config.n_queries + len(queries)
    # rows keyed as if the questions were decoded too: the continuations are the same draws
    responses, states = [], []
    if queries:
        responses = sharded([fmt.query(q) for _, q in queries], 1, len(by_sentence),
                            max_new_tokens=config.max_response_tokens, progress=bar, hidden=keep_hidden,
                            min_new_tokens=config.max_response_tokens if config.fixed_lengths else 0)
        if keep_hidden:
            responses, states = responses
    bar.close()
    out = _written([Entry(kind, q, r) for (kind, q), r in zip(queries, responses)], states, fmt, keep_hidden)
    sources = source_entries(fmt, chunk, config.source_entries, config.max_response_tokens)
    if not keep_hidden:
        return by_sentence + out + sources
    out, states = out
    return by_sentence + out + sources, [None] * len(by_sentence) + states + [None] * len(sources)


def anchor_prompts() -> list[str]:
    """The bundled general prompts of anchor entries (none of them is asked by the evaluation
    suite's general questions)."""
    return json.loads(files("iicl_fast").joinpath("data/anchor_prompts.json").read_text(encoding="utf-8"))


def _written(made: list[Entry], states, fmt: PromptFormat, keep_hidden: bool):
    """The entries whose response has a token other than a stop id; keep_hidden: -> (entries,
    the decoder's states of the same rows)."""
    stops = set(fmt.stop_ids)
    keep = [i for i, e in enumerate(made) if any(t not in stops for t in e.response)]
    entries = [made[i] for i in keep]
    return (entries, [states[i] for i in keep]) if keep_hidden else entries


def anchor_entries(model, fmt: PromptFormat, config: Config, *, chunk_index: int = 0, keep_hidden: bool = False):
    """config.anchor_entries general prompts, taken in turn from the bundled list (chunk i
    starts where chunk i-1 stopped), each answered greedily by `model` as the caller hands it
    over (the base: adapter off) with no chunk in the window. Their teacher is that model too,
    so training on them holds the student's answers to everything else where they were.
    keep_hidden: -> (entries, the decoder's states of each response), as elicit."""
    prompts = anchor_prompts()
    n = min(config.anchor_entries, len(prompts))
    if not n:
        return ([], []) if keep_hidden else []
    start = chunk_index * n
    queries = [prompts[(start + i) % len(prompts)] for i in range(n)]
    answers = generate(model, [fmt.prompt(q) for q in queries], max_new_tokens=config.max_response_tokens,
                       pad_id=fmt.pad_id, sample=False, stop_ids=fmt.stop_ids, batch_size=config.gen_batch_size,
                       hidden=keep_hidden)
    answers, states = answers if keep_hidden else (answers, None)
    return _written([Entry("anchor", q, r) for q, r in zip(queries, answers)], states, fmt, keep_hidden)


def prose_openings() -> list[str]:
    """The bundled openings of prose anchors: first words of everyday prose (none from the
    evaluation's held-out essays)."""
    return json.loads(files("iicl_fast").joinpath("data/prose_openings.json").read_text(encoding="utf-8"))


def prose_anchor_entries(model, fmt: PromptFormat, config: Config, *, chunk_index: int = 0,
                         keep_hidden: bool = False):
    """config.prose_anchors openings of plain prose (no chat template; chunk i starts where
    chunk i-1 stopped), each continued by `model` as the caller hands it over (the base),
    sampled (T 1, top-p 0.95, keyed by the seed and the chunk): text of the base's own
    distribution, on which training holds the student where the base was on raw text.
    keep_hidden: -> (entries, the decoder's states of each response), as elicit."""
    openings = prose_openings()
    n = min(config.prose_anchors, len(openings))
    if not n:
        return ([], []) if keep_hidden else []
    texts = [openings[(chunk_index * n + i) % len(openings)] for i in range(n)]
    prompts = [fmt.encode(t) for t in texts]
    outs = generate(model, prompts, max_new_tokens=config.max_response_tokens, pad_id=fmt.pad_id, sample=True,
                    temperature=1.0, top_p=0.95, stop_ids=fmt.stop_ids, batch_size=config.gen_batch_size,
                    keyed_seed=(config.seed * 1_000_003 + 104_729 + chunk_index) % (1 << 31), hidden=keep_hidden)
    outs, states = outs if keep_hidden else (outs, None)
    return _written([Entry("prose", t, r, raw=p) for t, p, r in zip(texts, prompts, outs)], states, fmt, keep_hidden)
