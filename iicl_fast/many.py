"""Many documents → many memories in one batched run (a LoraBank trained together)."""
from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from .bank import BankAdamW, LoraBank
from .config import Config, IICLError
from .consolidate import anchor_set, concat, epoch_order, hidden_loss, loss_stats, prepare_chunk, with_replay
from .driver import split_chunks, stream_id
from .memory import Memory, get_state_keys, sha256_text
from .teacher import student_hidden


def _bank_key(name: str, which: str) -> str:
    return f"base_model.model.{name}.lora_{which}.weight"


def consolidate_many(model, tokenizer, texts: list[str], config: Config | None = None) -> list[Memory]:
    """Consolidate each text into its own Memory, the training of all of them batched.

    Every text is split into chunks as Memory.stream does; in round r each text that has an
    r-th chunk is elicited, passed through the teacher and selected (per document), then the
    kept entries of all of them (plus each memory's replay) train together: each step takes
    the next micro-batch of every document, every sequence routed to its own adapter, one
    backward, and a masked AdamW step of the adapters that had a batch. Per adapter, the
    batches, losses, clipping and AdamW are those of Memory.consolidate with the same config,
    so the result matches consolidating each text alone. -> memories in the order of texts;
    each has .report (the last round's ConsolidationReport)."""
    config = config or Config()
    if isinstance(texts, str):                    # its characters would be as many documents
        raise IICLError("consolidate_many takes a list of texts (Memory.consolidate for one)")
    texts = list(texts)
    if not texts:
        raise IICLError("consolidate_many: no texts")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise IICLError(f"consolidate_many: text {i} is a {type(t).__name__}, not a string")
        if not t.strip():
            raise IICLError(f"consolidate_many: text {i} is empty")
    mems = [Memory(model, tokenizer, config) for _ in texts]     # fresh adapters: B = 0, the base model
    peft_model, fmt = mems[0].model, mems[0].fmt
    chunks = [split_chunks(fmt, t, config.chunk_tokens) for t in texts]
    with peft_model.disable_adapter():
        bank = LoraBank(peft_model, len(texts), rank=config.lora_r, alpha=config.lora_alpha,
                        target_modules=None if config.target_modules == "all-linear" else config.target_modules)
    try:
        keys = set(get_state_keys(mems[0]))
        names = [n for n, _ in bank.modules]
        if keys != {_bank_key(n, w) for n in names for w in "AB"}:
            raise IICLError("the bank's layers do not match the memories' LoRA layout")
        from peft import get_peft_model_state_dict
        with torch.no_grad():
            for i, m in enumerate(mems):
                sd = get_peft_model_state_dict(peft_model, adapter_name=m.name)
                for n in names:
                    bank.A[n][i].copy_(sd[_bank_key(n, "A")])
                    bank.B[n][i].copy_(sd[_bank_key(n, "B")])
        for r in range(max(len(c) for c in chunks)):
            docs = [i for i in range(len(texts)) if r < len(chunks[i])]
            prepared = {}
            for i in tqdm(docs, desc=f"round {r}: elicit, teacher, select", disable=not config.progress):
                mems[i]._activate()          # its adapter so far (fresh: the base model), as consolidate does
                prepared[i] = prepare_chunk(peft_model, fmt, chunks[i][r], config, chunk_index=r,
                                            base_view=peft_model.disable_adapter)
            # anchors depend on the round only (the base answers round r's prompts): one set for all
            anchors = anchor_set(peft_model, fmt, config, r, peft_model.disable_adapter) \
                if config.anchor_entries or config.prose_anchors else None
            # a fresh optimizer per chunk, as Memory.consolidate's train() makes one per chunk
            opt = BankAdamW(bank, lr=config.chunk_lr(r), weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm)
            _train_bank(peft_model, fmt, bank, opt, mems, prepared, config, chunk_index=r, anchors=anchors)
            _write_back(peft_model, bank, mems, docs)
            for i in docs:
                rep, kept, teacher = prepared[i]
                m = mems[i]
                m._update_replay(kept, teacher, r)
                if config.retain > 0:
                    m._retain(chunks[i][r])
                if r == 0:     # each text is one stream, as driver.stream records it
                    sid, text_id = stream_id([texts[i]], config.chunk_tokens)
                    m.streams.append({"id": sid, "text_sha256": text_id, "chunk_tokens": config.chunk_tokens,
                                      "chunks": len(chunks[i])})
                m.chunks.append({"index": r, "tokens": rep.chunk_tokens, "sha256": sha256_text(chunks[i][r]),
                                 "stream": m.streams[-1]["id"], "position": r})
                m.report = rep
    finally:
        bank.remove()
    return mems


def _train_bank(peft_model, fmt, bank, opt, mems, prepared, config, *, chunk_index: int, anchors=None):
    seed = config.seed + chunk_index
    docs = [i for i in prepared if prepared[i][1]]
    data = {}
    for i in docs:
        rep, kept, teacher = prepared[i]
        entries, hs = with_replay(kept, teacher, mems[i].replay, config, chunk_index)
        rep.replayed = len(entries) - len(kept)
        if anchors and anchors[0]:                      # as consolidate_chunk: after the replayed entries
            entries, hs = entries + anchors[0], concat(hs, anchors[1])
            rep.anchored = len(anchors[0])
        data[i] = (entries, hs, loss_stats(peft_model, hs, config))
    rngs = {i: torch.Generator().manual_seed(seed) for i in docs}     # as train() seeds chunk r
    t = time.perf_counter()
    bs = config.batch_size
    steps = max((math.ceil(len(data[i][0]) / bs) for i in docs), default=0)
    peft_model.train()
    try:
        for _ in range(config.epochs):
            orders = {i: epoch_order(len(data[i][0]), prepared[i][0].anchored, rngs[i]) for i in docs}
            totals = {i: [0.0, 0] for i in docs}
            for k in range(steps):
                active = [i for i in docs if k * bs < len(orders[i])]
                batch, route, parts = [], [], []
                for i in active:
                    idx = orders[i][k * bs: (k + 1) * bs]
                    entries, hs, _ = data[i]
                    parts.append((i, idx, sum(len(entries[j].response) for j in idx)))
                    batch += [entries[j] for j in idx]
                    route += [i] * len(idx)
                # padded rows, never packed: the bank routes each row (sequence) to its adapter
                with peft_model.disable_adapter(), bank.route(route):
                    h_s = student_hidden(peft_model, fmt, batch, packed=False)
                loss, at = 0.0, 0
                for i, idx, n in parts:
                    entries, hs, stats = data[i]
                    rows = hs.rows(idx).to(hs.h.device)
                    li = hidden_loss(peft_model, h_s[at: at + n], hs, rows, config, stats)
                    loss = loss + li
                    totals[i][0] += float(li.detach()) * n
                    totals[i][1] += n
                    at += n
                opt.zero_grad()
                loss.backward()
                opt.step(active=active)
            for i in docs:
                prepared[i][0].loss_per_epoch.append(totals[i][0] / max(totals[i][1], 1))
    finally:
        peft_model.eval()
    for i in docs:
        prepared[i][0].seconds["train"] = (time.perf_counter() - t) / len(docs)   # a share of the batched run


def _write_back(peft_model, bank, mems, docs):
    from peft import set_peft_model_state_dict
    for i in docs:
        sd = bank.peft_state(i)
        set_peft_model_state_dict(peft_model, {k: v.to(mems[i].params[0].device) for k, v in sd.items()},
                                  adapter_name=mems[i].name)
