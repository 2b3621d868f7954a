"""The C++ extension: segmented multi-adapter LoRA and the masked per-adapter AdamW,
against per-adapter PyTorch loops."""
import pytest
import torch

from iicl_fast import IICLError
from iicl_fast.bank import MaskedAdamW, segmented_lora, segmented_lora_loop
from iicl_fast._ext import ext


def make(n, r, d_in, d_out, lengths, ids, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths) + 3                                   # 3 trailing tokens belong to no segment
    x = torch.randn(T, d_in, generator=g, dtype=dtype)
    A = torch.randn(n, r, d_in, generator=g, dtype=dtype) * 0.3
    B = torch.randn(n, d_out, r, generator=g, dtype=dtype) * 0.3
    offsets = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.long)
    return x, A, B, offsets, torch.tensor(ids, dtype=torch.long)


@pytest.mark.parametrize("n,lengths,ids", [
    (3, [5, 0, 7, 1], [2, 0, 2, 1]),                     # uneven, an empty segment, a repeated adapter
    (1500, [1, 9, 0, 4, 13, 2, 0, 6], [1499, 0, 7, 1024, 1024, 3, 1200, 1499]),   # > 1024 adapters
    (5, [1], [4]),                                        # one token
])
def test_segmented_lora_matches_the_loop_values_and_gradients(n, lengths, ids):
    x, A, B, offsets, ids = make(n, 4, 11, 7, lengths, ids)
    xs = [t.clone().requires_grad_(True) for t in (x, A, B)]
    xr = [t.clone().requires_grad_(True) for t in (x, A, B)]
    y = segmented_lora(*xs, offsets, ids, scale=2.0)
    y_ref = segmented_lora_loop(*xr, offsets, ids, scale=2.0)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    assert bool((y[-3:] == 0).all())
    g = torch.randn(y.shape[1], y.shape[0], dtype=y.dtype).t()     # a non-contiguous gradient
    assert not g.is_contiguous()
    y.backward(g)
    y_ref.backward(g)
    for a, b in zip(xs, xr):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-11, atol=1e-12)
    # untouched adapters get exactly zero gradient
    unused = sorted(set(range(n)) - set(ids[torch.tensor(lengths) > 0].tolist()))
    assert bool((xs[1].grad[unused] == 0).all()) and bool((xs[2].grad[unused] == 0).all())


def test_backward_reads_any_strides():
    x, A, B, offsets, ids = make(4, 3, 6, 5, [4, 3], [1, 3])
    y, u = ext().segmented_lora_forward(x, A, B, offsets, ids, 1.5)
    g = torch.randn(5, y.shape[0], dtype=y.dtype)
    a = ext().segmented_lora_backward(g.t(), x, u, A, B, offsets, ids, 1.5, True)
    b = ext().segmented_lora_backward(g.t().contiguous(), x, u, A, B, offsets, ids, 1.5, True)
    g2 = torch.randn(y.shape[0], 10, dtype=y.dtype)[:, ::2]                 # strided columns
    c = ext().segmented_lora_backward(g2, x, u, A, B, offsets, ids, 1.5, True)
    d = ext().segmented_lora_backward(g2.contiguous(), x, u, A, B, offsets, ids, 1.5, True)
    for p, q in list(zip(a, b)) + list(zip(c, d)):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_bf16_compute_with_fp32_masters_is_as_good_as_the_plain_loop():
    x64, A64, B64, offsets, ids = make(6, 8, 64, 48, [17, 5, 30], [5, 0, 5])
    x = x64.to(torch.bfloat16)
    A, B = A64.float(), B64.float()
    ref = segmented_lora_loop(x.double(), A.double(), B.double(), offsets, ids, 2.0)
    ours = segmented_lora(x, A, B, offsets, ids, 2.0)
    plain = segmented_lora_loop(x, A, B, offsets, ids, 2.0)
    assert ours.dtype == torch.bfloat16
    err = lambda y: float((y.double() - ref).norm() / ref.norm())  # noqa: E731
    assert err(ours) <= 2 * err(plain) + 1e-6, (err(ours), err(plain))


def test_bad_input_names_the_problem():
    x, A, B, offsets, ids = make(4, 3, 6, 5, [4, 3], [1, 3], dtype=torch.float32)
    with pytest.raises(RuntimeError, match="adapter id 4 .* out of range for a bank of 4 adapters"):
        segmented_lora(x, A, B, offsets, torch.tensor([1, 4]))
    with pytest.raises(RuntimeError, match="A and B must have the same dtype"):
        segmented_lora(x, A, B.double(), offsets, ids)
    with pytest.raises(RuntimeError, match="offsets must have one more entry"):
        segmented_lora(x, A, B, offsets[:-1], ids)
    with pytest.raises(RuntimeError, match="offsets must be int64"):
        segmented_lora(x, A, B, offsets.int(), ids)
    with pytest.raises(RuntimeError, match="d_in"):
        segmented_lora(x[:, :5], A, B, offsets, ids)
    with pytest.raises(IICLError, match="A is on meta"):
        segmented_lora(x, A.to("meta"), B, offsets, ids)


def per_adapter_reference(params0, grads_per_step, actives, lr, wd, max_norm, betas=(0.9, 0.999), eps=1e-8):
    """torch.optim.AdamW, one optimizer per adapter over its slices, stepped when active,
    after torch.nn.utils.clip_grad_norm_ over that adapter's slices."""
    n = params0[0].shape[0]
    out = []
    for a in range(n):
        ps = [p[a].clone().requires_grad_(True) for p in params0]
        opt = torch.optim.AdamW(ps, lr=lr[a], weight_decay=wd[a], betas=betas, eps=eps, foreach=False)
        for grads, active in zip(grads_per_step, actives):
            if a not in active:
                continue
            for p, g in zip(ps, grads):
                p.grad = g[a].clone()
            torch.nn.utils.clip_grad_norm_(ps, max_norm)
            opt.step()
        out.append([p.detach() for p in ps])
    return [torch.stack([out[a][i] for a in range(n)]) for i in range(len(params0))]


def test_masked_adamw_matches_torch_adamw_per_adapter_and_leaves_inactive_bitwise():
    g = torch.Generator().manual_seed(3)
    n = 6
    params0 = [torch.randn(n, 3, 4, generator=g), torch.randn(n, 5, 3, generator=g)]
    steps = [[torch.randn(p.shape, generator=g) * s for p in params0] for s in (0.1, 5.0, 0.3, 2.0)]
    actives = [[0, 1, 2, 3, 4, 5], [1, 3], [0, 3, 5], [3]]
    lr = [1e-2, 2e-2, 3e-3, 1e-2, 5e-2, 1e-3]
    wd = [0.0, 0.1, 0.01, 0.0, 0.5, 0.2]
    params = [p.clone() for p in params0]
    opt = MaskedAdamW(params, n, max_grad_norm=1.0)
    opt.lr.copy_(torch.tensor(lr))
    opt.weight_decay.copy_(torch.tensor(wd))
    for grads, active in zip(steps, actives):
        before = [p.clone() for p in params] + [m.clone() for m in opt.exp_avg + opt.exp_avg_sq]
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        opt.step(active=torch.tensor(active))
        inactive = [a for a in range(n) if a not in active]
        after = params + opt.exp_avg + opt.exp_avg_sq
        for b, t in zip(before, after):
            assert torch.equal(b[inactive], t[inactive])      # bit for bit
    ref = per_adapter_reference(params0, steps, actives, lr, wd, 1.0)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)
    assert opt.step_count.tolist() == [2, 2, 1, 4, 1, 2]


def test_per_adapter_clipping_by_hand():
    n = 3
    params = [torch.zeros(n, 2), torch.zeros(n, 3)]
    grads = [torch.tensor([[3.0, 0.0], [0.1, 0.1], [30.0, 0.0]]), torch.tensor([[0.0, 4.0, 0.0], [0.0, 0.0, 0.1], [0.0, 40.0, 0.0]])]
    torch.testing.assert_close(ext().per_adapter_sq_norm(grads), torch.tensor([25.0, 0.03, 2500.0]))
    opt = MaskedAdamW(params, n, lr=1.0, max_grad_norm=1.0, betas=(0.0, 0.0), eps=1.0)
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    # beta1 = beta2 = 0: update = -lr * g' / (|g'| + eps) with g' = g * min(1, 1 / (norm + 1e-6))
    for a, norm in enumerate([5.0, 0.03 ** 0.5, 50.0]):
        coef = min(1.0, 1.0 / (norm + 1e-6))
        for p, g in zip(params, grads):
            gc = g[a] * coef
            torch.testing.assert_close(p[a], -gc / (gc.abs() + 1.0), rtol=1e-6, atol=1e-7)


def test_masked_adamw_bad_ids():
    opt = MaskedAdamW([torch.zeros(4, 2)], 4)
    with pytest.raises(IICLError, match="adapter id 7 is out of range for a bank of 4"):
        opt.step(active=torch.tensor([1, 7]))
    with pytest.raises(IICLError, match="holds 4 adapters, expected 5"):
        MaskedAdamW([torch.zeros(4, 2)], 5)


@pytest.mark.parametrize("impl", ["segmented", "bmm"])
def test_lora_bank_routes_each_sequence_to_its_adapter_and_exports_a_memory(tiny, tmp_path, impl):
    import iicl_fast
    from iicl_fast.bank import LoraBank
    model, tok = tiny
    ids = torch.tensor([tok("The lighthouse keeper feeds the cats", add_special_tokens=False)["input_ids"][:6],
                        tok("Seven grey cats sleep on the rocks", add_special_tokens=False)["input_ids"][:6]])
    with torch.no_grad():
        base = model(input_ids=ids).logits
    bank = LoraBank(model, 5, rank=4, alpha=8, impl=impl)
    with torch.no_grad(), bank.route([3, 1]):
        torch.testing.assert_close(model(input_ids=ids).logits, base)       # B = 0: no change
        for p in bank.B.values():
            p.normal_(0, 0.2)
        both = model(input_ids=ids).logits
    with torch.no_grad():
        with bank.route([3]):
            alone0 = model(input_ids=ids[:1]).logits
        with bank.route([1]):
            alone1 = model(input_ids=ids[1:]).logits
        assert not torch.allclose(both, base, atol=1e-3)
        torch.testing.assert_close(model(input_ids=ids).logits, base)       # outside route: the base
    torch.testing.assert_close(both, torch.cat([alone0, alone1]), rtol=1e-5, atol=1e-5)
    # export adapter 3: a memory dir that Memory.load (peft underneath) runs to the same logits
    bank.export(3, tmp_path / "m3")
    bank.remove()
    mem = iicl_fast.Memory.load(tmp_path / "m3", model, tok)
    mem._activate()
    with torch.no_grad():
        torch.testing.assert_close(mem.model(input_ids=ids[:1]).logits, alone0, rtol=1e-4, atol=1e-4)


def test_bank_training_step_moves_only_the_routed_adapters(tiny):
    from iicl_fast.bank import BankAdamW, LoraBank
    model, tok = tiny
    for p in model.parameters():
        p.requires_grad_(False)
    bank = LoraBank(model, 4, rank=2, alpha=4, target_modules=["q_proj", "v_proj", "down_proj"])
    assert len(bank.modules) == 3 * model.config.num_hidden_layers
    opt = BankAdamW(bank, lr=1e-2)
    before = [p.detach().clone() for p in bank.parameters()]
    ids = torch.randint(0, 1000, (2, 5))
    with bank.route([2, 0]):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step(active=[2, 0])
    for b, p in zip(before, bank.parameters()):
        assert torch.equal(b[[1, 3]], p.detach()[[1, 3]])
    moved = [not torch.equal(b[[0, 2]], p.detach()[[0, 2]]) for b, p in zip(before, bank.parameters())]
    assert all(moved[1::2])                        # every B of the routed adapters moved off zero
    with pytest.raises(IICLError, match="adapter id 4 is out of range for a bank of 4"):
        with bank.route([4]):
            pass
    with pytest.raises(IICLError, match="adapter id 9"):
        bank.export(9, "/nonexistent")


def test_masked_adamw_torch_path_matches_the_extension():
    g = torch.Generator().manual_seed(5)
    n = 5
    p0 = [torch.randn(n, 4, 3, generator=g), torch.randn(n, 2, generator=g)]
    runs = {}
    for impl in ("ext", "torch"):
        params = [p.clone() for p in p0]
        opt = MaskedAdamW(params, n, lr=3e-2, weight_decay=0.1, max_grad_norm=0.5, impl=impl)
        gg = torch.Generator().manual_seed(9)
        for active in ([0, 1, 2, 3, 4], [2, 4], [0, 4]):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gg) * 3
            opt.step(active=torch.tensor(active))
        runs[impl] = (params, opt.exp_avg, opt.exp_avg_sq, opt.step_count)
    for a, b in zip(runs["ext"][:3], runs["torch"][:3]):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)
    assert torch.equal(runs["ext"][3], runs["torch"][3])
