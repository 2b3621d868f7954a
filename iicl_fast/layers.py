"""Fused layers of the frozen base on CUDA: RMSNorm, the gated MLP's silu(gate) · up, and the
rotary embedding of q and k.

The base is frozen, so a layer's only job is to be fast: transformers runs RMSNorm as ~6
kernels over fp32 copies of the activations and the MLP's activation as 2 forward and 4
backward kernels over [tokens, intermediate]. Profiled on the 8B shape (one H200, one
training step of 16 entries): elementwise kernels took 170 of 684 ms, GEMMs 380
(benchmarks/NOTES.md). Here each is one Triton kernel each way (iicl_fast/kernels/rmsnorm.py,
iicl_fast/kernels/swiglu.py), computing the same function with transformers' rounding.

`install(model)` switches every RMSNorm and MLP module whose forward is exactly Llama's (the
source is compared: Llama, Qwen2, Qwen3, Mistral, Phi-3's norm) to the fused forward on CUDA
tensors; on the CPU, for other dtypes and for trainable norm weights they keep their own.
The rotary embedding is not a module: the attention calls its modeling file's
`apply_rotary_pos_emb`, so where that function (and its `rotate_half`) is exactly Llama's,
install replaces the file's function with one that takes iicl_fast/kernels/rotary.py on CUDA tensors
(and transformers' own otherwise); the forward rounds as transformers does. It is a process-wide
switch of that modeling file (uninstall puts the original back once no model uses it).
IICL_FUSED_LAYERS=0 turns it off (benchmarks compare both)."""
from __future__ import annotations

import ast
import inspect
import os
import sys
import textwrap
import types

import torch

_FAST: dict[type, type] = {}
_SOURCES: dict[str, str] = {}
# Tests set this to run the kernels on CPU tensors (through Triton's interpreter).
ON_CPU = False
ROTARY = True       # benchmarks set False to time the installed layers without the fused rotary


def _enabled() -> bool:
    return os.environ.get("IICL_FUSED_LAYERS", "1") != "0"


class RMSNormFn(torch.autograd.Function):
    """y = w · round(x · rstd) (iicl_fast/kernels/rmsnorm.py); gradient for x only (w is frozen)."""

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
    """h = silu(g) · u (iicl_fast/kernels/swiglu.py), gradients for g and u."""

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


class RotaryFn(torch.autograd.Function):
    """(q, k) rotated (iicl_fast/kernels/rotary.py); gradients for q and k (cos and sin are constants)."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        from .kernels.rotary import rope_forward
        ctx.save_for_backward(cos, sin)
        return rope_forward(q, k, cos, sin)

    @staticmethod
    def backward(ctx, gq, gk):
        from .kernels.rotary import rope_backward
        cos, sin = ctx.saved_tensors
        dq, dk = rope_backward(gq, gk, cos, sin)
        return dq, dk, None, None


def rotary(q, k, cos, sin):
    return RotaryFn.apply(q, k, cos, sin)


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


def _rotary_fast(original):
    """apply_rotary_pos_emb that takes the fused kernel where it applies, else `original`."""
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if ((q.is_cuda or ON_CPU) and ROTARY and _enabled() and unsqueeze_dim == 1 and q.dim() == 4 and k.dim() == 4
                and cos.dim() == 3 and q.dtype == k.dtype == cos.dtype == sin.dtype and q.shape[-1] % 2 == 0
                and cos.shape == sin.shape and cos.shape[1:] == q.shape[2:] and cos.shape[0] in (1, q.shape[0])
                and k.shape[0] == q.shape[0] and k.shape[2:] == q.shape[2:]):
            return rotary(q, k, cos, sin)
        return original(q, k, cos, sin, unsqueeze_dim)
    apply_rotary_pos_emb.__wrapped_original__ = original
    return apply_rotary_pos_emb


def _plain_function(fn):
    """fn itself, or, where transformers wrapped it for the hub's kernels (>= 5.2x with the
    `kernels` package installed: `apply_rotary_pos_emb` is an nn.Module "Func" whose forward
    calls the original unless a hub kernel was activated), the function its forward calls."""
    if isinstance(fn, types.FunctionType) or fn is None:
        return fn
    cells = getattr(getattr(type(fn), "forward", None), "__closure__", None) or ()
    inner = [c.cell_contents for c in cells if isinstance(c.cell_contents, types.FunctionType)]
    return inner[0] if len(inner) == 1 else fn


def _body(fn) -> str | None:
    """A function's code without its decorators and docstring (families copy Llama's with
    their own docstrings), or None without source."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(inspect.unwrap(_plain_function(fn)))))
    except (OSError, TypeError, SyntaxError):
        return None
    f = tree.body[0]
    if not isinstance(f, ast.FunctionDef):
        return None
    f.decorator_list = []
    if f.body and isinstance(f.body[0], ast.Expr) and isinstance(getattr(f.body[0], "value", None), ast.Constant):
        f.body = f.body[1:]
    return ast.dump(f)


_ROTARY_USERS: dict[str, int] = {}      # modeling module -> models installed that use its patched function


def _rotary_module(model_module) -> object | None:
    """The modeling module whose apply_rotary_pos_emb (and rotate_half) is Llama's, or None."""
    mod = sys.modules.get(model_module)
    fn = getattr(mod, "apply_rotary_pos_emb", None)
    if fn is None:
        return None
    if hasattr(fn, "__wrapped_original__"):
        return mod
    from transformers.models.llama import modeling_llama as ll
    if "rotary" not in _SOURCES:
        base = _body(ll.apply_rotary_pos_emb)
        if base is None:            # no source to compare against: leave every family's rotary as it is
            return None
        _SOURCES["rotary"] = base + (_body(ll.rotate_half) or "")
    if _body(fn) is None or _body(fn) + (_body(getattr(mod, "rotate_half", None)) or "") != _SOURCES["rotary"]:
        return None
    return mod


def _install_rotary(model) -> int:
    mods = {type(m).__module__ for m in model.modules() if type(m).__name__.endswith("Attention")}
    n = 0
    for name in sorted(mods):
        mod = _rotary_module(name)
        if mod is None or model.__dict__.get("_iicl_rotary", set()) & {name}:
            continue
        if not hasattr(mod.apply_rotary_pos_emb, "__wrapped_original__"):
            mod.apply_rotary_pos_emb = _rotary_fast(mod.apply_rotary_pos_emb)
        _ROTARY_USERS[name] = _ROTARY_USERS.get(name, 0) + 1
        model.__dict__.setdefault("_iicl_rotary", set()).add(name)
        n += 1
    return n


def _uninstall_rotary(model) -> int:
    names = model.__dict__.pop("_iicl_rotary", set())
    for name in names:
        _ROTARY_USERS[name] -= 1
        mod = sys.modules[name]
        if _ROTARY_USERS[name] == 0 and hasattr(mod.apply_rotary_pos_emb, "__wrapped_original__"):
            mod.apply_rotary_pos_emb = mod.apply_rotary_pos_emb.__wrapped_original__
    return len(names)


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
    tensors), and its modeling file's rotary embedding where it is Llama's. -> modules (and
    rotary functions) switched. Idempotent; state dicts and everything else unchanged."""
    n = _install_rotary(model)
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
    n = _uninstall_rotary(model)
    back = {v: k for k, v in _FAST.items()}
    for m in model.modules():
        if type(m) in back:
            m.__class__ = back[type(m)]
            n += 1
    return n
