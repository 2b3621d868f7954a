"""Batched generation and the hidden-state view of a causal LM (no full logits)."""
from __future__ import annotations

import copy

import torch


def causal_lm(model):
    """The HF *ForCausalLM under a peft wrapper (LoRA layers stay injected in it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder(model):
    """The transformer body: returns last (final-normed) hidden states, never logits."""
    return causal_lm(model).get_decoder()


def lm_head(model):
    """-> (weight [V, H], bias [V] or None, softcap or None) of the frozen output layer."""
    lm = causal_lm(model)
    head = lm.get_output_embeddings()
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    return head.weight, getattr(head, "bias", None), softcap


def pad_right(seqs: list[list[int]], pad_id: int, device=None):
    """-> ids [B, S], mask [B, S] (1 = real token)."""
    S = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), S), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), S), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def pad_left(seqs: list[list[int]], pad_id: int, device=None):
    S = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), S), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), S), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, S - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, S - len(s):] = 1
    return ids.to(device), mask.to(device)


def prefix_cache(model, prefix: list[int]):
    """KV cache of a shared prefix (batch 1), computed once and copied per batch."""
    device = next(model.parameters()).device
    return decoder(model)(input_ids=torch.tensor([prefix], device=device), use_cache=True).past_key_values


def step_logits(h, weight, bias=None, softcap=None):
    """h [B, H] -> fp32 logits [B, V] for a decoding step, the GEMM in the weight's dtype (as
    transformers computes them): casting an 8B model's lm_head to fp32 every step would
    write and read ~2 GB per token."""
    z = (h.to(weight.dtype) @ weight.t()).float()
    if bias is not None:
        z = z + bias.float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def sampling_generator(device, seed: int) -> torch.Generator:
    """A generator on `device` (torch.multinomial needs the generator on the logits' device)."""
    return torch.Generator(device=torch.device(device)).manual_seed(int(seed))


def next_token(logits, sample: bool, temperature: float, top_p: float, generator=None):
    """logits [B, V] fp32 -> token ids [B] (greedy, or nucleus sampling)."""
    if not sample:
        return logits.argmax(-1)
    if generator is not None and generator.device.type != logits.device.type:
        raise ValueError(f"the sampling generator is on {generator.device} but the logits are on "
                         f"{logits.device}: make it with sampling_generator(logits.device, seed)")
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        p, idx = probs.sort(-1, descending=True)
        keep = p.cumsum(-1) - p < top_p           # always keeps the most likely token
        p = p * keep
        choice = torch.multinomial(p, 1, generator=generator).squeeze(1)
        return idx.gather(1, choice[:, None]).squeeze(1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


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
def generate(model, prompts: list[list[int]], *, max_new_tokens: int, pad_id: int, sample: bool,
             eos_id: int | None = None, stop_ids=None, temperature: float = 1.0, top_p: float = 1.0,
             batch_size: int = 16, prefix: list[int] | None = None, generator=None, progress=None,
             min_new_tokens: int = 0) -> list[list[int]]:
    """Generate continuations of [prefix; prompt] for each token-id prompt.

    The shared prefix (e.g. the chunk) is encoded once; each batch copies its KV cache, so
    only the prompts' own tokens are recomputed. Prompts are left-padded after the prefix
    (the padding is masked and positions skip it). A row stops at the first of `stop_ids`
    (every end-of-turn id of the model; `eos_id` alone if not given) once it has
    `min_new_tokens`. Tokens stay on the device until the batch ends. Returns each
    continuation's ids up to and including its first stop id, if one came."""
    device = next(model.parameters()).device
    body = decoder(model)
    weight, bias, softcap = lm_head(model)
    stops = _stop_tensor(stop_ids, eos_id, device)
    cache0 = prefix_cache(model, prefix) if prefix else None
    K = len(prefix) if prefix else 0
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start: start + batch_size]
        ids, mask = pad_left(batch, pad_id, device)
        B = ids.shape[0]
        past = None
        if cache0 is not None:
            past = copy.deepcopy(cache0)
            past.batch_repeat_interleave(B)
        attn = torch.cat([torch.ones(B, K, dtype=mask.dtype, device=device), mask], 1)
        pos = K + (mask.cumsum(1) - 1).clamp(min=0)
        res = body(input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=past, use_cache=True)
        past, h = res.past_key_values, res.last_hidden_state[:, -1]
        next_pos = K + mask.sum(1)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        toks = torch.full((B, max_new_tokens), -1, dtype=torch.long, device=device)
        for t in range(max_new_tokens):
            z = step_logits(h, weight, bias, softcap)
            if t < min_new_tokens:
                z.index_fill_(1, stops, float("-inf"))
            tok = next_token(z, sample, temperature, top_p, generator)
            toks[:, t] = torch.where(done, -1, tok)
            done |= torch.isin(tok, stops)
            if t + 1 == max_new_tokens or ((t + 1) % STOP_CHECK_EVERY == 0 and bool(done.all())):
                break
            attn = torch.cat([attn, torch.ones(B, 1, dtype=attn.dtype, device=device)], 1)
            res = body(input_ids=tok[:, None], attention_mask=attn, position_ids=next_pos[:, None],
                       past_key_values=past, use_cache=True)
            past, h = res.past_key_values, res.last_hidden_state[:, -1]
            next_pos = next_pos + 1
        for row in toks.tolist():
            out.append([x for x in row if x >= 0])
        if progress is not None:
            progress.update(B)
    return out
