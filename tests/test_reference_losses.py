"""The plain loss head against float64 full-vocabulary computations."""
import pytest
import torch

from iicl_fast import reference


def full64(h_s, h_t, W, T=1.0, softcap=None):
    zs, zt = h_s.double() @ W.double().t(), h_t.double() @ W.double().t()
    if softcap:
        zs, zt = softcap * torch.tanh(zs / softcap), softcap * torch.tanh(zt / softcap)
    return torch.log_softmax(zs / T, -1), torch.log_softmax(zt / T, -1)


@pytest.mark.parametrize("N,H,V", [(1, 16, 37), (7, 24, 1000), (97, 40, 4099)])
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "seqkd"])
@pytest.mark.parametrize("T,softcap", [(1.0, None), (2.0, 5.0)])
def test_distill_loss_value_and_grad(N, H, V, kind, T, softcap):
    g = torch.Generator().manual_seed(N * V)
    h_s = torch.randn(N, H, generator=g, requires_grad=True)
    h_t = torch.randn(N, H, generator=g)
    W = torch.randn(V, H, generator=g) / H ** 0.5 * 3
    y = torch.randint(0, V, (N,), generator=g)
    loss = reference.distill_loss(kind, h_s, h_t, y, W, temperature=T, softcap=softcap, token_chunk=5)
    loss.backward()

    h64 = h_s.detach().double().requires_grad_(True)
    logq, logp = full64(h64, h_t, W, T, softcap)
    if kind == "forward_kl":
        ref = (logp.exp() * (logp - logq)).sum(-1).mean()
    elif kind == "reverse_kl":
        ref = (logq.exp() * (logq - logp)).sum(-1).mean()
    else:
        ref = -logq.gather(1, y[:, None]).mean()
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-5)
    torch.testing.assert_close(h_s.grad.double(), h64.grad, rtol=1e-3, atol=1e-6)


def test_forward_kl_zero_when_student_equals_teacher():
    h = torch.randn(5, 8)
    W = torch.randn(50, 8)
    assert reference.distill_loss("forward_kl", h, h, torch.zeros(5, dtype=torch.long), W).abs() < 1e-6


def test_token_logprob_and_entropy():
    g = torch.Generator().manual_seed(1)
    h, W = torch.randn(7, 12, generator=g), torch.randn(1000, 12, generator=g)
    y = torch.randint(0, 1000, (7,), generator=g)
    lp, ent = reference.token_logprob(h, W, y, temperature=2.0, token_chunk=3)
    logp = torch.log_softmax(h.double() @ W.double().t() / 2.0, -1)
    torch.testing.assert_close(lp.double(), logp.gather(1, y[:, None]).squeeze(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), -(logp.exp() * logp).sum(-1), rtol=1e-5, atol=1e-5)
