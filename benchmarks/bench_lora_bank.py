"""Many adapters trained together: the consolidation training phase for N documents.

    python benchmarks/bench_lora_bank.py [--adapters 16 64 256] [--steps 12] [--commit SHA] [--out DIR]

Workload (issue): each document has a transfer set of 32 sequences × 128 tokens, 2 epochs,
on a SmolLM2-135M-shaped Llama (hidden 576, 30 layers, vocab 49152; random weights; bf16),
LoRA r=16 on all linear layers, forward-KL loss against fixed teacher statistics.
Implementations:
  iicl_fast        LoraBank (its default hook on CUDA: gathered bmm) + BankAdamW (masked,
                   per-adapter clip / step / lr: the extension's CUDA kernel)
  iicl_fast_segmented  the same with the extension's segmented LoRA kernels as the hook
  iicl_fast_graph  the same step captured as CUDA graphs (GraphedBankStep): the masked update
                   has no host sync, so forward, backward and update replay without the host
  iicl_fast_graph_segmented  iicl_fast_graph with the segmented LoRA kernels
  torch_bank       the same stacked adapters + torch.optim.AdamW(fused=True) on the stacked tensors
                   (global clip; every adapter moves, the inactive ones by momentum and decay)
  torch_bank_graph torch_bank captured as a CUDA graph (AdamW(fused=True, capturable=True))
  peft_sequential_graph  peft_sequential with its step as CUDA graphs (one adapter slot re-used
                   document after document)
  model_graph      reference, not a contender: the frozen model's forward + backward (to its
                   input embeddings) and the loss, no adapters, as a CUDA graph: what the
                   bank's step costs beyond the model itself
  loop             one base GEMM, a Python loop over the batch's adapters for the LoRA part
  peft_sequential  one peft adapter at a time, AdamW(fused=True), 32 sequences a step
Each implementation runs `--steps` timed steps after 2 warm-up steps; docs/s extrapolates the
mean step to the whole workload (2 epochs of every document). Writes
benchmarks/results/lora_bank.json rows {"impl", "adapters", "docs_per_s", "ms_fwd", "ms_bwd",
"ms_opt", "peak_gib", "device", "commit", ...}; prints a table last.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from iicl_fast import ops  # noqa: E402
from iicl_fast.bank import BankAdamW, LoraBank  # noqa: E402

SEQS, LEN, EPOCHS, RANK, ALPHA = 32, 128, 2, 16, 32


def make_model():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class Timer:
    def __init__(self):
        self.ms = {"fwd": 0.0, "bwd": 0.0, "opt": 0.0}
        self.n = 0

    def step(self, fwd, bwd, opt):
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        ev[0].record(); out = fwd(); ev[1].record(); bwd(out); ev[2].record(); opt(); ev[3].record()
        torch.cuda.synchronize()
        return [ev[i].elapsed_time(ev[i + 1]) for i in range(3)]


def teacher(model, n_tokens):
    W = model.get_output_embeddings().weight
    h_t = torch.randn(n_tokens, W.shape[1], device="cuda", dtype=torch.bfloat16)
    return ops.teacher_stats(h_t, W)


def bank_impl(impl: str) -> str:
    """The LoRA hook each row runs: the extension's segmented kernels for *_segmented, the
    gathered batched GEMMs for torch_bank (no extension), the bank's default otherwise."""
    if impl.endswith("_segmented"):
        return "bmm" if os.environ.get("IICL_BENCH_FORCE_BMM") == "1" else "segmented"
    return "bmm" if impl.startswith("torch_bank") else "auto"


def capture_model_only(model, emb, static_ids, st):
    W = model.get_output_embeddings().weight

    def body():
        x = emb(static_ids).detach().requires_grad_(True)
        h = model.model(inputs_embeds=x, use_cache=False).last_hidden_state.reshape(-1, 576)
        ops.forward_kl(h, W, st, reduction="mean").backward()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        body(); body()
    torch.cuda.current_stream().wait_stream(side)
    g1, g2 = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(g1):
        body()
    with torch.cuda.graph(g2, pool=g1.pool()):
        static_ids.add_(0)         # no optimizer: an empty graph is refused
    return g1, g2


def print_profile(fn, title, rows=14):
    """The GPU kernels of a few replays, by total time (where the step's time goes)."""
    from torch.profiler import ProfilerActivity, profile
    fn(); torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    print(f"\n-- GPU kernels, 3 steps of {title} --")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70), flush=True)


def run_graph(model, n_docs, micro, steps, impl, profile=False):
    """iicl_fast_graph / torch_bank_graph: the step replayed from CUDA graphs; ms_fwd holds
    forward + backward (one graph), ms_bwd is 0."""
    from iicl_fast.bank import GraphedBankStep
    bank = LoraBank(model, n_docs, rank=RANK, alpha=ALPHA, impl=bank_impl(impl))
    try:
        with torch.no_grad():
            for p in bank.B.values():
                p.normal_(0, 0.01)
        st = teacher(model, micro * LEN)
        W = model.get_output_embeddings().weight

        def loss_fn(input_ids):
            h = model.model(input_ids=input_ids, use_cache=False).last_hidden_state.reshape(-1, 576)
            return ops.forward_kl(h, W, st, reduction="mean")

        g = torch.Generator().manual_seed(0)
        batch = lambda: (torch.randint(0, n_docs, (micro,), generator=g),  # noqa: E731
                         torch.randint(0, 49152, (micro, LEN), generator=g).cuda())
        docs, ids = batch()
        if impl == "model_graph":
            bank.remove()
            emb = model.model.embed_tokens
            static_ids = ids.clone()
            grad_graph, update_graph = capture_model_only(model, emb, static_ids, st)

            def load(docs, ids):
                static_ids.copy_(ids)
        elif impl.startswith("iicl_fast_graph"):
            step = GraphedBankStep(bank, BankAdamW(bank, lr=1e-3), loss_fn, {"input_ids": ids}, docs)
            grad_graph, update_graph = step.graph_grad, step.graph_update

            def load(docs, ids):
                step.static["input_ids"].copy_(ids)
                step.ids.copy_(docs)
        else:
            params = bank.parameters()
            opt = torch.optim.AdamW(params, lr=1e-3, fused=True, capturable=True)
            static_ids, static_docs = ids.clone(), docs.cuda()
            def body():
                for p in params:
                    p.grad = None
                bank._route = static_docs
                loss = loss_fn(static_ids)
                bank._route = None
                loss.backward()

            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    body()
                opt.step()                           # builds the optimizer state outside the capture
            torch.cuda.current_stream().wait_stream(side)
            grad_graph, update_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
            with torch.cuda.graph(grad_graph):
                body()
            with torch.cuda.graph(update_graph, pool=grad_graph.pool()):
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()

            def load(docs, ids):
                static_ids.copy_(ids)
                static_docs.copy_(docs)
        if profile:
            print_profile(lambda: (grad_graph.replay(), update_graph.replay()), f"{impl}, {n_docs} adapters")
        times = []
        for k in range(steps + 2):
            docs, ids = batch()
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            load(docs, ids)
            ev[0].record(); grad_graph.replay(); ev[1].record(); update_graph.replay(); ev[2].record()
            torch.cuda.synchronize()
            if k >= 2:
                times.append([ev[0].elapsed_time(ev[1]), 0.0, ev[1].elapsed_time(ev[2])])
        mean = [sum(x[i] for x in times) / len(times) for i in range(3)]
        return mean, math.ceil(n_docs * SEQS / micro) * EPOCHS
    finally:
        bank.remove()


def run_stacked(model, n_docs, micro, steps, impl):
    """iicl_fast / torch_bank / loop: every micro-batch mixes documents."""
    bank = LoraBank(model, n_docs, rank=RANK, alpha=ALPHA, impl=bank_impl(impl))
    with torch.no_grad():
        for p in bank.B.values():
            p.normal_(0, 0.01)
    if impl == "loop":
        bank.remove()
        bank._hooks = [lin.register_forward_hook(loop_hook(bank, name)) for name, lin in bank.modules]
    if impl.startswith("iicl_fast"):
        opt = BankAdamW(bank, lr=1e-3)
        step_opt = lambda active: opt.step(active=active)  # noqa: E731
    else:
        topt = torch.optim.AdamW(bank.parameters(), lr=1e-3, fused=True)
        step_opt = lambda active: (torch.nn.utils.clip_grad_norm_(bank.parameters(), 1.0), topt.step())  # noqa: E731
    g = torch.Generator().manual_seed(0)
    total_steps = math.ceil(n_docs * SEQS / micro) * EPOCHS
    st = teacher(model, micro * LEN)
    times = []
    for k in range(steps + 2):
        docs = torch.randint(0, n_docs, (micro,), generator=g).cuda()
        ids = torch.randint(0, 49152, (micro, LEN), generator=g).cuda()

        def fwd():
            with bank.route(docs):
                h = model.model(input_ids=ids).last_hidden_state.reshape(-1, 576)
            return ops.forward_kl(h, model.get_output_embeddings().weight, st, reduction="mean")

        def bwd(loss):
            for p in bank.parameters():
                p.grad = None
            loss.backward()

        t = Timer().step(fwd, bwd, lambda: step_opt(docs.unique()))
        if k >= 2:
            times.append(t)
    bank.remove()
    mean = [sum(x[i] for x in times) / len(times) for i in range(3)]
    return mean, total_steps


def loop_hook(bank, name):
    """mLoRA's design: the base GEMM once, then a Python loop over the batch's adapters."""
    def hook(module, inputs, output):
        ids = bank._route
        if ids is None:
            return None
        x = inputs[0]
        y = torch.zeros_like(output)
        for a in ids.unique().tolist():
            rows = (ids == a).nonzero().squeeze(1)
            xa = x[rows]
            y = y.index_add(0, rows, (xa @ bank.A[name][a].to(x.dtype).t()) @ bank.B[name][a].to(x.dtype).t() * bank.scale)
        return output + y
    return hook


def run_peft(model, n_docs, steps):
    from peft import LoraConfig, get_peft_model
    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear", task_type="CAUSAL_LM")
    pm = get_peft_model(model, cfg, adapter_name="d0")
    st = teacher(model, SEQS * LEN)
    g = torch.Generator().manual_seed(0)
    times = []
    for k in range(steps + 2):
        name = f"d{k}"
        if k:
            pm.add_adapter(name, cfg)
        pm.set_adapter(name)
        params = [p for n, p in pm.named_parameters() if f".{name}." in n]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
        ids = torch.randint(0, 49152, (SEQS, LEN), generator=g).cuda()

        def fwd():
            h = pm.get_base_model().model(input_ids=ids).last_hidden_state.reshape(-1, 576)
            return ops.forward_kl(h, model.get_output_embeddings().weight, st, reduction="mean")

        def bwd(loss):
            opt.zero_grad(set_to_none=True)
            loss.backward()

        t = Timer().step(fwd, bwd, lambda: (torch.nn.utils.clip_grad_norm_(params, 1.0), opt.step()))
        if k >= 2:
            times.append(t)
        pm.delete_adapter(name) if k else None
    mean = [sum(x[i] for x in times) / len(times) for i in range(3)]
    return mean, n_docs * EPOCHS        # one step = one document's 32 sequences


def run_peft_graph(model, n_docs, steps):
    """peft_sequential with its step captured as CUDA graphs: one adapter slot, trained on one
    document after another (re-initialised in place between documents, outside the timing)."""
    from peft import LoraConfig, get_peft_model
    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear", task_type="CAUSAL_LM")
    pm = get_peft_model(model, cfg, adapter_name="d0")
    params = [p for n, p in pm.named_parameters() if ".d0." in n]
    for p in params:
        p.requires_grad_(True)
    st = teacher(model, SEQS * LEN)
    W = model.get_output_embeddings().weight
    opt = torch.optim.AdamW(params, lr=1e-3, fused=True, capturable=True)
    g = torch.Generator().manual_seed(0)
    static_ids = torch.randint(0, 49152, (SEQS, LEN), generator=g).cuda()

    def body():
        for p in params:
            p.grad = None
        h = pm.get_base_model().model(input_ids=static_ids, use_cache=False).last_hidden_state.reshape(-1, 576)
        ops.forward_kl(h, W, st, reduction="mean").backward()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        body(); body()
        opt.step()
    torch.cuda.current_stream().wait_stream(side)
    grad_graph, update_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(grad_graph):
        body()
    with torch.cuda.graph(update_graph, pool=grad_graph.pool()):
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    times = []
    for k in range(steps + 2):
        static_ids.copy_(torch.randint(0, 49152, (SEQS, LEN), generator=g))
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        ev[0].record(); grad_graph.replay(); ev[1].record(); update_graph.replay(); ev[2].record()
        torch.cuda.synchronize()
        if k >= 2:
            times.append([ev[0].elapsed_time(ev[1]), 0.0, ev[1].elapsed_time(ev[2])])
    mean = [sum(x[i] for x in times) / len(times) for i in range(3)]
    return mean, n_docs * EPOCHS


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapters", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--impls", nargs="+", default=["iicl_fast", "iicl_fast_segmented", "iicl_fast_graph", "iicl_fast_graph_segmented",
                                                   "torch_bank", "torch_bank_graph",
                                                   "loop", "peft_sequential", "peft_sequential_graph",
                                                   "model_graph"])
    ap.add_argument("--micro", type=int, default=64, help="sequences per mixed micro-batch")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--profile", action="store_true", help="print the GPU kernels of the graph steps")
    ap.add_argument("--commit", default=None)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    import transformers
    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                           text=True).stdout.strip()
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "transformers": transformers.__version__, "commit": commit}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "lora_bank.json"
    rows = []
    model = make_model()
    for n in args.adapters:
        for impl in args.impls:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            try:
                if impl == "peft_sequential":
                    (f, b, o), total = run_peft(model, n, max(2, args.steps // 3))
                    model = make_model()       # peft injected layers: a clean base for the next
                elif impl == "peft_sequential_graph":
                    (f, b, o), total = run_peft_graph(model, n, args.steps)
                    model = make_model()
                elif "_graph" in impl:
                    (f, b, o), total = run_graph(model, n, args.micro, args.steps, impl,
                                                 profile=args.profile and n == max(args.adapters))
                else:
                    (f, b, o), total = run_stacked(model, n, args.micro, args.steps, impl)
            except torch.cuda.OutOfMemoryError as e:
                rows.append({"impl": impl, "adapters": n, "error": f"OOM: {str(e).splitlines()[0]}", **meta})
                continue
            except RuntimeError as e:     # a capture that fails is reported, the other rows still run
                rows.append({"impl": impl, "adapters": n, "error": f"{type(e).__name__}: {str(e)[:300]}", **meta})
                print(rows[-1], flush=True)
                torch.cuda.synchronize()
                continue
            peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
            sec = (f + b + o) * total / 1e3
            r = {"impl": impl, "adapters": n, "docs_per_s": n / sec, "ms_fwd": f, "ms_bwd": b, "ms_opt": o,
                 "peak_gib": peak, "steps_total": total, "micro_batch_seqs": SEQS if impl.startswith("peft")
                 else args.micro, **meta}
            rows.append(r)
            print(json.dumps(r), flush=True)
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(rows, indent=1))
            os.replace(tmp, path)
    print(f"\n{meta['device']}  torch {meta['torch']}  commit {commit}")
    print(f"{'impl':16} {'adapters':>8} {'docs/s':>9} {'fwd ms':>8} {'bwd ms':>8} {'opt ms':>8} {'peak GiB':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['impl']:16} {r['adapters']:>8} {r['error']}")
        else:
            print(f"{r['impl']:16} {r['adapters']:>8} {r['docs_per_s']:>9.2f} {r['ms_fwd']:>8.1f} "
                  f"{r['ms_bwd']:>8.1f} {r['ms_opt']:>8.1f} {r['peak_gib']:>9.2f}")


if __name__ == "__main__":
    main()
