"""The extension's CUDA masked AdamW and the graph-captured bank step. They need a GPU and
an extension built with nvcc: on the CPU-only CI they are skipped (and run on the device,
see benchmarks/NOTES.md); the CPU test of the graph's guard runs everywhere."""
import pytest
import torch

from iicl_fast import IICLError
from iicl_fast._ext import available, ext
from iicl_fast.bank import BankAdamW, GraphedBankStep, LoraBank, MaskedAdamW, segmented_lora, segmented_lora_loop

cuda = pytest.mark.skipif(not (torch.cuda.is_available() and available() and ext().with_cuda),
                          reason="needs a GPU and iicl_fast._C built with CUDA")


def small_llama():
    """A random 2-layer Llama, hidden 64 (no tokenizer: these tests also run where the
    embedded model's file is not installed)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def test_graphed_step_refuses_a_cpu_bank():
    model = small_llama()
    bank = LoraBank(model, 2, rank=2, alpha=4)
    with pytest.raises(IICLError, match="CUDA device"):
        GraphedBankStep(bank, BankAdamW(bank), lambda **k: None, {}, [0])


@cuda
@pytest.mark.parametrize("clip", [1.0, 0.0])
def test_cuda_masked_adamw_matches_the_torch_update(clip):
    g = torch.Generator(device="cuda").manual_seed(0)
    n = 1100                                     # > 1024 adapters; [n, 5, 3] takes the scalar path
    shapes = [(n, 16, 40), (n, 24, 16), (n, 5, 3)]
    p0 = [torch.randn(s, device="cuda", generator=g) for s in shapes]
    opts = {impl: MaskedAdamW([p.clone() for p in p0], n, lr=1e-2, weight_decay=0.1, max_grad_norm=clip, impl=impl)
            for impl in ("ext", "torch")}
    for o in opts.values():
        o.lr[::3] = 3e-3                           # per-adapter learning rates
    for step in range(4):
        active = torch.randperm(n, device="cuda", generator=g)[: n // (step + 2)]
        grads = [torch.randn(s, device="cuda", generator=g) * (1 + 5 * (i == 0)) for i, s in enumerate(shapes)]
        before = {k: [p.clone() for p in o.params] + [m.clone() for m in o.exp_avg] for k, o in opts.items()}
        for o in opts.values():
            for p, gr in zip(o.params, grads):
                p.grad = gr.clone()
            o.step(active=active)
        inactive = torch.ones(n, dtype=torch.bool, device="cuda")
        inactive[active] = False
        e, t = opts["ext"], opts["torch"]
        for i in range(len(shapes)):
            torch.testing.assert_close(e.params[i], t.params[i], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(e.exp_avg[i], t.exp_avg[i], rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(e.exp_avg_sq[i], t.exp_avg_sq[i], rtol=1e-5, atol=1e-9)
            assert torch.equal(e.params[i][inactive], before["ext"][i][inactive])            # bit for bit
            assert torch.equal(e.exp_avg[i][inactive], before["ext"][len(shapes) + i][inactive])
        assert torch.equal(e.step_count, t.step_count)


@cuda
def test_cuda_per_adapter_sq_norm():
    g = [torch.randn(37, 8, 5, device="cuda"), torch.randn(37, 3, device="cuda")]
    ref = sum(x.reshape(37, -1).double().pow(2).sum(1) for x in g)
    torch.testing.assert_close(ext().per_adapter_sq_norm(g).double(), ref, rtol=1e-5, atol=1e-5)


@cuda
def test_cuda_bad_input_names_the_tensor():
    p = [torch.zeros(3, 4, device="cuda")]
    o = MaskedAdamW(p, 3, impl="ext")
    bad = [torch.zeros(3, 4, device="cuda", dtype=torch.bfloat16)]      # torch refuses it as p.grad
    with pytest.raises(RuntimeError, match=r"grads\[0\] must be float32"):
        ext().masked_adamw_step(p, bad, o.exp_avg, o.exp_avg_sq, o.step_count, o.active_mask([0]), o.lr,
                                o.weight_decay, 0.9, 0.999, 1e-8, 1.0)
    with pytest.raises(IICLError, match="adapter id 3 is out of range"):
        o.step(active=[3])
    x = torch.zeros(5, 32, device="cuda", dtype=torch.bfloat16)
    A, B = torch.zeros(4, 16, 32, device="cuda"), torch.zeros(4, 8, 16, device="cuda")
    off, ids = torch.tensor([0, 5], device="cuda"), torch.tensor([4], device="cuda")
    with pytest.raises(IICLError, match="adapter id 4 is out of range for a bank of 4"):
        segmented_lora(x, A, B, off, ids)
    with pytest.raises(RuntimeError, match="x must be bfloat16"):
        segmented_lora(x.float(), A, B, off, ids - 1)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        segmented_lora(x, A[:, :8].contiguous(), B[..., :8].contiguous(), off, ids - 1)


@cuda
@pytest.mark.parametrize("n,r,lengths,ids", [
    (3, 16, [70, 0, 7, 1, 64], [2, 0, 2, 1, 0]),           # uneven, empty, a repeated adapter, tile-crossing
    (1500, 32, [1, 9, 0, 130, 13, 2, 0, 6], [1499, 0, 7, 1024, 1024, 3, 1200, 1499]),   # > 1024 adapters
    (5, 64, [200], [4]),
])
def test_cuda_segmented_lora_against_the_loop(n, r, lengths, ids):
    """Values and gradients (x, A, B, base) against the float64 loop on the same bf16 inputs:
    no worse than 2x the plain bf16 loop's error; tokens outside every segment get base."""
    g = torch.Generator().manual_seed(r)
    d_in, d_out = 72, 100                                   # not multiples of the 64-wide tiles
    T = sum(lengths) + 5
    x = (torch.randn(T, d_in, generator=g)).to(torch.bfloat16)
    A = torch.randn(n, r, d_in, generator=g) * 0.2
    B = torch.randn(n, d_out, r, generator=g) * 0.2
    base = torch.randn(T, d_out, generator=g).to(torch.bfloat16)
    offsets = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    ids_t = torch.tensor(ids)
    gy = torch.randn(d_out, T, generator=g).to(torch.bfloat16).t()          # non-contiguous
    cu = [t.cuda().requires_grad_(t.is_floating_point()) for t in (x, A, B, base)]
    y = segmented_lora(cu[0], cu[1], cu[2], offsets.cuda(), ids_t.cuda(), 2.0, base=cu[3])
    y.backward(gy.cuda())
    ref_in = [t.double().requires_grad_(True) for t in (x, A, B, base)]
    ref = segmented_lora_loop(ref_in[0], ref_in[1], ref_in[2], offsets, ids_t, 2.0) + ref_in[3]
    ref.backward(gy.double())
    plain_in = [x.clone().requires_grad_(True), A.clone().requires_grad_(True), B.clone().requires_grad_(True)]
    plain = segmented_lora_loop(*plain_in, offsets, ids_t, 2.0) + base
    plain.backward(gy)
    err = lambda a, b: float((a.detach().double().cpu() - b).norm() / b.norm())  # noqa: E731
    assert y.dtype == torch.bfloat16
    assert torch.equal(y[-5:].cpu(), base[-5:])                              # outside every segment
    assert err(y, ref.detach()) <= 2 * err(plain, ref.detach()) + 1e-3
    for ours, pl, rf in zip(cu[:3], plain_in, ref_in[:3]):
        assert err(ours.grad, rf.grad) <= 2 * err(pl.grad, rf.grad) + 1e-3, (err(ours.grad, rf.grad), err(pl.grad, rf.grad))
    torch.testing.assert_close(cu[3].grad.cpu(), gy)
    unused = sorted(set(range(n)) - set(ids_t[torch.tensor(lengths) > 0].tolist()))
    assert bool((cu[1].grad[unused] == 0).all()) and bool((cu[2].grad[unused] == 0).all())


@cuda
def test_bank_segmented_and_bmm_agree_on_the_gpu():
    model = small_llama().cuda().to(torch.bfloat16)
    for p in model.parameters():
        p.requires_grad_(False)
    ids = torch.randint(0, 1000, (3, 70), device="cuda")
    outs = []
    for impl in ("segmented", "bmm"):
        torch.manual_seed(0)
        bank = LoraBank(model, 4, rank=16, alpha=32, impl=impl)
        with torch.no_grad():
            for b in bank.B.values():
                b.normal_(0, 0.05)
        with bank.route([3, 0, 3]):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        outs.append((loss.detach().float(), [p.grad.clone() for p in bank.parameters()]))
        bank.remove()
    (l0, g0), (l1, g1) = outs
    torch.testing.assert_close(l0, l1, rtol=2e-2, atol=2e-2)
    for a, b in zip(g0, g1):
        assert float((a - b).norm() / (b.norm() + 1e-12)) < 5e-2


@cuda
def test_graphed_step_matches_eager_steps():
    """Three graph replays move the bank exactly as three eager steps do (same batches)."""
    from iicl_fast import ops
    model = small_llama().cuda()
    for p in model.parameters():
        p.requires_grad_(False)
    W = model.get_output_embeddings().weight
    g = torch.Generator(device="cuda").manual_seed(1)
    # distinct adapters per batch: repeated ids make index_add / atomics order-dependent, and Adam
    # magnifies a gradient's last bits where it is tiny (2 of 1280 weights off by 2e-4 relative)
    batches = [(torch.randperm(5, device="cuda", generator=g)[:3].cpu(),
                torch.randint(0, 1000, (3, 9), device="cuda", generator=g),
                torch.randn(27, 64, device="cuda", generator=g)) for _ in range(3)]

    def loss_fn(input_ids, h_t):
        h = model.model(input_ids=input_ids, use_cache=False).last_hidden_state.reshape(-1, 64)
        return ops.forward_kl(h, W, ops.teacher_stats(h_t, W), reduction="mean")

    results = []
    for graphed in (False, True):
        torch.manual_seed(0)
        bank = LoraBank(model, 5, rank=4, alpha=8)
        with torch.no_grad():
            for b in bank.B.values():
                b.normal_(0, 0.05)
        opt = BankAdamW(bank, lr=1e-2)
        losses = []
        if graphed:
            step = GraphedBankStep(bank, opt, loss_fn, {"input_ids": batches[0][1], "h_t": batches[0][2]}, batches[0][0])
            for ids, x, h_t in batches:
                losses.append(step(ids, input_ids=x, h_t=h_t).item())
        else:
            for ids, x, h_t in batches:
                with bank.route(ids):
                    loss = loss_fn(x, h_t)
                bank.model.zero_grad(set_to_none=True)
                for p in bank.parameters():
                    p.grad = None
                loss.backward()
                opt.step(active=ids)
                losses.append(loss.item())
        results.append((losses, [p.detach().clone() for p in bank.parameters()], opt.step_count.clone()))
        bank.remove()
    (l0, p0, s0), (l1, p1, s1) = results
    torch.testing.assert_close(torch.tensor(l1), torch.tensor(l0), rtol=1e-5, atol=1e-6)
    # Adam moves a weight by up to lr per step, g/(|g|+eps) for tiny g: there the last bits of
    # a gradient (cuBLAS may pick other kernels under capture) show in the weight (1 of 1280
    # weights off by 6.7e-6 = 2.5e-4 relative on an H100). Bound: 1/1000 of the largest move.
    for a, b in zip(p0, p1):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-3 * 1e-2 * len(batches))
    assert torch.equal(s0, s1) and int(s1.sum()) > 0
    with pytest.raises(IICLError, match="captured for 3 sequences"):
        step([0, 1], input_ids=batches[0][1][:2], h_t=batches[0][2])
