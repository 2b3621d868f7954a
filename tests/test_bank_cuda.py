"""The extension's CUDA masked AdamW and the graph-captured bank step. They need a GPU and
an extension built with nvcc: on the CPU-only CI they are skipped (and run on the device,
see benchmarks/NOTES.md); the CPU test of the graph's guard runs everywhere."""
import pytest
import torch

from iicl_fast import IICLError
from iicl_fast._ext import available, ext
from iicl_fast.bank import BankAdamW, GraphedBankStep, LoraBank, MaskedAdamW

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
    p[0].grad = torch.zeros(3, 4, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"grads\[0\] must be float32"):
        o.step(active=[0])
    with pytest.raises(IICLError, match="adapter id 3 is out of range"):
        o.step(active=[3])


@cuda
def test_graphed_step_matches_eager_steps():
    """Three graph replays move the bank exactly as three eager steps do (same batches)."""
    from iicl_fast import ops
    model = small_llama().cuda()
    for p in model.parameters():
        p.requires_grad_(False)
    W = model.get_output_embeddings().weight
    g = torch.Generator(device="cuda").manual_seed(1)
    batches = [(torch.randint(0, 5, (3,), device="cuda", generator=g).cpu(),
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
    for a, b in zip(p0, p1):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    assert torch.equal(s0, s1) and int(s1.sum()) > 0
    with pytest.raises(IICLError, match="captured for 3 sequences"):
        step([0, 1], input_ids=batches[0][1][:2], h_t=batches[0][2])
