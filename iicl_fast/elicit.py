"""Phase 1: hybrid prompting. With the chunk C in its window the model writes a transfer
set: questions about C answered with C in view, and open-ended C-grounded continuations."""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .config import Config
from .generation import generate
from .models import PromptFormat

# One question per sentence of C, in turn: a 135M model asked for "a question about the
# text" wrote off-topic questions for ~half its samples; pointing it at a sentence gives
# questions that cover every fact.
QUESTION_PROMPT = 'Write one question that is answered by this sentence of the text: "{sentence}"'
OPEN_PROMPTS = (
    "Repeat the text word for word.",
    "Summarize the text in a few sentences.",
    "List the key facts of the text.",
    "What is the text about?",
)


@dataclass
class Entry:
    """One transfer-set entry: the query the student sees and the response ids [L]."""
    kind: str            # "qa" | "continuation"
    query: str
    response: list[int]


def sentences(text: str) -> list[str]:
    parts = re.split(r"(?<=[.!?])\s+|\n+", text.strip())
    return [p.strip() for p in parts if len(p.strip().split()) >= 3] or [text.strip()]


def clean_question(text: str) -> str | None:
    """The first line up to its question mark, or None if it is not a question."""
    line = text.strip().split("\n")[0].strip().strip('"').strip()
    line = re.sub(r"^(question|q)\s*[:.\-]\s*", "", line, flags=re.I)
    if "?" not in line:
        return None
    line = line[: line.index("?") + 1]
    return line if len(line.split()) >= 3 else None


def continuation_queries(chunk: str, n: int, rng: torch.Generator) -> list[str]:
    """Open-ended queries: continue a passage from a sentence's opening words (3 of 4),
    recall / summary prompts (1 of 4). The student sees only the query, never C."""
    sents = sentences(chunk)
    queries = []
    for i in range(n):
        if i % 4 == 3:
            queries.append(OPEN_PROMPTS[(i // 4) % len(OPEN_PROMPTS)])
            continue
        words = sents[(i - i // 4) % len(sents)].split()
        cut = int(torch.randint(2, max(3, len(words) * 2 // 3) + 1, (1,), generator=rng))
        queries.append(f'Continue the passage: "{" ".join(words[:cut])}"')
    return queries


def elicit(model, fmt: PromptFormat, chunk: str, config: Config) -> list[Entry]:
    """-> the transfer set for one chunk: up to n_queries question→answer pairs (questions
    deduplicated) and n_continuations continuations; empty responses dropped."""
    rng = torch.Generator().manual_seed(config.seed)
    prefix = fmt.context_prefix(chunk)
    sample = dict(sample=True, temperature=config.elicit_temperature, top_p=config.elicit_top_p,
                  batch_size=config.gen_batch_size, eos_id=fmt.eos_id, pad_id=fmt.pad_id,
                  prefix=prefix, generator=rng)
    bar = tqdm(total=2 * config.n_queries + config.n_continuations, desc="elicit",
               disable=not config.progress, leave=False)

    questions: list[str] = []
    if config.n_queries:
        sents = sentences(chunk)
        asks = [fmt.query(QUESTION_PROMPT.format(sentence=sents[i % len(sents)])) for i in range(config.n_queries)]
        written = generate(model, asks, max_new_tokens=config.max_query_tokens, progress=bar, **sample)
        seen = set()
        for ids in written:
            q = clean_question(fmt.tok.decode(ids, skip_special_tokens=True))
            if q and q.lower() not in seen:
                seen.add(q.lower())
                questions.append(q)

    queries = [("qa", q) for q in questions]
    queries += [("continuation", q) for q in continuation_queries(chunk, config.n_continuations, rng)]
    bar.total = config.n_queries + len(queries)
    responses = generate(model, [fmt.query(q) for _, q in queries], max_new_tokens=config.max_response_tokens,
                         progress=bar, **sample)
    bar.close()
    return [Entry(kind, q, r) for (kind, q), r in zip(queries, responses)
            if any(t != fmt.eos_id for t in r)]
