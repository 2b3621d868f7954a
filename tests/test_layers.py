"""Fused RMSNorm and silu(gate)·up (iicl_fast/kernels/rmsnorm.py, iicl_fast/kernels/swiglu.py, iicl_fast.layers)
under the Triton interpreter: against float64, forward and gradient, at odd shapes, no worse
than a small multiple of transformers' own path in the same dtype; outputs NaN-poisoned by
the launchers; and a tiny Llama with the layers installed against the plain one.

fp16 and fp32 here: the interpreter truncates fp32 -> bf16 instead of rounding to nearest
(2,092 of 4,096 values off by an ulp, checked), so bf16 is checked on the GPU
(tests/test_cuda_e2e.py), where the cast rounds as transformers' does."""
import pytest
import torch

from iicl_fast import layers
from iicl_fast.kernels.reference_rmsnorm import add_rmsnorm_ref, rmsnorm_ref
from iicl_fast.kernels.reference_swiglu import swiglu_ref
from iicl_fast.kernels.rmsnorm import add_rmsnorm_forward, rmsnorm_backward, rmsnorm_forward
from iicl_fast.kernels.swiglu import swiglu_backward, swiglu_forward, swiglu_packed


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Outputs start as NaN: an element a kernel does not write fails the test."""
    from iicl_fast.kernels import rmsnorm as k1, swiglu as k2
    monkeypatch.setattr(k1, "POISON", True)
    monkeypatch.setattr(k2, "POISON", True)


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 37), (7, 64), (97, 130), (2, 3, 48)])
def test_rmsnorm_matches_float64(shape, dtype):
    g = torch.Generator().manual_seed(shape[0] * 31 + shape[-1])
    x = (torch.randn(*shape, generator=g) * 3).to(dtype)
    w = (1 + 0.3 * torch.randn(shape[-1], generator=g)).to(dtype)
    dy = torch.randn(*shape, generator=g).to(dtype)
    eps = 1e-5
    y, rstd = rmsnorm_forward(x, w, eps)
    dx = rmsnorm_backward(x, w, rstd, dy)
    assert y.shape == x.shape and dx.shape == x.shape and y.dtype == dtype
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()
    # float64 truth and transformers' own path (same dtype), both with autograd
    x64 = x.double().requires_grad_(True)
    y64 = rmsnorm_ref(x64, w, eps, dtype=torch.float64)
    (dx64,) = torch.autograd.grad(y64, x64, dy.double())
    xp = x.clone().requires_grad_(True)
    yp = rmsnorm_ref(xp, w, eps)
    (dxp,) = torch.autograd.grad(yp, xp, dy)
    assert rel(y, y64) <= max(2 * rel(yp, y64), 1e-6)
    assert rel(dx, dx64) <= max(2 * rel(dxp, dx64), 1e-6)
    if dtype == torch.float16:        # the same rounding as transformers: (nearly) equal outputs
        assert rel(y, yp) < 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 37), (7, 64), (97, 130), (2, 3, 48)])
def test_add_rmsnorm_matches_float64(shape, dtype):
    """The residual add folded into the norm: the sum as torch's add rounds it (equal), the
    norm no worse than twice transformers' own path against float64, and equal to the
    unfused kernel on that sum."""
    g = torch.Generator().manual_seed(shape[0] * 17 + shape[-1])
    h = (torch.randn(*shape, generator=g) * 3).to(dtype)
    y = torch.randn(*shape, generator=g).to(dtype)
    w = (1 + 0.3 * torch.randn(shape[-1], generator=g)).to(dtype)
    eps = 1e-6
    s, x = add_rmsnorm_forward(h, y, w, eps)
    assert s.shape == x.shape == h.shape and s.dtype == x.dtype == dtype
    assert torch.isfinite(s).all() and torch.isfinite(x).all()
    sp, xp = add_rmsnorm_ref(h, y, w, eps)
    _, x64 = add_rmsnorm_ref(h, y, w, eps, dtype=torch.float64)
    assert torch.equal(s, sp)
    assert rel(x, x64) <= max(2 * rel(xp, x64), 1e-6)
    assert torch.equal(x, rmsnorm_forward(sp, w, eps)[0])
    with pytest.raises(ValueError, match="add_rmsnorm_forward"):
        add_rmsnorm_forward(h, y[..., :-1], w, eps)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1,), (7, 33), (97, 130), (3, 2049)])
def test_swiglu_matches_float64(shape, dtype):
    gen = torch.Generator().manual_seed(sum(shape))
    g = (torch.randn(*shape, generator=gen) * 3).to(dtype)
    u = torch.randn(*shape, generator=gen).to(dtype)
    dh = torch.randn(*shape, generator=gen).to(dtype)
    h = swiglu_forward(g, u)
    dg, du = swiglu_backward(g, u, dh)
    for t in (h, dg, du):
        assert t.shape == g.shape and t.dtype == dtype and torch.isfinite(t).all()
    g64, u64 = g.double().requires_grad_(True), u.double().requires_grad_(True)
    h64 = swiglu_ref(g64, u64)
    dg64, du64 = torch.autograd.grad(h64, (g64, u64), dh.double())
    gp, up = g.clone().requires_grad_(True), u.clone().requires_grad_(True)
    hp = swiglu_ref(gp, up)
    dgp, dup = torch.autograd.grad(hp, (gp, up), dh)
    for ours, plain, truth in ((h, hp, h64), (dg, dgp, dg64), (du, dup, du64)):
        assert rel(ours, truth) <= max(2 * rel(plain, truth), 1e-6), (rel(ours, truth), rel(plain, truth))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("M, I", [(1, 37), (7, 2049), (97, 130)])
def test_swiglu_packed_matches_float64(M, I, dtype):
    """One GEMM's [gate | up] output read in place (a row stride wider than 2I, as a view of
    a wider buffer): against float64, and equal to swiglu_forward on the split halves."""
    gen = torch.Generator().manual_seed(M * 7 + I)
    wide = (torch.randn(M, 2 * I + 5, generator=gen) * 3).to(dtype)
    gu = wide[:, :2 * I]
    h = swiglu_packed(gu)
    assert h.shape == (M, I) and h.dtype == dtype and torch.isfinite(h).all()
    g, u = gu[:, :I], gu[:, I:]
    h64 = swiglu_ref(g, u, dtype=torch.float64)
    hp = swiglu_ref(g, u)
    assert rel(h, h64) <= max(2 * rel(hp, h64), 1e-6)
    assert torch.equal(h, swiglu_forward(g, u))
    with pytest.raises(ValueError, match="swiglu_packed: gu must be"):
        swiglu_packed(gu[:, :2 * I - 1] if I > 1 else gu[0])


def test_installed_layers_match_the_plain_model(smol_tokenizer, monkeypatch):
    """A tiny bf16 Llama: logits and the input-embedding gradient with the fused layers
    (forced onto the CPU through the interpreter) against transformers' own layers."""
    from conftest import make_tiny
    model = make_tiny(smol_tokenizer).to(torch.float16)
    ids = torch.randint(0, 1000, (2, 11))
    emb = model.get_input_embeddings()

    def run():
        emb.weight.grad = None
        emb.weight.requires_grad_(True)
        out = model(input_ids=ids).logits.float()
        out.pow(2).mean().backward()
        return out.detach(), emb.weight.grad.clone()

    plain_out, plain_grad = run()
    monkeypatch.setattr(layers, "ON_CPU", True)
    # The rotary switch is process-wide, counted by the models installed (a Memory installs
    # its model's layers: other tests of this process may hold some): start from none here.
    from transformers.models.llama import modeling_llama
    original = getattr(modeling_llama.apply_rotary_pos_emb, "__wrapped_original__", modeling_llama.apply_rotary_pos_emb)
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", original)
    monkeypatch.setitem(layers._ROTARY_USERS, modeling_llama.__name__, 0)
    # 2 norms a layer + the final one, 2 MLPs, and modeling_llama's rotary embedding
    assert layers.install(model) == 2 * 2 + 1 + 2 + 1
    other = make_tiny(smol_tokenizer)
    assert layers.install(other) == 2 * 2 + 1 + 2 + 1 and layers.uninstall(other) == 8
    assert type(model.model.norm).__name__ == "FusedLlamaRMSNorm"
    assert hasattr(modeling_llama.apply_rotary_pos_emb, "__wrapped_original__")
    calls = []
    fused_rotary = layers.rotary
    monkeypatch.setattr(layers, "rotary", lambda *a: calls.append(1) or fused_rotary(*a))
    fused_out, fused_grad = run()
    assert len(calls) == 2                              # the fused rotary ran in both layers
    assert rel(fused_out, plain_out) < 2e-2 and rel(fused_grad, plain_grad) < 5e-2
    assert layers.uninstall(model) == 8              # the last user: transformers' own function back
    assert modeling_llama.apply_rotary_pos_emb is original


def _lora_llama(dtype=torch.float64):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=61, hidden_size=40, intermediate_size=72, num_hidden_layers=2,
                      num_attention_heads=5, num_key_value_heads=1)
    model = get_peft_model(LlamaForCausalLM(cfg).to(dtype).eval(),
                           LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj", "up_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.4)
    return model


def _base(m):
    return m.get_base_layer() if hasattr(m, "get_base_layer") else m


def test_fused_linears_equal_their_modules_in_float64():
    """layers.fuse_weights / FusedLinears: q/k/v and gate/up of a LoRA Llama (adapters on q, v
    and up only) as one GEMM each equal the modules' outputs side by side (float64); the weights
    become views of one buffer with unchanged values and the model's output is unchanged; a
    disabled adapter gives the base; .to() copies undo the layout and FusedLinears declines."""
    model = _lora_llama()
    ids = torch.randint(0, 61, (3, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    body = model.get_base_model().model
    a, mlp = body.layers[1].self_attn, body.layers[1].mlp
    qkv = [a.q_proj, a.k_proj, a.v_proj]
    assert layers.FusedLinears.of(qkv) is None                 # separate storages: declines
    w_before = [_base(m).weight.detach().clone() for m in qkv]
    assert layers.fuse_projections(model) == 4
    assert layers.fuse_projections(model) == 4                 # idempotent
    ptrs = {_base(m).weight.untyped_storage().data_ptr() for m in qkv}
    assert len(ptrs) == 1
    for m, w in zip(qkv, w_before):
        assert torch.equal(_base(m).weight, w)
    x = torch.randn(7, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
        for group in (qkv, [mlp.gate_proj, mlp.up_proj]):
            f = layers.FusedLinears.of(group)
            assert f is not None and f.sizes == [m.out_features for m in group]
            want = torch.cat([m(x) for m in group], -1)
            torch.testing.assert_close(f(x), want, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(f(x[None]), want[None], rtol=1e-12, atol=1e-12)
        f = layers.FusedLinears.of(qkv)
        base = torch.cat([_base(m)(x) for m in qkv], -1)
        assert (f(x) - base).abs().max() > 1e-3                 # the adapters add something
        with model.disable_adapter():
            torch.testing.assert_close(layers.FusedLinears.of(qkv)(x), base, rtol=1e-12, atol=1e-12)
    copy = _lora_llama().to(torch.float32)
    assert layers.fuse_projections(copy) == 4
    copy.to(torch.float64)           # every weight its own storage again
    a2 = copy.get_base_model().model.layers[0].self_attn
    assert layers.FusedLinears.of([a2.q_proj, a2.k_proj, a2.v_proj]) is None


def test_fused_linears_take_the_adapters_A_from_the_buffers_tail():
    """fuse_projections reserves rows for the adapters' A after q/k/v (q and v adapted: 3 + 3),
    gate/up (up: 3) and no others here; with lora_tail one GEMM over [W; A] then the sB product
    in place equals the modules (float64) and the two-GEMM form. The tail follows the adapter:
    rewritten after an in-place change of A and after another adapter's FusedLinears wrote its
    own there; a rank that does not fit falls back to the two GEMMs and fuse_projections lays
    the group out anew with room for it. The write leaves the weights' version counters alone:
    a backward that saved them still runs."""
    from peft import LoraConfig
    model = _lora_llama()
    body = model.get_base_model().model
    a, mlp = body.layers[0].self_attn, body.layers[0].mlp
    qkv = [a.q_proj, a.k_proj, a.v_proj]
    w_before = [_base(m).weight.detach().clone() for m in qkv]
    assert layers.fuse_projections(model) == 4
    for m, w in zip(qkv, w_before):
        assert torch.equal(_base(m).weight, w)
    o_w = _base(a.o_proj).weight
    assert o_w.untyped_storage().nbytes() == o_w.numel() * o_w.element_size()     # no adapter: left alone
    x = torch.randn(7, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    f, gu = layers.FusedLinears.of(qkv), layers.FusedLinears.of([mlp.gate_proj, mlp.up_proj])
    assert (f.tail, gu.tail) == (6, 3) and f.tail_fits() and gu.tail_fits()
    n = f.weight.shape[0]
    with torch.no_grad():
        want = torch.cat([m(x) for m in qkv], -1)
        two_gemms = f(x)
        versions = [_base(m).weight._version for m in qkv]
        f.lora_tail = gu.lora_tail = True
        got = f(x)
        assert got.stride(0) == n + 6                           # a view of [M, ΣN + R]
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got, two_gemms, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gu(x), torch.cat([mlp.gate_proj(x), mlp.up_proj(x)], -1), rtol=1e-12, atol=1e-12)
        tail = f.weight.untyped_storage()
        rows = torch.empty(0, dtype=f.weight.dtype).set_(tail, n * 40, (6, 40), (40, 1))
        assert torch.equal(rows, torch.cat([a.q_proj.lora_A["default"].weight, a.v_proj.lora_A["default"].weight]))
        assert [_base(m).weight._version for m in qkv] == versions
        a.q_proj.lora_A["default"].weight.mul_(1.5)                 # an in-place change, as an optimizer step
        want2 = torch.cat([m(x) for m in qkv], -1)
        assert (want2 - want).abs().max() > 1e-3
        torch.testing.assert_close(f(x), want2, rtol=1e-12, atol=1e-12)
    # another adapter writes its A into the same rows; the first one's FusedLinears writes its own back
    model.add_adapter("two", LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj", "up_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".two." in name:
                p.normal_(0, 0.4)
        model.set_adapter("two")
        g = layers.FusedLinears.of(qkv)
        g.lora_tail = True
        assert g.tail_fits() and g.adapted[0][1] == "two"
        torch.testing.assert_close(g(x), torch.cat([m(x) for m in qkv], -1), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(f(x), want2, rtol=1e-12, atol=1e-12)
    # a larger rank: no room (the two GEMMs, still exact), until fuse_projections makes room
    model.add_adapter("big", LoraConfig(r=5, lora_alpha=10, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".big." in name:
                p.normal_(0, 0.4)
        model.set_adapter("big")
        want3 = torch.cat([m(x) for m in qkv], -1)
        h = layers.FusedLinears.of(qkv)
        h.lora_tail = True
        assert not h.tail_fits()
        torch.testing.assert_close(h(x), want3, rtol=1e-12, atol=1e-12)
    assert layers.fuse_projections(model) == 4
    assert layers.FusedLinears.of(qkv).tail == 10
    for m, w in zip(qkv, w_before):
        assert torch.equal(_base(m).weight, w)
    # the write during a backward's life: the weights it saved are not "modified in place"
    model.set_adapter("default")
    xg = x.clone().requires_grad_(True)
    out = _base(a.q_proj)(xg).sum()             # saves q's base weight: f.weight's first rows
    with torch.no_grad():
        f2 = layers.FusedLinears.of(qkv)
        f2.lora_tail = True
        f2(x)
    out.backward()
    torch.testing.assert_close(xg.grad, _base(a.q_proj).weight.sum(0).expand(7, -1))
