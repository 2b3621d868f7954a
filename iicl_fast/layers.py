"""Fused layers of the frozen base on CUDA: RMSNorm and the gated MLP's silu(gate) · up.

The base is frozen, so a layer's only job is to be fast: transformers runs RMSNorm as ~6
kernels over fp32 copies of the activations and the MLP's activation as 2 forward and 4
backward kernels over [tokens, intermediate]. Profiled on the 8B shape (one H200, one
training step of 16 entries): elementwise kernels took 170 of 684 ms, GEMMs 380
(benchmarks/NOTES.md). Here each is one Triton kernel each way (kernels/rmsnorm.py,
kernels/swiglu.py), computing the same function with transformers' rounding.

`install(model)` switches every RMSNorm and MLP module whose forward is exactly Llama's (the
source is compared: Llama, Qwen2, Qwen3, Mistral, Phi-3's norm) to the fused forward on CUDA
tensors; on the CPU, for other dtypes and for trainable norm weights they keep their own.
IICL_FUSED_LAYERS=0 turns it off (benchmarks compare both)."""
from __future__ import annotations

import inspect
import os

import torch

_FAST: dict[type, type] = {}
_SOURCES: dict[str, str] = {}
# Tests set this to run the kernels on CPU tensors (through Triton's interpreter).
ON_CPU = False


def _enabled() -> bool:
    return os.environ.get("IICL_FUSED_LAYERS", "1") != "0"


class RMSNormFn(torch.autograd.Function):
    """y = w · round(x · rstd) (kernels/rmsnorm.py); gradient for x only (w is frozen)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        from .kernels.rmsnorm import rmsnorm_forward
        y, rstd = rmsnorm_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        from .kernels.rmsnorm import rmsnorm_backward
        x, weight, rstd = ctx.saved_tensors
        return rmsnorm_backward(x, weight, rstd, dy), None, None


class SwiGLUFn(torch.autograd.Function):
    """h = silu(g) · u (kernels/swiglu.py), gradients for g and u."""

    @staticmethod
    def forward(ctx, g, u):
        from .kernels.swiglu import swiglu_forward
        ctx.save_for_backward(g, u)
        return swiglu_forward(g, u)

    @staticmethod
    def backward(ctx, dh):
        from .kernels.swiglu import swiglu_backward
        g, u = ctx.saved_tensors
        return swiglu_backward(g, u, dh)


def rmsnorm(x, weight, eps):
    return RMSNormFn.apply(x, weight, eps)


def swiglu(g, u):
    return SwiGLUFn.apply(g, u)


def _norm_forward(self, hidden_states):
    w = self.weight
    if (hidden_states.is_cuda or ON_CPU) and w.dtype == hidden_states.dtype and not w.requires_grad and _enabled():
        return rmsnorm(hidden_states, w, self.variance_epsilon)
    return super(type(self), self).forward(hidden_states)


def _mlp_forward(self, x):
    if (x.is_cuda or ON_CPU) and _enabled():
        g, u = self.gate_proj(x), self.up_proj(x)
        if g.dtype == u.dtype and g.shape == u.shape:
            return self.down_proj(swiglu(g, u))
        return self.down_proj(self.act_fn(g) * u)
    return super(type(self), self).forward(x)


def _source(cls) -> str:
    """A forward's source with the class's own name taken out (families copy Llama's)."""
    src = inspect.getsource(cls.forward)
    return src.replace(cls.__name__, "CLS")


def _reference(kind: str) -> str:
    if kind not in _SOURCES:
        from transformers.models.llama import modeling_llama as m
        _SOURCES[kind] = _source(m.LlamaRMSNorm if kind == "norm" else m.LlamaMLP)
    return _SOURCES[kind]


def _kind(m) -> str | None:
    cls = type(m)
    if cls in _FAST.values():
        return None
    try:
        if cls.__name__.endswith("RMSNorm") and hasattr(m, "variance_epsilon") and _source(cls) == _reference("norm"):
            return "norm"
        if (cls.__name__.endswith("MLP") and _source(cls) == _reference("mlp")
                and type(getattr(m, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation")):
            return "mlp"
    except (OSError, TypeError):        # no source (compiled or dynamic classes): leave it
        return None
    return None


def install(model) -> int:
    """Switch model's Llama-style RMSNorm and MLP modules to the fused forward (on CUDA
    tensors). -> modules switched. Idempotent; state dicts and everything else unchanged."""
    n = 0
    for m in model.modules():
        kind = _kind(m)
        if kind is None:
            continue
        cls = type(m)
        fast = _FAST.get(cls)
        if fast is None:
            fwd = _norm_forward if kind == "norm" else _mlp_forward
            fast = _FAST[cls] = type(f"Fused{cls.__name__}", (cls,), {"forward": fwd, "__module__": __name__})
        m.__class__ = fast
        n += 1
    return n


def uninstall(model) -> int:
    n = 0
    back = {v: k for k, v in _FAST.items()}
    for m in model.modules():
        if type(m) in back:
            m.__class__ = back[type(m)]
            n += 1
    return n
