"""Cascade attention (decode.py): the shared prefix attended once, merged with each row's
own tokens by log-sum-exp, against plain float64 attention over [prefix; row]."""
import math

import pytest
import torch

from iicl_fast.decode import _PREFIX, cascade_attention


class _Layer:
    layer_idx = 0


def plain_attention(q, pk, pv, k, v, vis):
    """float64: q [B, H, q, d]; prefix [kvh, K, d] (seen by every query); rows' k/v [B, kvh, T, d]
    with vis [B, 1, q, T]. -> [B, q, H, d]."""
    B, H, n, d = q.shape
    kvh, K = pk.shape[0], pk.shape[1]
    g = H // kvh
    kk = torch.cat([pk[None].expand(B, -1, -1, -1), k], 2).double().repeat_interleave(g, 1)
    vv = torch.cat([pv[None].expand(B, -1, -1, -1), v], 2).double().repeat_interleave(g, 1)
    s = q.double() @ kk.transpose(-1, -2) / math.sqrt(d)
    full = torch.cat([torch.ones(B, 1, n, K, dtype=torch.bool), vis], -1)
    s = s.masked_fill(~full, -math.inf)
    return (torch.softmax(s, -1) @ vv).transpose(1, 2)


@pytest.mark.parametrize("B,kvh,g,n,K,T", [(1, 2, 1, 1, 7, 1), (3, 2, 4, 1, 97, 5), (2, 1, 8, 6, 13, 6),
                                           (5, 2, 4, 3, 33, 9)])
def test_cascade_matches_plain_attention(B, kvh, g, n, K, T):
    torch.manual_seed(B * 100 + K)
    d, H = 16, kvh * g
    q = torch.randn(B, H, n, d)
    pk, pv = torch.randn(kvh, K, d), torch.randn(kvh, K, d)
    k, v = torch.randn(B, kvh, T, d), torch.randn(B, kvh, T, d)
    # rows of different suffix lengths (left padding), causal among the last n positions
    pad = torch.randint(0, T, (B,))
    pad[0] = 0
    cols = torch.arange(T)
    causal = cols[None, :] <= (torch.arange(n)[:, None] + T - n)
    vis = (cols[None, None, :] >= pad[:, None, None]) & causal[None]
    vis = vis[:, None]                                             # [B, 1, n, T]
    with _prefix([(pk, pv)]):
        out, _ = cascade_attention(_Layer(), q, k, v, vis, scaling=1 / math.sqrt(d))
    ref = plain_attention(q, pk, pv, k, v, vis)
    assert out.shape == (B, n, H, d) and torch.isfinite(out).all()
    assert (out.double() - ref).norm() / ref.norm() < 1e-5


class _prefix:
    def __init__(self, kv):
        self.kv = kv

    def __enter__(self):
        self.prev = dict(_PREFIX)
        _PREFIX.clear()
        _PREFIX.update(dict(enumerate(self.kv)))

    def __exit__(self, *a):
        _PREFIX.clear()
        _PREFIX.update(self.prev)


def nucleus_by_sort(probs, top_p):
    p, idx = probs.sort(-1, descending=True)
    keep = p.cumsum(-1) - p < top_p
    return torch.zeros_like(probs, dtype=torch.bool).scatter(1, idx, keep)


@pytest.mark.parametrize("V,top_p,sharp", [(7, 0.9, 1.0), (97, 0.5, 3.0), (1000, 0.95, 0.3), (50, 0.999, 5.0)])
def test_nucleus_mask_equals_the_sorted_definition(V, top_p, sharp):
    from iicl_fast.generation import nucleus_mask
    torch.manual_seed(V)
    probs = torch.softmax(torch.randn(6, V, dtype=torch.float64) * sharp, -1)   # fp64: no boundary ties by rounding
    assert torch.equal(nucleus_mask(probs, top_p), nucleus_by_sort(probs, top_p))


def test_sampled_tokens_follow_the_nucleus_distribution():
    """40,000 draws over a 7-token vocabulary against the renormalised nucleus, and the same
    seed draws the same tokens."""
    from iicl_fast.generation import next_token, sampling_generator
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0]]).repeat(40000, 1)
    from iicl_fast.generation import nucleus_mask
    draw = lambda: next_token(logits, True, 0.8, 0.9, sampling_generator("cpu", 5))   # noqa: E731
    a = draw()
    assert torch.equal(a, draw())
    p = torch.softmax(logits[0] / 0.8, -1)
    p = p * nucleus_by_sort(p[None], 0.9)[0]
    p = p / p.sum()
    probs = torch.softmax(logits / 0.8, -1)                  # the CUDA path: bisected threshold
    b = torch.multinomial(probs * nucleus_mask(probs, 0.9), 1, generator=sampling_generator("cpu", 6)).squeeze(1)
    for draws in (a, b):
        freq = torch.bincount(draws, minlength=7).double() / draws.numel()
        assert freq[p == 0].sum() == 0
        sd = (p * (1 - p) / draws.numel()).sqrt()
        assert ((freq - p).abs() <= 5 * sd + 1e-12).all(), (freq, p)


# --- the static decoder (decode.generate_static): one preallocated batch, kernels, compaction ---

def _tiny_llama(vocab=97, heads=6, kv_heads=2, seed=0):
    """A 2-layer Llama with group 3 (SmolLM2's) and weights large enough that greedy tokens vary."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model


def _lora_tiny(seed, targets, fused):
    """_tiny_llama with a LoRA adapter on `targets` whose B is nonzero (it moves the tokens);
    fused: q/k/v and gate/up laid out in one buffer each (layers.fuse_projections)."""
    from peft import LoraConfig, get_peft_model

    from iicl_fast import layers
    model = get_peft_model(_tiny_llama(seed=seed), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    if fused:
        assert layers.fuse_projections(model) == 4
    return model


@pytest.fixture
def static_kernels(monkeypatch):
    """generate_static with its Triton kernels on (the interpreter here), stop checks every 4
    steps and compaction as soon as one row has stopped."""
    import iicl_fast.decode as D
    orig = D.generate_static
    monkeypatch.setattr(D, "generate_static", lambda *a, **k: orig(*a, kernels=True, **k))
    monkeypatch.setattr(D, "STOP_CHECK_EVERY", 4)
    monkeypatch.setattr(D, "COMPACT_BELOW", 0.9)
    monkeypatch.setattr(D, "PREFILL_TOKENS", 16)          # prompts prefilled in slices of rows


@pytest.mark.parametrize("with_prefix", [True, False])
def test_static_decoder_greedy_equals_the_plain_loop(static_kernels, with_prefix):
    """fp32: the static decoder (kernels, a row that stops early, the batch compacted after it)
    writes the same tokens as the plain loop with a copied prefix cache."""
    from iicl_fast.generation import generate
    model = _tiny_llama()
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(3, 97, (23,), generator=g).tolist() if with_prefix else None
    qs = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (3, 7, 1, 5, 2)]
    kw = dict(max_new_tokens=14, pad_id=0, sample=False, prefix=prefix, batch_size=4)
    first = generate(model, qs, stop_ids=[10_000], static=False, **kw)     # no stop in the vocabulary
    stop = first[1][2]                                        # row 1 stops at its third token
    want = generate(model, qs, stop_ids=[stop], static=False, **kw)
    got = generate(model, qs, stop_ids=[stop], static=True, **kw)
    assert got == want
    assert len(want[1]) <= 3 and max(len(r) for r in want) == 14


def test_static_decoder_sampling_is_seeded(static_kernels):
    from iicl_fast.generation import generate
    model = _tiny_llama(seed=2)
    prefix, qs = list(range(5, 20)), [[7, 8, 9], [10], [11, 12]]
    kw = dict(max_new_tokens=8, pad_id=0, sample=True, temperature=0.9, top_p=0.9, prefix=prefix, stop_ids=[1],
              static=True)
    a = generate(model, qs, generator=torch.Generator().manual_seed(5), **kw)
    b = generate(model, qs, generator=torch.Generator().manual_seed(5), **kw)
    c = generate(model, qs, generator=torch.Generator().manual_seed(6), **kw)
    assert a == b and a != c
    assert all(len(r) == 8 or r[-1] == 1 for r in a)


@pytest.mark.parametrize("static", [True, False])
def test_keyed_draws_do_not_depend_on_the_batch(static_kernels, static):
    """keyed_seed: each row's continuation is the same decoded all at once, one at a time, in
    another order or as a share with its own keys (static: Triton sampler keyed by row,
    through compaction; plain loop: keyed uniforms); another seed draws otherwise."""
    from iicl_fast.generation import generate
    model = _tiny_llama(seed=4)
    prefix, qs = list(range(5, 20)), [[7, 8, 9], [10], [11, 12], [13, 14, 15, 16], [17]]
    kw = dict(max_new_tokens=9, pad_id=0, sample=True, temperature=1.2, top_p=0.95, prefix=prefix, stop_ids=[1],
              static=static)
    whole = generate(model, qs, keyed_seed=11, batch_size=5, **kw)
    assert generate(model, qs, keyed_seed=11, batch_size=1, **kw) == whole
    order = [3, 0, 4, 2, 1]
    again = generate(model, [qs[i] for i in order], keyed_seed=11, row_keys=order, batch_size=2, **kw)
    assert again == [whole[i] for i in order]
    assert generate(model, qs[1::2], keyed_seed=11, row_keys=[1, 3], batch_size=5, **kw) == whole[1::2]
    assert generate(model, qs, keyed_seed=12, batch_size=5, **kw) != whole
    with pytest.raises(ValueError, match="row_keys"):
        generate(model, qs, keyed_seed=11, row_keys=[0, 1], **kw)


@pytest.mark.parametrize("static,llama_step", [(True, True), (True, False), (False, True)])
def test_decoded_hidden_states_are_a_whole_pass(static_kernels, monkeypatch, static, llama_step):
    """generate(hidden=True): each continuation's states [len, H] are the final hidden states
    of one unpadded forward over [prefix; prompt; continuation] at the positions that predict
    its tokens (fp32) — static decoder (kernels, a first row stopped early, the batch compacted, the
    Llama step and transformers' forward) and plain loop, in batches of 3."""
    import iicl_fast.decode as D
    from iicl_fast.generation import generate
    monkeypatch.setattr(D, "LLAMA_STEP", llama_step)
    model = _tiny_llama(seed=6)
    g = torch.Generator().manual_seed(2)
    prefix = torch.randint(3, 97, (19,), generator=g).tolist()
    qs = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (4, 1, 6, 3, 2)]
    kw = dict(max_new_tokens=11, pad_id=0, prefix=prefix, batch_size=3, static=static)
    first = generate(model, qs, stop_ids=[10_000], sample=False, **kw)
    stop = first[0][1]                  # row 0 stops at its second token: rows 1, 2 move up at compaction
    for sample in (False, True):
        ids, states = generate(model, qs, stop_ids=[stop], sample=sample, temperature=1.3, keyed_seed=4,
                               hidden=True, **kw)
        assert ids == generate(model, qs, stop_ids=[stop], sample=sample, temperature=1.3, keyed_seed=4, **kw)
        assert sample or (len(ids[0]) <= 2 and max(len(r) for r in ids) == 11)
        for q, r, h in zip(qs, ids, states):
            seq = torch.tensor([prefix + q + r])
            with torch.no_grad():
                want = model.model(input_ids=seq).last_hidden_state[0, len(prefix) + len(q) - 1: seq.shape[1] - 1]
            assert h.shape == want.shape
            assert (h - want).abs().max() < 1e-4 * want.abs().max()


def test_decoder_stats_hook_records_every_call(static_kernels, monkeypatch):
    """decode.STATS (benchmarks: bench_consolidate splits elicitation with it): every
    generate_static call appends its rows, prompt tokens (and those its prefill ran: each slice
    of rows cut to its longest prompt, the rows sorted longest first; the tokens are the plain
    loop's), phase times and steps; None: nothing."""
    import iicl_fast.decode as D
    from iicl_fast.generation import generate
    model = _tiny_llama(seed=1)
    qs = [[5, 6, 7], [8], [9, 10, 11, 12]]
    kw = dict(max_new_tokens=5, pad_id=0, sample=False, prefix=list(range(20, 29)), stop_ids=[10_000], static=True)
    monkeypatch.setattr(D, "STATS", [])
    monkeypatch.setattr(D, "PREFILL_TOKENS", 8)
    want = generate(model, qs, batch_size=2, **{**kw, "static": False})
    assert generate(model, qs, batch_size=2, **kw) == want
    assert generate(model, qs, batch_size=3, **kw) == want
    calls = D.STATS
    # batch 3: longest first, slices cut to their own longest prompt: [4, 3] then [1] (9 of 12 padded)
    assert [(c["rows"], c["prompt_tokens"], c["padded_prompt_tokens"], c["steps"]) for c in calls] == [
        (2, 4, 6, 5), (1, 4, 4, 5), (3, 8, 9, 5)]
    assert all(c["decode_s"] > 0 and c["prefill_s"] > 0 and c["batches"] for c in calls)
    monkeypatch.setattr(D, "STATS", None)
    generate(model, qs, batch_size=2, **kw)
    assert len(calls) == 3


def test_keyed_next_token_follows_the_nucleus_distribution():
    """The plain path's keyed draws (inverse CDF at keyed uniforms), 20,000 keys over a
    9-token vocabulary, against the renormalised nucleus; the same key and step repeat."""
    from iicl_fast.generation import keyed_next_token
    from iicl_fast.kernels.reference_sampling import top_p_probs_ref
    z = torch.tensor([[2.0, 0.5, -1.0, 1.5, -3.0, 0.0, 1.0, -float("inf"), 0.2]])
    n = 20000
    tok = keyed_next_token(z.expand(n, -1), 0.8, 0.9, 5, list(range(n)), 3)
    want = top_p_probs_ref(z, 0.8, 0.9)[0]
    freq = torch.bincount(tok, minlength=9).double() / n
    assert freq[want == 0].sum() == 0 and (want == 0).sum() >= 2
    assert ((freq - want).abs() <= 5 * torch.sqrt(want * (1 - want) / n) + 1e-9).all(), (freq, want)
    assert torch.equal(keyed_next_token(z.expand(4, -1), 0.8, 0.9, 5, [0, 1, 2, 3], 3), tok[:4])


@pytest.mark.parametrize("llama_step,fused", [(True, False), (True, True), (False, False)])
def test_static_decoder_with_lora_takes_the_adapter(static_kernels, monkeypatch, llama_step, fused):
    """A peft LoRA model (adapter weights non-zero) through the Llama step built from its modules
    (and through transformers' forward; and with q/k/v and gate/up laid out for one GEMM each,
    layers.fuse_projections): the tokens of the plain loop, which differ from the base model's,
    also with the adapter disabled."""
    import iicl_fast.decode as D
    from peft import LoraConfig, get_peft_model

    from iicl_fast import layers
    from iicl_fast.generation import decoder, generate
    monkeypatch.setattr(D, "LLAMA_STEP", llama_step)
    model = get_peft_model(_tiny_llama(seed=3), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "gate_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    assert D.llama_like(decoder(model))
    if fused:
        assert layers.fuse_projections(model) == 4          # 2 layers × (q/k/v, gate/up)
        built = []
        orig = D._fused_groups
        monkeypatch.setattr(D, "_fused_groups", lambda *a: built.append(orig(*a)) or built[-1])
    qs, prefix = [[5, 6, 7, 8], [9, 10]], list(range(20, 31))
    kw = dict(max_new_tokens=10, pad_id=0, sample=False, prefix=prefix, stop_ids=[10_000])
    got = generate(model, qs, static=True, **kw)
    assert got == generate(model, qs, static=False, **kw)
    with model.disable_adapter():
        base = generate(model, qs, static=False, **kw)
        assert got != base
        if fused:
            assert generate(model, qs, static=True, **kw) == base
    if fused:      # every step ran the fused GEMMs (the adapter's, then the disabled one's)
        assert built and all(qkv is not None and gu is not None for b in built for qkv, gu in b)
        assert all(g[0][0].adapted for g in built[:1]) and not built[-1][0][0].adapted


@pytest.mark.parametrize("max_rows", [256, 1])
def test_static_decoder_takes_the_lora_from_the_buffers_tail(static_kernels, monkeypatch, max_rows):
    """decode.LORA_TAIL: every adapted projection — q/k/v and gate/up one GEMM each (also past
    FUSED_PROJ_MAX_ROWS, where the base's groups run as modules), o and down alone — runs x [W; A]ᵀ
    then the sB product in place, every step; the step writes the plain loop's tokens (fp32),
    which differ from the base model's; with the adapter disabled nothing takes a tail and the
    base's tokens come."""
    import iicl_fast.decode as D
    from iicl_fast import layers
    from iicl_fast.generation import generate
    monkeypatch.setattr(D, "LORA_TAIL", True)
    monkeypatch.setattr(D, "FUSED_PROJ_MAX_ROWS", max_rows)
    model = _lora_tiny(7, ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"], True)
    tails = []
    orig = layers.FusedLinears._with_tail
    monkeypatch.setattr(layers.FusedLinears, "_with_tail", lambda self, A: tails.append(len(self.sizes)) or orig(self, A))
    g = torch.Generator().manual_seed(8)
    prefix = torch.randint(3, 97, (19,), generator=g).tolist()
    qs = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (4, 1, 6)]
    kw = dict(max_new_tokens=8, pad_id=0, sample=False, prefix=prefix, stop_ids=[10_000])
    got = generate(model, qs, static=True, **kw)
    assert len(tails) == 2 * 4 * 7 and set(tails) == {1, 2, 3}      # 2 layers × (q/k/v, o, gate/up, down), 7 steps
    assert got == generate(model, qs, static=False, **kw)
    with model.disable_adapter():
        base = generate(model, qs, static=False, **kw)
        assert base != got
        tails.clear()
        assert generate(model, qs, static=True, **kw) == base and not tails


@pytest.mark.parametrize("fused", [True, False])
def test_static_decoder_runs_the_layer_gemms_through_the_skinny_kernel(static_kernels, monkeypatch, fused):
    """IICL_DECODE_GEMM=triton: the Llama step's projections run kernels/skinny_gemm.py (q/k/v
    and gate/up where laid out as one GEMM each, o; down after a fused gate/up), a LoRA
    adapter's product added in its epilogue (down has none), and the step writes the plain
    loop's tokens (fp32), which differ from the base model's."""
    import iicl_fast.decode as D
    from iicl_fast.generation import generate
    from iicl_fast.kernels import skinny_gemm
    monkeypatch.setattr(D, "GEMM", "triton")
    monkeypatch.setattr(D, "LORA_TAIL", False)         # the adapter's product as the kernel's add
    model = _lora_tiny(6, ["q_proj", "o_proj", "up_proj"], fused)
    calls = []
    orig = skinny_gemm.skinny_linear
    monkeypatch.setattr(skinny_gemm, "skinny_linear", lambda x, w, add=None: calls.append(add is not None) or orig(x, w, add))
    g = torch.Generator().manual_seed(4)
    prefix = torch.randint(3, 97, (17,), generator=g).tolist()
    qs = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (2, 5, 1)]
    kw = dict(max_new_tokens=8, pad_id=0, sample=False, prefix=prefix, stop_ids=[10_000])
    got = generate(model, qs, static=True, **kw)
    per_step = 4 if fused else 1          # a layer: q/k/v, gate/up (where laid out: else the modules), o, down
    assert len(calls) == 2 * per_step * 7                 # 2 layers, 7 steps after the prefill's token
    assert any(calls) and (all(calls) if not fused else not all(calls))   # down: no adapter, no add
    assert got == generate(model, qs, static=False, **kw)
    with model.disable_adapter():
        assert generate(model, qs, static=False, **kw) != got
    monkeypatch.setattr(D, "GEMM", "cuBLAS")
    with pytest.raises(D.IICLError, match="IICL_DECODE_GEMM must be cublas or triton"):
        generate(model, qs, static=True, **kw)


def test_static_decoder_steps_a_decoder_unlike_llama(static_kernels, monkeypatch):
    """A decoder _llama_step does not take (GPT-2: no embed_tokens, learned positions) steps
    through its own forward with the static attention, whatever IICL_DECODE_GEMM says, and
    writes the plain loop's tokens (fp32)."""
    import iicl_fast.decode as D
    from transformers import GPT2Config, GPT2LMHeadModel

    from iicl_fast.generation import decoder, generate
    monkeypatch.setattr(D, "GEMM", "triton")
    torch.manual_seed(9)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=48, n_layer=2, n_head=4, n_positions=128,
                                       bos_token_id=1, eos_token_id=2)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    assert not D.llama_like(decoder(model))
    g = torch.Generator().manual_seed(10)
    prefix = torch.randint(3, 97, (13,), generator=g).tolist()
    qs = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (3, 1, 5)]
    kw = dict(max_new_tokens=8, pad_id=0, sample=False, prefix=prefix, stop_ids=[10_000])
    got = generate(model, qs, static=True, **kw)
    assert got == generate(model, qs, static=False, **kw)
    assert len({tuple(r) for r in got}) > 1


@pytest.mark.parametrize("sample", [False, True])
def test_static_step_hands_16_bit_logits_to_the_kernels(static_kernels, monkeypatch, sample):
    """LOGITS_16: a bf16 model's kernels step returns its logits in bf16 (no fp32 copy of [B, V]); the
    argmax and the Triton sampler read them as the fp32 cast they replace: the same tokens as
    with fp32 logits forced, greedy and sampled."""
    import iicl_fast.decode as D
    from iicl_fast import generation
    from iicl_fast.generation import generate
    monkeypatch.setattr(D, "LOGITS_16", True)
    model = _tiny_llama(seed=7).to(torch.bfloat16)
    seen = []
    orig = generation.step_logits

    def spy(h, w, b=None, c=None, fp32=True):
        z = orig(h, w, b, c, fp32)
        seen.append(z.dtype)
        return z
    monkeypatch.setattr(generation, "step_logits", spy)
    g = torch.Generator().manual_seed(8)
    prefix = torch.randint(3, 97, (15,), generator=g).tolist()
    qs = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (3, 1, 4)]
    kw = dict(max_new_tokens=7, pad_id=0, sample=sample, temperature=0.9, top_p=0.9, prefix=prefix,
              stop_ids=[10_000], static=True)
    got = generate(model, qs, generator=torch.Generator().manual_seed(2), **kw)
    assert torch.bfloat16 in seen and torch.float32 in seen       # steps in bf16; the prefill's fp32
    monkeypatch.setattr(generation, "step_logits", lambda h, w, b=None, c=None, fp32=True: orig(h, w, b, c, True))
    assert generate(model, qs, generator=torch.Generator().manual_seed(2), **kw) == got


@pytest.mark.parametrize("add_norm", [True, False])
def test_static_decoder_folds_the_residual_adds_into_the_norms(static_kernels, monkeypatch, add_norm):
    """The fused layers installed (RMSNorm kernels): the Llama step runs every residual add in
    the kernel of the norm after it (2 a layer: 4 a step of the 2-layer model; none with
    ADD_NORM off) and writes the plain loop's tokens (fp32)."""
    import iicl_fast.decode as D
    from iicl_fast import layers
    from iicl_fast.generation import generate
    from iicl_fast.kernels import rmsnorm
    monkeypatch.setattr(layers, "ON_CPU", True)
    monkeypatch.setattr(D, "ADD_NORM", add_norm)
    model = _tiny_llama(seed=5).requires_grad_(False)
    with torch.no_grad():                                  # norms that differ: taking the wrong one shows
        for i, p in enumerate(model.parameters()):
            if p.dim() == 1:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    assert layers.install(model) >= 5                      # 5 norms (+ MLPs, rotary)
    calls = []
    orig = rmsnorm.add_rmsnorm_forward
    monkeypatch.setattr(rmsnorm, "add_rmsnorm_forward", lambda *a: calls.append(1) or orig(*a))
    g = torch.Generator().manual_seed(3)
    prefix = torch.randint(3, 97, (19,), generator=g).tolist()
    qs = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (4, 1, 6)]
    kw = dict(max_new_tokens=9, pad_id=0, sample=False, prefix=prefix, stop_ids=[10_000])
    got = generate(model, qs, static=True, **kw)
    assert len(calls) == (4 * 8 if add_norm else 0)       # 8 decoding steps after the prefill's token
    assert got == generate(model, qs, static=False, **kw)
    layers.uninstall(model)


@pytest.mark.parametrize("fused", [True, False])
def test_static_decoder_prefetches_o_then_gate_up(static_kernels, monkeypatch, fused):
    """PREFETCH_MB: each step, each layer's o projection base weight (LoRA-wrapped here) then
    gate/up's (the fused buffer, else gate's) are prefetched while its attention runs, the budget
    cut where it ends; PREFETCH_KV adds each layer's prefix K and V ahead of it; the tokens are the
    plain loop's and those with it off (fp32); off, or more rows than PREFETCH_MAX_ROWS, nothing
    is prefetched; a bad hint or size is one error."""
    import iicl_fast.decode as D
    from iicl_fast.generation import generate
    from iicl_fast.kernels import l2_prefetch
    model = _lora_tiny(11, ["o_proj", "up_proj"], fused)
    calls = []
    orig = l2_prefetch.l2_prefetch_spans
    monkeypatch.setattr(l2_prefetch, "l2_prefetch_spans", lambda w, n: calls.append((w.data_ptr(), n)) or orig(w, n))
    g = torch.Generator().manual_seed(12)
    prefix = torch.randint(3, 97, (21,), generator=g).tolist()
    qs = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (2, 6, 1)]
    kw = dict(max_new_tokens=8, pad_id=0, sample=False, prefix=prefix, stop_ids=[10_000])
    off = generate(model, qs, static=True, **kw)
    assert not calls
    o_bytes = 48 * 48 * 4
    budget = o_bytes + 1000                                 # all of o, 1,000 bytes of gate/up
    monkeypatch.setattr(D, "PREFETCH_MB", budget / 2 ** 20)
    got = generate(model, qs, static=True, **kw)
    want = []
    for layer in model.base_model.model.model.layers:
        want += [(layer.self_attn.o_proj.base_layer.weight.data_ptr(), o_bytes),
                 (layer.mlp.gate_proj.weight.data_ptr(), 1000)]
    assert calls == want * 7                                # 7 steps after the prefill's token
    assert got == off == generate(model, qs, static=False, **kw)
    calls.clear()
    monkeypatch.setattr(D, "PREFETCH_KV", True)             # + each layer's prefix K and V, before it
    assert generate(model, qs, static=True, **kw) == got
    kv_bytes = 2 * 21 * 8 * 4                                # kv heads × prefix × head dim × fp32
    assert [n for _, n in calls] == [kv_bytes, kv_bytes, o_bytes, 1000] * 2 * 7
    assert len({p for p, n in calls if n == kv_bytes}) == 4  # 2 layers' K and V, the same each step
    calls.clear()
    monkeypatch.setattr(D, "PREFETCH_MAX_ROWS", 2)          # 3 rows
    assert generate(model, qs, static=True, **kw) == got and not calls
    monkeypatch.setattr(D, "PREFETCH_HINT", "first")
    with pytest.raises(D.IICLError, match="IICL_DECODE_PREFETCH_HINT must be one of normal, last"):
        generate(model, qs, static=True, **kw)
    monkeypatch.setattr(D, "PREFETCH_HINT", "normal")
    for bad in ("32MB", "-1", "nan"):
        monkeypatch.setattr(D, "PREFETCH_MB", bad)
        with pytest.raises(D.IICLError, match="IICL_DECODE_PREFETCH_MB must be a number of MiB >= 0"):
            generate(model, qs, static=True, **kw)


@pytest.mark.parametrize("lengths,Hq,Hk", [([1], 2, 2), ([7, 1, 5], 4, 2), ([97, 33, 64], 6, 2)])
def test_varlen_causal_equals_attention_per_sequence(lengths, Hq, Hk):
    """decode.varlen_causal (the packed row's attention; on the CPU SDPA per sequence): each
    sequence attends causally within itself only (float64, against the plain formula)."""
    from iicl_fast.decode import varlen_causal
    g = torch.Generator().manual_seed(sum(lengths))
    T = sum(lengths)
    q, k, v = (torch.randn(T, h, 16, generator=g, dtype=torch.float64) for h in (Hq, Hk, Hk))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    out = varlen_causal(q, k, v, cu, max(lengths), scale=0.3)
    seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    allowed = (seq[:, None] == seq[None]) & torch.ones(T, T, dtype=torch.bool).tril()
    kk, vv = (x.repeat_interleave(Hq // Hk, 1).transpose(0, 1) for x in (k, v))
    s = (q.transpose(0, 1) @ kk.transpose(-1, -2) * 0.3).masked_fill(~allowed, -math.inf)
    torch.testing.assert_close(out, (torch.softmax(s, -1) @ vv).transpose(0, 1), rtol=1e-10, atol=1e-12)


def test_packed_student_hidden_equals_padded(smol_tokenizer):
    """Training's packed row (teacher.student_hidden, packed=True: positions restart at each
    sequence, attention within each) gives the padded batch's hidden states and LoRA gradients."""
    from conftest import TINY_CONFIG, make_tiny

    import iicl_fast
    from iicl_fast.elicit import Entry
    from iicl_fast.teacher import student_hidden
    model = make_tiny(smol_tokenizer)
    mem = iicl_fast.Memory(model, smol_tokenizer, iicl_fast.Config(**TINY_CONFIG))
    for p in mem.params:                       # LoRA B starts at zero: give it a gradient path through A
        torch.nn.init.normal_(p, std=0.02)
    entries = [Entry("qa", "Who built the lighthouse?", [5, 9, 13, 2, 8]),
               Entry("continuation", "Continue: the keeper feeds seven", [7, 1]),
               Entry("qa", "When?", [3, 4, 6, 11, 12, 14, 15])]
    out = {}
    for packed in (False, True):
        for p in mem.params:
            p.grad = None
        h = student_hidden(mem.model, mem.fmt, entries, packed=packed)
        (h * torch.linspace(-1, 1, h.shape[1])).sum().backward()
        out[packed] = (h.detach(), [p.grad.clone() for p in mem.params])
    assert out[True][0].shape == (14, model.config.hidden_size)
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(out[True][1], out[False][1]):      # fp32 sums in another order
        assert b.norm() > 0 and (a - b).norm() <= 1e-5 * b.norm()
    assert model.config._attn_implementation == "sdpa"


def test_packing_is_for_plain_causal_families():
    """decode.packing_unsupported: a Llama with SDPA packs; sliding windows, logit softcapping,
    other attention implementations and unknown families keep padded rows."""
    from transformers import Gemma2Config, GPT2Config, LlamaConfig, MistralConfig
    from transformers import AutoModelForCausalLM

    from iicl_fast.decode import packing_unsupported
    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2)
    llama = AutoModelForCausalLM.from_config(LlamaConfig(**small))
    assert packing_unsupported(llama) is None
    assert "sliding" in packing_unsupported(AutoModelForCausalLM.from_config(MistralConfig(**small, sliding_window=16)))
    assert packing_unsupported(AutoModelForCausalLM.from_config(Gemma2Config(**small, head_dim=8))) is not None
    assert "gpt2" in packing_unsupported(AutoModelForCausalLM.from_config(GPT2Config(n_embd=32, n_layer=1, n_head=4)))
    llama.config._attn_implementation = "eager"
    assert "eager" in packing_unsupported(llama)


def test_blaslt_modes_choose_row_counts(monkeypatch):
    """decode.BLASLT: which steps' GEMMs go through cuBLASLt, by rows; a bad value is one error."""
    import iicl_fast.decode as D
    from iicl_fast.config import IICLError
    for mode, want in (("off", []), ("on", [1, 64, 96, 97, 200, 320, 400]), ("small", [1, 64, 96]),
                       ("rows", [1, 64, 96, 320, 400])):
        monkeypatch.setattr(D, "BLASLT", mode)
        assert [r for r in (1, 64, 96, 97, 200, 320, 400) if D._blaslt(r)] == want, mode
    monkeypatch.setattr(D, "BLASLT", "fast")
    with pytest.raises(IICLError, match="IICL_DECODE_BLASLT must be"):
        D._blaslt(64)
