"""Batched generation and the hidden-state view of a causal LM (no full logits)."""
from __future__ import annotations

import copy
import random

import torch

from . import dist
from .config import IICLError
from .decode import without_cudnn_sdpa


def causal_lm(model):
    """The HF *ForCausalLM under a peft wrapper (LoRA layers stay injected in it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def check_positions(model, context: int, prompt: int, new: int) -> None:
    """IICLError where [context; prompt; new tokens] would run past the positions the model was
    built for (max_position_embeddings): a learned position table fails there with an index
    error (on CUDA a device-side assert), and rotary models drift out of what they were
    trained on without a word."""
    limit = getattr(causal_lm(model).config, "max_position_embeddings", None)
    if isinstance(limit, int) and context + prompt + new > limit:
        parts = ([f"a shared context of {context} tokens"] if context else []) + \
            ([f"prompts of up to {prompt}"] if prompt else []) + [f"{new} new tokens"]
        raise IICLError(f"{context + prompt + new} positions ({', '.join(parts)}) exceed the {limit} the model was built "
                        "for: give shorter chunks (chunk_tokens) or contexts")


def decoder(model):
    """The transformer body: returns last (final-normed) hidden states, never logits."""
    return causal_lm(model).get_decoder()


def cache_kw(body, cache) -> dict:
    """The KV-cache keyword of body.forward: `cache` from transformers 5.2x (`past_key_values`
    is deprecated there, going in 5.40), `past_key_values` before (5.17 on the GPU machine)."""
    fn = body.forward
    names = _cache_names.get(type(body))
    if names is None:
        import inspect
        names = _cache_names[type(body)] = "cache" if "cache" in inspect.signature(fn).parameters else "past_key_values"
    return {names: cache}


def cache_of(out):
    """The KV cache of a model output, under either transformers' name."""
    c = out.get("cache") if hasattr(out, "get") else None
    return c if c is not None else out.past_key_values


_cache_names: dict = {}


def lm_head(model):
    """-> (weight [V, H], bias [V] or None, softcap or None) of the frozen output layer."""
    lm = causal_lm(model)
    head = lm.get_output_embeddings()
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    return head.weight, getattr(head, "bias", None), softcap


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A CPU tensor on device without waiting for the GPU: a plain .to("cuda") of pageable
    memory synchronises the stream, so every micro-batch's ids drained the GPU's queue and
    left it idle while the host built the next batch. Pinned (PyTorch's caching host
    allocator keeps the buffer until the copy is done) and copied asynchronously."""
    dev = torch.device(device) if device is not None else t.device
    if dev.type != "cuda" or t.device.type != "cpu":
        return t.to(dev)
    return t.pin_memory().to(dev, non_blocking=True)


def pad_right(seqs: list[list[int]], pad_id: int, device=None):
    """-> ids [B, S], mask [B, S] (1 = real token)."""
    S = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), S), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), S), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return to_device(ids, device), to_device(mask, device)


def pad_left(seqs: list[list[int]], pad_id: int, device=None):
    S = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), S), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), S), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, S - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, S - len(s):] = 1
    return to_device(ids, device), to_device(mask, device)


def prefix_cache(model, prefix: list[int]):
    """KV cache of a shared prefix (batch 1), computed once and copied per batch."""
    device = next(model.parameters()).device
    return cache_of(decoder(model)(input_ids=torch.tensor([prefix], device=device), use_cache=True))


def step_logits(h, weight, bias=None, softcap=None, fp32: bool = True):
    """h [B, H] -> fp32 logits [B, V] for a decoding step, the GEMM in the weight's dtype (as
    transformers computes them): casting an 8B model's lm_head to fp32 every step would
    write and read ~2 GB per token. fp32=False: in the weight's dtype where no bias or softcap
    follows (the same values: the cast to fp32 is exact), for readers that upcast themselves
    (the static decoder's argmax and Triton sampler) — at 400 rows of the 8B vocabulary the
    cast was 0.15 ms of a 17 ms step (profile_decode, 28th session)."""
    z = h.to(weight.dtype) @ weight.t()
    if not fp32 and bias is None and softcap is None:
        return z
    z = z.float()
    if bias is not None:
        z = z + bias.float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def sampling_generator(device, seed: int) -> torch.Generator:
    """A generator on `device` (torch.multinomial needs the generator on the logits' device)."""
    return torch.Generator(device=torch.device(device)).manual_seed(int(seed))


# Bisection steps of the nucleus threshold: the band left undecided is max p / 2^30 wide,
# far under fp32's resolution of the probabilities themselves.
NUCLEUS_STEPS = 30


def nucleus_mask(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """probs [B, V] -> bool [B, V]: the smallest set of most likely tokens whose mass reaches
    top_p (token i kept iff the mass of the tokens more likely than i is < top_p), found by
    bisection on a probability threshold instead of sorting the vocabulary (on CUDA: 400 ×
    128,256 probabilities a step; elicitation 78.9 → 63.7 s with the other v2 changes)."""
    lo = torch.zeros_like(probs[:, :1])
    hi = probs.amax(-1, keepdim=True)           # mass above hi: 0 < top_p; above lo (0): 1 >= top_p
    for _ in range(NUCLEUS_STEPS):
        mid = (lo + hi) * 0.5
        above = torch.where(probs > mid, probs, 0.0).sum(-1, keepdim=True)
        small = above < top_p
        hi = torch.where(small, mid, hi)
        lo = torch.where(small, lo, mid)
    # every x below the smallest kept probability has mass above it >= top_p, every x at or
    # above it less: lo ends just below it
    return probs > lo


def next_token(logits, sample: bool, temperature: float, top_p: float, generator=None):
    """logits [B, V] fp32 -> token ids [B] (greedy, or nucleus sampling)."""
    if not sample:
        return logits.argmax(-1)
    if generator is not None and generator.device.type != logits.device.type:
        raise ValueError(f"the sampling generator is on {generator.device} but the logits are on "
                         f"{logits.device}: make it with sampling_generator(logits.device, seed)")
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0 and probs.is_cuda:
        probs = probs * nucleus_mask(probs, top_p)
    elif top_p < 1.0:       # the CPU sorts: 30 bisection passes cost 3× a sort there (16 × 49,152)
        p, idx = probs.sort(-1, descending=True)
        keep = p.cumsum(-1) - p < top_p           # always keeps the most likely token
        choice = torch.multinomial(p * keep, 1, generator=generator).squeeze(1)
        return idx.gather(1, choice[:, None]).squeeze(1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def keyed_uniforms(seed: int, keys, step: int) -> torch.Tensor:
    """float64 [B] in (0, 1): row b's uniform for this step, a function of (seed, keys[b],
    step) alone (SHA-512 seeding of Python's Mersenne Twister), so a row draws the same in any
    batch, order or process."""
    return torch.tensor([random.Random(f"{seed}:{int(k)}:{step}").random() for k in keys], dtype=torch.float64)


def keyed_next_token(logits, temperature: float, top_p: float, seed: int, keys, step: int):
    """logits [B, V] fp32 -> token ids [B]: nucleus draws by inverse CDF (most likely token
    first) at keyed_uniforms(seed, keys, step). The CPU's counterpart of the Triton sampler's
    keyed rows (iicl_fast/kernels/sampling.py); the two draw different numbers."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    p, idx = probs.sort(-1, descending=True)
    if top_p < 1.0:
        p = p * (p.cumsum(-1) - p < top_p)        # always keeps the most likely token
    cdf = p.cumsum(-1)
    u = keyed_uniforms(seed, keys, step).to(cdf.device) * cdf[:, -1]
    pick = torch.searchsorted(cdf, u[:, None]).clamp(max=cdf.shape[1] - 1)
    return idx.gather(1, pick).squeeze(1)


def _stop_tensor(stop_ids, eos_id, device) -> torch.Tensor:
    ids = [eos_id] if stop_ids is None else list(stop_ids)
    ids = [int(i) for i in ids if i is not None]
    if not ids:
        raise ValueError("generate: no stop id (give eos_id or stop_ids)")
    return torch.tensor(sorted(set(ids)), dtype=torch.long, device=device)


# How often the decoding loop asks the device whether every row has stopped: each ask is a
# host sync, and one per token kept the GPU idle between steps.
STOP_CHECK_EVERY = 16


@torch.no_grad()
@without_cudnn_sdpa
def generate(model, prompts: list[list[int]], *, max_new_tokens: int, pad_id: int, sample: bool,
             eos_id: int | None = None, stop_ids=None, temperature: float = 1.0, top_p: float = 1.0,
             batch_size: int = 16, prefix: list[int] | None = None, generator=None, progress=None,
             min_new_tokens: int = 0, cascade: bool | None = None, static: bool | None = None,
             prefix_kv=None, keyed_seed: int | None = None, row_keys: list[int] | None = None,
             hidden: bool = False):
    """Generate continuations of [prefix; prompt] for each token-id prompt.

    static (default: on CUDA for models cascade attention serves): decode.generate_static —
    batches of batch_size rows in preallocated caches after one copy of the prefix's KV,
    the step captured as a CUDA graph, attention and sampling in Triton kernels. Otherwise
    the plain loop: the shared prefix (e.g. the chunk) is encoded once and each batch copies
    its KV cache (or, cascade, attends to one copy of it through decode.shared_prefix), so
    only the prompts' own tokens are recomputed; prompts are left-padded after the prefix
    (the padding is masked and positions skip it). prefix_kv: decode.prefix_kv(model, prefix)
    computed by the caller, so that several calls on one prefix (questions, then answers)
    encode it once. A row stops at the first of `stop_ids` (every end-of-turn id of the
    model; `eos_id` alone if not given) once it has `min_new_tokens`. Returns each
    continuation's ids up to and including its first stop id, if one came.

    keyed_seed (sampling): draws keyed by (keyed_seed, row key, step) instead of a generator's
    stream, row_keys[i] (default i, < 2^24) the key of prompts[i]: a row's continuation is then
    the same in any batch size, order or share of prompts (several ranks).

    hidden: also return, for each continuation, the final hidden states [len(continuation), H]
    (the model's dtype, on its device) that produced its tokens' logits: row t is the state
    over [prefix; prompt; continuation[:t]], which is what a pass over the whole sequence
    computes there (teacher.teacher_hidden reuses them instead of recomputing). -> (ids, hiddens)"""
    device = next(model.parameters()).device
    if keyed_seed is not None and row_keys is None:
        row_keys = list(range(len(prompts)))
    if keyed_seed is not None and (len(row_keys) != len(prompts) or not all(0 <= k < 2 ** 24 for k in row_keys)):
        raise ValueError(f"row_keys: one key in [0, 2^24) a prompt; got {len(row_keys)} for {len(prompts)} prompts")
    keyed = dict(keyed_seed=keyed_seed, row_keys=row_keys)
    body = decoder(model)
    stops = _stop_tensor(stop_ids, eos_id, device)
    K = len(prefix) if prefix else 0
    check_positions(model, K, max((len(p) for p in prompts), default=0), max_new_tokens)
    from .decode import cascade_unsupported
    served = device.type == "cuda" and cascade_unsupported(model) is None
    if static is None:
        static = served and cascade is None
    if cascade is None:
        cascade = served
    if static:
        from .decode import generate_static
        from .decode import prefix_kv as encode_prefix
        kv = prefix_kv if prefix_kv is not None or not prefix else encode_prefix(model, prefix)
        out: list[list[int]] = []
        hs: list[torch.Tensor] = []
        for start in range(0, len(prompts), batch_size):
            got = generate_static(model, prompts[start: start + batch_size], prefix=kv, max_new_tokens=max_new_tokens,
                                  pad_id=pad_id, stops=stops, sample=sample, temperature=temperature, top_p=top_p,
                                  generator=generator, min_new_tokens=min_new_tokens, progress=progress,
                                  keyed_seed=keyed_seed, hidden=hidden,
                                  row_keys=None if row_keys is None else row_keys[start: start + batch_size])
            if hidden:
                got, h = got
                hs += h
            out += got
        return (out, hs) if hidden else out
    if cascade and prefix:
        from .decode import prefix_kv as encode_prefix
        from .decode import shared_prefix
        with shared_prefix(model, prefix_kv if prefix_kv is not None else encode_prefix(model, prefix)):
            return _generate(model, body, prompts, K, None, False, stops, max_new_tokens, pad_id, sample,
                             temperature, top_p, batch_size, generator, progress, min_new_tokens, hidden, **keyed)
    if prefix and batch_size > 1 and len(prompts) > 1:
        from .decode import sliding_window
        if sliding_window(model):
            # transformers' sliding-window cache layers do not take a prefix copied into a
            # batch with left-padded rows after it (measured: Mistral and Gemma-3 rows got
            # row 0's tokens); the prefix is recomputed per row instead: exact, slower.
            return _generate(model, body, [prefix + p for p in prompts], 0, None, False, stops, max_new_tokens,
                             pad_id, sample, temperature, top_p, batch_size, generator, progress, min_new_tokens,
                             hidden, **keyed)
    cache0 = prefix_cache(model, prefix) if prefix else None
    return _generate(model, body, prompts, K, cache0, bool(prefix), stops, max_new_tokens, pad_id, sample,
                     temperature, top_p, batch_size, generator, progress, min_new_tokens, hidden, **keyed)


def _generate(model, body, prompts, K, cache0, copy_prefix, stops, max_new_tokens, pad_id, sample,
              temperature, top_p, batch_size, generator, progress, min_new_tokens, hidden=False, keyed_seed=None,
              row_keys=None):
    """The decoding loop; the prefix (K tokens) either copied per row from cache0 into the
    batch's cache (copy_prefix) or attended through decode.shared_prefix (K > 0, no cache0).
    hidden: (ids, per-row hidden states), as generate."""
    device = next(model.parameters()).device
    weight, bias, softcap = lm_head(model)
    out: list[list[int]] = []
    hs: list[torch.Tensor] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start: start + batch_size]
        ids, mask = pad_left(batch, pad_id, device)
        B = ids.shape[0]
        past = None
        if copy_prefix:
            past = copy.deepcopy(cache0)
            past.batch_repeat_interleave(B)
        # the mask covers what the cache holds: the copied prefix, or only the rows' own tokens
        attn = torch.cat([torch.ones(B, K if copy_prefix else 0, dtype=mask.dtype, device=device), mask], 1)
        pos = K + (mask.cumsum(1) - 1).clamp(min=0)
        res = body(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, **cache_kw(body, past))
        past, h = cache_of(res), res.last_hidden_state[:, -1]
        next_pos = K + mask.sum(1)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        toks = torch.full((B, max_new_tokens), -1, dtype=torch.long, device=device)
        steps = []                                     # hidden: the state each step's logits came from
        for t in range(max_new_tokens):
            if hidden:
                steps.append(h.clone())
            z = step_logits(h, weight, bias, softcap)
            if t < min_new_tokens:
                z.index_fill_(1, stops, float("-inf"))
            if sample and keyed_seed is not None:
                tok = keyed_next_token(z, temperature, top_p, keyed_seed, row_keys[start: start + B], t).to(device)
            else:
                tok = next_token(z, sample, temperature, top_p, generator)
            toks[:, t] = torch.where(done, -1, tok)
            done |= torch.isin(tok, stops)
            if t + 1 == max_new_tokens or ((t + 1) % STOP_CHECK_EVERY == 0 and dist.all_agree(bool(done.all()))):
                break
            attn = torch.cat([attn, torch.ones(B, 1, dtype=attn.dtype, device=device)], 1)
            res = body(input_ids=tok[:, None], attention_mask=attn, position_ids=next_pos[:, None],
                       use_cache=True, **cache_kw(body, past))
            past, h = cache_of(res), res.last_hidden_state[:, -1]
            next_pos = next_pos + 1
        rows = [[x for x in row if x >= 0] for row in toks.tolist()]
        if hidden:
            states = torch.stack(steps, 1)             # [B, steps, H]
            hs += [states[i, :len(r)] for i, r in enumerate(rows)]
        out += rows
        if progress is not None:
            progress.update(B)
    return (out, hs) if hidden else out
