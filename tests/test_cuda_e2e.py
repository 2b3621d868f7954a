"""The consolidation loop on CUDA, end to end (skipped without a GPU; run on the GPU machine).

IICL_MODEL: a .gguf file or model dir to use instead of the embedded model's package."""
import itertools
import json
import os

import pytest
import torch

import iicl_fast
from iicl_fast import cli
from iicl_fast.generation import generate, sampling_generator

from conftest import TINY_CONFIG, make_tiny

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
MODEL = os.environ.get("IICL_MODEL")

DOC = ("The lighthouse of Karsk was built in 1871 by Ada Lindqvist. Its lamp burns whale oil. "
       "The keeper feeds seven grey cats every morning.")


def test_sampling_on_cuda_and_per_chunk_seeds(smol_tokenizer):
    """The sampler's generator lives on the logits' device; chunks draw their own streams."""
    from iicl_fast.elicit import elicit
    from iicl_fast.models import PromptFormat
    tok = smol_tokenizer
    model = make_tiny(tok).to("cuda", torch.bfloat16)
    fmt = PromptFormat(tok, model)
    cfg = iicl_fast.Config(**TINY_CONFIG)
    a = elicit(model, fmt, DOC, cfg, chunk_index=0)
    b = elicit(model, fmt, DOC, cfg, chunk_index=0)
    c = elicit(model, fmt, DOC, cfg, chunk_index=1)
    assert a and [e.response for e in a] == [e.response for e in b]
    assert [e.response for e in a] != [e.response for e in c]
    assert sampling_generator(torch.device("cuda"), 0).device.type == "cuda"
    # draws keyed by row (the Triton sampler's keys): one row at a time, the same set (fp32:
    # batch shapes change no sampled token)
    m32 = make_tiny(tok).to("cuda")
    one = elicit(m32, fmt, DOC, iicl_fast.Config(**{**TINY_CONFIG, "gen_batch_size": 1}), chunk_index=0)
    many = elicit(m32, fmt, DOC, iicl_fast.Config(**{**TINY_CONFIG, "gen_batch_size": 16}), chunk_index=0)
    assert one and [(e.query, e.response) for e in one] == [(e.query, e.response) for e in many]


def test_cascade_greedy_matches_copied_prefix_on_cuda(smol_tokenizer):
    """Cascade attention (one prefix copy) against the per-row prefix copy, greedy, fp32 and bf16."""
    from iicl_fast.models import PromptFormat
    tok = smol_tokenizer
    fmt = PromptFormat(tok)
    prefix = fmt.context_prefix(DOC * 3)
    qs = [fmt.query(q) for q in ("Who built the lighthouse?", "Cats?", "Tell me about the lamp oil of Karsk")]
    kw = dict(max_new_tokens=12, eos_id=fmt.eos_id, pad_id=fmt.pad_id, sample=False, prefix=prefix, batch_size=3)
    model = make_tiny(tok).to("cuda")
    assert generate(model, qs, cascade=True, **kw) == generate(model, qs, cascade=False, **kw)


def test_demo_recall_on_cuda_bf16(capsys):
    argv = ["demo", "--json", "--device", "cuda", "--dtype", "bf16"] + (["--model", MODEL] if MODEL else [])
    assert cli.main(argv) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    print(json.dumps({k: v for k, v in res.items() if k != "answers"}))
    assert res["recall_consolidated"] >= res["recall_full_context"] - 1
    assert res["recall_consolidated"] > res["recall_no_context"]
    assert res["recall_full_context"] >= res["questions"] // 2


def test_cli_consolidate_on_cuda_with_config_flags(tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC)
    out = tmp_path / "mem"
    argv = ["consolidate", str(doc), "--out", str(out), "--device", "cuda", "--preset", "small",
            "--set", "epochs=2", "--set", "n_queries=8", "--set", "n_continuations=8"] + (["--model", MODEL] if MODEL else [])
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "config (cuda:0, bfloat16)" in err and '"epochs": 2' in err
    man = json.loads((out / "manifest.json").read_text())
    assert man["config"]["epochs"] == 2 and len(man["chunks"]) == 1


def test_flash_prefix_part_matches_the_plain_one():
    """decode.attend_prefix through PyTorch's flash op (with its log-sum-exp) against the plain
    fp32 softmax, at an odd prefix length and a GQA-stacked query count."""
    from iicl_fast.decode import _flash_prefix, attend_prefix
    torch.manual_seed(0)
    q = torch.randn(8, 1001, 128, device="cuda", dtype=torch.bfloat16)
    pk, pv = (torch.randn(8, 997, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    from iicl_fast import decode
    assert _flash_prefix(q, pk, pv, 128 ** -0.5) is not None
    o1, l1 = attend_prefix(q, pk, pv, 128 ** -0.5, flash=True)         # cuDNN where it checked out
    o2, l2 = attend_prefix(q, pk, pv, 128 ** -0.5, flash=False)
    o3, l3 = _flash_prefix(q, pk, pv, 128 ** -0.5, cudnn=False)       # the flash op
    print("cuDNN prefix part in use:", decode._CUDNN_OK)
    s = (q.double() @ pk.double().transpose(1, 2)) * 128 ** -0.5
    ref_o, ref_l = torch.softmax(s, -1) @ pv.double(), torch.logsumexp(s, -1, keepdim=True)
    for o, l in ((o1, l1), (o2, l2), (o3, l3)):
        assert (o.double() - ref_o).norm() / ref_o.norm() < 1e-2
        assert (l.double() - ref_l).abs().max() < 1e-2


def test_eval_suites_run_on_cuda(smol_tokenizer):
    """Every evaluation suite, quick sizes, on CUDA in bf16 (the tiny model: the plumbing,
    teacher_adapted's adapter switch and the JSD loss among the ablations)."""
    from iicl_fast.evaluation import SUITES, Sizes, run_suite
    model = make_tiny(smol_tokenizer).to("cuda", torch.bfloat16)
    cfg = iicl_fast.Config(**{**TINY_CONFIG, "epochs": 1, "answer_max_new_tokens": 6})
    for suite in SUITES:
        res = run_suite(suite, model, smol_tokenizer, cfg, seeds=[0], sizes=Sizes.quick(), progress=False,
                        variants=["default", "teacher_adapted", "loss_jsd", "select_random"])
        assert res["device"].startswith("cuda") and res["dtype"] == "bfloat16"
        assert res["results"]
        if suite == "sequence":     # the answer log-probabilities ran on the GPU and are finite
            lp = res["results"]["answer_logprob"]["runs"][0]
            assert all(x is not None and -1e4 < x < 0 for row in lp["matrix"] for x in row), lp
            st = res["results"]["answer_logprob_stream"]["per_stream"][0]
            assert all(x is not None and x < 0 for x in st["by_position_logprob"] + st["base_logprob"]), st


def test_flash_suffix_part_matches_float64():
    """cascade_attention with no cache and no mask (the teacher pass) takes the flash op for the
    rows' own tokens; against float64 attention over [prefix; row] with a causal row part."""
    import math
    from iicl_fast.decode import _PREFIX, _flash_suffix, cascade_attention

    class Layer:
        layer_idx = 0
    torch.manual_seed(0)
    B, kvh, g, n, K, d = 3, 2, 4, 37, 101, 128
    H = kvh * g
    q = torch.randn(B, H, n, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, kvh, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    pk, pv = (torch.randn(kvh, K, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    assert _flash_suffix(q, k, v, d ** -0.5) is not None
    prev = dict(_PREFIX)
    _PREFIX.clear()
    _PREFIX[0] = (pk, pv)
    try:
        out, _ = cascade_attention(Layer(), q, k, v, None, scaling=d ** -0.5)
    finally:
        _PREFIX.clear()
        _PREFIX.update(prev)
    kk = torch.cat([pk[None].expand(B, -1, -1, -1), k], 2).double().repeat_interleave(g, 1)
    vv = torch.cat([pv[None].expand(B, -1, -1, -1), v], 2).double().repeat_interleave(g, 1)
    s = q.double() @ kk.transpose(-1, -2) / math.sqrt(d)
    vis = torch.cat([torch.ones(n, K, dtype=torch.bool, device="cuda"),
                     torch.ones(n, n, dtype=torch.bool, device="cuda").tril()], 1)
    ref = (torch.softmax(s.masked_fill(~vis, -math.inf), -1) @ vv).transpose(1, 2)
    assert torch.isfinite(out).all()
    assert (out.double() - ref).norm() / ref.norm() < 1e-2


def test_fast_lora_on_cuda_bf16():
    """iicl_fast.lora on CUDA in bf16 (mm with an fp32 result for the LoRA gradients), against
    float64, forward and gradients, no worse than a small multiple of peft's own path."""
    import sys
    sys.path.insert(0, os.path.dirname(__file__))
    from test_lora import float64_ref, outputs_and_grads, peft_net, rel
    from iicl_fast.lora import install
    pm, layer = peft_net(200, 333, True)
    pm.to("cuda")
    x = torch.randn(3, 97, 200, device="cuda", dtype=torch.bfloat16)
    c = torch.randn(3, 97, 333, device="cuda", dtype=torch.float64)
    ref, xd, A64, B64 = float64_ref(layer, x)
    (ref * c).sum().backward()
    plain = outputs_and_grads(pm, layer, x, c)
    install(pm)
    fast = outputs_and_grads(pm, layer, x, c)
    for got, want, base in zip(fast, (ref, xd.grad, A64.grad, B64.grad), plain):
        err, err_plain = rel(got, want), rel(base, want)
        assert err < 2e-2 and err <= max(4 * err_plain, 8e-3), (err, err_plain)


@pytest.mark.parametrize("n,h,inter", [(1, 4096, 14336), (97, 130, 37), (4099, 576, 1536)])
def test_fused_layers_bf16_on_cuda(n, h, inter, monkeypatch):
    """iicl_fast/kernels/rmsnorm.py and iicl_fast/kernels/swiglu.py in bf16 (the interpreter truncates bf16 casts,
    so bf16 is checked here): against float64, no worse than 2× transformers' own bf16 path."""
    from iicl_fast.kernels.reference_rmsnorm import rmsnorm_ref
    from iicl_fast.kernels.reference_swiglu import swiglu_ref
    from iicl_fast.kernels import rmsnorm as k1, swiglu as k2
    from iicl_fast.layers import rmsnorm, swiglu
    monkeypatch.setattr(k1, "POISON", True)
    monkeypatch.setattr(k2, "POISON", True)

    def rel(a, b):
        return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())
    torch.manual_seed(n)
    x = (torch.randn(n, h, device="cuda") * 3).to(torch.bfloat16).requires_grad_(True)
    w = (1 + 0.3 * torch.randn(h, device="cuda")).to(torch.bfloat16)
    dy = torch.randn(n, h, device="cuda").to(torch.bfloat16)
    y = rmsnorm(x, w, 1e-5)
    (dx,) = torch.autograd.grad(y, x, dy)
    x64 = x.detach().double().requires_grad_(True)
    y64 = rmsnorm_ref(x64, w, 1e-5, dtype=torch.float64)
    (dx64,) = torch.autograd.grad(y64, x64, dy.double())
    yp = rmsnorm_ref(x, w, 1e-5)
    (dxp,) = torch.autograd.grad(yp, x, dy)
    assert rel(y, y64) <= 2 * rel(yp, y64) and rel(dx, dx64) <= 2 * rel(dxp, dx64)
    assert rel(y, yp) < 1e-2
    g = (torch.randn(n, inter, device="cuda") * 3).to(torch.bfloat16).requires_grad_(True)
    u = torch.randn(n, inter, device="cuda").to(torch.bfloat16).requires_grad_(True)
    dh = torch.randn(n, inter, device="cuda").to(torch.bfloat16)
    hh = swiglu(g, u)
    dg, du = torch.autograd.grad(hh, (g, u), dh)
    g64, u64 = g.detach().double().requires_grad_(True), u.detach().double().requires_grad_(True)
    h64 = swiglu_ref(g64, u64)
    dg64, du64 = torch.autograd.grad(h64, (g64, u64), dh.double())
    hp = swiglu_ref(g, u)
    dgp, dup = torch.autograd.grad(hp, (g, u), dh)
    for ours, plain, truth in ((hh, hp, h64), (dg, dgp, dg64), (du, dup, du64)):
        assert rel(ours, truth) <= 2 * rel(plain, truth)


@pytest.mark.parametrize("B,Hq,Hk,T,d", [(1, 32, 8, 1, 128), (3, 9, 3, 97, 64), (2, 32, 8, 4099, 128)])
def test_fused_rotary_bf16_on_cuda(B, Hq, Hk, T, d, monkeypatch):
    """iicl_fast/kernels/rotary.py's training path in bf16 on strided [B, H, T, d] views: forward bit-equal
    to transformers' apply_rotary_pos_emb, gradients no worse than 2x its bf16 autograd (fp64 truth)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    from iicl_fast.kernels import rotary as kr
    from iicl_fast.kernels.reference_rotary import rope_ref
    from iicl_fast.layers import rotary
    monkeypatch.setattr(kr, "POISON", True)
    plain = getattr(apply_rotary_pos_emb, "__wrapped_original__", apply_rotary_pos_emb)
    torch.manual_seed(T)
    q = torch.randn(B, T, Hq, d, device="cuda").to(torch.bfloat16).transpose(1, 2).requires_grad_(True)
    k = torch.randn(B, T, Hk, d, device="cuda").to(torch.bfloat16).transpose(1, 2).requires_grad_(True)
    ang = torch.rand(B, T, d // 2, device="cuda") * 4000
    cos, sin = torch.cat([ang.cos()] * 2, -1).bfloat16(), torch.cat([ang.sin()] * 2, -1).bfloat16()
    qo, ko = rotary(q, k, cos, sin)
    pq, pk = plain(q, k, cos, sin)
    for o, p in ((qo, pq), (ko, pk)):
        assert torch.equal(o, p), (int((o != p).sum()), o.numel(), float((o.float() - p.float()).abs().max()))
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    ours = torch.autograd.grad((qo, ko), (q, k), (gq, gk))
    base = torch.autograd.grad((pq, pk), (q, k), (gq, gk))
    q64, k64 = q.detach().double().requires_grad_(True), k.detach().double().requires_grad_(True)
    truth = torch.autograd.grad(rope_ref(q64, k64, cos, sin), (q64, k64), (gq.double(), gk.double()))

    def rel(a, b):
        return float((a.double() - b).norm() / b.norm())
    for o, p, t in zip(ours, base, truth):
        assert torch.isfinite(o).all() and rel(o, t) <= 2 * rel(p, t) + 1e-6


def test_prose_anchors_on_cuda_bf16(smol_tokenizer):
    """Prose anchors on CUDA: raw prompts sampled through the static decoder (the same draws
    in any batch size, fp32), then a chunk trained with them on packed rows in bf16."""
    from iicl_fast.elicit import prose_anchor_entries
    from iicl_fast.models import PromptFormat
    tok = smol_tokenizer
    m32 = make_tiny(tok).to("cuda")
    fmt = PromptFormat(tok, m32)
    one, many = (prose_anchor_entries(m32, fmt, iicl_fast.Config(**{**TINY_CONFIG, "prose_anchors": 5, "gen_batch_size": b}))
                 for b in (1, 16))
    assert len(one) == 5 and all(e.raw == fmt.encode(e.query) for e in one)
    assert [e.response for e in one] == [e.response for e in many]
    model = make_tiny(tok).to("cuda", torch.bfloat16)
    mem = iicl_fast.Memory(model, tok, iicl_fast.Config(**{**TINY_CONFIG, "prose_anchors": 6, "anchor_entries": 2}))
    rep = mem.consolidate(DOC)
    assert rep.anchored == 8 and all(torch.isfinite(torch.tensor(rep.loss_per_epoch)))


def test_training_moves_the_model_on_cuda_bf16(smol_tokenizer, monkeypatch):
    """Consolidation in bf16 on CUDA changes what the model computes: the loss falls over the
    epochs, and after training the fast LoRA forward (cached bf16 copies) equals peft's own
    forward from the trained fp32 weights. (A stale copy once kept the loss constant.)
    Training's forward runs on packed rows (decode.varlen_causal)."""
    from iicl_fast import decode, lora
    calls = []
    real = decode.varlen_causal
    monkeypatch.setattr(decode, "varlen_causal", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    tok = smol_tokenizer
    model = make_tiny(tok).to("cuda", torch.bfloat16)
    mem = iicl_fast.Memory(model, tok, iicl_fast.Config(**{**TINY_CONFIG, "epochs": 3, "lr": 3e-3}))
    probe = torch.tensor([mem.fmt.prompt("Who built the lighthouse?")], device="cuda")
    with torch.no_grad():
        before = mem.model(input_ids=probe).logits.float()
    rep = mem.consolidate(DOC)
    print("loss per epoch", rep.loss_per_epoch)
    assert rep.loss_per_epoch[-1] < rep.loss_per_epoch[0]
    assert calls, "training did not run on packed rows"
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        fast = mem.model(input_ids=probe).logits.float()
        lora.uninstall(mem.model)
        plain = mem.model(input_ids=probe).logits.float()
        lora.install(mem.model)
    assert (fast - before).abs().max() > 1e-2
    assert (fast - plain).norm() / plain.norm() < 2e-2


@pytest.mark.parametrize("lengths,Hq,Hk", [([1], 8, 2), ([97, 5, 33], 8, 2), ([593, 577, 1, 600], 32, 8)])
def test_varlen_causal_bf16_on_cuda(lengths, Hq, Hk):
    """decode.varlen_causal (flash's variable-length kernel over a packed row): output and
    q / k / v gradients against float64, each no worse than 2× SDPA's flash kernel run per
    sequence in bf16 on the same inputs."""
    import math

    from torch.nn.attention import SDPBackend, sdpa_kernel

    from iicl_fast.decode import varlen_causal
    T, d = sum(lengths), 128
    g = torch.Generator(device="cuda").manual_seed(T)
    q, k, v = (torch.randn(T, h, d, generator=g, device="cuda").bfloat16().requires_grad_() for h in (Hq, Hk, Hk))
    go = torch.randn(T, Hq, d, generator=g, device="cuda").bfloat16()
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    out = varlen_causal(q, k, v, cu, max(lengths), scale=d ** -0.5)
    ours = (out, *torch.autograd.grad(out, (q, k, v), go))
    parts, bounds = [], cu.tolist()
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]):
        for a, b in zip(bounds[:-1], bounds[1:]):
            qs, ks, vs = (x[a:b].transpose(0, 1)[None] for x in (q, k, v))
            parts.append(torch.nn.functional.scaled_dot_product_attention(
                qs, ks, vs, is_causal=True, enable_gqa=True)[0].transpose(0, 1))
    o = torch.cat(parts)
    flash = (o, *torch.autograd.grad(o, (q, k, v), go))
    seq = torch.repeat_interleave(torch.arange(len(lengths), device="cuda"), torch.tensor(lengths, device="cuda"))
    allowed = (seq[:, None] == seq[None]) & torch.ones(T, T, dtype=torch.bool, device="cuda").tril()
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    kk, vv = (x.repeat_interleave(Hq // Hk, 1).transpose(0, 1) for x in (k64, v64))
    s = (q64.transpose(0, 1) @ kk.transpose(-1, -2) * d ** -0.5).masked_fill(~allowed, -math.inf)
    o64 = (torch.softmax(s, -1) @ vv).transpose(0, 1)
    ref = (o64, *torch.autograd.grad(o64, (q64, k64, v64), go.double()))
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()   # noqa: E731
    for name, a, f, r in zip(("out", "dq", "dk", "dv"), ours, flash, ref):
        print(name, f"varlen {rel(a, r):.2e}, flash per sequence {rel(f, r):.2e}")
        assert torch.isfinite(a).all() and rel(a, r) <= 2 * rel(f, r) + 1e-6, name


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float32, 1e-4)])
def test_packed_student_hidden_on_cuda(smol_tokenizer, dtype, tol):
    """The packed training row on CUDA (bf16: flash's varlen kernel; fp32, which flash has not:
    SDPA per sequence) against the padded batch: hidden states and LoRA gradients within the
    dtype's rounding of each other."""
    from iicl_fast.elicit import Entry
    from iicl_fast.teacher import student_hidden
    tok = smol_tokenizer
    model = make_tiny(tok).to("cuda", dtype)
    mem = iicl_fast.Memory(model, tok, iicl_fast.Config(**TINY_CONFIG))
    for p in mem.params:
        torch.nn.init.normal_(p, std=0.02)
    entries = [Entry("qa", "Who built the lighthouse?", list(range(5, 45))),
               Entry("continuation", "Continue: the keeper feeds seven", [7, 1]),
               Entry("qa", "When?", list(range(100, 161)))]
    out = {}
    for packed in (False, True):
        for p in mem.params:
            p.grad = None
        h = student_hidden(mem.model, mem.fmt, entries, packed=packed)
        (h.float() * torch.linspace(-1, 1, h.shape[1], device="cuda")).sum().backward()
        out[packed] = (h.detach().float(), [p.grad.clone() for p in mem.params])
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()   # noqa: E731
    print("hidden", rel(out[True][0], out[False][0]), "grads", max(rel(a, b) for a, b in zip(out[True][1], out[False][1])))
    assert rel(out[True][0], out[False][0]) < tol
    assert all(rel(a, b) < 2.5 * tol for a, b in zip(out[True][1], out[False][1]))


# --- issue 12: the static decoder's kernels and loop on the GPU ---------------------------

@pytest.mark.parametrize("merge_pipe,partials16", [(False, False), (True, False), (False, True)])
def test_cascade_decode_and_sampler_bf16_on_cuda(monkeypatch, merge_pipe, partials16):
    """The decode-attention kernel at the 8B head shapes (bf16, tensor cores) against float64,
    no worse than twice plain bf16 (the suffix programs' merge in loops, or pipelined:
    MERGE_PIPE; the partials in bf16: PARTIALS_16); the sampler's draws against the exact nucleus."""
    from iicl_fast.kernels import prefix_attention as pa
    from iicl_fast.kernels import sampling
    from iicl_fast.kernels.reference_prefix_attention import cascade_decode_ref
    from iicl_fast.kernels.reference_sampling import top_p_probs_ref
    monkeypatch.setattr(pa, "POISON", True)
    monkeypatch.setattr(sampling, "POISON", True)
    monkeypatch.setattr(pa, "MERGE_PIPE", merge_pipe)
    monkeypatch.setattr(pa, "PARTIALS_16", partials16)
    g = torch.Generator(device="cuda").manual_seed(0)
    for B, K, S in ((37, 5003, 77), (1, 1, 1), (400, 5000, 600), (64, 5000, 144)):
        q = torch.randn(B, 32, 128, device="cuda", generator=g).bfloat16()
        pk, pv = (torch.randn(8, K, 128, device="cuda", generator=g).bfloat16() for _ in range(2))
        ks, vs = (torch.randn(B, 8, S, 128, device="cuda", generator=g).bfloat16() for _ in range(2))
        cur = torch.tensor([S - 1], dtype=torch.int32, device="cuda")
        lo = torch.randint(0, S, (B,), device="cuda", generator=g).to(torch.int32)
        o = pa.cascade_decode(q, pk, pv, ks, vs, lo, cur, 128 ** -0.5)
        sub = slice(0, min(B, 40))        # float64 on a slice of rows: the reference is [B, 32, K] scores
        o64 = cascade_decode_ref(q[sub], pk, pv, ks[sub], vs[sub], lo[sub], cur, 128 ** -0.5)
        ob = cascade_decode_ref(q[sub], pk, pv, ks[sub], vs[sub], lo[sub], cur, 128 ** -0.5, dtype=torch.bfloat16)
        err, err_b = (o[sub].double() - o64).abs().max().item(), (ob.double() - o64).abs().max().item()
        print(f"cascade_decode B={B} K={K} S={S}: err {err:.2e}, plain bf16 {err_b:.2e}")
        assert torch.isfinite(o).all() and err <= max(2 * err_b, 1e-3)
    V, n = 1003, 200_000
    z = torch.randn(V, device="cuda", generator=g) * 3
    want = top_p_probs_ref(z[None].cpu(), 0.7, 0.9)[0]
    tok = sampling.sample_top_p(z[None].expand(n, V).contiguous(), torch.tensor([5], device="cuda"), 0.7, 0.9)
    freq = torch.bincount(tok.cpu(), minlength=V).double() / n
    assert freq[want == 0].sum() == 0
    assert ((freq - want).abs() <= 5 * torch.sqrt(want * (1 - want) / n) + 2 / n).all()


def _scaled_tiny(tok, dtype):
    model = make_tiny(tok)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model.to("cuda", dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_decoder_graph_equals_eager_on_cuda(smol_tokenizer, dtype, monkeypatch):
    """The captured step replays what the eager step computes (bf16 and fp32: same tokens),
    through a compaction; fp32 also equals the plain loop with a copied prefix."""
    import iicl_fast.decode as D
    monkeypatch.setattr(D, "STOP_CHECK_EVERY", 4)
    monkeypatch.setattr(D, "COMPACT_BELOW", 0.9)
    model = _scaled_tiny(smol_tokenizer, dtype)
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(3, 40000, (301,), generator=g).tolist()
    qs = [torch.randint(3, 40000, (n,), generator=g).tolist() for n in (5, 17, 1, 9, 30, 2)]
    kw = dict(max_new_tokens=24, pad_id=0, sample=False, prefix=prefix, batch_size=6)
    first = generate(model, qs, stop_ids=[10 ** 6], static=False, cascade=False, **kw)
    kw["stop_ids"] = [first[2][5]]
    graph = generate(model, qs, static=True, **kw)
    monkeypatch.setattr(D, "GRAPHS", False)
    eager = generate(model, qs, static=True, **kw)
    assert graph == eager
    if dtype == torch.float32:
        assert graph == generate(model, qs, static=False, cascade=False, **kw)


def test_flash_prefix_in_the_decoding_step(smol_tokenizer, monkeypatch):
    """decode.FLASH_PREFIX: cascade_decode's prefix part through the flash op, at odd shapes
    (7 rows, group 4, a 997-token prefix) against float64 — no worse than twice the plain bf16
    error — inside a captured graph as eager; and the static decoder's greedy tokens with it,
    captured and eager, equal."""
    import iicl_fast.decode as D
    from iicl_fast.kernels.prefix_attention import cascade_decode
    from iicl_fast.kernels.reference_prefix_attention import cascade_decode_ref
    torch.manual_seed(0)
    B, Hq, Hkv, K, S, d = 7, 32, 8, 997, 41, 128
    q = torch.randn(B, Hq, d, device="cuda", dtype=torch.bfloat16)
    pk, pv = (torch.randn(Hkv, K, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ks, vs = (torch.randn(B, Hkv, S, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    cur = torch.tensor([S - 3], dtype=torch.int32, device="cuda")
    lo = torch.randint(0, S - 2, (B,), device="cuda").to(torch.int32)
    call = lambda: cascade_decode(q, pk, pv, ks, vs, lo, cur, d ** -0.5, prefix=D._flash_prefix)   # noqa: E731
    o = call()
    o64 = cascade_decode_ref(q.cpu(), pk.cpu(), pv.cpu(), ks.cpu(), vs.cpu(), lo.cpu(), cur.cpu(), d ** -0.5)
    ot = cascade_decode_ref(q.cpu(), pk.cpu(), pv.cpu(), ks.cpu(), vs.cpu(), lo.cpu(), cur.cpu(), d ** -0.5,
                            dtype=torch.bfloat16)
    err, err_t = (o.cpu().double() - o64).abs().max().item(), (ot.double() - o64).abs().max().item()
    assert err <= max(2 * err_t, 1e-3), (err, err_t)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        call()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, o)
    monkeypatch.setattr(D, "FLASH_PREFIX", True)
    monkeypatch.setattr(D, "FLASH_PREFIX_MIN_M", 1)
    model = _scaled_tiny(smol_tokenizer, torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(3, 40000, (301,), generator=g).tolist()
    qs = [torch.randint(3, 40000, (n,), generator=g).tolist() for n in (5, 17, 1, 9, 30, 2)]
    kw = dict(max_new_tokens=24, pad_id=0, sample=False, prefix=prefix, batch_size=6, stop_ids=[10 ** 6])
    graphed = generate(model, qs, static=True, **kw)
    monkeypatch.setattr(D, "GRAPHS", False)
    assert graphed == generate(model, qs, static=True, **kw)


def test_fused_projections_on_cuda(smol_tokenizer, monkeypatch):
    """A Memory on CUDA lays q/k/v and gate/up out for one GEMM each (layers.fuse_projections):
    fp32, the decoder's greedy tokens with the fused GEMMs equal the per-projection ones and
    the plain loop's; bf16, FusedLinears (LoRA on) within a bf16 rounding of the modules."""
    import iicl_fast.decode as D
    from iicl_fast import layers
    monkeypatch.setattr(D, "STOP_CHECK_EVERY", 4)
    monkeypatch.setattr(D, "COMPACT_BELOW", 0.9)
    for dtype in (torch.float32, torch.bfloat16):
        model = _scaled_tiny(smol_tokenizer, dtype)
        mem = iicl_fast.Memory(model, smol_tokenizer, iicl_fast.Config(**TINY_CONFIG))
        with torch.no_grad():
            for p in mem.params:
                p.normal_(0, 0.05)
        body = mem.model.get_base_model().model
        a, mlp = body.layers[0].self_attn, body.layers[0].mlp
        qkv = layers.FusedLinears.of([a.q_proj, a.k_proj, a.v_proj])
        gu = layers.FusedLinears.of([mlp.gate_proj, mlp.up_proj])
        assert qkv is not None and gu is not None and qkv.adapted
        x = torch.randn(37, a.q_proj.in_features, device="cuda", dtype=dtype)
        with torch.no_grad():
            for f, mods in ((qkv, [a.q_proj, a.k_proj, a.v_proj]), (gu, [mlp.gate_proj, mlp.up_proj])):
                want = torch.cat([m(x) for m in mods], -1).float()
                err = float((f(x).float() - want).norm() / want.norm())
                assert err < (1e-6 if dtype == torch.float32 else 8e-3), err
        if dtype == torch.bfloat16:
            continue
        g = torch.Generator().manual_seed(0)
        prefix = torch.randint(3, 40000, (211,), generator=g).tolist()
        qs = [torch.randint(3, 40000, (n,), generator=g).tolist() for n in (5, 17, 1, 9)]
        kw = dict(max_new_tokens=20, pad_id=0, sample=False, prefix=prefix, batch_size=4, stop_ids=[10 ** 6])
        fused = generate(mem.model, qs, static=True, **kw)
        monkeypatch.setattr(D, "FUSED_PROJ", False)
        assert generate(mem.model, qs, static=True, **kw) == fused
        monkeypatch.setattr(D, "FUSED_PROJ", True)
        assert generate(mem.model, qs, static=False, cascade=False, **kw) == fused


def test_captures_leave_no_memory_behind(smol_tokenizer):
    """Generations with captured steps, one after another, end with the same memory allocated:
    a fresh side stream per capture left a 32 MiB cuBLAS workspace behind each (a stress
    stream grew ~64 MB a chunk)."""
    import gc

    model = _scaled_tiny(smol_tokenizer, torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(3, 40000, (200,), generator=g).tolist()
    qs = [torch.randint(3, 40000, (n,), generator=g).tolist() for n in (4, 9, 2)]
    kw = dict(max_new_tokens=20, pad_id=0, sample=True, temperature=0.7, top_p=0.9, prefix=prefix, batch_size=3,
              stop_ids=[10 ** 6], static=True)
    after = []
    for i in range(4):
        generate(model, qs, generator=sampling_generator("cuda", i), **kw)
        gc.collect()
        after.append(torch.cuda.memory_allocated())
    assert after[1] == after[2] == after[3], after


def test_library_passes_keep_cudnn_attention_off():
    """decode.sdpa_backends: cuDNN attention off inside (its per-shape plans are never freed),
    the caller's backend settings back after."""
    from iicl_fast.decode import sdpa_backends
    before = torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled()
    with sdpa_backends():
        assert not torch.backends.cuda.cudnn_sdp_enabled() and torch.backends.cuda.flash_sdp_enabled() == before[1]
        q = torch.randn(1, 2, 37, 64, device="cuda", dtype=torch.bfloat16)
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled()) == before


def test_static_greedy_matches_transformers_on_the_embedded_model():
    """fp32: every row's greedy tokens equal transformers' generate; bf16: the rate of rows
    that diverge is printed (the issue's figure), not asserted."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from greedy_equality import compare
    from iicl_fast.models import load_model
    res = []
    for dtype in ("fp32", "bf16"):
        model, tok = load_model(MODEL, device="cuda", dtype=dtype)
        res.append(compare(model, tok, rows=16, new=48))
        print(res[-1])
    if os.environ.get("IICL_RESULTS"):          # the device run keeps the figures
        with open(os.path.join(os.environ["IICL_RESULTS"], "greedy_equality.json"), "w") as f:
            json.dump(res, f, indent=1)
    assert res[0]["rows_identical"] == res[0]["rows"], res[0]


_WORKSPACE_PROBE = """
import sys, torch
from iicl_fast.graphs import touch_workspaces, warm_up
if sys.argv[1] == "touch":
    touch_workspaces()
before = torch.cuda.memory_allocated()
a = torch.randn(300, 200, device="cuda", dtype=torch.bfloat16, requires_grad=True)
w = torch.randn(200, 100, device="cuda", dtype=torch.bfloat16)
(a @ w).float().square().sum().backward()
warm_up(lambda: a.detach() @ w)
del a, w
torch.cuda.synchronize()
print(torch.cuda.memory_allocated() - before)
"""


@pytest.mark.parametrize("touch", [True, False])
def test_touched_workspaces_leave_nothing_for_a_first_chunk(touch):
    """After graphs.touch_workspaces, a fresh process's matmuls forward, backward (autograd's
    thread: its own cuBLAS handle) and on the side stream allocate nothing that stays; without
    it they leave workspaces behind (that is what made a resumed process's first chunk peak
    ~32 MiB below the others)."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", _WORKSPACE_PROBE, "touch" if touch else "plain"],
                         capture_output=True, text=True, check=True)
    left = int(out.stdout.split()[-1])
    if touch:
        assert left == 0, left
    else:
        assert left >= 2**20, left


def test_stream_reports_peak_memory_by_phase(smol_tokenizer, tmp_path):
    """A stream on CUDA reports each chunk's peak per phase (elicit, teacher, select, train,
    save), the chunk's peak being the largest, every one above the weights' own bytes."""
    from iicl_fast.driver import stream
    tok = smol_tokenizer
    model = make_tiny(tok).to("cuda", torch.bfloat16)
    mem = iicl_fast.Memory(model, tok, iicl_fast.Config(**{**TINY_CONFIG, "chunk_tokens": 40}))
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    reps = [r for r in stream(mem, DOC + " " + DOC.replace("Karsk", "Vell"), checkpoint_dir=tmp_path / "m")]
    assert len(reps) >= 2
    for r in reps:
        assert set(r.peak_gib_phase) == {"elicit", "teacher", "select", "train", "save"}, r.peak_gib_phase
        assert r.peak_gib == max(r.peak_gib_phase.values())
        assert min(r.peak_gib_phase.values()) > weights
        assert set(r.held_gib_phase) == set(r.peak_gib_phase)
        assert all(weights < r.held_gib_phase[k] <= r.peak_gib_phase[k] for k in r.peak_gib_phase)


def test_bank_training_on_cuda_bf16(smol_tokenizer):
    """consolidate_many on CUDA: the passes pack by default there, the bank's training keeps
    padded rows (it routes each row to its document's adapter; a packed micro-batch is one
    row and raised before e6d0768). Every document's adapter is trained and recalls apart."""
    from iicl_fast.teacher import pack_by_default
    tok = smol_tokenizer
    model = make_tiny(tok).to("cuda", torch.bfloat16)
    assert pack_by_default(model, torch.device("cuda"))
    docs = [DOC, "The keeper feeds seven grey cats every morning. Harbour master Olle Brand counts ships."]
    mems = iicl_fast.consolidate_many(model, tok, docs, iicl_fast.Config(**TINY_CONFIG))
    assert len(mems) == 2 and all(m.report.loss_per_epoch for m in mems)
    for m in mems:
        b = [p for n, p in m.model.named_parameters() if f"lora_B.{m.name}." in n]
        assert b and all(torch.isfinite(p).all() for p in b) and max(float(p.abs().max()) for p in b) > 0


def _bf16_memory_with_lora(tok):
    """A Memory over the scaled tiny model in bf16 (fused layers installed, q/k/v and gate/up
    laid out) with its adapter's weights non-zero."""
    mem = iicl_fast.Memory(_scaled_tiny(tok, torch.bfloat16), tok, iicl_fast.Config(**TINY_CONFIG))
    with torch.no_grad():
        for p in mem.params:
            p.normal_(0, 0.05)
    return mem


def _count_calls(monkeypatch, module, name) -> list:
    """module.name still runs, each call appending 1 to the list returned."""
    calls, orig = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a: calls.append(1) or orig(*a))
    return calls


def _step_setting_matches(mem, monkeypatch, attr: str, off, on, calls: list, seed: int, what: str) -> None:
    """A Memory's decoding step with decode.<attr> = on against = off (6 rows after a 211-token
    prefix, greedy): with off, `calls` (a _count_calls list of the path `on` takes) stays empty;
    with on it fills, and the captured and eager steps write the same tokens through a compaction.
    Then the first decoded step's final states (each row's token 0 comes from the same prefill,
    so the step's inputs are equal) no further from off's than 2× what another correct GEMM's
    summation order moves them (cuBLASLt), at least 4 bf16 ulps of the largest. Greedy tokens
    are no test there: 3 of 6 rows kept cuBLAS's first 8 under the skinny GEMM on the H200 (the
    random model's near ties flip under any reordering), and a wiring fault (the adapter's term
    dropped, a wrong layout) moves the states by O(1), not by rounding."""
    import iicl_fast.decode as D
    monkeypatch.setattr(D, "STOP_CHECK_EVERY", 4)
    monkeypatch.setattr(D, "COMPACT_BELOW", 0.9)
    monkeypatch.setattr(D, attr, off)
    gen = torch.Generator().manual_seed(seed)
    prefix = torch.randint(3, 40000, (211,), generator=gen).tolist()
    qs = [torch.randint(3, 40000, (n,), generator=gen).tolist() for n in (5, 17, 1, 9, 30, 2)]
    kw = dict(max_new_tokens=24, pad_id=0, sample=False, prefix=prefix, batch_size=6)
    plain = generate(mem.model, qs, static=True, stop_ids=[10 ** 6], **kw)
    assert not calls
    monkeypatch.setattr(D, attr, on)
    kw["stop_ids"] = [plain[2][5]]
    graph_tokens = generate(mem.model, qs, static=True, **kw)
    assert calls
    monkeypatch.setattr(D, "GRAPHS", False)
    assert generate(mem.model, qs, static=True, **kw) == graph_tokens
    monkeypatch.setattr(D, "GRAPHS", True)
    kw.update(stop_ids=[10 ** 6], max_new_tokens=2)

    def first_step(value, blaslt="off"):
        monkeypatch.setattr(D, attr, value)
        monkeypatch.setattr(D, "BLASLT", blaslt)
        ids, states = generate(mem.model, qs, static=True, hidden=True, **kw)
        return [r[0] for r in ids], torch.stack([h[1] for h in states]).float()

    t_off, h_off = first_step(off)
    t_lt, h_lt = first_step(off, "on")
    t_on, h_on = first_step(on)
    assert t_off == t_lt == t_on
    ulp = torch.finfo(torch.bfloat16).eps * h_off.abs().max().item()
    lt_moves = (h_lt - h_off).abs().max().item()
    moved = (h_on - h_off).abs().max().item()
    print(f"first step's states: {what} moves them {moved:.4g} from {attr}={off}, cuBLASLt {lt_moves:.4g} (ulp {ulp:.3g})")
    assert moved <= 2 * max(lt_moves, 4 * ulp), (moved, lt_moves, ulp)


def test_add_norm_step_equals_the_separate_kernels_on_cuda(smol_tokenizer, monkeypatch):
    """The residual add folded into the norm kernel (decode.ADD_NORM) is the separate add and
    norm bit for bit in bf16: the kernel at odd shapes, and a Memory's captured decoding step
    (LoRA on, q/k/v and gate/up laid out) writing the same greedy tokens with it on and off."""
    import iicl_fast.decode as D
    from iicl_fast.kernels import rmsnorm as k
    monkeypatch.setattr(k, "POISON", True)
    for n, hdim in ((1, 4096), (97, 130), (400, 576)):
        g = torch.Generator(device="cuda").manual_seed(n)
        h = (torch.randn(n, hdim, device="cuda", generator=g) * 3).bfloat16()
        y = torch.randn(n, hdim, device="cuda", generator=g).bfloat16()
        w = (1 + 0.3 * torch.randn(hdim, device="cuda", generator=g)).bfloat16()
        s, x = k.add_rmsnorm_forward(h, y, w, 1e-5)
        assert torch.equal(s, h + y) and torch.equal(x, k.rmsnorm_forward(h + y, w, 1e-5)[0])
    mem = _bf16_memory_with_lora(smol_tokenizer)
    calls = _count_calls(monkeypatch, k, "add_rmsnorm_forward")
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(3, 40000, (211,), generator=g).tolist()
    qs = [torch.randint(3, 40000, (n,), generator=g).tolist() for n in (5, 17, 1, 9)]
    kw = dict(max_new_tokens=20, pad_id=0, sample=False, prefix=prefix, batch_size=4, stop_ids=[10 ** 6])
    folded = generate(mem.model, qs, static=True, **kw)
    assert calls                                            # the step took the folded kernels
    monkeypatch.setattr(D, "ADD_NORM", False)
    assert generate(mem.model, qs, static=True, **kw) == folded


@pytest.mark.parametrize("block_v", [128, 8192])
def test_sampler_over_many_blocks_on_cuda(block_v):
    """The sampler walking a row in several blocks (its max rising between them) or in one:
    200,000 draws over 1,003 tokens follow the nucleus distribution; the 8B vocabulary in
    16 blocks of 8,192 draws only nucleus tokens."""
    from iicl_fast.kernels import sampling
    from iicl_fast.kernels.reference_sampling import top_p_probs_ref
    g = torch.Generator(device="cuda").manual_seed(9)
    V, n = 1003, 200_000
    z = torch.randn(V, device="cuda", generator=g) * 3
    want = top_p_probs_ref(z[None].cpu(), 0.7, 0.9)[0]
    tok = sampling.sample_top_p(z[None].expand(n, V).contiguous(), torch.tensor([3], device="cuda"), 0.7, 0.9,
                                block_v=block_v)
    freq = torch.bincount(tok.cpu(), minlength=V).double() / n
    assert freq[want == 0].sum() == 0
    assert ((freq - want).abs() <= 5 * torch.sqrt(want * (1 - want) / n) + 2 / n).all()
    big = torch.randn(64, 128256, device="cuda", generator=g) * 2.5
    tok = sampling.sample_top_p(big, torch.tensor([4], device="cuda"), 0.7, 0.9, block_v=block_v)
    # the nucleus by a sort: top_p_probs_ref compares every pair of tokens ([B, V, V]: at the 8B
    # vocabulary ~8 PB, which got this test's process killed on its first GPU run)
    probs = torch.softmax(big.cpu().double() / 0.7, -1)
    s = probs.sort(-1, descending=True).values
    least_kept = torch.where(s.cumsum(-1) - s < 0.9, s, torch.inf).amin(-1)
    assert (probs.gather(1, tok.cpu()[:, None])[:, 0] >= least_kept * (1 - 1e-9)).all()


def test_skinny_gemm_on_cuda(smol_tokenizer, monkeypatch):
    """kernels/skinny_gemm.py on the GPU (bf16 tensor cores): the 8B projections' shapes and odd
    ones at 1-128 rows, one split and several, with an added term, within 2× cuBLAS's error
    against float64; a split-K launch replayed in a CUDA graph on new inputs repeats the eager
    launch bit for bit (the counters reset); and a Memory's decoding step with IICL_DECODE_GEMM=
    triton (LoRA on, q/k/v and gate/up laid out) writes the same greedy tokens captured and
    eager, through a compaction, and its first step's states are as close to cuBLAS's as
    cuBLASLt's are."""
    import iicl_fast.decode as D
    from iicl_fast.kernels import skinny_gemm as sg
    monkeypatch.setattr(sg, "POISON", True)
    g = torch.Generator(device="cuda").manual_seed(0)
    for (N, K), cfg in itertools.product([(6144, 4096), (4096, 14336), (97, 515), (1000, 4096)],
                                         [None, dict(block_n=64, block_k=128, split_k=8, num_warps=4, num_stages=4)]):
        monkeypatch.setattr(sg, "CFG", cfg)
        w = (torch.randn(N, K, device="cuda", generator=g) / K ** 0.5).bfloat16()
        for M in (1, 7, 64, 97, 128):
            x = torch.randn(M, K, device="cuda", generator=g).bfloat16()
            a = torch.randn(M, N, device="cuda", generator=g).bfloat16() if M % 2 else None
            want = x.double() @ w.double().t() + (0 if a is None else a.double())
            plain = torch.mm(x, w.t()) if a is None else torch.addmm(a, x, w.t())
            bound = max((plain.double() - want).abs().max().item(), torch.finfo(torch.bfloat16).eps / 2 * want.abs().max().item())
            err = (sg.skinny_linear(x, w, a).double() - want).abs().max().item()
            assert err <= 2 * bound, (N, K, M, cfg, err, bound)
    monkeypatch.setattr(sg, "CFG", None)
    w = (torch.randn(4096, 14336, device="cuda", generator=g) / 120).bfloat16()
    x = torch.randn(64, 14336, device="cuda", generator=g).bfloat16()
    assert sg._cfg(64, 4096, 14336)["split_k"] > 1
    sg.skinny_linear(x, w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = sg.skinny_linear(x, w)
    for i in range(3):
        x.copy_(torch.randn(64, 14336, device="cuda", generator=g).bfloat16())
        graph.replay()
        assert torch.equal(y, sg.skinny_linear(x, w)), i
    monkeypatch.setattr(D, "LORA_TAIL", False)           # the adapter's product as the kernel's add
    mem = _bf16_memory_with_lora(smol_tokenizer)
    _step_setting_matches(mem, monkeypatch, "GEMM", "cublas", "triton", _count_calls(monkeypatch, sg, "skinny_linear"),
                          1, "skinny")


@pytest.mark.parametrize("max_rows", [256, 1])
def test_lora_tail_step_on_cuda(smol_tokenizer, monkeypatch, max_rows):
    """decode.LORA_TAIL on the GPU (bf16, a Memory's adapter on every projection it targets):
    the captured step takes the adapter's A from each buffer's tail (also past FUSED_PROJ_MAX_ROWS),
    writes the same greedy tokens captured and eager through a compaction, and its first step's
    states are no further from the two-GEMM LoRA's than 2× what cuBLASLt's summation order moves
    them (the tail rounds x Wᵀ before adding the rank-r product: one rounding more)."""
    import iicl_fast.decode as D
    from iicl_fast import layers
    monkeypatch.setattr(D, "FUSED_PROJ_MAX_ROWS", max_rows)
    mem = _bf16_memory_with_lora(smol_tokenizer)
    _step_setting_matches(mem, monkeypatch, "LORA_TAIL", False, True,
                          _count_calls(monkeypatch, layers.FusedLinears, "_with_tail"), 2, "the tail")


@pytest.mark.parametrize("sample", [False, True])
def test_logits16_step_draws_the_same_tokens_on_cuda(smol_tokenizer, monkeypatch, sample):
    """decode.LOGITS_16: the captured step hands bf16 logits to the argmax / the Triton sampler
    (the values of the fp32 cast they replace): the same tokens as with it off."""
    import iicl_fast.decode as D
    model = _scaled_tiny(smol_tokenizer, torch.bfloat16)
    gen = torch.Generator().manual_seed(3)
    prefix = torch.randint(3, 40000, (211,), generator=gen).tolist()
    qs = [torch.randint(3, 40000, (n,), generator=gen).tolist() for n in (5, 17, 1, 9)]
    kw = dict(max_new_tokens=24, pad_id=0, sample=sample, temperature=0.9, top_p=0.9, prefix=prefix, batch_size=4,
              stop_ids=[10 ** 6], static=True)
    off = generate(model, qs, generator=sampling_generator("cuda", 4), **kw)
    monkeypatch.setattr(D, "LOGITS_16", True)
    assert generate(model, qs, generator=sampling_generator("cuda", 4), **kw) == off


@pytest.mark.parametrize("hint", ["normal", "last"])
def test_l2_prefetch_step_writes_the_same_tokens_on_cuda(smol_tokenizer, monkeypatch, hint):
    """decode.PREFETCH_MB: each layer's o and gate/up weights prefetched into L2 on a forked
    stream during its attention (and with PREFETCH_KV the next layer's prefix K and V during its
    MLP), captured in the step's graph: the same tokens as with it off,
    greedy and sampled; and the prefetch kernel launched on its own runs and leaves a tensor as it was."""
    import iicl_fast.decode as D
    from iicl_fast.kernels.l2_prefetch import l2_prefetch
    w = torch.randn(4099, 1031, device="cuda", dtype=torch.bfloat16)
    before = w.clone()
    l2_prefetch(w, w.numel() * 2, hint)
    torch.cuda.synchronize()
    assert torch.equal(w, before)
    model = _scaled_tiny(smol_tokenizer, torch.bfloat16)
    gen = torch.Generator().manual_seed(5)
    prefix = torch.randint(3, 40000, (257,), generator=gen).tolist()
    qs = [torch.randint(3, 40000, (n,), generator=gen).tolist() for n in (5, 17, 1, 9, 3)]
    for sample in (False, True):
        kw = dict(max_new_tokens=24, pad_id=0, sample=sample, temperature=0.9, top_p=0.9, prefix=prefix,
                  batch_size=5, stop_ids=[10 ** 6], static=True)
        monkeypatch.setattr(D, "PREFETCH_MB", 0.0)
        off = generate(model, qs, generator=sampling_generator("cuda", 4), **kw)
        monkeypatch.setattr(D, "PREFETCH_MB", 32.0)
        monkeypatch.setattr(D, "PREFETCH_HINT", hint)
        assert generate(model, qs, generator=sampling_generator("cuda", 4), **kw) == off
        monkeypatch.setattr(D, "PREFETCH_KV", True)
        assert generate(model, qs, generator=sampling_generator("cuda", 4), **kw) == off
        monkeypatch.setattr(D, "PREFETCH_KV", False)


def test_teacher_states_from_the_captured_decoder_on_cuda(smol_tokenizer, capsys):
    """elicit(keep_hidden=True) on the GPU (the static decoder, its step captured: each step's
    states copied out of the graph's buffer before the next replay rewrites it). Against an
    fp32 teacher pass over the same entries, the decoder's bf16 states' token log-probs are
    no further off than 2x the bf16 teacher pass's (plus 0.01 nats): the teacher consolidate
    now reads is as good as the one it recomputed. fp32: the pass's states within 1e-4."""
    from iicl_fast.config import Config
    from iicl_fast.elicit import elicit
    from iicl_fast.models import PromptFormat
    from iicl_fast.teacher import hidden_logprob, teacher_hidden
    tok = smol_tokenizer
    model, model32 = _scaled_tiny(tok, torch.bfloat16), _scaled_tiny(tok, torch.float32)
    fmt = PromptFormat(tok, model)
    cfg = Config(**{**TINY_CONFIG, "n_queries": 4, "n_continuations": 12, "max_query_tokens": 24,
                    "max_response_tokens": 40, "source_entries": 3, "gen_batch_size": 16, "seed": 3})
    entries, known = elicit(model, fmt, DOC, cfg, keep_hidden=True)
    assert sum(k is not None for k in known) >= 8 and any(k is None for k in known)
    reused = teacher_hidden(model, fmt, DOC, entries, batch_size=16, known=known)
    passed = teacher_hidden(model, fmt, DOC, entries, batch_size=16)
    ref = teacher_hidden(model32, fmt, DOC, entries, batch_size=16)
    lp = {k: hidden_logprob(model32, hs).double() for k, hs in (("reused", reused), ("pass", passed), ("fp32", ref))}
    rows = torch.cat([torch.arange(reused.offsets[i], reused.offsets[i + 1]) for i, k in enumerate(known) if k is not None])
    err = {k: (lp[k][rows] - lp["fp32"][rows]).abs().mean().item() for k in ("reused", "pass")}
    with capsys.disabled():
        print(f"\nteacher log-prob error vs fp32 over {len(rows)} decoded tokens: decoder {err['reused']:.4f}, "
              f"pass {err['pass']:.4f} nats")
    assert err["reused"] <= 2 * err["pass"] + 0.01, err
    others = torch.cat([torch.arange(reused.offsets[i], reused.offsets[i + 1]) for i, k in enumerate(known) if k is None])
    rel = ((reused.h[others] - passed.h[others]).norm() / passed.h[others].norm()).item()
    assert rel < 2e-2, rel                # the pass's rows where nothing was known (other batches: bf16 apart)
    entries32, known32 = elicit(model32, fmt, DOC, cfg, keep_hidden=True)     # fp32: the pass's values
    full32 = teacher_hidden(model32, fmt, DOC, entries32, batch_size=16)
    got32 = teacher_hidden(model32, fmt, DOC, entries32, batch_size=16, known=known32)
    assert (got32.h - full32.h).abs().max() < 1e-4 * full32.h.abs().max()
