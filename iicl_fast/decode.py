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
import math

import torch

from .config import IICLError

IMPL = "iicl_cascade"
_PREFIX: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
# Rows of the prefix part's score matrix [kv_heads, rows, K] in fp32 taken at a time:
# 8 heads × 16,384 × 5,000 × 4 B = 2.6 GB at the paper's chunk size.
PREFIX_ROWS = 16384
# The rows' own part through the flash op where it applies (_flash_suffix); False: always the
# plain fp32 path (benchmarks compare both).
FLASH_SUFFIX = True
CUDNN_PREFIX = True          # the prefix part through cuDNN's attention where it checks out


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
    cfgs = {id(c): c for c in (causal_lm(model).config, causal_lm(model).get_decoder().config)}.values()
    saved = [(c, c._attn_implementation) for c in cfgs]
    prev = dict(_PREFIX)
    _PREFIX.clear()
    _PREFIX.update(dict(enumerate(kv)))
    try:
        for c, _ in saved:
            c._attn_implementation = IMPL
        yield
    finally:
        for c, impl in saved:
            c._attn_implementation = impl
        _PREFIX.clear()
        _PREFIX.update(prev)


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


def cascade_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: query [B, H, q, d]; key / value [B, kvh, T, d] the
    rows' own tokens (their cache); the shared prefix from shared_prefix. -> [B, q, H, d]."""
    B, H, q, d = query.shape
    pk, pv = _PREFIX[module.layer_idx]
    kvh = pk.shape[0]
    g = H // kvh
    scale = scaling if scaling is not None else d ** -0.5
    qg = query.reshape(B, kvh, g * q, d)
    o1, lse1 = attend_prefix(qg.transpose(0, 1).reshape(kvh, B * g * q, d), pk, pv, scale)
    o1 = o1.view(kvh, B, g * q, d).transpose(0, 1)
    lse1 = lse1.view(kvh, B, g * q, 1).transpose(0, 1)
    T = key.shape[2]
    part = _flash_suffix(query, key, value, scale) if FLASH_SUFFIX and attention_mask is None and T == q else None
    if part is not None:
        o2, lse2 = part
    else:
        s2 = torch.matmul(qg, key.transpose(-1, -2)).float().mul_(scale)       # [B, kvh, g*q, T]
        vis = _suffix_mask(attention_mask, B, q, T, query.device)              # [B, 1, q, T]
        s2 = s2.view(B, kvh, g, q, T).masked_fill_(~vis[:, :, None], -math.inf).view(B, kvh, g * q, T)
        o2, lse2 = _partial(s2, value)
    lse = torch.logaddexp(lse1, lse2)
    o = o1 * (lse1 - lse).exp() + o2 * (lse2 - lse).exp()
    return o.to(query.dtype).reshape(B, H, q, d).transpose(1, 2).contiguous(), None
