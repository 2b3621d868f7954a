"""Configuration of one consolidation (elicit → teacher → select → train)."""
from __future__ import annotations

import dataclasses
import difflib
import numbers
from dataclasses import dataclass


class IICLError(Exception):
    """A problem with the user's input or files; the CLI prints it as one line, exit 2."""


LOSSES = ("forward_kl", "reverse_kl", "seqkd", "jsd")
SELECTIONS = ("ppl_gap", "random")
REPLAY_POLICIES = ("reservoir", "ppl_gap", "balanced")
REPLAY_DRAWS = ("uniform", "overlap")
LOSS_IMPLS = ("reference", "fused")
RETAIN_UNITS = ("token", "sentence")
QA_RESPONSES = ("answer", "sentence")


@dataclass
class Config:
    """The defaults (preset `small`) make the embedded SmolLM2-135M consolidate a ~150-token
    document in a few minutes on 2 CPU cores, ~5 s on one H200 (~50 entries of <=40 tokens,
    r=16 on all linear layers, lr 2e-3, 4 epochs). They are the best setting measured on the
    evaluation suite's sequence documents (benchmarks/NOTES.md, 13th session): elicitation
    and teacher on the base model, the chunk's own sentences as source entries; and for
    streams (18th session) a replay buffer balanced over the chunks and a learning rate that
    falls to half over a memory's first 12 chunks; and (19th session) anchors of plain prose
    that hold held-out NLL within ~1 % of the base's over a 20-chunk stream."""

    # 1. elicitation (hybrid prompting, the chunk in the window)
    # model-written questions, answered with the chunk in view. 0 in `small`: on the suite's
    # sequence documents (H200, 6 seeds in two sets) continuations alone recalled as well or
    # better for a third less time a chunk: seeds 3-5 0.36 / 0.28 (right after / after three
    # documents, 6.3 s) against 0.27 / 0.21 with 40 questions (9.1 s); seeds 0-2 0.29 / 0.30
    # against 0.33 / 0.28. `paper` keeps InfiniteICL's 200.
    n_queries: int = 0
    # The model-written questions' responses: "answer" (the model answers each with the chunk
    # in view: InfiniteICL's pairs) or "sentence" (the chunk's sentence it was written about,
    # as written, then the stop id: no answer decoded). After three documents (CPU, embedded
    # model, seed 9) the memory still held all three texts (answer log-probability gain kept
    # 0.99 of each alone) while the third's questions were answered 1 of 9 (5 of 9 alone): the
    # replies were the chat model's own ("The story of Griheim is a testament to ...") or
    # another document's entities (NOTES.md, 21st session). Questions answered by the
    # sentence train that path: for the next sweep; "answer" is what was measured.
    qa_response: str = "answer"
    n_continuations: int = 24      # open-ended: continue a passage, recall, summarise
    max_query_tokens: int = 32
    max_response_tokens: int = 40
    elicit_temperature: float = 0.7
    elicit_top_p: float = 0.9
    # entries whose response is the chunk's own text (a passage's opening words as the query,
    # whole consecutive sentences packed up to max_response_tokens as the response, stop id
    # appended): the teacher with the chunk in view scores text it can copy, so every fact's
    # tokens are taught as written (all of them once source_entries >= the chunk's units:
    # ~155 for a 7,168-token chunk of the essays at 48 tokens)
    # 16 by default: with teacher_base, recall of 3 documents after the third 0.28 against 0.15
    # without either (3 seeds of the suite's sequence documents, H200, NOTES.md, 13th session)
    source_entries: int = 16
    # rows decoded together (CUDA: one static batch after one prefix KV copy); draws are keyed
    # by row, so it changes the speed, not the transfer set
    gen_batch_size: int = 16
    # benchmarks on random weights: every generation runs its full max tokens and question
    # texts are kept as written (random weights never stop and write no "?")
    fixed_lengths: bool = False
    # 3. path selection by ΔPPL = log P(r | C, q) − log P(r | q)
    select_ratio: float = 0.875    # keep the top ρ·N entries ...
    select_top_k: int | None = None  # ... or exactly the top k (wins over the ratio)
    selection: str = "ppl_gap"     # ppl_gap (top ΔPPL) | random (the same count, drawn at random: an ablation)
    # Elicit and teach with the adapter off (the base model with the chunk in view) instead
    # of with θ_{i-1}: the chunk's knowledge is in the chunk, and an adapter that has already
    # absorbed earlier chunks writes and teaches worse. Measured on the suite's sequence
    # documents (3 seeds, H200): recall right after each document 0.36 vs 0.21 with θ_{i-1}.
    teacher_base: bool = True
    # The teacher's hidden states for the entries the decoder wrote are the ones it computed
    # while writing them (the same model, the chunk in view, the same tokens before each): the
    # teacher pass runs only over the rest (source entries, sentence answers); the same for the
    # anchors, whose teacher is the base that wrote them. Why: at the paper preset every entry
    # is decoded, and the pass recomputed 214,879 tokens with the 5,000-token chunk in view,
    # ~60 % of the teacher + student phase's 13.6 s (8B shape, H200; teacher pass 1.96 s against
    # the student pass's 1.38 s in profile_consolidate, 15th session). Their values differ from
    # a pass over the whole sequence by the rounding of the other kernels (fp32: ~1e-6 on the
    # CPU, ~1e-4 on CUDA). Data-parallel ranks each keep the states of the rows they decoded
    # (consolidate.sharded_hidden): until the 36th session they ran the pass instead, and on the
    # H100 2 ranks' logged losses parted from one process's at chunk 2 (tests/test_dist_cuda).
    # False: every entry through the teacher pass.
    teacher_from_elicit: bool = True
    # 4. consolidation
    loss: str = "forward_kl"       # forward_kl | reverse_kl | seqkd | jsd (β = 0.5)
    loss_impl: str = "fused"       # fused (iicl_fast.ops, loss-head identity) | reference (plain PyTorch)
    kernel_impl: str = "auto"      # for fused: auto (Triton on CUDA, torch on CPU) | triton | torch
    temperature: float = 1.0
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"
    # 2e-3: the evaluation suite's recall (H200, bf16, NOTES.md, seventeenth session) was
    # undertrained at 1e-3: consolidated 0.274 -> 0.464 of the questions on seeds 0-2 (full
    # context 0.410), and 0.260 -> 0.443 on seeds 6-8, which nothing was chosen on (1.10x full
    # context), at the same time a chunk; held-out NLL after one document +1.15 % -> +1.27 %
    # (CPU, with 48 continuations). 48 continuations add ~0.07 more for ~45 % more time a
    # chunk: preset `quality`.
    lr: float = 2e-3
    # The learning rate of a memory's chunk i: lr · max(lr_floor, (1 + i / lr_decay_chunks)^-½)
    # (0: lr for every chunk; Config.chunk_lr): 2e-3 for a first document, 1e-3 from chunk 12
    # on. A long stream at lr 2e-3 drifted from the base: held-out NLL +6.9 % after the suite's
    # 20 chunks on two seeds (+0.8–1.0 % after one); with 4 (and balanced replay) +2.5–2.7 % on
    # three; lr 1e-3 throughout +1.7–2.0 %, but single documents undertrained (H200, NOTES.md,
    # eighteenth session). Three documents in sequence kept 0.907 of their single recall (0.929
    # without the decay, seeds 9-11, which nothing was chosen on).
    lr_decay_chunks: int = 4
    lr_floor: float = 0.5
    # Chunks of a memory trained at lr before the decay above starts (chunk i decays as chunk
    # i - lr_decay_after). 0: from the second chunk, as measured. For the next sweep: three
    # documents in sequence lose as much to the later documents being learnt less (right
    # after 0.43-0.45 vs 0.475 alone, at 0.89x / 0.82x lr) as to forgetting (H200, NOTES.md,
    # twentieth session), where the stream's drift needs the decay over its later chunks.
    lr_decay_after: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    epochs: int = 4
    batch_size: int = 8            # entries per optimizer step
    # Micro-batches are sized by padded tokens, not by entries: a step's batch_size entries
    # are length-sorted and split into micro-batches of at most train_tokens (gradients
    # accumulated); the teacher / student / ΔPPL passes take pass_tokens a batch.
    train_tokens: int = 4096
    pass_tokens: int = 8192
    gradient_checkpointing: bool = False   # recompute the student's activations in backward
    token_chunk: int = 256         # response tokens per loss slice: never tokens×vocab at once
    # Replay: up to this many kept entries of earlier chunks (chosen by replay_policy, with
    # their teacher hidden states) are trained on again with each new chunk. Without it the
    # 135M model lost the first of two documents (recall 2/2 -> 0/2) while learning the
    # second. Bounded, so memory stays constant over a stream. 0 disables.
    # 256 with replay_policy "balanced" and replay_sample 48: over the suite's 20-chunk stream
    # the first chunk's recall held (0.29 -> 0.29 after 20 chunks, seed 6) where the reservoir of
    # 32 lost it (0.29 -> 0, 0.33 -> 0 on seeds 6, 7) and so did 512 sampled 32 at a time; with
    # the decay above, 0.46 -> 0.30 over three seeds (H200, NOTES.md, eighteenth session).
    replay_entries: int = 256
    # Which entries the buffer keeps: "reservoir" (a uniform sample of every kept entry so
    # far) or "ppl_gap" (the replay_entries of highest ΔPPL so far: the knowledge the base
    # model can least reconstruct without its chunk, e.g. a planted code, ranked 0th and 5th of
    # 96 source entries of its 4,096-token chunk by the embedded model); "balanced" (an equal
    # share of the buffer for every chunk so far, each chunk's entries of highest ΔPPL: a
    # long stream's first chunk keeps its share, where the reservoir held ~1.6 of each of 20).
    replay_policy: str = "balanced"
    # Entries of the buffer trained on with each chunk: 0 = all of it; k > 0 = a seeded sample
    # of k, drawn anew each chunk, so a buffer much larger than a chunk's share costs a fixed
    # time a chunk. Over the suite's 20-chunk stream a buffer of 32 held ~1.6 entries of each
    # chunk at the end and the first chunk's recall fell 0.50 → 0 (H200, NOTES.md, 14th
    # session); 512 sampled 32 at a time lost it too (18th). 96 rather than 48 (each earlier
    # chunk drawn twice as often): the stream's first 5 chunks kept 0.86x of their recall right
    # after (8 streams, 90 % interval [0.76, 0.99]) against 0.66x (10 streams), +0.25 paired on
    # 6 seeds [0.12, 0.38], better on each of the unseen seeds 13-15; all 20 at the end 0.294
    # vs 0.246; held-out NLL +1.5 % vs +1.1 % (bound 2 %); +22 % time a chunk once the buffer
    # holds more than 48; three documents unchanged (H200, NOTES.md, 20th-21st sessions).
    replay_sample: int = 96
    # Each replayed entry appears this many times in the chunk's training set (its share of
    # every epoch's gradient). For three documents in sequence the buffer (~35 entries a
    # document) is replayed whole already, so more draws cannot weigh the earlier documents
    # more; this can. 2 on three documents: 0.943x of single recall after 3 [0.85, 1.07], paired
    # +0.146 [+0.05, +0.26] over the old defaults' 0.798 (10 sequences); on 20-chunk streams,
    # repeated on every chunk, it drifted: held-out NLL +2.1 % (bound 2 %), first five chunks kept
    # 0.68 vs 0.86, general questions 0.60 vs 0.71 (5 unseen streams; H200, NOTES.md, 22nd-23rd
    # sessions) — hence replay_repeats_whole below.
    replay_repeats: int = 2
    # replay_repeats only while the buffer is replayed whole (no more entries than replay_sample:
    # three documents, a stream's first ~3 chunks); from the first draw on, each drawn entry once.
    # Why: repeated on every chunk of a stream, 96 drawn entries twice outweighed the ~40 new ones
    # (the drift above), while a stream's first chunk loses most at the very next chunk (0.48 ->
    # 0.40 of its recall, 21st session), when its entries are all replayed. Measured with
    # replay_repeats 2 (H200, NOTES.md, 25th session): three documents as replay_repeats 2 alone
    # (the same training sets: 0.943x); 5 unseen 20-chunk streams (seeds 13-17) first five chunks
    # kept 0.923 [0.82, 1.01], paired +0.141 [-0.01, +0.28] over replay_repeats 1, first chunk
    # 0.776 [0.62, 1.00] (+0.22 [-0.06, +0.63]), held-out NLL +1.5 % (unchanged), general
    # questions 0.67 (-0.04 [-0.11, +0.03]), all 20 at the end 0.298 (unchanged). Re-measured
    # at c04de44 (27th session; the 24th session's decode attention sums in another order, so
    # other transfer sets are sampled): three documents 0.829x [0.71, 0.95] (10 sequences, seeds
    # 9-18), 13 streams (6-8, 13-22) first chunk 0.679 [0.54, 0.83], first five 0.854
    # [0.75, 0.95], NLL +1.5 %, general 0.708 — the 0.943 and 0.776 above were the draw of one
    # decoder; the seed-to-seed spread is wider than any replay setting's effect measured.
    replay_repeats_whole: bool = True
    # Fill: a buffer holding fewer than replay_sample entries (a memory's first chunks) is cycled
    # whole to replay_sample entries, the remainder a seeded sample, so that replay's share of a
    # chunk's training set is the same from the second chunk on. Measured: three documents
    # 0.865x [0.79, 0.95] (+0.067 [-0.02, +0.14] paired, 10 sequences); streams' first five kept
    # +0.07 [+0.01, +0.14] but first chunk and general questions lower (4 streams; H200,
    # NOTES.md, 23rd session). False: the default.
    replay_fill: bool = False
    # How replay_sample entries are drawn from a larger buffer: "uniform" (a seeded sample) or
    # "overlap" (a seeded sample weighted towards the earlier entries that share the most
    # informative words and tokens with the new chunk's kept entries: consolidate.overlap_scores).
    # Why: of 8 answers a stream lost, 3 were replaced by a later chunk's fact of the same form
    # (the population of one town by the next chunk's population; NOTES.md, 23rd session,
    # interference_probe.py), so the entries a new chunk is likeliest to overwrite are replayed
    # when it is learnt. It acts only where a draw does: a buffer larger than replay_sample (a
    # stream's ~4th chunk on; three documents replay their whole buffer), or replay_fill's
    # remainder. Measured on 5 unseen 20-chunk streams (H200, 25th session): first five chunks
    # kept +0.077 [-0.09, +0.24], first chunk +0.16 [-0.16, +0.61], but all 20 at the end -0.030
    # [-0.046, -0.013] and general questions -0.07: "uniform" stays the default.
    replay_draw: str = "uniform"
    # Anchors: this many general prompts a chunk (iicl_fast/data/anchor_prompts.json, in turn),
    # answered by the base model without the chunk, its own answer distribution the teacher:
    # the student is held where the base was on everything the chunk is not about. Without
    # them one 6-fact document took general-question accuracy 0.70 → 0.25 (H200, suite). With
    # 16 (CPU, embedded model, benchmarks/anchor_probe.py, 3 documents): general accuracy
    # 0.40 → 0.80 and 0.55 → 0.70, held-out NLL rise 2.0 % → 1.3 % and 1.1 % → 0.9 %, recall
    # 3/8 → 4/8 and 4/18 → 3/18 after two documents (right after the first: 3/9 → 5/9), for
    # +20–30 % time a chunk (one seed each: the GPU suite is to confirm it). 0 disables.
    anchor_entries: int = 16
    # Prose anchors: this many openings of plain prose a chunk (data/prose_openings.json, in
    # turn), no chat template, continued by the base (sampled) and taught with the base as
    # teacher. The chat anchors above hold answers to prompts; held-out NLL is measured on raw
    # text, and there the suite's 20-chunk stream drifted +2.62 % (7 seeds, 2.43–2.84) without
    # them, +1.09 % (0.95–1.26) with 16 (+0.86 % with 32); after one document +1.24 % -> +0.27 %;
    # general accuracy after 20 chunks 0.62 -> 0.69 (base 0.70). Recall was not hurt beyond the
    # noise: three documents in sequence (10 seeds, 30 documents) 0.354 after the third vs 0.365
    # without, alone 0.443 vs 0.409; the stream's first 5 chunks kept 0.71x vs 0.62x. Cost:
    # +16–20 % time a chunk (H200, NOTES.md, nineteenth session). 0 disables.
    prose_anchors: int = 16
    # 5. retain (short-term memory, SirLLM): after each consolidated chunk the top `retain`
    # fraction of its tokens by surprisal (older retained tokens' scores × retain_decay per
    # chunk) stay in the window as a prefix for `ask`. 0 keeps nothing.
    retain: float = 0.0
    retain_decay: float = 0.9
    # what the window keeps: "sentence" (whole sentences by their tokens' mean surprisal) or
    # "token" (SirLLM's single tokens). At 0.1 of a 6-fact document the tokens were "stad
    # indigoheim Dunova vault Askvik XP": the recall suite (H200, seeds 3-5) answered 0.291
    # with that window beside the memory, 0.301 with the memory alone, 0.373 with sentences.
    retain_unit: str = "sentence"
    # 6. streaming
    chunk_tokens: int = 1024
    # answering
    answer_max_new_tokens: int = 48
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        for f in dataclasses.fields(self):
            setattr(self, f.name, _checked(f.name, getattr(self, f.name)))
        if self.loss not in LOSSES:
            raise IICLError(f"unknown loss {self.loss!r}: choose one of {', '.join(LOSSES)}")
        if self.selection not in SELECTIONS:
            raise IICLError(f"unknown selection {self.selection!r}: choose one of {', '.join(SELECTIONS)}")
        if self.loss_impl not in LOSS_IMPLS:
            raise IICLError(f"unknown loss_impl {self.loss_impl!r}: choose one of {', '.join(LOSS_IMPLS)}")
        if self.kernel_impl not in ("auto", "triton", "torch"):
            raise IICLError(f"unknown kernel_impl {self.kernel_impl!r}: choose auto, triton or torch")
        if not 0.0 < self.select_ratio <= 1.0:
            raise IICLError(f"select_ratio must be in (0, 1], got {self.select_ratio}")
        if self.select_top_k is not None and self.select_top_k < 1:
            raise IICLError(f"select_top_k must be >= 1, got {self.select_top_k}")
        for name in ("n_queries", "n_continuations", "source_entries", "anchor_entries", "prose_anchors"):
            if getattr(self, name) < 0:
                raise IICLError(f"{name} must be >= 0")
        if self.n_queries + self.n_continuations + self.source_entries == 0:
            raise IICLError("n_queries + n_continuations + source_entries must be > 0")
        for name in ("max_query_tokens", "max_response_tokens", "gen_batch_size", "lora_r",
                     "epochs", "batch_size", "train_tokens", "pass_tokens", "token_chunk", "chunk_tokens",
                     "answer_max_new_tokens"):
            if getattr(self, name) < 1:
                raise IICLError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr_decay_chunks < 0:
            raise IICLError(f"lr_decay_chunks must be >= 0, got {self.lr_decay_chunks}")
        if self.lr_decay_after < 0:
            raise IICLError(f"lr_decay_after must be >= 0, got {self.lr_decay_after}")
        if not 0.0 < self.lr_floor <= 1.0:
            raise IICLError(f"lr_floor must be in (0, 1], got {self.lr_floor}")
        if self.replay_entries < 0:
            raise IICLError(f"replay_entries must be >= 0, got {self.replay_entries}")
        if self.replay_sample < 0:
            raise IICLError(f"replay_sample must be >= 0, got {self.replay_sample}")
        if self.replay_repeats < 1:
            raise IICLError(f"replay_repeats must be >= 1, got {self.replay_repeats}")
        if self.replay_draw not in REPLAY_DRAWS:
            raise IICLError(f"unknown replay_draw {self.replay_draw!r}: choose one of {', '.join(REPLAY_DRAWS)}")
        if self.replay_policy not in REPLAY_POLICIES:
            raise IICLError(f"unknown replay_policy {self.replay_policy!r}: choose one of {', '.join(REPLAY_POLICIES)}")
        if not 0.0 <= self.retain <= 1.0:
            raise IICLError(f"retain must be in [0, 1], got {self.retain}")
        if self.qa_response not in QA_RESPONSES:
            raise IICLError(f"unknown qa_response {self.qa_response!r}: choose one of {', '.join(QA_RESPONSES)}")
        if self.retain_unit not in RETAIN_UNITS:
            raise IICLError(f"unknown retain_unit {self.retain_unit!r}: choose one of {', '.join(RETAIN_UNITS)}")
        if not 0.0 < self.retain_decay <= 1.0:
            raise IICLError(f"retain_decay must be in (0, 1], got {self.retain_decay}")
        for name in ("temperature", "elicit_temperature", "lr", "lora_alpha"):
            if not getattr(self, name) > 0:
                raise IICLError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 < self.elicit_top_p <= 1.0:
            raise IICLError(f"elicit_top_p must be in (0, 1], got {self.elicit_top_p}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise IICLError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise IICLError("weight_decay and max_grad_norm must be >= 0")

    def chunk_lr(self, chunk_index: int) -> float:
        """The learning rate of a memory's chunk chunk_index (see lr_decay_chunks, lr_decay_after)."""
        if not self.lr_decay_chunks:
            return self.lr
        i = max(0, chunk_index - self.lr_decay_after)
        return self.lr * max(self.lr_floor, (1.0 + i / self.lr_decay_chunks) ** -0.5)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """From a manifest: fields this version does not know are ignored (older/newer memories)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def preset(cls, name: str = "small", **overrides) -> "Config":
        """A named setting (PRESETS) with fields overridden; unknown names or fields → IICLError."""
        if name not in PRESETS:
            raise IICLError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
        fields = {**PRESETS[name], **overrides}
        check_fields(fields)
        return cls(**{k: coerce(k, v) for k, v in fields.items()})


def check_fields(d: dict) -> None:
    known = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(d) - known)
    if unknown:
        hints = [f"{u} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(u, known, 1, 0.6)) else u
                 for u in unknown]
        raise IICLError(f"unknown Config field{'s' if len(unknown) > 1 else ''}: {', '.join(hints)}")


_DEFAULTS = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
             for f in dataclasses.fields(Config)}


def _numpy_bool(value) -> bool:
    return type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")


def _checked(name: str, value):
    """value as field `name`'s type (numpy scalars as Python's: a manifest is JSON), or IICLError
    (Python callers; files and --set go through coerce first): Config(lr="0.1") failed at a
    comparison, epochs=2.5 deep in training."""
    default = _DEFAULTS[name]
    integral = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if name == "select_top_k":
        ok, want, cast = value is None or integral, "an int or None", lambda v: None if v is None else int(v)
    elif name == "target_modules":
        ok = isinstance(value, str) or (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value))
        want, cast = '"all-linear", a list of module names or a regular expression', lambda v: v
    elif isinstance(default, bool):
        ok, want, cast = isinstance(value, bool) or _numpy_bool(value), "True or False", bool
    elif isinstance(default, int):
        ok, want, cast = integral, "an int", int
    elif isinstance(default, float):
        ok, want, cast = isinstance(value, numbers.Real) and not isinstance(value, bool), "a number", float
    elif isinstance(default, str):
        ok, want, cast = isinstance(value, str), "a string", str
    else:
        return value
    if not ok:
        raise IICLError(f"Config field {name} must be {want}, got {value!r}")
    return cast(value)


def coerce(name: str, value):
    """A user's value for field `name` (from JSON/TOML, or a --set string) as the field's type."""
    default = _DEFAULTS[name]
    text = isinstance(value, str)
    try:
        if name == "select_top_k":
            if value is None or (text and value.strip().lower() in ("none", "null", "")):
                return None
            return _int(value)
        if name == "target_modules":
            if text:
                return value if "," not in value and value == "all-linear" else [v.strip() for v in value.split(",") if v.strip()]
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return value
            raise ValueError
        if isinstance(default, bool):
            if text and value.strip().lower() in ("1", "true", "yes", "on"):
                return True
            if text and value.strip().lower() in ("0", "false", "no", "off"):
                return False
            if isinstance(value, bool):
                return value
            raise ValueError
        if isinstance(default, int):
            return _int(value)
        if isinstance(default, float):
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if isinstance(default, str):
            if not text:
                raise ValueError
            return value
    except (ValueError, TypeError):
        raise IICLError(f"bad value for Config field {name}: {value!r} (expected {type(default).__name__}"
                        f"{' or none' if name == 'select_top_k' else ''})") from None
    return value


def _int(value) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError
    if isinstance(value, str):
        return int(value.strip().replace("_", ""))
    return int(value)


# `small`: the embedded 135M model on 2 CPU cores (the defaults above).
# `paper`: InfiniteICL's setting (arXiv 2504.01707): ~5,000-token chunks, 200 model-written
# question→answer pairs and 200 open continuations of up to 512 tokens, the top 200 kept by
# ΔPPL, LoRA with forward KL, 3 epochs. lr 1e-4 and r 16 are ours (usual for LoRA on an 8B
# base), not taken from the paper; batch and token budgets are sized for one H200.
PRESETS: dict[str, dict] = {
    "small": {},
    "paper": dict(teacher_base=False, source_entries=0, anchor_entries=0, chunk_tokens=5000, n_queries=200, n_continuations=200, max_query_tokens=64,
                  max_response_tokens=512, select_top_k=200, loss="forward_kl", epochs=3, lora_r=16,
                  lora_alpha=32, lr=1e-4, batch_size=16, gen_batch_size=400, train_tokens=16384,
                  pass_tokens=32768, replay_entries=64, replay_policy="reservoir", replay_sample=0,
                  replay_repeats=1, lr_decay_chunks=0, prose_anchors=0),
    # `stress`: 2M-token streams with the embedded model on one GPU (iicl-fast stress), sized
    # for the H200 time one session has (README, "stress"): 7,168-token chunks (the model's
    # 8,192 positions hold a chunk, its question and answer), 16 questions and 16
    # continuations of <= 48 tokens, and the whole chunk as source entries (~155 units of <= 48 tokens);
    # the top 48 by ΔPPL are trained once with the 96 highest-ΔPPL entries of the stream so
    # far (replay_policy ppl_gap), 32 a step; elicitation and the teacher on the base model
    # (teacher_base: 0.37/0.34 recall after 3 documents vs 0.19/0.12 default, NOTES.md).
    # Activations recomputed in backward: without, a chunk's peak was its longest training
    # step's activations (1.65–2.18 GiB over 170 chunks on the H200, max/min 1.32); with,
    # 0.620–0.649 GiB over a 2M run's chunks after the first (benchmarks/results/stress_2m.json).
    "stress": dict(chunk_tokens=7168, n_queries=16, n_continuations=16, max_query_tokens=32,
                   max_response_tokens=48, source_entries=256, select_top_k=48, teacher_base=True, epochs=1,
                   batch_size=32, gen_batch_size=64, replay_entries=96, replay_policy="ppl_gap",
                   gradient_checkpointing=True, anchor_entries=0, lr=1e-3, replay_sample=0, replay_repeats=1,
                   lr_decay_chunks=0, prose_anchors=0),
    # `small` with twice the continuations: the best recall measured on the suite (seeds 6-8,
    # H200: 0.509 of the questions against 0.443 for `small`, full context 0.404; 0.615 with the
    # window of sentences) for ~45 % more time a chunk (5.8 s vs 4.0 s on the H200; 148 s vs
    # 95 s on 2 CPU cores)
    "quality": dict(n_continuations=48),
}
