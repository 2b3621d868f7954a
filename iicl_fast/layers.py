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


def fused_norm(m, like: torch.Tensor):
    """(weight, eps) when m is an installed fused RMSNorm that would run its kernel on `like`
    (frozen weight of like's dtype, fused layers on), else None: the decoding step then folds
    the residual add before m into that kernel (kernels/rmsnorm.add_rmsnorm_forward)."""
    w = getattr(m, "weight", None)
    if type(m).forward is not _norm_forward or w is None or w.requires_grad or w.dtype != like.dtype:
        return None
    if not ((like.is_cuda or ON_CPU) and _enabled()):
        return None
    return w, m.variance_epsilon


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


# -- projections that read one input, as one GEMM (decoding steps) -------------------------
# At the decoding step's M = 64 rows a GEMM streams its weights: cuBLAS took 4.8 ms a step for
# the 8B shape's seven projections a layer, ~3.3 TB/s (benchmarks/NOTES.md, eighth session),
# and k / v (N = 1,024) fill a fraction of the SMs. q, k, v read one input, gate and up
# another: laid out as one [ΣN, in] buffer each they are two GEMMs instead of five.


def _base_and_adapter(m):
    """(the frozen nn.Linear computing m's base, the one active LoRA adapter of m or None),
    or None where m is something FusedLinears cannot compute exactly."""
    from peft.tuners.lora.layer import Linear as LoraLinear
    if type(m) is torch.nn.Linear:
        base, name = m, None
    elif isinstance(m, LoraLinear):
        base = m.get_base_layer()
        if type(base) is not torch.nn.Linear:
            return None
        active = [a for a in m.active_adapters if a in m.lora_A]
        if m.disable_adapters:
            if m.merged:                    # peft would unmerge first
                return None
            name = None
        elif m.merged or not active:
            name = None
        elif len(active) > 1:
            return None
        else:
            name = active[0]
            if (name in getattr(m, "lora_variant", {}) or getattr(m, "use_dora", {}).get(name, False)
                    or getattr(m, "fan_in_fan_out", False) or m.lora_B[name].bias is not None
                    or m.lora_A[name].weight.device != base.weight.device
                    or (m.training and not isinstance(m.lora_dropout[name], torch.nn.Identity))):
                return None
    else:
        return None
    w = base.weight
    if base.bias is not None or w.requires_grad or type(w.data) is not torch.Tensor or w.dim() != 2:
        return None
    return base, name


def _stacked(ws) -> torch.Tensor | None:
    """ws laid out as consecutive rows of one buffer -> that buffer [ΣN, in] (a view), else None."""
    w0 = ws[0]
    K = w0.shape[1]
    if any(w.shape[1] != K or w.dtype != w0.dtype or w.device != w0.device or not w.is_contiguous() for w in ws):
        return None
    ptr, off = w0.untyped_storage().data_ptr(), w0.storage_offset()
    for w in ws:
        if w.untyped_storage().data_ptr() != ptr or w.storage_offset() != off:
            return None
        off += w.numel()
    return w0.detach().as_strided((sum(w.shape[0] for w in ws), K), (K, 1))


def _adapter_rows(linears) -> int:
    """The most rows the rank-r factors A of one adapter take over linears (Σ of the ranks of the
    members it adapts; the largest over the adapters they carry), 0 without adapters."""
    rows: dict[str, int] = {}
    for m in linears:
        for name, a in getattr(m, "lora_A", {}).items():
            rows[name] = rows.get(name, 0) + a.out_features
    return max(rows.values(), default=0)


def _tail_rows(base, w: torch.Tensor) -> int:
    """Rows that fuse_weights reserved after w ([ΣN, in], a _stacked view of the buffer it laid
    out, base: the first member's nn.Linear), 0 where it did not or the weights were moved since."""
    rec = base.__dict__.get("_iicl_tail")
    if rec is None or w.storage_offset() != 0:
        return 0
    ptr, rows, reserve = rec
    if (w.data_ptr() != ptr or w.shape[0] != rows
            or w.untyped_storage().nbytes() != (rows + reserve) * w.shape[1] * w.element_size()):
        return 0
    return reserve


def fuse_weights(linears, reserve: int = 0) -> bool:
    """Lay the frozen base weights of linears ([out_i, in] each, one shared input) out as
    consecutive rows of one buffer, each module's weight a view of it: memory unchanged (one
    module's copy at a time), every forward unchanged. -> whether they are laid out so.

    reserve: rows of zeros kept after the weights, where FusedLinears (LORA_TAIL) puts the
    adapter's A so that one GEMM gives x Wᵀ and x Aᵀ (a layout with fewer rows is laid out anew).
    Do it before any CUDA graph is captured over these weights (it moves them) and before
    moving the model (`.to()` gives each weight its own storage again: FusedLinears then
    declines, and the layers run one GEMM each as before). A state dict of such a model holds
    views of one storage: safetensors refuses to save shared tensors (clone them first)."""
    parts = [_base_and_adapter(m) for m in linears]
    if any(p is None for p in parts):
        return False
    bases = [b for b, _ in parts]
    ws = [b.weight for b in bases]
    w = _stacked(ws)
    if w is not None and (reserve == 0 or _tail_rows(bases[0], w) >= reserve):
        return True
    w0 = ws[0]
    if any(w.shape[1] != w0.shape[1] or w.dtype != w0.dtype or w.device != w0.device for w in ws):
        return False
    with torch.no_grad():
        n = sum(w.shape[0] for w in ws)
        buf = torch.zeros(n + reserve, w0.shape[1], dtype=w0.dtype, device=w0.device)
        off = 0
        for b in bases:
            k = b.weight.shape[0]
            buf[off:off + k] = b.weight.detach()
            b.weight.data = buf[off:off + k]
            off += k
    if reserve:
        bases[0].__dict__["_iicl_tail"] = (buf.data_ptr(), n, reserve)
    else:
        bases[0].__dict__.pop("_iicl_tail", None)
    return True


def fuse_projections(model) -> int:
    """fuse_weights for every Llama-style decoder layer of model: its attention's q / k / v
    and its MLP's gate / up, each with rows reserved for its adapters' A (_adapter_rows); o and
    down, where adapted, laid out alone with theirs. -> the q/k/v and gate/up groups laid out.
    Idempotent."""
    n = 0
    for m in model.modules():
        a, mlp = getattr(m, "self_attn", None), getattr(m, "mlp", None)
        groups = []
        if a is not None and all(hasattr(a, p) for p in ("q_proj", "k_proj", "v_proj")):
            groups.append(([a.q_proj, a.k_proj, a.v_proj], getattr(a, "o_proj", None)))
        if mlp is not None and is_llama_mlp(mlp):
            groups.append(([mlp.gate_proj, mlp.up_proj], mlp.down_proj))
        for group, single in groups:
            n += fuse_weights(group, _adapter_rows(group))
            if single is not None and _adapter_rows([single]):
                fuse_weights([single], _adapter_rows([single]))
    return n


def is_llama_mlp(m) -> bool:
    """m computes Llama's MLP, down(silu(gate(x)) · up(x)) (its own forward or the fused one)."""
    return _kind(m) == "mlp" or (type(m) in _FAST.values() and type(m).forward is _mlp_forward)


# FusedLinears' buffer tails: the buffer's data pointer -> the A it holds in its reserved rows
# (written by whichever FusedLinears ran on it last; another rewrites it).
_TAIL_HOLDS: dict[int, torch.Tensor] = {}


class FusedLinears:
    """Linears with one input whose base weights fuse_weights laid out in one buffer, as one
    GEMM: x [..., in] -> [..., ΣN] = x W_catᵀ + (x A_catᵀ)(blockdiag sᵢBᵢ)ᵀ — the rank-r
    products of every adapted member in two small GEMMs, added in the base GEMM's epilogue as
    lora._base_plus does for one. Inference only (no autograd). sizes: each member's N.

    lora_tail (the decoding step sets it, decode.LORA_TAIL): where fuse_weights reserved rows
    for A_cat after the weights, A_cat is written there and one GEMM gives [x W_catᵀ | x A_catᵀ]
    ([M, ΣN + R]), the rank-r product then added into its first ΣN columns in place: one launch
    fewer, and the x Aᵀ GEMM (M × R outputs over all of in: few programs for a long K) gone into
    the weights' stream. y is then rounded twice (x Wᵀ, then + the product) where the two-GEMM
    form rounds once; its columns are a view with row stride ΣN + R.

    FusedLinears.of(linears) -> one, or None where the weights are not laid out so or a member
    is not computable here (then call the modules). Build it when the adapters' state is fixed
    (a decoding step's capture): which adapter is active is read then."""

    def __init__(self, weight, sizes, adapted, tail: int = 0):
        self.weight, self.sizes, self.adapted = weight, sizes, adapted    # adapted: [(module, name, row0)]
        self.tail = tail                # rows fuse_weights reserved after weight
        self.lora_tail = False
        self._lora_key, self._lora = None, None
        self.gemm = None        # (x [M, in], W [ΣN, in], add [M, ΣN] or None) -> x Wᵀ + add; None: torch.mm

    @classmethod
    def of(cls, linears):
        parts = [_base_and_adapter(m) for m in linears]
        if any(p is None for p in parts):
            return None
        w = _stacked([b.weight for b, _ in parts])
        if w is None:
            return None
        sizes, adapted, row = [], [], 0
        for m, (b, name) in zip(linears, parts):
            if name is not None:
                adapted.append((m, name, row))
            sizes.append(b.weight.shape[0])
            row += sizes[-1]
        return cls(w, sizes, adapted, _tail_rows(parts[0][0], w))

    def tail_fits(self) -> bool:
        """Whether the active adapter's A_cat fits the reserved rows (and there is an adapter)."""
        return bool(self.adapted) and sum(m.lora_A[name].out_features for m, name, _ in self.adapted) <= self.tail

    def _lora_weights(self, dtype):
        """(A_cat [R, in], blockdiag(sᵢBᵢ) [ΣN, R]) in dtype, rebuilt when any member's cast
        weights change (lora._half_weights caches those by version), or None."""
        if not self.adapted:
            return None
        from .lora import _half_weights
        halves = [_half_weights(m, name, dtype) for m, name, _ in self.adapted]
        key = [t for pair in halves for t in pair]
        if self._lora_key is None or len(key) != len(self._lora_key) or any(a is not b for a, b in zip(key, self._lora_key)):
            A = torch.cat([a for a, _ in halves])
            BS = torch.zeros(self.weight.shape[0], A.shape[0], dtype=dtype, device=A.device)
            r0 = 0
            for (_, _, row), (a, bs) in zip(self.adapted, halves):
                BS[row:row + bs.shape[0], r0:r0 + a.shape[0]] = bs
                r0 += a.shape[0]
            self._lora_key, self._lora = key, (A, BS)
        return self._lora

    def _with_tail(self, A: torch.Tensor) -> torch.Tensor:
        """[W_cat; A_cat] [ΣN + R, in]: the buffer's reserved rows hold A (written here when
        another A was there last). A tensor of its own on the buffer's storage: the write does
        not bump the weights' version counters (autograd would refuse a backward that saved them)."""
        n, K = self.weight.shape
        ext = torch.empty(0, dtype=self.weight.dtype, device=self.weight.device)
        ext.set_(self.weight.untyped_storage(), self.weight.storage_offset(), (n + A.shape[0], K), (K, 1))
        if _TAIL_HOLDS.get(self.weight.data_ptr()) is not A:
            ext[n:].copy_(A)
            _TAIL_HOLDS[self.weight.data_ptr()] = A
        return ext

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        lw = self._lora_weights(x.dtype)
        if lw is not None and self.lora_tail and lw[0].shape[0] <= self.tail and x.dtype == self.weight.dtype:
            ext = self._with_tail(lw[0])
            n = self.weight.shape[0]
            y2 = self.gemm(x2, ext, None) if self.gemm is not None else torch.mm(x2, ext.t())   # [M, ΣN + R]
            y = y2[:, :n]
            y.addmm_(y2[:, n:], lw[1].t())
        elif self.gemm is not None:
            y = self.gemm(x2, self.weight, None if lw is None else torch.mm(torch.mm(x2, lw[0].t()), lw[1].t()))
        elif lw is None:
            y = torch.mm(x2, self.weight.t())
        else:
            y = torch.mm(torch.mm(x2, lw[0].t()), lw[1].t())
            y.addmm_(x2, self.weight.t())
        return y.view(*x.shape[:-1], y.shape[-1])
