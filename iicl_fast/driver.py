"""The streaming loop: a long text (or texts in order) → chunks → one T_i per chunk, a
checkpoint after each, resume after a crash, progress and per-chunk metrics.

    for rep in stream(mem, texts, checkpoint_dir="memdir"):
        print(rep.summary())

Read top to bottom: split, align with what the checkpoint already holds, then per chunk
consolidate → save → report."""
from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Iterable, Iterator

import torch
from tqdm.auto import tqdm

from .config import IICLError
from .consolidate import ConsolidationReport
from .memory import Memory, sha256_text
from .models import PromptFormat


def split_chunks(fmt: PromptFormat, text: str, chunk_tokens: int) -> list[str]:
    """Split text into chunks of at most ~chunk_tokens tokens, at sentence or line ends where
    possible; a sentence longer than a chunk is cut by tokens."""
    units = [u for u in re.split(r"(?<=[.!?\n])\s+", text.strip()) if u.strip()]
    chunks, cur, cur_n = [], [], 0
    for u in units:
        n = len(fmt.encode(u))
        if n > chunk_tokens:
            if cur:
                chunks.append(" ".join(cur)); cur, cur_n = [], 0
            ids = fmt.encode(u)
            chunks += [fmt.tok.decode(ids[i: i + chunk_tokens]).strip() for i in range(0, len(ids), chunk_tokens)]
            continue
        if cur and cur_n + n > chunk_tokens:
            chunks.append(" ".join(cur)); cur, cur_n = [], 0
        cur.append(u.strip()); cur_n += n
    if cur:
        chunks.append(" ".join(cur))
    return [c for c in chunks if c.strip()]


def align_chunks(recorded: list[str], new: list[str]) -> int:
    """Where the new stream's chunk 0 sits in the recorded chunk list.

    The first position o where every overlapping chunk agrees (resume of a stream, or of a
    continuation); len(recorded) when the stream is new (a continuation of the memory)."""
    for o in range(len(recorded)):
        overlap = min(len(new), len(recorded) - o)
        if recorded[o: o + overlap] == new[:overlap]:
            return o
    return len(recorded)


def stream(mem: Memory, texts: str | Iterable[str], *, chunk_tokens: int | None = None,
           checkpoint_dir: str | os.PathLike | None = None) -> Iterator[ConsolidationReport]:
    """Consolidate texts chunk by chunk into mem, each chunk one T_i (seeded seed + index).

    With checkpoint_dir, the memory is saved after every chunk, and chunks the saved
    manifest already records (same position, same sha256) are skipped: running the same
    stream again resumes after the last saved chunk; a new stream continues the memory.
    Each report carries the chunk's seconds per phase (plus "save") and peak GPU memory."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    chunk_tokens = chunk_tokens or mem.config.chunk_tokens
    if checkpoint_dir is not None and Path(checkpoint_dir).exists() and not mem.chunks:
        mem._restore(checkpoint_dir)
    chunks = [c for t in texts for c in split_chunks(mem.fmt, t, chunk_tokens)]
    if not chunks:
        raise IICLError("empty text: nothing to consolidate")
    offset = align_chunks([c["sha256"] for c in mem.chunks], [sha256_text(c) for c in chunks])
    cuda = mem.params[0].is_cuda
    for j, chunk in enumerate(tqdm(chunks, desc="chunks", disable=not mem.config.progress)):
        idx = offset + j
        if idx < len(mem.chunks):
            yield ConsolidationReport(chunk_index=idx, chunk_tokens=mem.chunks[idx]["tokens"], skipped=True)
            continue
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        rep = mem.consolidate(chunk, chunk_index=idx)
        if checkpoint_dir is not None:
            t = time.perf_counter()
            mem.save(checkpoint_dir)
            rep.seconds["save"] = time.perf_counter() - t
        if cuda:
            rep.peak_gib = torch.cuda.max_memory_allocated() / 2**30
        yield rep
