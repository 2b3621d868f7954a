"""LoRA linear layers computed in the base model's dtype.

peft keeps a bf16 base's adapter weights in fp32 and, per adapted linear and call, casts the
input to fp32, runs both LoRA GEMMs in fp32, promotes the layer's output to fp32 to add them
and casts it back; in training it also saves the fp32 copy of the input for backward. On an
8B model with 224 adapted linears that is ~30 GB of extra memory traffic per layer-batch of
32K tokens and ~40 GB of saved activations per training step (estimated from the shapes;
measured figures in benchmarks/NOTES.md), plus four extra launches per linear in every
decoding step.

Here the adapter weights stay fp32 (the optimizer's master copy) and are cast once per change
to the input's dtype (cached by their version counters); the layer is

    y = x Wᵀ + b + (x Aᵀ)(s B)ᵀ          (the rank-r product first, the base GEMM adding it)

with fp32 accumulation in every GEMM, and its backward

    g_a = g_y (s B)          [N, r]
    ∂x  = g_y W + g_a A      (g_a A first, likewise)
    ∂A  = g_aᵀ x             [r, in]   (fp32 out)
    ∂B  = s g_yᵀ (x Aᵀ)      [out, r]  (fp32 out)

saving only x (in its own dtype) and x Aᵀ. This is what torch.autocast does to a bf16 model
with fp32 LoRA weights, without the casts of the layer's whole output.

`install(model)` switches every plain peft `lora.Linear` of model to this forward where it
applies (one active vanilla adapter, no dropout in training, a half-precision input) and to
peft's own forward otherwise (fp32 models: nothing changes; `disable_adapter`, merged layers,
several active adapters, DoRA, dropout)."""
from __future__ import annotations

import torch

_FAST = {}          # peft's lora.Linear class -> its fast subclass


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for 16-bit a, b with an fp32 result (CUDA's mm.dtype: no rounding of the sum to
    16 bits; elsewhere the 16-bit product, widened)."""
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            pass
    return torch.mm(a, b).float()


def _base_plus(x2, weight, bias, xa, bs_h):
    """x2 Wᵀ + b + xa (s B)ᵀ. The rank-r product is computed first and the base GEMM adds it in
    its epilogue (addmm_, β = 1): the base GEMM is compute-bound, so reading it there is ~free,
    where adding it afterwards (y.addmm_) read and wrote all of y once more in a memory-bound
    K = r GEMM (~38 ms of a 595 ms training step on the 8B shape, benchmarks/NOTES.md)."""
    z = torch.mm(xa, bs_h.t()) if bias is None else torch.addmm(bias, xa, bs_h.t())
    return z.addmm_(x2, weight.t())          # in place: an out-of-place addmm first copies z


class LoraLinearFn(torch.autograd.Function):
    """y = x Wᵀ + b + (x Aᵀ)(s B)ᵀ; gradients for x, A and B (W and b are frozen).

    x [..., in] (16-bit), weight [out, in], bias [out] or None, A [r, in] and B [out, r] fp32
    (the trained parameters), a_h = A and bs_h = s·B in x's dtype (no grad)."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, a_h, bs_h, scale):
        x2 = x.reshape(-1, x.shape[-1])
        xa = torch.mm(x2, a_h.t())                        # [N, r]
        y = _base_plus(x2, weight, bias, xa, bs_h)
        ctx.save_for_backward(x2, weight, a_h, bs_h, xa)
        ctx.scale = scale
        ctx.in_shape = x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, gy):
        x2, weight, a_h, bs_h, xa = ctx.saved_tensors
        g = gy.reshape(-1, gy.shape[-1]).to(x2.dtype)
        ga = torch.mm(g, bs_h)                            # [N, r] = s · g B
        gx = gA = gB = None
        if ctx.needs_input_grad[0]:
            gx = torch.mm(ga, a_h).addmm_(g, weight).view(ctx.in_shape)     # see _base_plus
        if ctx.needs_input_grad[3]:
            gA = _mm_f32(ga.t(), x2)                      # [r, in]
        if ctx.needs_input_grad[4]:
            gB = _mm_f32(g.t(), xa).mul_(ctx.scale)       # [out, r]
        return gx, None, None, gA, gB, None, None, None


# Optimizer steps taken in this process (any torch optimizer): the fused AdamW updates its
# parameters without bumping their version counters (checked: _version stays 0 after a fused
# step), so version counters alone would keep a stale copy after training. On CUDA that
# froze the model's output: a constant loss over epochs and nothing consolidated.
_STEPS = [0]
_HOOKED = []


def _count_step(*_):
    _STEPS[0] += 1


def _half_weights(layer, name: str, dtype: torch.dtype):
    """(A, s·B) of adapter `name` in dtype. With autograd on (training) cast on every call;
    without (decoding, passes) cached until A or B changes (their version counters, and any
    optimizer step in the process)."""
    A = layer.lora_A[name].weight
    B = layer.lora_B[name].weight
    s = layer.scaling[name]
    if torch.is_grad_enabled():
        with torch.no_grad():
            return A.detach().to(dtype), (B.detach() * s).to(dtype)
    if not _HOOKED:
        from torch.optim.optimizer import register_optimizer_step_post_hook
        _HOOKED.append(register_optimizer_step_post_hook(_count_step))
    key = (A.data_ptr(), A._version, B.data_ptr(), B._version, s, dtype, _STEPS[0])
    cache = layer.__dict__.setdefault("_iicl_half", {})
    hit = cache.get(name)
    if hit is None or hit[0] != key:
        hit = cache[name] = (key, A.detach().to(dtype), (B.detach() * s).to(dtype))
    return hit[1], hit[2]


def _fast_adapter(layer, x, args, kwargs) -> str | None:
    """The adapter name if layer's forward on x can take the fast path, else None."""
    if args or kwargs or layer.disable_adapters or layer.merged:
        return None
    if x.dtype not in (torch.bfloat16, torch.float16):
        return None
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    if name in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(name, False):
        return None
    if getattr(layer, "fan_in_fan_out", False) or layer.lora_B[name].bias is not None:
        return None
    if layer.training and not isinstance(layer.lora_dropout[name], torch.nn.Identity):
        return None
    base = layer.get_base_layer()
    if type(base) is not torch.nn.Linear or base.weight.dtype != x.dtype or base.weight.requires_grad:
        return None
    if layer.lora_A[name].weight.device != x.device:
        return None
    return name


def _forward(self, x, *args, **kwargs):
    name = _fast_adapter(self, x, args, kwargs)
    if name is None:
        return super(type(self), self).forward(x, *args, **kwargs)
    base = self.get_base_layer()
    a_h, bs_h = _half_weights(self, name, x.dtype)
    A, B = self.lora_A[name].weight, self.lora_B[name].weight
    if torch.is_grad_enabled() and (A.requires_grad or B.requires_grad or x.requires_grad):
        return LoraLinearFn.apply(x, base.weight, base.bias, A, B, a_h, bs_h, self.scaling[name])
    x2 = x.reshape(-1, x.shape[-1])
    y = _base_plus(x2, base.weight, base.bias, torch.mm(x2, a_h.t()), bs_h)
    return y.view(*x.shape[:-1], y.shape[-1])


def install(model) -> int:
    """Give every plain peft lora.Linear in model the fast forward. -> layers switched.
    Idempotent; peft's state dict, save / load, merge and unload are unchanged."""
    from peft.tuners.lora.layer import Linear
    n = 0
    for m in model.modules():
        cls = type(m)
        if cls is Linear:
            fast = _FAST.get(cls)
            if fast is None:
                fast = _FAST[cls] = type("FastLoraLinear", (cls,), {"forward": _forward, "__module__": __name__})
            m.__class__ = fast
            n += 1
    return n


def uninstall(model) -> int:
    """Back to peft's own forward (benchmarks compare both). -> layers switched."""
    n = 0
    for m in model.modules():
        for peft_cls, fast in _FAST.items():
            if type(m) is fast:
                m.__class__ = peft_cls
                m.__dict__.pop("_iicl_half", None)
                n += 1
    return n
