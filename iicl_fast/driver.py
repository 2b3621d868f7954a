"""The streaming loop: a long text (or texts in order) → chunks → one T_i per chunk, a
checkpoint after each, resume after a crash, progress and per-chunk metrics.

    for rep in stream(mem, texts, checkpoint_dir="memdir"):
        print(rep.summary())

Read top to bottom: split, align with what the checkpoint already holds, then per chunk
consolidate → save → report."""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import time
from pathlib import Path
from typing import Iterable, Iterator

import torch
from tqdm.auto import tqdm

from . import dist
from .config import IICLError
from .consolidate import ConsolidationReport, phase_peak, trace
from .graphs import touch_workspaces
from .memory import MANIFEST, Memory, open_for_write, sha256_text
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


def stream_id(texts: list[str], chunk_tokens: int) -> tuple[str, str]:
    """-> (stream id, text id): the text is the sequence of texts; the stream is that text
    chunked at chunk_tokens."""
    text_id = hashlib.sha256("\0".join(sha256_text(t) for t in texts).encode()).hexdigest()
    return hashlib.sha256(f"{text_id}|{chunk_tokens}".encode()).hexdigest()[:32], text_id


def match_stream(mem: Memory, texts: list[str], chunk_tokens: int, shas: list[str], log=None) -> tuple[str, int]:
    """-> (the stream's id, how many of its chunks the memory already holds).

    The same texts at the same chunking resume their stream; the same texts at another
    chunking are refused (they would be consolidated twice); other texts are a new stream,
    appended (and said so in the log). Never aligned by a chunk's hash alone: a new stream
    whose first chunk equals a recorded one is still new."""
    sid, text_id = stream_id(texts, chunk_tokens)
    if not any(s["id"] == sid for s in mem.streams):
        other = [s for s in mem.streams if s["text_sha256"] == text_id]
        if other:
            raise IICLError(f"this memory holds the same text chunked at {other[0]['chunk_tokens']} tokens, not "
                            f"{chunk_tokens}: resume with chunk_tokens={other[0]['chunk_tokens']} (another chunking "
                            "would consolidate it twice)")
        legacy = [c for c in mem.chunks if "stream" not in c]
        if not mem.streams and legacy and [c["sha256"] for c in legacy] == shas[: len(legacy)]:
            for j, c in enumerate(legacy):         # a memory saved before streams were recorded
                c.update(stream=sid, position=j)
        elif log is not None and mem.chunks:
            log(f"new stream of {len(shas)} chunks, appended after the memory's {len(mem.chunks)} chunks")
        mem.streams.append({"id": sid, "text_sha256": text_id, "chunk_tokens": chunk_tokens, "chunks": len(shas)})
    done = [c for c in mem.chunks if c.get("stream") == sid]
    if [c["sha256"] for c in done] != shas[: len(done)] or [c["position"] for c in done] != list(range(len(done))):
        raise IICLError("the memory's record of this stream does not match its text: the manifest is corrupt")
    return sid, len(done)


def stream(mem: Memory, texts: str | Iterable[str], *, chunk_tokens: int | None = None,
           checkpoint_dir: str | os.PathLike | None = None, log=None, on_chunk=None) -> Iterator[ConsolidationReport]:
    """Consolidate texts chunk by chunk into mem, each chunk one T_i (seeded seed + index).

    With checkpoint_dir (opened for writing: locked, an interrupted save recovered), the
    memory is saved after every chunk, and running the same stream again resumes after its
    last saved chunk; other texts are a new stream, appended (see match_stream).
    Each report carries the chunk's seconds per phase (plus "save") and peak GPU memory.
    on_chunk(j) is called before chunk j (its position in the stream) is consolidated."""
    if not isinstance(texts, str) and not isinstance(texts, Iterable):
        raise IICLError(f"stream takes a string or a list of strings, got {type(texts).__name__}")
    texts = [texts] if isinstance(texts, str) else list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise IICLError(f"stream: text {i} is a {type(t).__name__}, not a string")
    if chunk_tokens is not None and (type(chunk_tokens) is not int or chunk_tokens < 1):
        raise IICLError(f"chunk_tokens must be an integer >= 1 (None: the config's {mem.config.chunk_tokens}), "
                        f"got {chunk_tokens!r}")
    chunk_tokens = chunk_tokens or mem.config.chunk_tokens
    chunks = [c for t in texts for c in split_chunks(mem.fmt, t, chunk_tokens)]
    if not chunks:
        raise IICLError("empty text: nothing to consolidate")
    with open_for_write(checkpoint_dir) if checkpoint_dir is not None else contextlib.nullcontext():
        dist.barrier()          # several ranks: rank 0 has finished an interrupted save before any reads
        if checkpoint_dir is not None and not mem.chunks and (Path(checkpoint_dir) / MANIFEST).is_file():
            mem._restore(checkpoint_dir)
        sid, done = match_stream(mem, texts, chunk_tokens, [sha256_text(c) for c in chunks], log)
        recorded = [c for c in mem.chunks if c.get("stream") == sid]
        cuda = mem.params[0].is_cuda
        if cuda and os.environ.get("IICL_TOUCH_WORKSPACES", "1") != "0":   # =0: for an A/B of it only
            touch_workspaces(mem.params[0].device)
        for j, chunk in enumerate(tqdm(chunks, desc="chunks", disable=not mem.config.progress)):
            if j < done:
                yield ConsolidationReport(chunk_index=recorded[j]["index"], chunk_tokens=recorded[j]["tokens"],
                                          skipped=True)
                continue
            if on_chunk is not None:
                on_chunk(j)
            if cuda:
                torch.cuda.reset_peak_memory_stats(mem.params[0].device)
            rep = mem.consolidate(chunk, chunk_index=len(mem.chunks), stream=sid, position=j)
            if checkpoint_dir is not None:
                trace("save", rep.chunk_index)
                t = time.perf_counter()
                mem.save(checkpoint_dir)
                rep.seconds["save"] = time.perf_counter() - t
            if cuda:
                phase_peak(rep, "save", mem.params[0].device)
                rep.peak_gib = max(rep.peak_gib_phase.values())
            yield rep
