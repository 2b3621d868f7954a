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


def next_token(logits, sample: bool, temperature: float, top_p: float, generator=None):
    """logits [B, V] fp32 -> token ids [B] (greedy, or nucleus sampling)."""
    if not sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        p, idx = probs.sort(-1, descending=True)
        keep = p.cumsum(-1) - p < top_p           # always keeps the most likely token
        p = p * keep
        choice = torch.multinomial(p, 1, generator=generator).squeeze(1)
        return idx.gather(1, choice[:, None]).squeeze(1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.no_grad()
def generate(model, prompts: list[list[int]], *, max_new_tokens: int, eos_id: int, pad_id: int,
             sample: bool, temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 16,
             prefix: list[int] | None = None, generator=None, progress=None) -> list[list[int]]:
    """Generate continuations of [prefix; prompt] for each token-id prompt.

    The shared prefix (e.g. the chunk) is encoded once; each batch copies its KV cache, so
    only the prompts' own tokens are recomputed. Prompts are left-padded after the prefix
    (the padding is masked and positions skip it). Returns each continuation's ids up to
    and including the first eos, if one came."""
    device = next(model.parameters()).device
    body = decoder(model)
    weight, bias, softcap = lm_head(model)
    from .reference import logits_of
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
        rows = [[] for _ in range(B)]
        for _ in range(max_new_tokens):
            tok = next_token(logits_of(h, weight, bias, softcap), sample, temperature, top_p, generator)
            for b in range(B):
                if not done[b]:
                    rows[b].append(int(tok[b]))
            done |= tok == eos_id
            if bool(done.all()):
                break
            attn = torch.cat([attn, torch.ones(B, 1, dtype=attn.dtype, device=device)], 1)
            res = body(input_ids=tok[:, None], attention_mask=attn, position_ids=next_pos[:, None],
                       past_key_values=past, use_cache=True)
            past, h = res.past_key_values, res.last_hidden_state[:, -1]
            next_pos = next_pos + 1
        out += rows
        if progress is not None:
            progress.update(B)
    return out
