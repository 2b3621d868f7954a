"""Short-term memory: a bounded KV cache that keeps the informative tokens (SirLLM).

A `StreamingSession` ingests an endless dialogue into a KV cache that never holds more than
`sink + budget + recent` tokens:

    [sink first tokens][budget tokens of highest decayed score][recent newest tokens]

A token's score is its surprisal -log P(x_i | x_<i) (SirLLM's "token entropy"), read from
the forward pass that ingests it: the logits at position i-1 score token i (the public SirLLM
code scores token i with the distribution at i, which predicts i+1; we do not). Every new
turn multiplies all stored scores by `decay`. Policies: "entropy" (SirLLM), "recent"
(StreamingLLM: sinks + newest), "full" (no eviction; refuses to run past the model's
maximum position).

Positions stay contiguous inside the cache (StreamingLLM's position shift): when tokens are
evicted the survivors move down, and their cached keys are re-rotated by the RoPE angle of
the move (RoPE rotations compose: R(p_new) = R(p_new - p_old) R(p_old)), so a session runs
far past the model's maximum position.
"""
from __future__ import annotations

import contextlib

import torch

from .config import IICLError
from .generation import cache_kw, cache_of, causal_lm, decoder, lm_head

POLICIES = ("entropy", "recent", "full")


# -- scores -------------------------------------------------------------------------------
def surprisal(h_prev: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
              bias=None, softcap=None, rows: int = 256) -> torch.Tensor:
    """h_prev [n, H] (the hidden state *before* each target), targets [n] -> -log p [n] fp32.

    On CUDA the fused ops.token_logprob (no logits in memory); elsewhere fp32 logits for
    `rows` tokens at a time and only their logsumexp: on 2 CPU cores, 64 tokens × 49152
    took 41 ms this way vs 75 ms through ops.token_logprob's reference, which also
    computes the entropy."""
    if h_prev.is_cuda and bias is None and softcap is None:
        from . import ops
        lp, _ = ops.token_logprob(h_prev, weight, targets)
        return -lp.detach().float()
    from .reference import logits_of
    out = []
    for s in range(0, h_prev.shape[0], rows):
        z = logits_of(h_prev[s: s + rows], weight, bias, softcap)
        out.append(torch.logsumexp(z, -1) - z.gather(1, targets[s: s + rows, None]).squeeze(1))
    return torch.cat(out) if out else torch.zeros(0)


def keep_indices(scores: torch.Tensor, *, sink: int, budget: int, recent: int, n_new: int = 0,
                 policy: str = "entropy") -> torch.Tensor:
    """Which of the L cached tokens stay so that n_new more fit in sink + budget + recent.

    scores [L] (decayed). Keeps the first `sink`, the newest max(recent - n_new, 0) (the
    n_new arriving tokens complete the recent window) and, of the rest, the highest scores
    (policy "entropy"; ties go to the newer token) or the newest (policy "recent").
    -> sorted LongTensor of kept positions; all of them when everything fits."""
    L = scores.shape[0]
    cap = sink + budget + recent
    if L + n_new <= cap:
        return torch.arange(L)
    n_sink = min(sink, L)
    n_rec = min(max(recent - n_new, 0), L - n_sink)
    k_mid = cap - n_new - n_sink - n_rec
    if k_mid < 0:
        raise IICLError(f"{n_new} new tokens do not fit a cache of sink {sink} + budget {budget} + recent {recent}")
    mid = torch.arange(n_sink, L - n_rec)
    k_mid = min(k_mid, mid.numel())
    if policy == "entropy":
        # newest first, then a stable sort by descending score: equal scores keep the newer token
        order = torch.sort(-scores[mid].flip(0).float(), stable=True).indices[:k_mid]
        chosen = mid.flip(0)[order]
    else:
        chosen = mid[mid.numel() - k_mid:]
    keep = torch.cat([torch.arange(n_sink), chosen, torch.arange(L - n_rec, L)])
    return keep.sort().values


def rope_cos_sin(inv_freq: torch.Tensor, delta: torch.Tensor):
    """cos, sin [L, d] of the RoPE rotation by `delta` positions (delta [L]); angles in fp64."""
    ang = delta.to(inv_freq.device, torch.float64)[:, None] * inv_freq.double()[None, :]   # [L, d/2]
    return torch.cat([ang.cos(), ang.cos()], -1).float(), torch.cat([ang.sin(), ang.sin()], -1).float()


def rotate(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate keys [B, heads, L, d] (rotate-half convention of Llama-family models) -> fp32."""
    k = keys.float()
    half = k.shape[-1] // 2
    return k * cos + torch.cat([-k[..., half:], k[..., :half]], -1) * sin


def rerotation_unsupported(model) -> str | None:
    """Why evicting tokens and re-rotating the kept keys to contiguous positions would not
    equal recomputing them (None: it would). Sliding-window layers keep their own window;
    a partial rotary dimension or per-layer RoPE bases rotate what `rotate` does not."""
    from .decode import sliding_window
    if sliding_window(model):
        return "sliding-window attention layers"
    lm = causal_lm(model)
    cfg = getattr(lm.config, "text_config", None) or lm.config
    if getattr(cfg, "partial_rotary_factor", 1.0) not in (None, 1.0):
        return f"a partial rotary dimension (partial_rotary_factor {cfg.partial_rotary_factor})"
    if getattr(cfg, "rope_local_base_freq", None):
        return "per-layer RoPE bases (local and global)"
    return None


def _rope_inv_freq(model) -> torch.Tensor:
    lm = causal_lm(model)
    rope = getattr(getattr(lm, "model", lm), "rotary_emb", None)
    if rope is None or not hasattr(rope, "inv_freq"):
        raise IICLError(f"{type(lm).__name__} has no rotary embedding that StreamingSession can re-rotate "
                        "(a Llama-family model is needed)")
    if "dynamic" in str(getattr(rope, "rope_type", "")):
        raise IICLError("dynamic RoPE scaling changes frequencies with length: not supported by StreamingSession")
    return rope.inv_freq.detach()


# -- chat turns ---------------------------------------------------------------------------
class _Turns:
    """Token pieces around a turn of each role, cut out of the tokenizer's chat template
    (plain "User: …" lines without one)."""

    _MARK = "\u2063IICLTURN\u2063"

    def __init__(self, tok):
        self.tok = tok
        self.preamble: list[int] = []
        self.wrap: dict[str, tuple[list[int], list[int]]] = {}
        self.gen_header: list[int] = self.encode("Assistant:")
        if getattr(tok, "chat_template", None):
            try:
                self._from_template()
                return
            except Exception:  # noqa: BLE001 - a template that refuses these probes: use plain lines
                self.wrap = {}
        for role in ("system", "user", "assistant"):
            self.wrap[role] = (self.encode(f"{role.capitalize()}: "), self.encode("\n"))

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _render(self, msgs, gen=False) -> str:
        return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    def _from_template(self):
        M = self._MARK
        one = self._render([{"role": "user", "content": M}])
        base = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
        base_text = self._render(base)
        for role in ("system", "user", "assistant"):
            text = self._render(base + [{"role": role, "content": M}])
            if not text.startswith(base_text) or M not in text:
                raise ValueError("template is not incremental")
            head, tail = text[len(base_text):].split(M)
            self.wrap[role] = (self.encode(head), self.encode(tail))
        user_head = self.tok.decode(self.wrap["user"][0])
        pre = one.split(M)[0]
        self.preamble = self.encode(pre[: len(pre) - len(user_head)] if pre.endswith(user_head) else "")
        gen = self._render([{"role": "user", "content": M}], gen=True)
        self.gen_header = self.encode(gen[len(one):])

    def turn(self, text: str, role: str | None) -> list[int]:
        if role is None:
            return self.encode(text)
        if role not in self.wrap:
            raise IICLError(f"unknown role {role!r}: use 'user', 'assistant', 'system' or None (raw text)")
        head, tail = self.wrap[role]
        return head + self.encode(text) + tail


# -- the session --------------------------------------------------------------------------
def check_cache(policy: str, sink: int, budget: int, recent: int, decay: float) -> None:
    """StreamingSession's settings checked (IICLError naming the first bad one), so a caller can
    check them before loading a model."""
    if policy not in POLICIES:
        raise IICLError(f"unknown policy {policy!r}: choose one of {', '.join(POLICIES)}")
    for name, v in (("sink", sink), ("budget", budget), ("recent", recent)):
        if not isinstance(v, int) or v < 0:
            raise IICLError(f"{name} must be an integer >= 0, got {v!r}")
    if policy != "full" and budget < sink + recent:
        raise IICLError(f"budget {budget} is smaller than sink + recent = {sink + recent}: "
                        "the scored middle of the cache would be smaller than its fixed ends")
    if not 0.0 < decay <= 1.0:
        raise IICLError(f"decay must be in (0, 1], got {decay}")


class StreamingSession:
    """A dialogue with a bounded KV cache (SirLLM token-entropy retention with decay).

        sess = StreamingSession(model, tok, policy="entropy", sink=4, budget=256, recent=64, decay=0.9)
        sess.feed(text, role="user"); sess.generate("What is the pass key?"); sess.cache_tokens

    `model` may be a `Memory`: its adapter is active for every pass (long-term + short-term).
    Text is ingested `step` tokens at a time; before each step the cache is trimmed so that
    it never holds more than sink + budget + recent tokens, even during the forward pass."""

    def __init__(self, model, tokenizer=None, policy: str = "entropy", sink: int = 4, budget: int = 256,
                 recent: int = 64, decay: float = 0.9, *, step: int = 64, chat: bool = True):
        from .memory import Memory
        self.memory = model if isinstance(model, Memory) else None
        if self.memory is not None:
            tokenizer = tokenizer or self.memory.tokenizer
            model = self.memory.model
        if tokenizer is None:
            raise IICLError("StreamingSession: give the tokenizer with the model")
        check_cache(policy, sink, budget, recent, decay)
        if step < 1:
            raise IICLError(f"step must be >= 1, got {step}")
        self.model, self.tok, self.policy = model, tokenizer, policy
        self.sink, self.budget, self.recent, self.decay = sink, budget, recent, decay
        self.step = step if policy == "full" else max(1, min(step, recent))
        self.body = decoder(model)
        self.weight, self.bias, self.softcap = lm_head(model)
        why = rerotation_unsupported(model) if policy != "full" else None
        if why:
            raise IICLError(f"StreamingSession cannot evict from {type(causal_lm(model)).__name__}: it has {why} "
                            "(policy 'full' keeps every token)")
        self.inv_freq = _rope_inv_freq(model) if policy != "full" else None
        cfg = causal_lm(model).config
        self.max_positions = getattr(cfg, "max_position_embeddings", None)
        self.eos_id = tokenizer.eos_token_id
        self.turns = _Turns(tokenizer) if chat else None
        self.device = next(model.parameters()).device
        self.reset()

    # -- state --------------------------------------------------------------------------
    def reset(self) -> None:
        self.cache = None
        self.ids = torch.zeros(0, dtype=torch.long)
        self.scores = torch.zeros(0, dtype=torch.float32)
        self.last_h: torch.Tensor | None = None     # hidden state of the newest token: scores the next one
        self.key_master: list[torch.Tensor] = []      # per layer: fp32 keys as rotated when computed
        self.key_pos = torch.zeros(0, dtype=torch.long)   # ... and the position they were rotated at
        self.tokens_seen = 0
        self.evicted = 0
        self.peak_cache_tokens = 0
        self.turn_count = 0

    @property
    def capacity(self) -> int:
        return self.sink + self.budget + self.recent if self.policy != "full" else (self.max_positions or 10 ** 12)

    @property
    def cache_tokens(self) -> int:
        return int(self.ids.numel())

    def cached_text(self) -> str:
        return self.tok.decode(self.ids.tolist())

    # -- internals ------------------------------------------------------------------------
    def _adapters(self):
        """On a Memory: its adapter. On a plain model that memories were built on (peft
        injected LoRA layers into it): no adapter, the base model as it was."""
        if self.memory is not None:
            self.memory._activate()
            return contextlib.nullcontext()
        peft_model = self.model.__dict__.get("_iicl_peft")
        return peft_model.disable_adapter() if peft_model is not None else contextlib.nullcontext()

    def _new_turn(self):
        """SirLLM's decay: every turn multiplies the stored scores by rho."""
        if self.turn_count > 0:
            self.scores.mul_(self.decay)
        self.turn_count += 1

    def _evict(self, n_new: int) -> None:
        L = self.cache_tokens
        if self.policy == "full":
            if self.max_positions and L + n_new > self.max_positions:
                raise IICLError(f"policy 'full' ran past the model's maximum of {self.max_positions} positions "
                                f"({L + n_new} tokens): use 'entropy' or 'recent' for longer streams")
            return
        keep = keep_indices(self.scores, sink=self.sink, budget=self.budget, recent=self.recent,
                            n_new=n_new, policy=self.policy)
        if keep.numel() == L:
            return
        # survivors move to positions 0..n-1; their keys are re-rotated from the fp32 copy
        # rotated at the position they were computed at, so no rounding piles up over evictions
        self.key_pos = self.key_pos[keep]
        cos, sin = rope_cos_sin(self.inv_freq, torch.arange(keep.numel()) - self.key_pos)
        dev_keep = keep.to(self.device)
        for i, layer in enumerate(self.cache.layers):
            self.key_master[i] = self.key_master[i].index_select(2, dev_keep)
            layer.keys = rotate(self.key_master[i], cos, sin).to(layer.keys.dtype)
            layer.values = layer.values.index_select(2, dev_keep)
        self.ids, self.scores = self.ids[keep], self.scores[keep]
        self.evicted += L - keep.numel()

    def _forward(self, piece: torch.Tensor) -> torch.Tensor:
        """Run piece [n] through the body at the next cache positions -> hidden [n, H]."""
        self._evict(piece.numel())
        L, n = self.cache_tokens, piece.numel()
        pos = torch.arange(L, L + n)
        out = self.body(input_ids=piece[None].to(self.device), position_ids=pos[None].to(self.device),
                        use_cache=True, **cache_kw(self.body, self.cache))
        self.cache = cache_of(out)
        if self.policy != "full":
            if not self.key_master:
                for layer in self.cache.layers:
                    if getattr(layer, "is_sliding", False) or not hasattr(layer, "keys"):
                        raise IICLError(f"cache layer {type(layer).__name__} is not supported by StreamingSession")
                self.key_master = [layer.keys.float() for layer in self.cache.layers]
            else:
                self.key_master = [torch.cat([m, layer.keys[:, :, -n:].float()], 2)
                                   for m, layer in zip(self.key_master, self.cache.layers)]
            self.key_pos = torch.cat([self.key_pos, pos])
        self.ids = torch.cat([self.ids, piece])
        self.tokens_seen += n
        self.peak_cache_tokens = max(self.peak_cache_tokens, self.cache_tokens)
        return out.last_hidden_state[0]

    @torch.no_grad()
    def _ingest(self, ids: list[int]) -> None:
        """Forward ids through the bounded cache, `step` tokens at a time, scoring each."""
        for s in range(0, len(ids), self.step):
            piece = torch.tensor(ids[s: s + self.step], dtype=torch.long)
            with self._adapters():
                h = self._forward(piece)
            sc = torch.zeros(piece.numel())
            if self.policy == "entropy":
                if self.last_h is not None:
                    prev = torch.cat([self.last_h[None], h[:-1]])
                    sc = surprisal(prev, self.weight, piece.to(self.device), self.bias, self.softcap).cpu()
                elif piece.numel() > 1:   # the session's first token has no prediction: score 0
                    sc[1:] = surprisal(h[:-1], self.weight, piece[1:].to(self.device), self.bias, self.softcap).cpu()
            self.scores = torch.cat([self.scores, sc])
            self.last_h = h[-1]

    @torch.no_grad()
    def _ingest_one(self, t: int, score: float) -> None:
        """A generated token, already scored by the distribution it was drawn from."""
        with self._adapters():
            self.last_h = self._forward(torch.tensor([t]))[-1]
        self.scores = torch.cat([self.scores, torch.tensor([score if self.policy == "entropy" else 0.0])])

    @torch.no_grad()
    def _next_logits(self) -> torch.Tensor:
        from .generation import step_logits
        return step_logits(self.last_h[None], self.weight, self.bias, self.softcap)[0]

    def _turn_ids(self, text: str, role: str | None) -> list[int]:
        if self.turns is None or role is None:
            return self.tok(text, add_special_tokens=False)["input_ids"]
        ids = self.turns.turn(text, role)
        return (self.turns.preamble + ids) if self.tokens_seen == 0 else ids

    # -- API ------------------------------------------------------------------------------
    def feed(self, text: str, role: str | None = "user") -> None:
        """Ingest one turn (role None: raw text, no chat wrapping); evicts as it goes."""
        if not isinstance(text, str) or not text.strip():
            raise IICLError("empty feed: nothing to ingest")
        self.feed_tokens(self._turn_ids(text, role))

    def feed_tokens(self, ids: list[int], *, new_turn: bool = True) -> None:
        """Ingest token ids as they are; new_turn=False continues the current turn (no decay)."""
        ids = [int(i) for i in ids]
        if not ids:
            raise IICLError("empty feed: nothing to ingest")
        if new_turn:
            self._new_turn()
        self._ingest(ids)

    def _answer(self, ids: list[int], max_new_tokens: int, chat: bool):
        """Ingest the prompt ids (a new turn), then decode greedily, every generated token
        going through the bounded cache. -> (new ids, logits before the first)."""
        if max_new_tokens < 1:
            raise IICLError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not ids:
            raise IICLError("empty prompt")
        self._new_turn()
        self._ingest(ids)
        first = self._next_logits()
        logits, out = first, []
        for _ in range(max_new_tokens):
            t = int(logits.argmax())
            out.append(t)
            lp = torch.log_softmax(logits.float(), -1)[t]
            self._ingest_one(t, float(-lp))
            if t == self.eos_id:
                break
            logits = self._next_logits()
        if chat:     # close the assistant turn so the dialogue stays well-formed
            tail = self.turns.wrap["assistant"][1]
            if out and out[-1] == self.eos_id:
                tail = tail[1:] if tail[:1] == [self.eos_id] else []
            if tail:
                self._ingest(tail)
        return out, first

    def _chat_prompt(self, prompt: str, role: str | None, answer_prefix: str = "") -> tuple[list[int], bool]:
        if not isinstance(prompt, str) or not prompt.strip():
            raise IICLError("empty prompt")
        chat = self.turns is not None and role is not None
        ids = self._turn_ids(prompt, role) + (self.turns.gen_header if chat else [])
        if answer_prefix:
            ids += self.tok(answer_prefix, add_special_tokens=False)["input_ids"]
        return ids, chat

    def generate(self, prompt: str, max_new_tokens: int = 32, *, role: str | None = "user",
                 answer_prefix: str = "") -> str:
        """Answer a prompt from what the cache holds (greedy). The prompt is a user turn (role
        None: raw text, continued as is); the answer stays in the cache as the assistant's turn.
        answer_prefix is put in the assistant's mouth first."""
        ids, chat = self._chat_prompt(prompt, role, answer_prefix)
        out, _ = self._answer(ids, max_new_tokens, chat)
        return self.tok.decode(out, skip_special_tokens=True).strip()

    def generate_tokens(self, ids: list[int], max_new_tokens: int = 32) -> str:
        """Continue raw prompt ids greedily (no chat wrapping)."""
        out, _ = self._answer([int(i) for i in ids], max_new_tokens, False)
        return self.tok.decode(out, skip_special_tokens=True).strip()

    def choose(self, stem: str, choices: list[str], *, labels: list[str] | None = None,
               max_new_tokens: int = 8) -> int:
        """Multiple choice as SirLLM scores it: the choice greedy decoding reproduces (its
        label or its text), else the choice whose first token is most likely at the answer."""
        if not choices:
            raise IICLError("choose: no choices")
        labels = labels or [chr(ord("A") + i) for i in range(len(choices))]
        body = stem.strip() + "\n" + "\n".join(f"{l}. {c}" for l, c in zip(labels, choices))
        body += "\nAnswer with the letter of the best choice."
        ids, chat = self._chat_prompt(body, "user")
        out, first = self._answer(ids, max_new_tokens, chat)
        said = self.tok.decode(out, skip_special_tokens=True).strip()
        k = match_choice(said, choices, labels)
        if k is not None:
            return k
        lp = torch.log_softmax(first.float(), -1)
        firsts = [self.tok(f"{l}", add_special_tokens=False)["input_ids"][0] for l in labels]
        return int(torch.tensor([float(lp[t]) for t in firsts]).argmax())


def match_choice(said: str, choices: list[str], labels: list[str]) -> int | None:
    """Index of the choice an answer names: label first ("B", "B.", "(B)"), else a choice text."""
    s = said.strip().lower()
    for i, l in enumerate(labels):
        l = l.lower()
        for form in (l, f"({l})", f"{l}.", f"{l})", f"{l}:"):
            if s == form or s.startswith(form + " ") or (s.startswith(form) and len(form) > len(l)):
                return i
    hits = [i for i, c in enumerate(choices) if c.strip().lower() and c.strip().lower() in s]
    if len(hits) == 1:
        return hits[0]
    return None
