"""iicl_fast.lora: the LoRA linear in the base's dtype, against float64 and peft's own forward."""
import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear as PeftLinear

from iicl_fast.lora import LoraLinearFn, install


class Net(torch.nn.Module):
    def __init__(self, d_in, d_out, bias):
        super().__init__()
        self.proj = torch.nn.Linear(d_in, d_out, bias=bias)

    def forward(self, x):
        return self.proj(x)


def peft_net(d_in, d_out, bias, r=4, dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    net = Net(d_in, d_out, bias).to(dtype)
    pm = get_peft_model(net, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"]))
    layer = pm.base_model.model.proj
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.5)    # B starts at 0 in peft
    return pm, layer


def float64_ref(layer, x):
    """y, and the LoRA gradients of sum(y * c), in float64 from the same weights."""
    W = layer.base_layer.weight.double()
    b = None if layer.base_layer.bias is None else layer.base_layer.bias.double()
    A = layer.lora_A["default"].weight.double().detach().requires_grad_(True)
    B = layer.lora_B["default"].weight.double().detach().requires_grad_(True)
    xd = x.double().detach().requires_grad_(True)
    y = torch.nn.functional.linear(xd, W, b) + layer.scaling["default"] * (xd @ A.t()) @ B.t()
    return y, xd, A, B


def outputs_and_grads(pm, layer, x, c):
    """y = pm(x) and the gradients of sum(y * c) in x, A and B."""
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    A.grad = B.grad = None
    xin = x.clone().requires_grad_(True)
    y = pm(xin)
    (y.double() * c).sum().backward()
    return y, xin.grad, A.grad.clone(), B.grad.clone()


def rel(a, b):
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


@pytest.mark.parametrize("n,d_in,d_out,bias", [(1, 16, 24, False), (7, 33, 19, True), (97, 64, 130, False)])
def test_fast_lora_matches_float64_and_is_no_worse_than_peft(n, d_in, d_out, bias):
    pm, layer = peft_net(d_in, d_out, bias)
    assert layer.lora_A["default"].weight.dtype == torch.float32      # peft's fp32 adapter
    x = torch.randn(2, n, d_in, dtype=torch.bfloat16)
    c = torch.randn(2, n, d_out, dtype=torch.float64)
    ref, xd, A64, B64 = float64_ref(layer, x)
    (ref * c).sum().backward()
    plain = outputs_and_grads(pm, layer, x, c)          # peft's forward
    assert install(pm) == 1 and type(layer).__name__ == "FastLoraLinear"
    assert isinstance(layer, PeftLinear)
    fast = outputs_and_grads(pm, layer, x, c)
    for got, want, base in zip(fast, (ref, xd.grad, A64.grad, B64.grad), plain):
        assert torch.isfinite(got).all()
        # the fast path computes in bf16 with fp32 accumulation, as autocast would; peft casts
        # the input to fp32. Bound: bf16's unit roundoff (2^-8) times a small factor, and never
        # far worse than peft's own error
        err, err_plain = rel(got, want), rel(base, want)
        assert err < 2e-2 and err <= max(4 * err_plain, 8e-3), (err, err_plain)


def test_fast_lora_no_grad_and_fallbacks():
    pm, layer = peft_net(32, 48, True)
    install(pm)
    x = torch.randn(5, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        y = pm(x)
        ref, *_ = float64_ref(layer, x)
        assert rel(y, ref) < 1e-2
        with pm.disable_adapter():         # the base alone (teacher_base)
            yb = pm(x)
        assert rel(yb, torch.nn.functional.linear(x.double(), layer.base_layer.weight.double(),
                                                  layer.base_layer.bias.double())) < 1e-2
        # an fp32 model keeps peft's own forward, bit for bit
        pm32, l32 = peft_net(32, 48, True, dtype=torch.float32)
        x32 = torch.randn(5, 32)
        before = pm32(x32)
        install(pm32)
        assert torch.equal(pm32(x32), before)


@pytest.mark.parametrize("make_opt", [lambda ps: torch.optim.SGD(ps, lr=0.5),
                                      lambda ps: torch.optim.AdamW(ps, lr=0.05, fused=True)])
def test_half_weights_follow_the_optimizer(make_opt):
    """The bf16 copies of A and s·B follow every optimizer step, the fused AdamW's too (it
    does not bump the parameters' version counters: a cache keyed on them alone kept the
    first copy, and on CUDA the loss stayed constant over epochs)."""
    pm, layer = peft_net(16, 16, False)
    install(pm)
    params = [p for n, p in pm.named_parameters() if "lora_" in n]
    opt = make_opt(params)
    x = torch.randn(8, 16, dtype=torch.bfloat16)
    losses = []
    for _ in range(3):
        with torch.no_grad():                 # a cached copy is made here ...
            ref, *_ = float64_ref(layer, x)
            assert rel(pm(x), ref) < 1e-2
        opt.zero_grad()
        loss = pm(x).float().pow(2).mean()    # ... and must not outlive the step below
        loss.backward()
        losses.append(float(loss))
        opt.step()
    assert len(set(losses)) == 3


def test_lora_fn_gradcheck_in_float64():
    """The backward formulas themselves, exactly (float64 throughout)."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    W, b = torch.randn(6, 7, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    A = torch.randn(2, 7, dtype=torch.float64, requires_grad=True)
    B = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)

    def f(x, A, B):
        return LoraLinearFn.apply(x, W, b, A, B, A, 1.5 * B, 1.5)
    # a_h / bs_h are A and s·B themselves here (the "cast" to float64 is the identity), so
    # gradcheck sees y as a function of x, A, B through the Function's own backward only
    assert torch.autograd.gradcheck(lambda x_: f(x_, A.detach(), B.detach()), (x,))
    y = f(x, A, B)
    g = torch.randn_like(y)
    gA, gB = torch.autograd.grad((y * g).sum(), (A, B))
    ya = torch.nn.functional.linear(x, W, b) + 1.5 * (x @ A.t()) @ B.t()
    rA, rB = torch.autograd.grad((ya * g).sum(), (A, B))
    assert torch.allclose(gA, rA) and torch.allclose(gB, rB)
