"""Phases 1–4 for one chunk: T_i : θ_{i-1} + C_i → θ_i."""
from __future__ import annotations

import contextlib
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from . import dist, reference
from .config import Config
from .decode import without_cudnn_sdpa
from .elicit import Entry, anchor_entries, elicit, prompt_ids, prose_anchor_entries
from .generation import causal_lm, lm_head, to_device
from .models import PromptFormat
from .select import delta_ppl, select_by_ppl_gap, select_random
from .teacher import HiddenSet, hidden_logprob, student_hidden, student_hidden_set, teacher_hidden, token_batches


@dataclass
class ConsolidationReport:
    """What one T_i did."""
    chunk_index: int = 0
    chunk_tokens: int = 0
    skipped: bool = False          # already recorded in the memory (resume)
    elicited: int = 0
    kept: int = 0
    replayed: int = 0              # entries of earlier chunks trained on again
    anchored: int = 0              # anchor entries (general prompts, the base as teacher) trained on
    dppl_kept: float = float("nan")     # mean ΔPPL of kept entries (nats/token)
    dppl_dropped: float = float("nan")  # mean ΔPPL of dropped entries
    loss_per_epoch: list[float] = field(default_factory=list)
    peak_gib: float = float("nan")     # peak GPU memory of the chunk (driver.stream, on CUDA)
    # on CUDA: peak allocated GiB of each phase (the peak counter is reset at every phase's end)
    peak_gib_phase: dict[str, float] = field(default_factory=dict)
    # on CUDA: GiB still allocated at each phase's end (what a phase leaves to the next: the
    # 8B chunk's peaks were 2.37 GiB higher in every phase in some runs of the same code)
    held_gib_phase: dict[str, float] = field(default_factory=dict)
    # work done, for floors and per-chunk records: rows generated, tokens decoded, teacher
    # and student pass tokens, response tokens, tokens trained (all epochs)
    work: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        if self.skipped:
            return f"chunk {self.chunk_index}: already consolidated, skipped"
        secs = " ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items())
        losses = " ".join(f"{x:.4f}" for x in self.loss_per_epoch)
        return (f"chunk {self.chunk_index} ({self.chunk_tokens} tokens): elicited {self.elicited}, kept "
                f"{self.kept} (+{self.replayed} replayed); ΔPPL kept {self.dppl_kept:.3f} dropped {self.dppl_dropped:.3f}; "
                f"loss/epoch {losses}; {secs}" + ("" if self.peak_gib != self.peak_gib else f"; peak {self.peak_gib:.2f} GiB"))


def trace(phase: str, chunk_index: int) -> None:
    """IICL_TRACE_PHASES=1: say on stderr when each phase starts (fault-injection tests read it)."""
    if os.environ.get("IICL_TRACE_PHASES"):
        sys.stderr.write(f"[iicl phase] {phase} {chunk_index}\n")   # one write: ranks' lines never interleave
        sys.stderr.flush()


def _now(model) -> float:
    """perf_counter after the device's queued work (phases are timed, not just launched)."""
    if next(model.parameters()).is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter()


def phase_peak(rep: ConsolidationReport, phase: str, device: torch.device) -> None:
    """On CUDA: the phase's peak allocated memory and what it leaves allocated into rep, then
    the peak counter reset for the next."""
    if device.type == "cuda":
        rep.peak_gib_phase[phase] = torch.cuda.max_memory_allocated(device) / 2**30
        rep.held_gib_phase[phase] = torch.cuda.memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)


def _mean(x: torch.Tensor) -> float:
    x = x[torch.isfinite(x)]
    return float(x.mean()) if x.numel() else float("nan")


# Rows per slab of the fused loss head in training (teacher stats and forward KL; the kernel's
# slab_rows, first pieces of this many rows a call). Its
# kernel's [rows, V] bf16 workspace grows with the rows up to 256 MiB (2,688 rows at V=49,152):
# the stress stream's chunk 1, whose replay buffer was half full (~2,200 rows), peaked at
# 0.632 GiB against 0.678-0.684 for every later chunk (>= 2,688 rows), and max/min missed 1.05.
# In pieces of 512 rows (48 MiB at V=49,152) nearly every call reaches the same workspace.
# Pieces grow with the vocabulary (loss_rows): at V=128,256 pieces of 512 rows were half the
# kernel's own 1,024-row slab and the loss head took 65 ms a training step of the 8B shape
# against 45 ms in whole slabs (H200, benchmarks/NOTES.md, fifteenth session).
LOSS_ROWS = 512


def loss_rows(vocab: int) -> int:
    """Rows per slab of training's loss head: LOSS_ROWS per started 65,536 vocabulary entries
    (512 at V=49,152, 1,024 — one of the kernel's slabs — at V=128,256)."""
    return LOSS_ROWS * -(-vocab // 65536)


def entry_loss(model, fmt, batch: list[Entry], teacher: HiddenSet, rows: torch.Tensor, config: Config,
               teacher_stats=None):
    """Mean loss over a micro-batch's response tokens (differentiable in the LoRA weights)."""
    return hidden_loss(model, student_hidden(model, fmt, batch), teacher, rows, config, teacher_stats)


def hidden_loss(model, h_s, teacher: HiddenSet, rows: torch.Tensor, config: Config, teacher_stats=None):
    """Mean loss of student hidden states h_s [n, H] against the teacher's rows [n]."""
    weight, bias, softcap = lm_head(model)
    targets = teacher.targets[rows]
    if config.loss_impl == "fused":
        from . import ops
        if config.loss == "forward_kl" and bias is None and softcap is None:
            # one call, its kernel's slabs capped at loss_rows(V) (see LOSS_ROWS): a call per piece
            # cost a host sync each (the kernel's overflow check), and the GPU idled while the
            # host launched the next piece: ~20 ms of gaps in a 550 ms step of the 8B shape
            st = ops.TeacherStats(*(None if t is None else t[rows] for t in teacher_stats))
            return ops.forward_kl(h_s, weight, st, temperature=config.temperature, reduction="mean",
                                  impl=config.kernel_impl, slab_rows=loss_rows(weight.shape[0]))
        if config.loss == "seqkd":
            lp, _ = ops.token_logprob(h_s, weight, targets, temperature=config.temperature, impl=config.kernel_impl)
            return -lp.mean()
        kind = {"forward_kl": "forward", "reverse_kl": "reverse", "jsd": "jsd"}[config.loss]
        return ops.kl_divergence(h_s, weight, teacher.h[rows].to(h_s.dtype), weight, kind=kind, softcap=softcap,
                                 temperature=config.temperature, reduction="mean", impl=config.kernel_impl)
    return reference.distill_loss(config.loss, h_s, teacher.h[rows], targets, weight, bias=bias,
                                  softcap=softcap, temperature=config.temperature,
                                  token_chunk=config.token_chunk)


def micro_batches(fmt: PromptFormat, entries: list[Entry], idx: list[int], max_tokens: int) -> list[list[int]]:
    """A step's entries idx split into micro-batches of at most max_tokens padded tokens."""
    lengths = [len(prompt_ids(fmt, entries[i])) + len(entries[i].response) for i in idx]
    return [[idx[j] for j in b] for b in token_batches(lengths, max_tokens)]


def epoch_order(n: int, dealt: int, rng: torch.Generator) -> list[int]:
    """One epoch's order of n entries: the first n - dealt shuffled, the last `dealt` (anchors)
    shuffled and dealt evenly among them, so every step of a batch takes its share of anchors.
    Put at the end of the list (as before) a step could be anchors alone: at chunk 0 the
    student is the base, their gradients are rounding noise, and AdamW's normalised step
    turned that noise into steps of up to lr (NOTES.md, 13th session). dealt=0: randperm(n)."""
    main = torch.randperm(n - dealt, generator=rng).tolist()
    if not dealt:
        return main
    extra = [n - dealt + i for i in torch.randperm(dealt, generator=rng).tolist()]
    slots = [((2 * j + 1) * n) // (2 * dealt) for j in range(dealt)]     # the middles of dealt equal parts
    out, a, m = [], 0, 0
    for pos in range(n):
        if a < dealt and pos == slots[a]:
            out.append(extra[a])
            a += 1
        else:
            out.append(main[m])
            m += 1
    return out


def train(model, fmt: PromptFormat, entries: list[Entry], teacher: HiddenSet, params: list[torch.Tensor],
          config: Config, *, seed: int | None = None, dealt: int = 0, lr: float | None = None) -> list[float]:
    """LoRA training of the student (no chunk in view). -> mean loss per epoch.
    seed: of the epochs' shuffles (config.seed + the chunk's index in consolidate_chunk).
    lr: the chunk's learning rate (config.chunk_lr; None: config.lr).
    dealt: the last `dealt` entries (anchors) are spread evenly over each epoch's steps.

    A step takes batch_size entries (the loss is the mean over their response tokens) in
    micro-batches of at most train_tokens padded tokens, gradients accumulated. Under
    torch.distributed a step's entries are dealt out over the ranks and the gradients summed
    (iicl_fast.dist): every rank takes the same steps."""
    # fused on CUDA: one kernel over every LoRA tensor instead of a foreach chain (the 8B
    # profile showed ~50 ms of optimizer time per step, 7 % of the step)
    opt = torch.optim.AdamW(params, lr=config.lr if lr is None else lr, weight_decay=config.weight_decay, fused=params[0].is_cuda)
    rng = torch.Generator().manual_seed(config.seed if seed is None else seed)
    stats = loss_stats(model, teacher, config)
    losses = []
    lm = causal_lm(model)
    if config.gradient_checkpointing:      # transformers >= 5.2x names it activation checkpointing
        if hasattr(lm, "activation_checkpointing_enable"):
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    bar = tqdm(total=config.epochs * len(entries), desc="train", disable=not config.progress, leave=False)
    try:
        for _ in range(config.epochs):
            order = epoch_order(len(entries), dealt, rng)
            # the epoch's loss summed on the device: a float() per micro-batch waited for the GPU
            # and left it idle while the next step's first kernels were launched
            total, count = torch.zeros((), dtype=torch.float64, device=teacher.h.device), 0
            for s in range(0, len(order), config.batch_size):
                idx = order[s: s + config.batch_size]
                n_step = sum(len(entries[i].response) for i in idx)
                opt.zero_grad(set_to_none=True)
                for mb in micro_batches(fmt, entries, dist.shard(idx), config.train_tokens):
                    rows = to_device(teacher.rows(mb), teacher.h.device)
                    loss = entry_loss(model, fmt, [entries[i] for i in mb], teacher, rows, config, stats)
                    (loss * (rows.numel() / n_step)).backward()
                    total += loss.detach().double() * rows.numel()
                    count += rows.numel()
                dist.all_reduce_grads(params)
                if config.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                opt.step()
                bar.update(len(idx))
            total, count = dist.all_reduce_sum([float(total), count])
            losses.append(total / max(count, 1))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        dist.sync_params(params)        # FSDP: every rank took the same steps; rank 0's, bit for bit
    finally:
        model.eval()
        for p in params:      # the last step's gradients would otherwise stay allocated until the next chunk
            p.grad = None
        if config.gradient_checkpointing:
            (getattr(lm, "activation_checkpointing_disable", None) or lm.gradient_checkpointing_disable)()
        bar.close()
    return losses


def loss_stats(model, teacher: HiddenSet, config: Config):
    """The one teacher pass of the fused forward KL (None for the other losses)."""
    if not (config.loss_impl == "fused" and config.loss == "forward_kl"):
        return None
    from . import ops
    weight, _, _ = lm_head(model)
    n = loss_rows(weight.shape[0])
    # pieces of 8 slabs: the teacher's rows cast to the weight's dtype a piece at a time
    parts = [ops.teacher_stats(teacher.h[a: a + 8 * n].to(weight.dtype), weight, temperature=config.temperature,
                               impl=config.kernel_impl, slab_rows=n) for a in range(0, len(teacher.h), 8 * n)]
    return tuple(torch.cat([getattr(p, k) for p in parts]) for k in ("lse", "entropy", "mu")) + (None,)


def subset(hs: HiddenSet, idx: list[int]) -> HiddenSet:
    """The rows of entries idx (in that order), with fresh offsets."""
    offsets = [0]
    for e in idx:
        offsets.append(offsets[-1] + hs.offsets[e + 1] - hs.offsets[e])
    rows = hs.rows(idx) if idx else torch.zeros(0, dtype=torch.long)
    return HiddenSet(hs.h[rows], hs.targets[rows], offsets)


def concat(a: HiddenSet, b: HiddenSet) -> HiddenSet:
    return HiddenSet(torch.cat([a.h, b.h.to(a.h.device)]), torch.cat([a.targets, b.targets.to(a.targets.device)]),
                     a.offsets + [a.offsets[-1] + o for o in b.offsets[1:]])


@without_cudnn_sdpa
def consolidate_chunk(model, fmt: PromptFormat, chunk: str, params: list[torch.Tensor], config: Config,
                      *, chunk_index: int = 0, replay=None, base_view=None):
    """Elicit → teacher pass → select by ΔPPL → train the LoRA params on the kept entries
    (plus `replay`: (entries, HiddenSet) kept from earlier chunks, trained on again so the
    new chunk does not overwrite them).

    -> (report, kept entries, their teacher HiddenSet)."""
    rep, kept_entries, teacher = prepare_chunk(model, fmt, chunk, config, chunk_index=chunk_index,
                                               base_view=base_view)
    if not kept_entries:
        return rep, [], None
    if config.anchor_entries or config.prose_anchors:
        t = _now(model)
        anchors = anchor_set(model, fmt, config, chunk_index, base_view)
        rep.anchored = len(anchors[0])
        rep.seconds["elicit"] += _now(model) - t          # anchors are elicited and taught outside the chunk
    trace("train", chunk_index)
    t = _now(model)
    train_entries, train_teacher = with_replay(kept_entries, teacher, replay, config, chunk_index)
    rep.replayed = len(train_entries) - len(kept_entries)
    if rep.anchored:
        train_entries, train_teacher = train_entries + anchors[0], concat(train_teacher, anchors[1])
    rep.loss_per_epoch = train(model, fmt, train_entries, train_teacher, params, config,
                               seed=config.seed + chunk_index, dealt=rep.anchored, lr=config.chunk_lr(chunk_index))
    rep.seconds["train"] = _now(model) - t
    if os.environ.get("IICL_TRACE_PHASES") and dist.is_main():   # full precision: tests/test_dist_cuda.py
        sys.stderr.write(f"[iicl losses] {chunk_index} {' '.join(repr(x) for x in rep.loss_per_epoch)}\n")
    phase_peak(rep, "train", params[0].device)
    lengths = [len(prompt_ids(fmt, e)) + len(e.response) for e in train_entries]
    rep.work["train_tokens"] = config.epochs * sum(lengths)
    rep.work["train_pairs"] = config.epochs * sum(n * (n + 1) // 2 for n in lengths)     # causal attention's (q, k)
    return rep, kept_entries, teacher


def anchor_set(model, fmt: PromptFormat, config: Config, chunk_index: int, base_view=None):
    """-> (anchor entries, their teacher HiddenSet): general prompts answered by the base
    (under base_view; without one, by θ_{i-1}) with no chunk in view, then openings of prose it
    continues (config.prose_anchors), and the hidden states of that same model as the teacher.
    Not kept for replay: each chunk takes the next prompts."""
    reuse = config.teacher_from_elicit       # every rank decodes every anchor
    with (base_view or contextlib.nullcontext)():
        a = anchor_entries(model, fmt, config, chunk_index=chunk_index, keep_hidden=reuse)
        p = prose_anchor_entries(model, fmt, config, chunk_index=chunk_index, keep_hidden=reuse)
        (a, ka), (p, kp) = (a, p) if reuse else ((a, None), (p, None))
        entries = dist.broadcast(a + p)
        if not entries:
            return [], None
        # the decoder's states are the teacher's (Config.teacher_from_elicit): this rank's where
        # it wrote rank 0's tokens (FSDP: where every rank did)
        known = (ka + kp if dist.all_agree(entries == a + p) else [None] * len(entries)) if reuse else None
        hs = sharded_hidden(model, entries, lambda es, kn: student_hidden_set(
            model, fmt, es, batch_size=config.gen_batch_size, max_tokens=config.pass_tokens, known=kn), known)
    return entries, hs


# An earlier entry's weight in an "overlap" draw is OVERLAP_FLOOR + its overlap score (in [0, 1]):
# the floor keeps every entry drawable, at worst 1 / 11 as likely as a fully overlapping one.
OVERLAP_FLOOR = 0.1


def _features(e: Entry) -> set:
    """An entry's words (its query's, lowercased) and its response's token ids, as one set."""
    return {w for w in "".join(c.lower() if c.isalnum() else " " for c in e.query).split()} | \
        {("#", t) for t in e.response}


def overlap_scores(old: list[Entry], new: list[Entry]) -> list[float]:
    """Per entry of `old`: the share of its features' information (idf over old + new) that the
    `new` entries also have, in [0, 1]. A feature in every entry (a prompt's fixed words, "the")
    weighs ~0; a rarer one (a fact's form: "population", "km"; a name) most."""
    feats_old = [_features(e) for e in old]
    feats_new = [_features(e) for e in new]
    df: dict = {}
    for f in feats_old + feats_new:
        for x in f:
            df[x] = df.get(x, 0) + 1
    n = len(feats_old) + len(feats_new)
    idf = {x: math.log(n / c) for x, c in df.items()}
    seen_new = set().union(*feats_new) if feats_new else set()
    out = []
    for f in feats_old:
        total = sum(idf[x] for x in f)
        out.append(sum(idf[x] for x in f if x in seen_new) / total if total > 0 else 0.0)
    return out


def _draw(idx: list[int], m: int, rng: random.Random, weights: list[float] | None) -> list[int]:
    """m of idx without replacement, sorted: uniform, or by weight (keys u^(1/w), which draws
    successively in proportion to the weights left)."""
    if weights is None:
        return sorted(rng.sample(idx, m))
    keys = [(rng.random() ** (1.0 / weights[i]), i) for i in idx]
    return sorted(i for _, i in sorted(keys, reverse=True)[:m])


def with_replay(kept: list[Entry], teacher: HiddenSet, replay, config: Config | None = None, chunk_index: int = 0):
    """The kept entries followed by the replay buffer's, or (config.replay_sample > 0) by a
    seeded sample of that many of them, drawn anew each chunk (replay_fill: a smaller buffer cycled
    to that many; replay_draw "overlap": weighted by overlap_scores with the kept entries); each
    replay_repeats times (replay_repeats_whole: only while the whole buffer is replayed)."""
    if not (replay and replay[0]):
        return kept, teacher
    entries, hs = replay
    k = config.replay_sample if config is not None else 0
    idx = list(range(len(entries)))
    rng = random.Random((config.seed * 1_000_003 + chunk_index) * 7 + 1) if config is not None else None
    weights = None
    if config is not None and config.replay_draw == "overlap" and 0 < k and (k < len(entries) or config.replay_fill):
        weights = [OVERLAP_FLOOR + s for s in overlap_scores(entries, kept)]
    if 0 < k < len(entries):
        idx = _draw(idx, k, rng, weights)
    elif 0 < k and config.replay_fill:
        # a buffer smaller than k is cycled whole, the remainder a seeded sample: k replayed a chunk
        idx = idx * (k // len(entries)) + _draw(idx, k % len(entries), rng, weights)
    repeats = config.replay_repeats if config is not None else 1
    if config is not None and config.replay_repeats_whole and 0 < k < len(entries):
        repeats = 1          # a drawn share: once (replay_repeats_whole)
    idx = idx * repeats
    if idx != list(range(len(entries))):
        entries, hs = [entries[i] for i in idx], subset(hs, idx)
    return kept + entries, concat(teacher, hs)


def owners(known: list | None, n: int) -> list[int]:
    """The rank that computes each of n entries in sharded_hidden. known (None on every rank or
    on none): per entry, the states this rank holds or None. An entry whose states some rank
    holds goes to one of its holders (in turn among them), so nothing decoded is recomputed; the
    rest are dealt out in turn. One process: 0 for all."""
    if not dist.active():
        return [0] * n
    W = dist.world()
    if known is None:
        return [i % W for i in range(n)]
    held = dist.all_gather_objects([k is not None for k in known])
    out, free = [], 0
    for i in range(n):
        holders = [q for q in range(W) if held[q][i]]
        if holders:
            out.append(holders[i % len(holders)])
        else:
            out.append(free % W)
            free += 1
    return out


def sharded_hidden(model, entries: list[Entry], compute, known: list | None = None) -> HiddenSet:
    """compute(entries, their known states) -> HiddenSet, run on this rank's share of the
    entries (owners) and gathered: every rank ends with the whole set in entry order (one
    process: compute(entries, known)). known: as owners; data-parallel ranks each hold the
    decoder's states of the rows they decoded (elicit's keep_hidden), and those rows are their
    share, so the teacher of every decoded row is the decoder's, as in one process."""
    if not dist.active():
        return compute(entries, known)
    W, r = dist.world(), dist.rank()
    device = next(model.parameters()).device
    owner = owners(known, len(entries))
    mine = [i for i in range(len(entries)) if owner[i] == r]
    if mine:
        h = compute([entries[i] for i in mine], None if known is None else [known[i] for i in mine]).h
    else:                                  # fewer entries than ranks
        h = torch.zeros(0, lm_head(model)[0].shape[1], dtype=torch.float32, device=device)
    parts = dist.all_gather_rows(h)
    at = [0] * W
    rows = []
    for i, e in enumerate(entries):        # entry i is the next of its owner's rows
        k = owner[i]
        rows.append(parts[k][at[k]: at[k] + len(e.response)])
        at[k] += len(e.response)
    offsets = [0]
    for e in entries:
        offsets.append(offsets[-1] + len(e.response))
    targets = torch.tensor([t for e in entries for t in e.response], device=device)
    return HiddenSet(torch.cat(rows), targets, offsets)


def prepare_chunk(model, fmt: PromptFormat, chunk: str, config: Config, *, chunk_index: int = 0, base_view=None):
    """Elicit → teacher pass → select by ΔPPL. -> (report, kept entries, their teacher HiddenSet).

    base_view: with config.teacher_base, a context manager factory under which the model is
    the base (adapter off, e.g. PeftModel.disable_adapter): elicitation and the teacher pass
    run there, the student pass (ΔPPL's second term) with the adapter on."""
    teach = base_view if (config.teacher_base and base_view is not None) else contextlib.nullcontext
    rep = ConsolidationReport(chunk_index=chunk_index, chunk_tokens=len(fmt.encode(chunk)))
    trace("elicit", chunk_index)
    t = _now(model)
    known = None                             # the decoder's states of the entries this rank wrote
    with teach():
        if config.teacher_from_elicit:
            mine, known = elicit(model, fmt, chunk, config, chunk_index=chunk_index, keep_hidden=True)
        else:
            mine = elicit(model, fmt, chunk, config, chunk_index=chunk_index)
    # several ranks: each decoded its share of the rows and gathered the set (elicit); rank 0's
    # copy is sent to all, so that no difference in the text-side steps can split the ranks
    entries = dist.broadcast(mine)
    if known is not None and not dist.all_agree(entries == mine):    # states of other rows: none kept
        known = [None] * len(entries)
    rep.elicited = len(entries)
    rep.seconds["elicit"] = _now(model) - t
    device = next(model.parameters()).device
    phase_peak(rep, "elicit", device)
    if not entries:
        return rep, [], None

    trace("teacher", chunk_index)
    t = _now(model)
    with teach():                            # several ranks: each takes a share of the entries
        teacher = sharded_hidden(model, entries, lambda es, kn: teacher_hidden(
            model, fmt, chunk, es, batch_size=config.gen_batch_size, max_tokens=config.pass_tokens,
            progress=config.progress, known=kn), known)
    held = [any(h) for h in zip(*dist.all_gather_objects([k is not None for k in known or [None] * len(entries)]))]
    run = [e for e, h in zip(entries, held) if not h]                 # through the pass, on some rank
    known = None                             # their copy is in the teacher's set now
    student = sharded_hidden(model, entries, lambda es, kn: student_hidden_set(
        model, fmt, es, batch_size=config.gen_batch_size, max_tokens=config.pass_tokens))
    rep.seconds["teacher"] = _now(model) - t
    phase_peak(rep, "teacher", device)
    rep.work.update(response_tokens=sum(len(e.response) for e in entries),
                    teacher_tokens=sum(len(fmt.query(e.query)) + len(e.response) for e in run),
                    teacher_reused_tokens=sum(len(e.response) for e in entries) - sum(len(e.response) for e in run),
                    student_tokens=sum(len(prompt_ids(fmt, e)) + len(e.response) for e in entries))

    t = _now(model)
    impl = config.kernel_impl if config.loss_impl == "fused" else None
    gaps = delta_ppl(hidden_logprob(model, teacher, config.temperature, impl=impl),
                     hidden_logprob(model, student, config.temperature, impl=impl), teacher.offsets)
    if dist.active():                        # one selection and replay order on every rank
        gaps = torch.tensor(dist.broadcast(gaps.tolist()), dtype=gaps.dtype)
    if config.selection == "random":
        keep = select_random(len(entries), ratio=config.select_ratio, top_k=config.select_top_k,
                             seed=config.seed + chunk_index)
    else:
        keep = select_by_ppl_gap(gaps, ratio=config.select_ratio, top_k=config.select_top_k)
    for e, g in zip(entries, gaps.tolist()):
        e.dppl = g if math.isfinite(g) else None
    dropped = sorted(set(range(len(entries))) - set(keep))
    rep.kept = len(keep)
    rep.dppl_kept = _mean(gaps[keep])
    rep.dppl_dropped = _mean(gaps[dropped]) if dropped else float("nan")
    kept_entries = [entries[i] for i in keep]
    rep.work["kept_response_tokens"] = sum(len(e.response) for e in kept_entries)
    teacher = subset(teacher, keep)
    rep.seconds["select"] = _now(model) - t
    phase_peak(rep, "select", device)
    return rep, kept_entries, teacher
