"""The support matrix: every family of tests/families.py through consolidation (elicit,
teacher pass with prefix reuse, ΔPPL, fused = reference loss), save/load (ours and plain
peft), batched generation = transformers' greedy generate, and StreamingSession eviction
(= recomputing the kept tokens at their new positions, or a clear refusal).

With IICL_SUPPORT_MATRIX=FILE the outcomes are written there as JSON;
`python scripts/support_matrix.py FILE` turns them into the README's table."""
import json
import os

import pytest
import torch

import iicl_fast
from conftest import TINY_CONFIG
from families import DEVICE, FAMILIES, make_family
from iicl_fast import IICLError
from iicl_fast.consolidate import hidden_loss, loss_stats
from iicl_fast.elicit import Entry
from iicl_fast.generation import generate, lm_head
from iicl_fast.models import PromptFormat
from iicl_fast.retain import StreamingSession
from iicl_fast.teacher import teacher_hidden

DOC = ("The red tower of Karsk was built in 1807 by Ada Lind. The blue gate of Vell is older than the tower. "
       "Every morning the keeper of the tower feeds seven grey cats and winds the great clock.")
OUTCOMES: dict = {}


@pytest.fixture(scope="module", autouse=True)
def write_matrix():
    yield
    path = os.environ.get("IICL_SUPPORT_MATRIX")
    if path:
        old = json.loads(open(path).read()) if os.path.exists(path) else {}
        for fam, row in OUTCOMES.items():
            old.setdefault(fam, {}).update(row)
        with open(path + ".tmp", "w") as f:
            json.dump(old, f, indent=1, sort_keys=True)
        os.replace(path + ".tmp", path)


def record(fam, feature, outcome):
    OUTCOMES.setdefault(fam, {})[feature] = outcome


@pytest.mark.parametrize("fam", FAMILIES)
def test_consolidate_save_load(fam, smol_tokenizer, tmp_path):
    tok = smol_tokenizer
    model = make_family(fam, tok)
    mem = iicl_fast.Memory(model, tok, iicl_fast.Config(**{**TINY_CONFIG, "epochs": 1}))
    targets = {n.split(".")[-1] for n, m in mem.model.named_modules() if hasattr(m, "lora_A")}
    expected = {"phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}}.get(
        fam, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
    assert targets == expected                      # every linear layer of the family, lm_head excluded
    rep = mem.consolidate(DOC)
    assert rep.elicited > 0 and rep.kept > 0
    assert all(torch.isfinite(torch.tensor(rep.loss_per_epoch)))
    assert any(float(p.abs().max()) > 0 for n, p in mem.model.named_parameters() if "lora_B" in n)
    probe = torch.tensor([mem.fmt.prompt("Who built the red tower?")], device=DEVICE)
    with torch.no_grad():
        want = mem.model(input_ids=probe).logits
    mem.save(tmp_path / "mem")
    loaded = iicl_fast.Memory.load(tmp_path / "mem", make_family(fam, tok), tok)
    from peft import PeftModel
    plain = PeftModel.from_pretrained(make_family(fam, tok), str(tmp_path / "mem")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=probe).logits, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(plain(input_ids=probe).logits, want, rtol=1e-5, atol=1e-5)
    record(fam, "consolidate", "ok")
    record(fam, "save_load", "ok")


@pytest.mark.parametrize("fam", FAMILIES)
def test_teacher_prefix_reuse_and_losses(fam, smol_tokenizer):
    """Prefix reuse = one full forward per entry; the fused loss (identity path, or the
    general path where a softcap or bias is present) = the plain PyTorch loss, value and grad."""
    tok = smol_tokenizer
    model = make_family(fam, tok)
    fmt = PromptFormat(tok, model)
    entries = [Entry("qa", "Who built it?", fmt.encode("Ada Lind built it.")),
               Entry("qa", "What does the keeper feed every single morning?", fmt.encode("Seven grey cats.")),
               Entry("continuation", "Continue", fmt.encode("The clock strikes twelve and the cats"))]
    with torch.no_grad():
        a = teacher_hidden(model, fmt, DOC, entries, batch_size=2, prefix_reuse=True, cascade=False)
        b = teacher_hidden(model, fmt, DOC, entries, batch_size=3, prefix_reuse=False)
    torch.testing.assert_close(a.h, b.h, rtol=1e-4, atol=1e-4)
    _, bias, softcap = lm_head(model)
    torch.manual_seed(1)
    h_s = (a.h + 0.3 * torch.randn_like(a.h)).requires_grad_(True)
    rows = torch.arange(a.h.shape[0], device=a.h.device)
    got = {}
    for impl in ("fused", "reference"):
        cfg = iicl_fast.Config(**TINY_CONFIG, loss_impl=impl)
        loss = hidden_loss(model, h_s, a, rows, cfg, loss_stats(model, a, cfg))
        g, = torch.autograd.grad(loss, h_s)
        got[impl] = (loss.detach(), g)
    torch.testing.assert_close(got["fused"][0], got["reference"][0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got["fused"][1], got["reference"][1], rtol=1e-3, atol=1e-7)
    record(fam, "fused_loss", "general path (softcap)" if softcap else ("general path (bias)" if bias is not None
                                                                       else "identity path"))


@pytest.mark.parametrize("fam", FAMILIES)
def test_generate_equals_transformers_greedy(fam, smol_tokenizer):
    tok = smol_tokenizer
    model = make_family(fam, tok)
    fmt = PromptFormat(tok, model)
    prefix = fmt.context_prefix(DOC)
    queries = [fmt.query("Who built the tower?"), fmt.query("Cats?")]
    ours = generate(model, queries, prefix=prefix, max_new_tokens=6, stop_ids=[-1], pad_id=fmt.pad_id,
                    sample=False, batch_size=2)
    for q, o in zip(queries, ours):
        ids = torch.tensor([prefix + q], device=DEVICE)
        hf = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                            eos_token_id=None, pad_token_id=fmt.pad_id)[0, ids.shape[1]:].tolist()
        assert o == hf
    record(fam, "generate", "ok")


@pytest.mark.parametrize("fam", FAMILIES)
def test_streaming_session_evicts_exactly_or_refuses(fam, smol_tokenizer):
    """After evictions, the first layer's cached keys and values (the ones that depend on
    the token and its position only) equal a fresh forward over the kept tokens at
    contiguous positions: the re-rotation is exact. Deeper layers keep what they computed
    with the evicted tokens in view, as SirLLM does. Families whose keys cannot be
    re-rotated are refused with one line."""
    tok = smol_tokenizer
    model = make_family(fam, tok)
    kw = dict(policy="entropy", sink=3, budget=12, recent=8, step=8, chat=False)
    if fam in ("mistral", "gemma2", "gemma3", "phi3") and _refused(model, tok, kw):
        record(fam, "retain", "refused: " + _refused(model, tok, kw))
        full = StreamingSession(model, tok, policy="full", chat=False)     # keeping every token still works
        full.feed_tokens(tok(DOC, add_special_tokens=False)["input_ids"])
        assert full.evicted == 0
        return
    sess = StreamingSession(model, tok, **kw)
    stream = tok(DOC * 2, add_special_tokens=False)["input_ids"]
    sess.feed_tokens(stream)
    assert sess.evicted > 0 and sess.cache_tokens == 23
    from iicl_fast.generation import cache_of, decoder
    with torch.no_grad():
        ids = sess.ids[None].to(next(model.parameters()).device)      # the session keeps its ids on the CPU
        fresh = cache_of(decoder(model)(input_ids=ids, use_cache=True)).layers[0]
    kept = sess.cache.layers[0]
    assert kept.keys.shape == fresh.keys.shape
    torch.testing.assert_close(kept.keys.float(), fresh.keys.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(kept.values.float(), fresh.values.float(), rtol=1e-5, atol=1e-5)
    assert torch.isfinite(sess._next_logits()).all()
    record(fam, "retain", "ok")


def _refused(model, tok, kw):
    try:
        StreamingSession(model, tok, **kw)
    except IICLError as e:
        msg = str(e)
        assert "StreamingSession cannot evict" in msg and "\n" not in msg
        return msg.split(": it has ")[1].split(" (policy")[0]
    return None


@pytest.mark.parametrize("fam", FAMILIES)
def test_bank_consolidates_documents_together(fam, smol_tokenizer):
    """consolidate_many (one LoRA bank, documents trained together) on every family: each
    document gets its own trained adapter, and a memory answers with its own adapter."""
    tok = smol_tokenizer
    docs = [DOC, "The green mill of Olm was built in 1821 by Otto Berg. It grinds barley for the town."]
    mems = iicl_fast.consolidate_many(make_family(fam, tok), tok, docs, iicl_fast.Config(**{**TINY_CONFIG, "epochs": 1}))
    assert len(mems) == 2
    probe = torch.tensor([mems[0].fmt.prompt("Who built the mill?")], device=DEVICE)
    outs = []
    for m in mems:
        m._activate()
        with torch.no_grad():
            outs.append(m.model(input_ids=probe).logits)
    assert all(len(m.chunks) == 1 for m in mems)
    assert (outs[0] - outs[1]).abs().max() > 1e-6            # two documents, two different adapters
    record(fam, "bank", "ok")
