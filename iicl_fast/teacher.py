"""Phase 2: the teacher pass. The model with C in view over [C; q; r] for every entry, C
encoded once and its KV cache shared by every batch (prefix reuse). Only O(tokens × hidden)
is kept: the final hidden state at each position that predicts a response token."""
from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from . import reference
from .decode import packed_sequences, packing_unsupported
from .elicit import Entry, prompt_ids
from .generation import cache_kw, decoder, lm_head, pad_right, prefix_cache, to_device
from .models import PromptFormat


@dataclass
class HiddenSet:
    """Per-response-token hidden states for a list of entries.

    h [N, H] fp32, targets [N] (the response token each row predicts),
    offsets [E+1] (entry e owns rows offsets[e]:offsets[e+1])."""
    h: torch.Tensor
    targets: torch.Tensor
    offsets: list[int]

    def rows(self, entries_idx: list[int]) -> torch.Tensor:
        return torch.cat([torch.arange(self.offsets[e], self.offsets[e + 1]) for e in entries_idx])


def token_batches(lengths: list[int], max_tokens: int, max_rows: int | None = None) -> list[list[int]]:
    """Indices grouped into batches of at most max_tokens padded tokens (rows × longest row)
    and max_rows rows, longest first, so that a batch pads little. A row longer than the
    budget gets a batch of its own."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, cur, longest = [], [], 0
    for i in order:
        n = lengths[i]
        if cur and (max(longest, n) * (len(cur) + 1) > max_tokens or (max_rows and len(cur) >= max_rows)):
            batches.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    if cur:
        batches.append(cur)
    return batches


def _in_order(parts: list[torch.Tensor], batches: list[list[int]], lengths: list[int]) -> torch.Tensor:
    """Rows of per-batch results (entry by entry, in batch order) put back in entry order."""
    flat = torch.cat(parts)
    at, where = 0, {}
    for b in batches:
        for i in b:
            where[i] = (at, lengths[i])
            at += lengths[i]
    idx = torch.cat([torch.arange(where[i][0], where[i][0] + where[i][1]) for i in range(len(lengths))])
    return flat[idx.to(flat.device)]


def _gather(hidden, seq_starts, lengths):
    """hidden [B, S, H]; entry b's response predicted by rows seq_starts[b]-1 ... +L-1."""
    return torch.cat([hidden[b, s - 1: s - 1 + n] for b, (s, n) in enumerate(zip(seq_starts, lengths))])


@torch.no_grad()
def teacher_hidden(model, fmt: PromptFormat, chunk: str, entries: list[Entry], *, batch_size=8,
                   max_tokens: int | None = None, prefix_reuse=True, cascade: bool | None = None,
                   progress=False, known: list | None = None) -> HiddenSet:
    """Hidden states of the model with the chunk in view, at every response position.

    Batches hold at most batch_size entries and max_tokens padded suffix tokens ([q; r]; the
    prefix KV is shared), longest first. cascade (default: on CUDA) keeps one copy of the
    prefix KV for every row (decode.py) instead of copying it per row.

    known: per entry, the states [len(response), H] the decoder already computed for it with
    the chunk in view (elicit's keep_hidden), or None: only the None entries are run (the
    paper preset's entries are all decoded: its 214,879 teacher-pass tokens need no pass)."""
    if _some_known("teacher_hidden", entries, known):
        return _with_known(model, entries, known, lambda es: teacher_hidden(
            model, fmt, chunk, es, batch_size=batch_size, max_tokens=max_tokens, prefix_reuse=prefix_reuse,
            cascade=cascade, progress=progress))
    device = next(model.parameters()).device
    body = decoder(model)
    prefix = fmt.context_prefix(chunk)
    K = len(prefix)
    if cascade is None:
        from .decode import cascade_unsupported
        cascade = device.type == "cuda" and cascade_unsupported(model) is None
    cascade = cascade and prefix_reuse
    if cascade:
        from .decode import prefix_kv, shared_prefix
        ctx = shared_prefix(model, prefix_kv(model, prefix))
    else:
        ctx = contextlib.nullcontext()
    cache = prefix_cache(model, prefix) if prefix_reuse and not cascade else None
    suffixes_all = [fmt.query(e.query) + e.response for e in entries]
    lengths = [len(e.response) for e in entries]
    batches = token_batches([len(x) for x in suffixes_all], max_tokens or 1 << 62, batch_size)
    hs = []
    with ctx:
        for bidx in tqdm(batches, desc="teacher", disable=not progress, leave=False):
            batch = [entries[i] for i in bidx]
            suffixes = [suffixes_all[i] for i in bidx]
            starts = [len(s) - len(e.response) for s, e in zip(suffixes, batch)]
            if cascade:                  # one copy of the prefix KV, attended through decode.py
                # right padding and no mask: under causal attention no real token sees a pad,
                # and the rows' own part takes the flash op (decode._flash_suffix)
                ids, _ = pad_right(suffixes, fmt.pad_id, device)
                B, S = ids.shape
                hidden = body(input_ids=ids, use_cache=False,
                              position_ids=torch.arange(K, K + S, device=device)[None].expand(B, S)).last_hidden_state
            elif prefix_reuse:
                ids, mask = pad_right(suffixes, fmt.pad_id, device)
                B, S = ids.shape
                past = copy.deepcopy(cache)
                past.batch_repeat_interleave(B)
                full_mask = torch.cat([torch.ones(B, K, dtype=mask.dtype, device=device), mask], 1)
                pos = torch.arange(K, K + S, device=device)
                hidden = body(input_ids=ids, attention_mask=full_mask, position_ids=pos[None].expand(B, S),
                              cache_position=pos, use_cache=True, **cache_kw(body, past)).last_hidden_state
                del past
            else:
                ids, mask = pad_right([prefix + s for s in suffixes], fmt.pad_id, device)
                hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state
                starts = [K + s for s in starts]
            hs.append(_gather(hidden, starts, [len(e.response) for e in batch]).float())
            del hidden
    targets = [t for e in entries for t in e.response]
    return HiddenSet(_in_order(hs, batches, lengths), torch.tensor(targets, device=device), _offsets(entries))


def _some_known(fn: str, entries, known) -> bool:
    """Whether known (None, or one state or None an entry) gives any entry's states."""
    if known is None:
        return False
    if len(known) != len(entries):
        raise ValueError(f"{fn}: {len(known)} known states for {len(entries)} entries")
    for i, (k, e) in enumerate(zip(known, entries)):
        if k is not None and (k.dim() != 2 or k.shape[0] != len(e.response)):
            raise ValueError(f"{fn}: known[{i}] has shape {tuple(k.shape)}, "
                             f"expected [{len(e.response)}, H] (one state a response token)")
    return any(k is not None for k in known)


def _with_known(model, entries, known, run) -> HiddenSet:
    """The HiddenSet of entries: known[i] where given, run(the other entries) for the rest."""
    todo = [i for i, k in enumerate(known) if k is None]
    ran = run([entries[i] for i in todo]) if todo else None
    device = next(model.parameters()).device
    offsets = _offsets(entries)
    H = next(k for k in known if k is not None).shape[1]
    h = torch.empty(offsets[-1], H, dtype=torch.float32, device=device)   # filled piece by piece:
    for j, i in enumerate(todo):                                          # no fp32 copy of each first
        h[offsets[i]: offsets[i + 1]] = ran.h[ran.offsets[j]: ran.offsets[j + 1]]
    for i, k in enumerate(known):
        if k is not None:
            h[offsets[i]: offsets[i + 1]] = k
    targets = [t for e in entries for t in e.response]
    return HiddenSet(h, torch.tensor(targets, device=device), offsets)


def _offsets(entries: list[Entry]) -> list[int]:
    offsets = [0]
    for e in entries:
        offsets.append(offsets[-1] + len(e.response))
    return offsets


def student_batch(fmt: PromptFormat, entries: list[Entry], device):
    """Student sequences [head; q; tail; r] (no chunk): ids, mask, response starts."""
    seqs = [prompt_ids(fmt, e) + e.response for e in entries]
    ids, mask = pad_right(seqs, fmt.pad_id, device)
    starts = [len(s) - len(e.response) for s, e in zip(seqs, entries)]
    return ids, mask, starts


def student_hidden(model, fmt: PromptFormat, entries: list[Entry], packed: bool | None = None):
    """Differentiable student hidden states [N, H] at every response position.

    packed (default: on CUDA, where decode.packing_unsupported finds nothing, unless
    IICL_PACK=0): the sequences one after another in a single row, attention within each
    (decode.packed_sequences); else right-padded to the longest."""
    device = next(model.parameters()).device
    if packed is None:
        packed = pack_by_default(model, device)
    if packed:
        return _packed_hidden(model, fmt, entries, device)
    ids, mask, starts = student_batch(fmt, entries, device)
    # Right padding: under causal attention no real token sees a pad, so no mask is passed,
    # and SDPA takes its flash path with grouped KV heads (a padding mask sends it to a path
    # that repeats every KV head per query head).
    # use_cache=False: by default the body builds a KV cache, a torch.cat copy of every layer's
    # keys and values (64 copy kernels, ~5 ms of a 8B training step)
    hidden = decoder(model)(input_ids=ids, use_cache=False).last_hidden_state
    return _gather(hidden, starts, [len(e.response) for e in entries])


def pack_by_default(model, device) -> bool:
    """student_hidden's packed=None: on CUDA where decode.packing_unsupported finds nothing,
    unless IICL_PACK=0."""
    return device.type == "cuda" and os.environ.get("IICL_PACK", "1") != "0" and not packing_unsupported(model)


def _packed_hidden(model, fmt: PromptFormat, entries: list[Entry], device):
    """student_hidden over one packed row: ids [1, ΣL], positions restarting at each sequence."""
    seqs = [prompt_ids(fmt, e) + e.response for e in entries]
    lengths = [len(s) for s in seqs]
    ends = torch.tensor(lengths).cumsum(0).tolist()
    ids = to_device(torch.tensor([t for s in seqs for t in s])[None], device)
    pos = to_device(torch.cat([torch.arange(n) for n in lengths])[None], device)
    cu = to_device(torch.tensor([0] + ends, dtype=torch.int32), device)
    # entry b's response is predicted by the rows before each of its tokens
    rows = torch.cat([torch.arange(end - len(e.response) - 1, end - 1) for end, e in zip(ends, entries)])
    with packed_sequences(model, cu, max(lengths)):
        hidden = decoder(model)(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state[0]
    return hidden[to_device(rows, device)]


@torch.no_grad()
def hidden_logprob(model, hs: HiddenSet, temperature=1.0, token_chunk=256, impl=None):
    """Per-response-token log-prob [N] of the targets, from stored hidden states.

    impl: None → the plain reference; "auto" | "triton" | "torch" → ops.token_logprob."""
    weight, bias, softcap = lm_head(model)
    if impl is not None and bias is None and softcap is None:
        from . import ops
        return ops.token_logprob(hs.h.to(weight.dtype), weight, hs.targets, temperature=temperature, impl=impl)[0]
    lp, _ = reference.token_logprob(hs.h, weight, hs.targets, bias=bias, softcap=softcap,
                                    temperature=temperature, token_chunk=token_chunk)
    return lp


@torch.no_grad()
def student_hidden_set(model, fmt, entries, batch_size=8, max_tokens: int | None = None,
                       known: list | None = None) -> HiddenSet:
    """The student's hidden states (no chunk in view) at every response position, batches
    sized as in teacher_hidden. known: as teacher_hidden's (the anchors, which the decoder
    wrote with no chunk in view)."""
    if _some_known("student_hidden_set", entries, known):
        return _with_known(model, entries, known, lambda es: student_hidden_set(
            model, fmt, es, batch_size=batch_size, max_tokens=max_tokens))
    lengths = [len(e.response) for e in entries]
    batches = token_batches([len(prompt_ids(fmt, e)) + len(e.response) for e in entries],
                            max_tokens or 1 << 62, batch_size)
    hs = [student_hidden(model, fmt, [entries[i] for i in b]).float() for b in batches]
    device = next(model.parameters()).device
    targets = [t for e in entries for t in e.response]
    return HiddenSet(_in_order(hs, batches, lengths), torch.tensor(targets, device=device), _offsets(entries))
