"""Decoding many rows after one shared prefix (cascade attention).

The prefix's KV is computed once and stored once ([kv_heads, K, head_dim] per layer); each
row's own tokens go in an ordinary per-row cache. Attention is the prefix part (every row's
queries against the one prefix copy: GQA groups and rows stacked into the GEMM's M) plus
the suffix part (per row, masked), merged by their log-sum-exps, as FlashInfer's cascade
attention does. The prefix is never copied per row: at 8B and a 5,000-token prefix a copy
is 0.65 GB a row, and today's per-row copy ran 127 ms a step at 64 rows (issue 12).

    kv = prefix_kv(model, prefix_ids)
    with shared_prefix(model, kv):
        out = body(input_ids=..., attention_mask=suffix_mask, position_ids=K + ...)

Used by generation.generate on CUDA; the CPU keeps the plain path (tests compare both)."""
from __future__ import annotations

import contextlib
import functools
import math
import os

import torch

from . import dist
from .config import IICLError
from .graphs import capture, warm_up

IMPL = "iicl_cascade"
_PREFIX: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
# Rows of the prefix part's score matrix [kv_heads, rows, K] in fp32 taken at a time:
# 8 heads × 16,384 × 5,000 × 4 B = 2.6 GB at the paper's chunk size.
PREFIX_ROWS = 16384
# The rows' own part through the flash op where it applies (_flash_suffix); False: always the
# plain fp32 path (benchmarks compare both).
FLASH_SUFFIX = True
# cuDNN attention: PyTorch keeps one cuDNN plan per input shape, never evicted
# (pytorch/pytorch#190388), and builds one for every new shape. In a stream every chunk has
# its own length: on the H200 a stress stream's process grew ~23 MB of host memory a chunk
# with cuDNN and ~2 MB without, and its phases paid a plan build a chunk (teacher 0.9–1.4 s
# vs 0.55–0.9 s; benchmarks/check_stress_memory.py --no-cudnn). So both are off by default:
# the prefix part of the passes through cuDNN (IICL_CUDNN_PREFIX=1: on, where it checks out;
# it served fixed-shape benchmarks) and cuDNN among the SDPA backends of the library's own
# passes (sdpa_backends; IICL_CUDNN_SDPA=1 leaves PyTorch's choice alone).
CUDNN_PREFIX = os.environ.get("IICL_CUDNN_PREFIX", "0") == "1"
CUDNN_SDPA = os.environ.get("IICL_CUDNN_SDPA", "0") == "1"


def sdpa_backends():
    """A context in which scaled_dot_product_attention picks among the backends enabled now,
    cuDNN's excepted (see CUDNN_SDPA)."""
    if CUDNN_SDPA or not torch.cuda.is_available():
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    b = torch.backends.cuda
    keep = [k for k, on in ((SDPBackend.FLASH_ATTENTION, b.flash_sdp_enabled()),
                            (SDPBackend.EFFICIENT_ATTENTION, b.mem_efficient_sdp_enabled()),
                            (SDPBackend.MATH, b.math_sdp_enabled())) if on]
    return sdpa_kernel(keep or [SDPBackend.MATH])


def without_cudnn_sdpa(fn):
    """fn run inside sdpa_backends() (a decorator for the library's entry points)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with sdpa_backends():
            return fn(*args, **kwargs)
    return run


# Training packs a micro-batch's sequences into one row (teacher.student_hidden): padded to
# the longest, the 8B step's 16 rows were 5.5 % pad tokens (9,488 computed for 8,992 real), all
# of it through every GEMM. Attention then runs per sequence on the packed row (flash's
# variable-length kernel: no pad, no mask). cuDNN, twice as fast at this shape (0.69 vs
# 1.42 ms a layer, benchmarks/bench_train_attention.py), builds a plan of ~100 ms for every new
# shape and keeps it (see CUDNN_SDPA); padded to a multiple of 64 to bound the shapes it took
# 1.16 ms a layer with the copies, and the whole step was no faster (H200).
PACKED_IMPL = "iicl_packed"
_PACKED: dict[str, object] = {}


def varlen_causal(q, k, v, cu: torch.Tensor, max_len: int, scale=None) -> torch.Tensor:
    """Causal attention within each sequence of a packed row: q [T, Hq, d], k / v [T, Hk, d]
    (Hq a multiple of Hk), sequence s at rows cu[s]:cu[s+1] (int32 [S+1] on q's device).
    -> [T, Hq, d]. CUDA in 16 bits (head dim a multiple of 8, ≤ 256): flash's variable-length
    kernel (_varlen_flash); otherwise SDPA per sequence (fp32 has no flash kernel)."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256:
        return _varlen_flash(q, k, v, cu, max_len, scale)
    bounds = cu.tolist()
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (x[a:b].transpose(0, 1) for x in (q, k, v))
        outs.append(torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1]).transpose(0, 1))
    return torch.cat(outs)


def _varlen_flash(q, k, v, cu, max_len, scale):
    """Flash's variable-length kernel through its ATen op (differentiable: its backward is
    aten::_flash_attention_backward), grouped KV heads as they are. torch 2.11's public
    varlen_attn has no grouped heads: k and v repeated per query head cost ~12 ms of copies and
    their gradients' sums a step of the 8B shape (H200 profile, 04299b1)."""
    return torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, max_len, max_len, 0.0, True, False,
                                                   scale=scale)[0]


def _packed_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention function over one packed row (batch 1): query [1, Hq, T, d],
    key / value [1, Hk, T, d], the sequences' bounds from packed_sequences. -> ([1, T, Hq, d], None)."""
    if attention_mask is not None or query.shape[0] != 1 or dropout or kwargs.get("softcap") is not None:
        raise IICLError("packed attention takes one row, no mask, no dropout and no softcap")
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))
    out = varlen_causal(q, k, v, _PACKED["cu"], _PACKED["max_len"], scaling)
    return out[None], None


# Families whose attention goes through transformers' attention interface with (q, k, v) as
# Llama's and whose positions are plain position ids (checked on the GPU: Llama); others keep
# padded rows.
PACKED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3")


def _sharded(model) -> bool:
    from .generation import decoder
    layers = getattr(decoder(model), "layers", None)
    return layers is not None and dist.is_sharded(layers)


def packing_unsupported(model) -> str | None:
    """Why model's training forward cannot be packed (None: it can)."""
    from .generation import causal_lm
    cfg = causal_lm(model).config
    if _sharded(model):
        return "layers sharded by FSDP2"
    if getattr(cfg, "model_type", None) not in PACKED_FAMILIES:
        return f"model type {getattr(cfg, 'model_type', None)!r}"
    if getattr(cfg, "_attn_implementation", None) != "sdpa":
        return f"attention implementation {getattr(cfg, '_attn_implementation', None)!r}"
    if getattr(cfg, "sliding_window", None) or getattr(cfg, "layer_types", None) and \
            any(t != "full_attention" for t in cfg.layer_types):
        return "sliding-window layers"
    if getattr(cfg, "attn_logit_softcapping", None):
        return "attention logit softcapping"
    return None


@contextlib.contextmanager
def packed_sequences(model, cu: torch.Tensor, max_len: int):
    """Inside: model's attention layers attend within the sequences of one packed row
    (cu: int32 [S+1] bounds on the model's device; max_len the longest). The mask builder
    knows no mask for PACKED_IMPL, so transformers passes none (its early exit)."""
    from transformers import AttentionInterface
    AttentionInterface.register(PACKED_IMPL, _packed_attention)
    prev = dict(_PACKED)
    _PACKED.update(cu=cu, max_len=max_len)
    try:
        with _attention_implementation(model, PACKED_IMPL):
            yield
    finally:
        _PACKED.clear()
        _PACKED.update(prev)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    AttentionInterface.register(IMPL, cascade_attention)
    AttentionMaskInterface.register(IMPL, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def _layer_kv(cache, i: int):
    if hasattr(cache, "layers"):
        return cache.layers[i].keys, cache.layers[i].values
    return cache.key_cache[i], cache.value_cache[i]


@torch.no_grad()
def prefix_kv(model, prefix: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The prefix's keys and values per layer, [kv_heads, K, head_dim] each, computed once."""
    from .generation import cache_of, decoder
    device = next(model.parameters()).device
    cache = cache_of(decoder(model)(input_ids=torch.tensor([prefix], device=device), use_cache=True))
    return [tuple(t[0] for t in _layer_kv(cache, i)) for i in range(len(cache))]


def cascade_unsupported(model) -> str | None:
    """Why cascade attention cannot serve this model (None: it can). It computes plain
    scaled-dot-product attention: an attention logit softcap (Gemma-2) or sliding-window
    layers (Mistral, Gemma-2/3) need the model's own attention, so callers fall back to the
    per-row cache path for them."""
    from .generation import causal_lm
    cfg = causal_lm(model).config
    cfg = getattr(cfg, "text_config", None) or cfg
    if _sharded(model):
        return "layers sharded by FSDP2 (the static decoder reads weights outside their forward)"
    if sliding_window(model):
        return "sliding-window attention layers"
    if getattr(cfg, "attn_logit_softcapping", None):
        return "an attention logit softcap"
    return None


def sliding_window(model) -> bool:
    """Whether any attention layer of model sees only a window of recent tokens."""
    from .generation import causal_lm
    cfg = causal_lm(model).config
    cfg = getattr(cfg, "text_config", None) or cfg
    types = getattr(cfg, "layer_types", None)
    if types is not None:
        return any("sliding" in t for t in types)
    return bool(getattr(cfg, "sliding_window", None)) and getattr(cfg, "use_sliding_window", True)


@contextlib.contextmanager
def shared_prefix(model, kv: list[tuple[torch.Tensor, torch.Tensor]]):
    """Inside: every attention layer of model attends to kv (positions 0..K-1) before the
    per-row cache; position ids of the rows' tokens must start at K."""
    from .generation import causal_lm
    why = cascade_unsupported(model)
    if why:
        raise IICLError(f"cascade attention cannot serve {type(causal_lm(model)).__name__}: it has {why}")
    _register()
    prev = dict(_PREFIX)
    _PREFIX.clear()
    _PREFIX.update(dict(enumerate(kv)))
    try:
        with _attention_implementation(model, IMPL):
            yield
    finally:
        _PREFIX.clear()
        _PREFIX.update(prev)


@contextlib.contextmanager
def _attention_implementation(model, name: str):
    """Inside: model's attention layers call the attention function registered as name."""
    from .generation import causal_lm
    cfgs = {id(c): c for c in (causal_lm(model).config, causal_lm(model).get_decoder().config)}.values()
    saved = [(c, c._attn_implementation) for c in cfgs]
    try:
        for c, _ in saved:
            c._attn_implementation = name
        yield
    finally:
        for c, impl in saved:
            c._attn_implementation = impl


def _partial(s: torch.Tensor, v: torch.Tensor):
    """Scores s [..., n, L] (fp32, -inf where masked), values v [..., L, d] ->
    (softmax(s)·v [..., n, d] fp32, lse [..., n, 1]; -inf where a row sees nothing)."""
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = s.sub_(m).exp_()
    l = p.sum(-1, keepdim=True)
    o = torch.matmul(p.to(v.dtype), v).float() / l.clamp_min(1e-30)
    lse = torch.where(l > 0, m + l.log(), torch.full_like(l, -math.inf))
    return o, lse


# cuDNN's fused attention (wgmma on Hopper; PyTorch's own SDPA prefers it there) for the
# prefix part, checked once per process against the flash op on a small input (its LSE
# layout differs between releases); None: not checked yet.
_CUDNN_OK: bool | None = None


def _cudnn_prefix(q, pk, pv, scale):
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q[None].contiguous(), pk[None].contiguous(), pv[None].contiguous(), None, True, 0.0, False, False, scale=scale)
    out, lse = res[0][0], res[1][0]
    if lse.numel() != q.shape[0] * q.shape[1]:
        raise RuntimeError("unexpected log-sum-exp shape")
    return out.float(), lse.reshape(q.shape[0], q.shape[1], 1).float()


def _cudnn_usable(q, pk, pv, scale) -> bool:
    global _CUDNN_OK
    if _CUDNN_OK is None:
        try:
            g = torch.Generator(device=q.device).manual_seed(0)
            qs = torch.randn(2, 333, q.shape[-1], device=q.device, generator=g).to(q.dtype)
            ks, vs = (torch.randn(2, 257, q.shape[-1], device=q.device, generator=g).to(q.dtype) for _ in range(2))
            o1, l1 = _cudnn_prefix(qs, ks, vs, scale)
            o2, l2 = _flash_prefix(qs, ks, vs, scale, cudnn=False)
            _CUDNN_OK = bool((o1 - o2).abs().max() < 2e-2 and (l1 - l2).abs().max() < 2e-2)
        except (RuntimeError, NotImplementedError, TypeError, AttributeError):
            _CUDNN_OK = False
    return _CUDNN_OK


def _flash_prefix(q, pk, pv, scale, cudnn: bool = True):
    """The prefix part through PyTorch's flash-attention op, which returns its log-sum-exp
    (no mask: every query sees the whole prefix). None where it does not apply."""
    if not (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] <= 256):
        return None
    if cudnn and CUDNN_PREFIX and _cudnn_usable(q, pk, pv, scale):
        try:
            return _cudnn_prefix(q, pk, pv, scale)
        except (RuntimeError, NotImplementedError):
            pass
    try:
        res = torch.ops.aten._scaled_dot_product_flash_attention(
            q[None].contiguous(), pk[None].contiguous(), pv[None].contiguous(), 0.0, False, False, scale=scale)
    except (RuntimeError, NotImplementedError):
        return None
    out, lse = res[0][0], res[1][0]
    if lse.shape != q.shape[:2]:
        return None
    return out.float(), lse.float()[..., None]


def attend_prefix(q: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor, scale: float, *, flash: bool = True):
    """q [kvh, N, d] (rows × group × positions stacked), pk/pv [kvh, K, d] ->
    (out [kvh, N, d] fp32, lse [kvh, N, 1])."""
    if flash:
        r = _flash_prefix(q, pk, pv, scale)
        if r is not None:
            return r
    outs, lses = [], []
    for s in range(0, q.shape[1], PREFIX_ROWS):
        sc = torch.matmul(q[:, s: s + PREFIX_ROWS], pk.transpose(1, 2)).float().mul_(scale)
        o, lse = _partial(sc, pv)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, 1), torch.cat(lses, 1)


def _flash_suffix(query, key, value, scale):
    """The rows' own part when they have no cache and no mask (the teacher pass: right-padded
    rows, so under causal attention no real token sees a pad): causal flash attention with its
    log-sum-exp. query [B, H, q, d], key / value [B, kvh, q, d] ->
    (o [B, kvh, g*q, d] fp32, lse [B, kvh, g*q, 1]) in cascade_attention's layout, or None
    where the flash op does not apply. The plain path materialises [B, kvh, g*q, q] fp32
    scores: ~35 GB of traffic per layer for a 32K-token batch of 580-token rows."""
    B, H, q, d = query.shape
    if not (query.is_cuda and query.dtype in (torch.bfloat16, torch.float16) and d <= 256):
        return None
    kvh = key.shape[1]
    g = H // kvh
    if g > 1:                          # the flash op wants as many KV heads as query heads
        key = key[:, :, None].expand(B, kvh, g, q, d).reshape(B, H, q, d)
        value = value[:, :, None].expand(B, kvh, g, q, d).reshape(B, H, q, d)
    try:
        res = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, True, False, scale=scale)
    except (RuntimeError, NotImplementedError):
        return None
    out, lse = res[0], res[1]
    if lse.shape != (B, H, q):
        return None
    return out.reshape(B, kvh, g * q, d).float(), lse.reshape(B, kvh, g * q, 1).float()


def _suffix_mask(attention_mask, B: int, q: int, T: int, device) -> torch.Tensor:
    """-> bool [B, 1, q, T], True = visible (the masking utilities' mask, or causal)."""
    if attention_mask is None:
        i = torch.arange(q, device=device)[:, None] + (T - q)
        return (torch.arange(T, device=device)[None] <= i)[None, None].expand(B, 1, q, T)
    m = attention_mask
    if m.dtype != torch.bool:
        m = m == 0              # additive float mask: 0 where visible
    return m[..., -T:].expand(B, 1, q, T)


def _attend(query, key, value, vis, prefix, scale):
    """query [B, H, q, d]; the rows' own key / value [B, kvh, T, d] with vis bool [B, 1, q, T]
    (True = visible; None: causal flash where it applies); prefix (pk, pv) [kvh, K, d] or None
    -> [B, q, H, d] in query's dtype: the prefix part and the own part merged by log-sum-exps."""
    B, H, q, d = query.shape
    kvh = key.shape[1]
    g = H // kvh
    qg = query.reshape(B, kvh, g * q, d)
    part = _flash_suffix(query, key, value, scale) if vis is None and FLASH_SUFFIX else None
    if part is not None:
        o2, lse2 = part
    else:
        T = key.shape[2]
        if vis is None:
            vis = _suffix_mask(None, B, q, T, query.device)
        s2 = torch.matmul(qg, key.transpose(-1, -2)).float().mul_(scale)       # [B, kvh, g*q, T]
        s2 = s2.view(B, kvh, g, q, T).masked_fill_(~vis[:, :, None], -math.inf).view(B, kvh, g * q, T)
        o2, lse2 = _partial(s2, value)
    if prefix is None:
        o = o2
    else:
        pk, pv = prefix
        o1, lse1 = attend_prefix(qg.transpose(0, 1).reshape(kvh, B * g * q, d), pk, pv, scale)
        o1 = o1.view(kvh, B, g * q, d).transpose(0, 1)
        lse1 = lse1.view(kvh, B, g * q, 1).transpose(0, 1)
        lse = torch.logaddexp(lse1, lse2)
        o = o1 * (lse1 - lse).exp() + o2 * (lse2 - lse).exp()
    return o.to(query.dtype).reshape(B, H, q, d).transpose(1, 2).contiguous()


def cascade_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: query [B, H, q, d]; key / value [B, kvh, T, d] the
    rows' own tokens (their cache); the shared prefix from shared_prefix. -> [B, q, H, d]."""
    B, H, q, d = query.shape
    scale = scaling if scaling is not None else d ** -0.5
    T = key.shape[2]
    vis = None if attention_mask is None and T == q else _suffix_mask(attention_mask, B, q, T, query.device)
    return _attend(query, key, value, vis, _PREFIX[module.layer_idx], scale), None


# --------------------------------------------------------------------------------------------
# The static decoder: all rows of a batch in one preallocated cache, the step captured once.
#
# Each row's own tokens (its left-padded prompt, then what it generates) live in static
# caches [B, kvh, S, d] per layer (S = longest prompt + max_new_tokens). Left padding puts
# every row's next token in the same slot `cur`, a device scalar: a step writes its keys at
# cur, the attention kernel (iicl_fast/kernels/prefix_attention.cascade_decode) reads the shared prefix
# and slots lo[b]..cur, and nothing in the step depends on a host value, so on CUDA it is
# captured as a graph once per batch shape and replayed. Sampling runs on the device
# (iicl_fast/kernels/sampling.py, seeded from a device counter); the host asks whether every row has
# stopped only every STOP_CHECK_EVERY steps, and then drops stopped rows from the batch once
# at most COMPACT_BELOW of it is still going (one more capture, at the smaller shape).
# --------------------------------------------------------------------------------------------

STATIC_IMPL = "iicl_static"
STOP_CHECK_EVERY = 16
COMPACT_BELOW = 0.5
# Prompt tokens per prefill forward: 400 rows of 60 at once put 28.0 GiB at peak on the 8B
# shape, 0.8 over weights + KV + 10 % (benchmarks/NOTES.md); 8,192 keep the MLP's activations
# under 0.7 GB and the GEMMs large.
PREFILL_TOKENS = 8192
# False (IICL_DECODE_GRAPHS=0): eager steps on CUDA too (benchmarks compare; the CPU never captures)
GRAPHS = os.environ.get("IICL_DECODE_GRAPHS", "1") != "0"
LLAMA_STEP = True       # False: Llama-like decoders also step through transformers' forward
# _llama_step folds each residual add into the fused RMSNorm after it (kernels/rmsnorm.
# add_rmsnorm_forward): 65 kernels a step fewer on the 8B shape. With the unrolled merge reads it
# took bench_generate's step (H200, 5,000-token prefix, 128 new) from 6.38 to 6.29 ms at 64 rows,
# 9.87 -> 9.78 at 200, 17.60 -> 17.50 at 400 (28th session, one run each; the graph profile's
# norms 0.148 ms at 64 rows, the 64 adds gone). IICL_DECODE_ADD_NORM=0: the separate add and
# norm (benchmarks compare).
ADD_NORM = os.environ.get("IICL_DECODE_ADD_NORM", "1") != "0"
# _llama_step runs q/k/v and gate/up as one GEMM each where layers.fuse_projections laid their
# weights out so (Memory does on CUDA); IICL_FUSED_PROJ=0: one GEMM a projection (benchmarks).
# Measured (H200, 8B shape, 5,000-token prefix, bench_generate.py --unfused, one run each, 40f0310):
# 64 rows 7.24 -> 6.66 ms a step (the GEMMs stream the weights: fewer, wider ones go faster);
# 400 rows 17.96 -> 18.43 (compute-bound: nothing to gain, cuBLAS's tiles for the wider N
# slower): so up to FUSED_PROJ_MAX_ROWS rows only.
FUSED_PROJ = os.environ.get("IICL_FUSED_PROJ", "1") != "0"
FUSED_PROJ_MAX_ROWS = 256
# An adapter's rank-r factor A in rows that layers.fuse_projections reserves after each group's
# (and adapted o's and down's) weights, so that one GEMM gives x Wᵀ and x Aᵀ (FusedLinears'
# lora_tail), then the product with sB added in place: 2 launches a projection where the LoRA took
# 3, and the x Aᵀ GEMM (M × R outputs over a K of 4,096-14,336: few programs) gone into the
# weights' stream; groups with a tail run as one GEMM at any row count. Why: elicitation decodes
# with θ_{i-1}'s adapter on every linear layer — at 400 rows (projections unfused) 448 extra
# launches a step; the paper chunk's 400-row steps ran 21.6 ms against the table's 19.63 (base
# model). Measured (H100, bench_generate.py --rows 64 400 --new 128 --lora 16 --lora-tail, cad6fd8,
# two runs): 64 rows 8.97 / 8.96 -> 8.04 / 8.03 ms a step (the base's 7.44: the LoRA's cost 1.53 ->
# 0.60), 400 rows 20.17 / 20.18 -> 19.70 / 19.72 (base 17.47). On by default
# (IICL_DECODE_LORA_TAIL=0: the three GEMMs).
LORA_TAIL = os.environ.get("IICL_DECODE_LORA_TAIL", "1") == "1"
# The layers' GEMMs through cuBLASLt rather than cuBLAS (torch's preferred_blas_library, set
# while the step runs, so a graph captures those kernels; the LM head stays on cuBLAS, slower
# through Lt at every size measured). Graph-timed GEMMs of the 8B layers, ms a step (32 layers,
# cuBLAS -> cuBLASLt, H200, benchmarks/tune_decode_gemms.py, 25th session): 64 rows 3.91 -> 3.68,
# 128 4.27 -> 4.31, 200 4.94 -> 5.11, 256 5.55 -> 5.48, 320 6.75 -> 6.58, 400 9.41 -> 8.82 (cuBLAS
# runs 400 rows as slowly as 512); bench_generate's step 6.36 -> 6.13 ms at 64 rows, 17.57 ->
# 17.32 at 400. But the paper chunk's elicitation, which captures a step for every batch size
# its compaction leaves, took 18.41 s with "rows" against 13.87 s with "off" (peak 59.3 / 57.0
# GiB; bench_consolidate.py, one H200, 9c81f39). Since (31st session, fcb0f89, H200): the layers'
# GEMMs at the row counts a compaction leaves (tune_decode_gemms --lean) Lt wins at 61-97 and
# 387-400 rows, loses at 203; bench_generate 64 rows 6.11 -> 5.89 ms, 400 rows 17.12 -> 16.93.
# Default "small": Lt at <= 96 rows only, where the gain is largest and the paper chunk's
# batches (200 and 400 rows) do not go until their tails. "off" | "rows" (Lt at <= 96 and >= 320
# rows) | "small" | "on" (Lt at any row count); IICL_DECODE_BLASLT sets it.
BLASLT = os.environ.get("IICL_DECODE_BLASLT", "small")


def _blaslt(rows: int) -> bool:
    """Whether a step of `rows` rows runs its layers' GEMMs through cuBLASLt (BLASLT)."""
    if BLASLT not in ("off", "rows", "small", "on"):
        raise IICLError(f"IICL_DECODE_BLASLT must be off, rows, small or on; got {BLASLT!r}")
    return BLASLT == "on" or (BLASLT in ("rows", "small") and rows <= 96) or (BLASLT == "rows" and rows >= 320)


@contextlib.contextmanager
def _blas(lt: bool):
    """torch's preferred BLAS library set to cuBLASLt inside (lt), restored after."""
    if not lt:
        yield
        return
    before = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library("cublaslt")
    try:
        yield
    finally:
        torch.backends.cuda.preferred_blas_library(before)
# The step's layer GEMMs (q/k/v, o, gate/up, down; not the LM head) for at most SKINNY_MAX_ROWS
# rows through kernels/skinny_gemm.py (columns a program and K split, so narrow outputs fill
# the GPU) instead of cuBLAS, for 16-bit weights: cuBLAS streams the 8B q/k/v at 2.9 TB/s and
# down at 3.3 where gate/up reaches 3.85 (64 rows, tune_decode_gemms.py, gemm_variants_ae8b4a0):
# at 3.9 TB/s the two would save ~0.3 ms of the 6.1 ms step. Not yet measured on the GPU
# (benchmarks/tune_skinny_gemm.py; bench_generate.py --gemm): "cublas" by default, "triton"
# (IICL_DECODE_GEMM=triton) to measure.
GEMM = os.environ.get("IICL_DECODE_GEMM", "cublas")
SKINNY_MAX_ROWS = 128
# A kernels step hands its logits to the argmax / the Triton sampler in the LM head's dtype
# rather than as an fp32 copy (generation.step_logits fp32=False: the same values, the readers
# upcast): at 400 rows of the 8B vocabulary the copy was 0.15 ms of the 17 ms step and the
# sampler read twice the bytes (profile_decode, 28th session). Measured (H200, bench_generate,
# fcb0f89, ms a step, warm): 64 rows 6.10 -> 6.07, 400 rows 17.10 -> 16.98; its GPU test draws
# the same tokens. On by default (IICL_DECODE_LOGITS16=0: fp32 logits).
LOGITS_16 = os.environ.get("IICL_DECODE_LOGITS16", "1") == "1"


def _skinny_gemm(rows: int, dtype: torch.dtype, on_cuda: bool):
    """The GEMM a step of `rows` rows hands its FusedLinears (GEMM): skinny_gemm's launcher,
    or None for torch.mm. On the CPU (the interpreter's tests) any float dtype."""
    if GEMM not in ("cublas", "triton"):
        raise IICLError(f"IICL_DECODE_GEMM must be cublas or triton; got {GEMM!r}")
    if GEMM != "triton" or rows > SKINNY_MAX_ROWS or (on_cuda and dtype not in (torch.float16, torch.bfloat16)):
        return None
    from .kernels.skinny_gemm import skinny_linear
    return skinny_linear


# The decoding step's prefix part through PyTorch's flash op (_flash_prefix; cuDNN where
# IICL_CUDNN_PREFIX=1) instead of the Triton prefix kernel, from FLASH_PREFIX_MIN_M query vectors
# a KV head (rows × group) on: at 400 rows the Triton tiles run at ~260 TFLOP/s (3.96 of 20.1 ms a step,
# eighth session); below ~1,024 the flash op has too few query blocks to fill the GPU (it does not
# split the prefix). Off (IICL_DECODE_FLASH_PREFIX=1: on): measured slower through the flash op at
# 400 rows (H100, 122c916: 19.55 ms a step against 17.70), 1.5 % faster through cuDNN (17.43; with
# IICL_CUDNN_PREFIX=1), which builds a plan for each new shape (~100 ms each at the training
# shapes, 16th session; every row count a compaction leaves would pay one), so not adopted.
FLASH_PREFIX = os.environ.get("IICL_DECODE_FLASH_PREFIX", "0") == "1"
FLASH_PREFIX_MIN_M = 1024
# The o projection's weights (then gate/up's, while the budget lasts) brought into L2 on a side
# stream while a layer's attention runs (kernels/l2_prefetch.py): at 64 rows of the 8B shape the
# attention reads ~40 MB a layer at ~1.2 TB/s for ~34 µs and the o GEMM then streams 32 MB of
# weights (graph profile, 29th session). Predicted −0.1 to −0.15 ms a step at 64 rows (~5 µs of
# o's ~9 a layer); nothing where the GEMMs are compute-bound (400 rows). PREFETCH_MB: MiB a layer
# (IICL_DECODE_PREFETCH_MB; 0, off, until measured on the GPU), at most PREFETCH_MAX_ROWS rows;
# PREFETCH_HINT (IICL_DECODE_PREFETCH_HINT) "normal" or "last" (the lines marked evict-last).
# PREFETCH_KV (IICL_DECODE_PREFETCH_KV=1): the next layer's prefix K and V (20 MB at 5,000 tokens)
# during this layer's MLP, so that the latency-bound prefix part (~18 µs a layer for 20 MB at 64
# rows) reads them from L2; it moves bytes the MLP's stream pays for (~5 µs) out of the attention.
# Measured (H100, 122c916, results/generate_prefetch_h100_122c916.json): every setting slower —
# 64 rows 7.45 ms a step → 7.65–7.93, 128 rows 8.76 → 8.95–9.24 (the side stream's reads compete
# with the GEMMs' for HBM instead of filling idle time). So off, and kept only as a measured option.
PREFETCH_MB = os.environ.get("IICL_DECODE_PREFETCH_MB", "0")      # checked by _prefetch_plan
PREFETCH_HINT = os.environ.get("IICL_DECODE_PREFETCH_HINT", "normal")
PREFETCH_KV = os.environ.get("IICL_DECODE_PREFETCH_KV", "0") == "1"
PREFETCH_MAX_ROWS = 128
# Benchmarks: a list that every generate_static call without its own stats appends its phase
# times to (prefill_s, capture_s, decode_s, steps, batches; a sync at each phase end), so a
# chunk's elicitation can be split into its calls' parts (bench_consolidate.py). None: off.
STATS: list | None = None
_STATIC: list = [None]  # the active _Static


def _decode_prefix(query_vectors: int):
    """cascade_decode's prefix= for a step of query_vectors a KV head (rows × group): the flash op
    (FLASH_PREFIX, from FLASH_PREFIX_MIN_M on), else None (the Triton prefix kernel)."""
    return _flash_prefix if FLASH_PREFIX and query_vectors >= FLASH_PREFIX_MIN_M else None


class _Static:
    """What the static attention function reads: per-layer prefix (pk, pv) or None, per-layer
    caches ks / vs [B, kvh, S, d], lo int32 [B] (each row's first real slot), cur int32 [1]
    (the slot this call writes first), n (cur's value on the host, for the eager paths),
    kernels (decoding steps through the Triton kernel; False: the plain path)."""

    def __init__(self, prefix, ks, vs, lo, kernels):
        self.prefix, self.ks, self.vs, self.lo, self.kernels = prefix, ks, vs, lo, kernels
        self.cur = torch.zeros(1, dtype=torch.int32, device=lo.device)
        self.n = 0
        self.offsets = torch.arange(ks[0].shape[2], device=lo.device)


def static_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function of the static decoder: writes key / value [B, kvh, q, d]
    into the layer's cache at slots cur..cur+q-1, then attends to the prefix and to each
    row's slots lo[b]..(its own slot) -> [B, q, H, d]."""
    st = _STATIC[0]
    i = module.layer_idx
    ks, vs = st.ks[i], st.vs[i]
    B, H, q, d = query.shape
    scale = scaling if scaling is not None else d ** -0.5
    slots = st.offsets[:q] + st.cur
    ks.index_copy_(2, slots, key)
    vs.index_copy_(2, slots, value)
    prefix = st.prefix[i] if st.prefix is not None else None
    if q == 1 and st.kernels:
        from .kernels.prefix_attention import cascade_decode
        pk, pv = prefix if prefix is not None else (None, None)
        return cascade_decode(query[:, :, 0], pk, pv, ks, vs, st.lo, st.cur, scale,
                              prefix=_decode_prefix(B * H // ks.shape[1]))[:, None], None
    T = st.n + q                                        # eager: the host knows cur
    j = st.offsets[:T]
    own = st.n + st.offsets[:q]
    vis = (j[None, None, :] >= st.lo[:, None, None]) & (j[None, None, :] <= own[None, :, None])
    return _attend(query, ks[:, :, :T], vs[:, :, :T], vis[:, None], prefix, scale), None


def _no_mask(*args, **kwargs):
    return None     # static_attention masks by lo / cur itself


_MASK_FREE: list = []


def _mask_free_for_unregistered() -> bool:
    """Whether transformers builds no mask at all for an attention implementation with no
    mask function registered. Registering one costs more than the mask: its preprocessing
    asks the device whether position ids hold packed sequences (a host sync per forward)."""
    if not _MASK_FREE:
        import inspect

        from transformers import masking_utils
        fn = getattr(masking_utils, "_preprocess_mask_arguments", None)
        _MASK_FREE.append(fn is not None and "_global_mapping" in inspect.getsource(fn))
    return _MASK_FREE[0]


@contextlib.contextmanager
def _static_mode(model, st: _Static):
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(STATIC_IMPL, static_attention)
    if not _mask_free_for_unregistered():
        AttentionMaskInterface.register(STATIC_IMPL, _no_mask)
    prev = _STATIC[0]
    _STATIC[0] = st
    try:
        with _attention_implementation(model, STATIC_IMPL):
            yield
    finally:
        _STATIC[0] = prev


def _dims(model):
    from .generation import causal_lm
    cfg = causal_lm(model).config
    cfg = getattr(cfg, "text_config", None) or cfg
    heads = cfg.num_attention_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, getattr(cfg, "num_key_value_heads", None) or heads, d


_LLAMA_SOURCES: dict = {}


def llama_like(body) -> bool:
    """Whether body (a transformers decoder) computes exactly Llama's decoder: its model, layer
    and attention forwards are Llama's (sources compared, class names aside), no q/k norms.
    Then _llama_step runs a decoding step from its modules with fused glue."""
    from transformers.models.llama import modeling_llama as m

    from .layers import _source
    if not all(hasattr(body, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return False
    if not _LLAMA_SOURCES:
        _LLAMA_SOURCES.update(model=_source(m.LlamaModel), layer=_source(m.LlamaDecoderLayer),
                              attn=_source(m.LlamaAttention))
    try:
        if _source(type(body)) != _LLAMA_SOURCES["model"]:
            return False
        for layer in body.layers:
            if (_source(type(layer)) != _LLAMA_SOURCES["layer"] or _source(type(layer.self_attn)) != _LLAMA_SOURCES["attn"]
                    or getattr(layer.self_attn, "q_norm", None) is not None):
                return False
    except (OSError, TypeError):
        return False
    return True


def _fused_groups(body, rows: int):
    """Per layer of a llama_like body: (q/k/v, gate/up) as layers.FusedLinears, each None
    where its weights are not laid out in one buffer, or past FUSED_PROJ_MAX_ROWS rows unless
    LORA_TAIL takes its adapter (then the modules run)."""
    from .layers import FusedLinears, is_llama_mlp

    def keep(f):
        if f is not None:
            f.lora_tail = LORA_TAIL
        return f if f is not None and (rows <= FUSED_PROJ_MAX_ROWS or (LORA_TAIL and f.tail_fits())) else None
    out = []
    for layer in body.layers:
        a, mlp = layer.self_attn, layer.mlp
        out.append((keep(FusedLinears.of([a.q_proj, a.k_proj, a.v_proj])),
                    keep(FusedLinears.of([mlp.gate_proj, mlp.up_proj])) if is_llama_mlp(mlp) else None))
    return out


def _singles(body, gemm):
    """Per layer of a llama_like body: (o, down) as one-member layers.FusedLinears where `gemm`
    (_skinny_gemm) runs them or LORA_TAIL takes their adapter, each None elsewhere or where
    FusedLinears cannot compute it (the module runs)."""
    from .layers import FusedLinears, is_llama_mlp

    def keep(f):
        if f is None:
            return None
        f.gemm, f.lora_tail = gemm, LORA_TAIL
        return f if gemm is not None or (LORA_TAIL and f.tail_fits()) else None
    return [(keep(FusedLinears.of([layer.self_attn.o_proj])),
             keep(FusedLinears.of([layer.mlp.down_proj])) if is_llama_mlp(layer.mlp) else None)
            for layer in body.layers]


def _prefetch_plan(body, fused, st: _Static, rows: int):
    """What a step of a llama_like body prefetches into L2, or None (off, or more than
    PREFETCH_MAX_ROWS rows): {"o": per layer [(weight, bytes)] that PREFETCH_MB MiB cover during
    its attention — the o projection's base weight first, then gate/up's (the fused buffer, else
    gate's) — or None; "kv": per layer [(prefix K, bytes), (prefix V, bytes)] (PREFETCH_KV), to
    prefetch during the layer before's MLP, or None}."""
    from .kernels.l2_prefetch import HINTS
    from .layers import _base_and_adapter, is_llama_mlp
    if PREFETCH_HINT not in HINTS:
        raise IICLError(f"IICL_DECODE_PREFETCH_HINT must be one of {', '.join(HINTS)}; got {PREFETCH_HINT!r}")
    try:
        mib = float(PREFETCH_MB)
    except ValueError:
        mib = -1.0
    if not mib >= 0:
        raise IICLError(f"IICL_DECODE_PREFETCH_MB must be a number of MiB >= 0; got {PREFETCH_MB!r}")
    if rows > PREFETCH_MAX_ROWS:
        return None
    o = kv = None
    if mib > 0:
        o = []
        for i, layer in enumerate(body.layers):
            gate_up = fused[i][1] if fused is not None else None
            mods = [layer.self_attn.o_proj] + ([layer.mlp.gate_proj] if gate_up is None and is_llama_mlp(layer.mlp) else [])
            ws = [p[0].weight for p in map(_base_and_adapter, mods) if p is not None]
            o.append(_spans(ws + ([gate_up.weight] if gate_up is not None else []), int(mib * 2 ** 20)))
    if PREFETCH_KV and st.prefix is not None:
        kv = [_spans(list(pair), 1 << 62) for pair in st.prefix]
    o, kv = (x if x is not None and any(x) else None for x in (o, kv))
    return {"o": o, "kv": kv} if o or kv else None


def _spans(ws: list, budget: int):
    """[(w, bytes)] covering ws in order until budget bytes run out (contiguous ones), or None."""
    spans = []
    for w in ws:
        n = min(budget, w.numel() * w.element_size())
        if n >= 16 and w.is_contiguous():
            spans.append((w, n))
            budget -= n
    return spans or None


def _prefetch_start(spans):
    """spans' L2 prefetches on the prefetch stream, ordered after the current stream's work so
    far (the GEMM that read this layer's q/k/v) -> that stream, for _prefetch_join. On the CPU
    the interpreter runs the same kernel recording its spans, inline (tests) -> None."""
    from .kernels.l2_prefetch import l2_prefetch, l2_prefetch_spans
    dev = spans[0][0].device
    if dev.type != "cuda":
        for w, n in spans:
            l2_prefetch_spans(w, n)
        return None
    from .graphs import prefetch_stream
    ps = prefetch_stream(dev)
    ps.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(ps):
        for w, n in spans:
            l2_prefetch(w, n, PREFETCH_HINT)
    return ps


def _prefetch_join(ps) -> None:
    """The current stream waits for _prefetch_start's prefetches (a capture must join every fork)."""
    if ps is not None:
        torch.cuda.current_stream(ps.device).wait_stream(ps)


def _llama_step(body, st: _Static, tok, pos, fused=None, singles=None, prefetch=None):
    """One decoding step of a Llama-like decoder (llama_like), tok / pos [B] -> the final-normed
    hidden states [B, hidden]. The modules (norms, projections with any LoRA, MLP) are the
    model's own; between them one kernel rotates q and k and writes the caches
    (iicl_fast/kernels/rotary.py) and three do the attention (iicl_fast/kernels/prefix_attention.cascade_decode):
    ~16 kernels a layer where transformers' forward launched ~45 (measured: the small ones
    were ~2.3 ms of a 9.2 ms step at 64 rows, more than the attention itself). fused:
    _fused_groups(body, rows) (None: the modules), q/k/v and gate/up one GEMM each where laid out;
    singles: _singles(body, gemm) (None: the modules), o and down through that GEMM or their tail;
    prefetch: _prefetch_plan(...) (None: no L2 prefetch)."""
    B = tok.shape[0]
    prefix_fn = _decode_prefix(B * body.config.num_attention_heads // body.config.num_key_value_heads)
    h = body.embed_tokens(tok)
    cos, sin = body.rotary_emb(h[:, None], pos[:, None])
    cos, sin = cos[:, 0], sin[:, 0]
    with _blas(h.is_cuda and h.dtype != torch.float32 and _blaslt(B)):     # fp32: as measured before
        return _llama_layers(body, st, h, cos, sin, prefix_fn, fused, singles, prefetch)


def _add_norms(body, h):
    """[(weight, eps)] of every norm that follows a residual add in the step (each layer's
    post-attention norm, the next layer's input norm, the final norm, in that order) when
    ADD_NORM is on and all are installed fused RMSNorms (layers.fused_norm), else None."""
    from .layers import fused_norm
    if not ADD_NORM:
        return None
    ls = body.layers
    mods = [m for i, layer in enumerate(ls)
            for m in (layer.post_attention_layernorm, ls[i + 1].input_layernorm if i + 1 < len(ls) else body.norm)]
    got = [fused_norm(m, h) for m in mods]
    return None if any(g is None for g in got) else got


def _llama_layers(body, st: _Static, h, cos, sin, prefix_fn, fused, singles=None, prefetch=None):
    """_llama_step's decoder layers and final norm: h [B, hidden] -> normed h [B, hidden]. Where
    the norms allow (_add_norms) each residual add runs in the kernel of the norm after it;
    prefetch (_prefetch_plan): into L2 on a side stream, each layer's "o" spans while its attention
    runs, the next layer's "kv" spans while its MLP runs."""
    from .kernels.prefix_attention import cascade_decode
    from .kernels.rmsnorm import add_rmsnorm_forward
    from .kernels.rotary import rope_write
    from .kernels.swiglu import swiglu_packed
    B = h.shape[0]
    norms = _add_norms(body, h)
    o_plan, kv_plan = (prefetch["o"], prefetch["kv"]) if prefetch is not None else (None, None)
    kv_ps = _prefetch_start(kv_plan[0]) if kv_plan and kv_plan[0] else None
    x = body.layers[0].input_layernorm(h)
    for i, layer in enumerate(body.layers):
        a = layer.self_attn
        qkv, gate_up = fused[i] if fused is not None else (None, None)
        o_proj, down = singles[i] if singles is not None else (None, None)
        o_proj = a.o_proj if o_proj is None else o_proj
        down = layer.mlp.down_proj if down is None else down
        if i and norms is None:
            x = layer.input_layernorm(h)
        if qkv is None:
            q = rope_write(a.q_proj(x), a.k_proj(x), a.v_proj(x), cos, sin, st.ks[i], st.vs[i], st.cur)
        else:
            q = rope_write(*qkv(x).split(qkv.sizes, dim=-1), cos, sin, st.ks[i], st.vs[i], st.cur)
        _prefetch_join(kv_ps)                   # before o's fork: that join would wait for o's too
        ps = _prefetch_start(o_plan[i]) if o_plan and o_plan[i] else None
        pk, pv = st.prefix[i] if st.prefix is not None else (None, None)
        o = cascade_decode(q, pk, pv, st.ks[i], st.vs[i], st.lo, st.cur, a.scaling, prefix=prefix_fn)
        _prefetch_join(ps)
        y = o_proj(o.view(B, -1))
        nxt = kv_plan[i + 1] if kv_plan and i + 1 < len(kv_plan) else None
        kv_ps = _prefetch_start(nxt) if nxt else None
        if norms is None:
            h = h + y
            x = layer.post_attention_layernorm(h)
        else:
            h, x = add_rmsnorm_forward(h, y, *norms[2 * i])
        y = layer.mlp(x) if gate_up is None else down(swiglu_packed(gate_up(x)))
        if norms is None:
            h = h + y
        else:                                   # the next layer's input norm, or the final norm
            h, x = add_rmsnorm_forward(h, y, *norms[2 * i + 1])
    return body.norm(h) if norms is None else x


class _Step:
    """One decoding step of the batch: tok [B] and pos [B] in -> fp32 logits [B, V] (and .h,
    the hidden states [B, H] they came from); on CUDA (graphs) captured once and replayed, else
    run eagerly. Llama-like decoders with the
    kernels on take _llama_step; others their own forward through static_attention."""

    def __init__(self, model, st: _Static, B: int, graph: bool, pool):
        from .generation import decoder, lm_head
        self.body, self.head = decoder(model), lm_head(model)
        self.st = st
        self.llama = st.kernels and LLAMA_STEP and llama_like(self.body)
        self.fused = _fused_groups(self.body, B) if self.llama and FUSED_PROJ else None
        w = self.body.embed_tokens.weight if self.llama else None       # llama_like bodies have it
        gemm = _skinny_gemm(B, w.dtype, w.is_cuda) if self.llama else None
        self.singles = _singles(self.body, gemm) if self.llama and (gemm is not None or LORA_TAIL) else None
        self.prefetch = _prefetch_plan(self.body, self.fused, st, B) if self.llama else None
        if gemm is not None:
            for f in [f for pair in (self.fused or []) for f in pair if f is not None]:
                f.gemm = gemm
        dev = st.lo.device
        self.tok = torch.zeros(B, dtype=torch.long, device=dev)
        self.pos = torch.zeros(B, dtype=torch.long, device=dev)
        self.graph = None
        if graph:
            warm_up(self._run, device=dev)      # compiles kernels, fills LoRA casts (it writes
            self.graph = torch.cuda.CUDAGraph()  # slot cur, which the replay rewrites)
            with capture(self.graph, pool, device=dev):
                self.out = self._run()

    def _run(self):
        from .generation import step_logits
        if self.llama:
            h = _llama_step(self.body, self.st, self.tok, self.pos, self.fused, self.singles, self.prefetch)
        else:
            h = self.body(input_ids=self.tok[:, None], position_ids=self.pos[:, None],
                          use_cache=False).last_hidden_state[:, -1]
        self.h = h                              # [B, H], the final norm's output (a graph's: rewritten each replay)
        return step_logits(h, *self.head, fp32=not (self.st.kernels and LOGITS_16))   # the kernels' readers upcast

    def __call__(self, tok, pos):
        self.tok.copy_(tok)
        self.pos.copy_(pos)
        if self.graph is None:
            return self._run()
        self.graph.replay()
        return self.out


def _choose(z, sample, temperature, top_p, seed, generator, kernels, keys=None, keyed=None):
    """logits [B, V] (fp32; the weight's dtype from a kernels step) -> tokens [B] on the device:
    argmax, or a nucleus draw (the Triton
    sampler advancing the device seed, or generation.next_token where kernels are off).
    keys [B]: the rows' draw keys (keyed sampling); keyed: (seed, step) for the plain path."""
    if not sample:
        return z.argmax(-1)
    if kernels:
        from .kernels.sampling import sample_top_p
        tok = sample_top_p(z, seed, temperature, top_p, keys=keys)
        seed.add_(1)
        return tok
    from .generation import keyed_next_token, next_token
    if keys is not None:
        return keyed_next_token(z, temperature, top_p, keyed[0], keys.tolist(), keyed[1]).to(z.device)
    return next_token(z, True, temperature, top_p, generator)


@torch.no_grad()
def generate_static(model, prompts: list[list[int]], *, prefix: list[tuple[torch.Tensor, torch.Tensor]] | None,
                    max_new_tokens: int, pad_id: int, stops: torch.Tensor, sample: bool, temperature: float = 1.0,
                    top_p: float = 1.0, generator=None, min_new_tokens: int = 0, progress=None,
                    kernels: bool | None = None, graphs: bool | None = None, stats: dict | None = None,
                    keyed_seed: int | None = None, row_keys: list[int] | None = None, hidden: bool = False):
    """Continuations of [prefix; prompt] for each prompt, all rows in one batch (callers split
    larger sets): prefix is prefix_kv's output (None: no shared prefix), stops the stop ids
    (a device tensor). kernels (default: on CUDA) runs decoding steps' attention and sampling
    through the Triton kernels; graphs (default: on CUDA) captures the step. stats (a dict,
    for benchmarks: synchronises at phase ends) gets prefill_s, capture_s, decode_s (the
    steps, their captures not included), steps and batch sizes. Returns each continuation's ids up to
    and including its first stop id, if one came. keyed_seed, row_keys: draws keyed by row
    (generation.generate). hidden: (ids, each row's hidden states [len(ids), H]) as
    generation.generate: a [B, max_new_tokens, H] buffer in the model's dtype (400 rows × 512
    tokens of the 8B shape: 1.7 GB) that each step's state is copied into (3.3 MB a step)."""
    from .generation import causal_lm, decoder, lm_head, pad_left, step_logits
    device = next(model.parameters()).device
    dtype = causal_lm(model).get_input_embeddings().weight.dtype
    kernels = device.type == "cuda" if kernels is None else kernels
    graphs = device.type == "cuda" and GRAPHS if graphs is None else graphs
    graphs = graphs and kernels        # the plain attention path reads cur from the host: never captured
    L, kvh, d = _dims(model)
    K = prefix[0][0].shape[1] if prefix else 0
    # batch rows longest prompt first, so that each prefill slice is cut to its own longest
    # prompt (the paper preset's answer prompts: 64-token questions and ~18-token continuation
    # prompts, 40 % of a 400-row batch's prefill was left padding). rows maps them back.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    ids, mask = pad_left([prompts[i] for i in order], pad_id, device)
    B, P = ids.shape
    S = P + max_new_tokens
    lengths = mask.sum(1)
    st = _Static(prefix, [torch.zeros(B, kvh, S, d, device=device, dtype=dtype) for _ in range(L)],
                 [torch.zeros(B, kvh, S, d, device=device, dtype=dtype) for _ in range(L)],
                 (P - lengths).to(torch.int32), kernels)
    seed = keys = None
    if sample and keyed_seed is not None:
        keys = torch.tensor(list(range(B)) if row_keys is None else row_keys, dtype=torch.int64, device=device)
        seed = torch.tensor([keyed_seed % 2 ** 62], dtype=torch.int64, device=device)
    elif sample and kernels:     # the draws' seed, itself drawn from the caller's generator
        seed = torch.randint(0, 2 ** 62, (1,), device=device, generator=generator)
    rows = torch.tensor(order, device=device)               # batch row -> prompt index
    toks = torch.full((max_new_tokens, B), -1, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    pool = None   # each capture its own pool: reusing one after its graph was freed tripped an allocator assert
    if stats is None and STATS is not None:
        stats = {"rows": B, "prompt_tokens": sum(map(len, prompts))}
        STATS.append(stats)
    clock = _Clock(device, stats)
    with _static_mode(model, st):
        pos = K + (mask.cumsum(1) - 1).clamp(min=0)
        zs, hs = [], []
        widths = [max(1, len(prompts[i])) for i in order]
        s = padded = 0
        while s < B:                             # prompts in slices of rows: views of the caches,
            w = widths[s]                        # each slice its last w slots (the rest is padding)
            e = min(B, s + max(1, PREFILL_TOKENS // w))
            part = _Static(prefix, [k[s:e] for k in st.ks], [v[s:e] for v in st.vs], st.lo[s:e], kernels)
            part.cur.fill_(P - w)
            part.n = P - w
            with _static_mode(model, part):
                h = decoder(model)(input_ids=ids[s:e, P - w:], position_ids=pos[s:e, P - w:],
                                   use_cache=False).last_hidden_state[:, -1]
            zs.append(step_logits(h, *lm_head(model)))
            hs.append(h)
            padded += (e - s) * w
            s = e
        if stats is not None:
            stats["padded_prompt_tokens"] = padded
        z = zs[0] if len(zs) == 1 else torch.cat(zs)
        h = hs[0] if len(hs) == 1 else torch.cat(hs)
        hid = h.new_empty(B, max_new_tokens, h.shape[-1]) if hidden else None
        del zs, hs
        st.cur.fill_(P)
        st.n = P
        next_pos = K + lengths
        clock.lap("prefill_s")
        step = None
        for t in range(max_new_tokens):
            if t < min_new_tokens:
                z.index_fill_(1, stops, float("-inf"))
            tok = _choose(z, sample, temperature, top_p, seed, generator, kernels,
                          None if keys is None else keys.index_select(0, rows), (keyed_seed, t))
            toks[t].index_copy_(0, rows, torch.where(done, -1, tok))
            if hid is not None:
                hid[:, t].index_copy_(0, rows, h)          # before the next step rewrites a graph's h
            done |= torch.isin(tok, stops)
            if t + 1 == max_new_tokens:
                break
            if (t + 1) % STOP_CHECK_EVERY == 0:
                live = int((~done).sum())
                if live == 0:
                    break
                if live <= COMPACT_BELOW * done.numel():
                    keep = (~done).nonzero().flatten()
                    st.ks = [k.index_select(0, keep) for k in st.ks]
                    st.vs = [v.index_select(0, keep) for v in st.vs]
                    st.lo, rows, tok, next_pos, done = (x.index_select(0, keep) for x in (st.lo, rows, tok, next_pos, done))
                    step = None
            if step is None:
                clock.lap("decode_s")
                step = _Step(model, st, done.numel(), graphs, pool)
                clock.lap("capture_s", batch=done.numel())
            z = step(tok, next_pos)
            h = step.h
            st.cur.add_(1)
            st.n += 1
            next_pos = next_pos + 1
        clock.lap("decode_s", steps=t + 1)
    if progress is not None:
        progress.update(B)
    out = [[x for x in row if x >= 0] for row in toks.t().tolist()]
    return (out, [hid[i, :len(r)] for i, r in enumerate(out)]) if hidden else out


class _Clock:
    """Phase times into a stats dict (None: does nothing, never synchronises)."""

    def __init__(self, device, stats):
        import time
        self.time, self.device, self.stats = time.perf_counter, device, stats
        self.t = self.time()
        if stats is not None:
            stats.update(prefill_s=0.0, capture_s=0.0, decode_s=0.0, steps=0, batches=[])

    def lap(self, key, steps=None, batch=None):
        if self.stats is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = self.time()
        self.stats[key] += now - self.t
        self.t = now
        if steps is not None:
            self.stats["steps"] = steps
        if batch is not None:
            self.stats["batches"].append(batch)
