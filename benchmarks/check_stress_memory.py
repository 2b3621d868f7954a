"""Where does a stream's GPU memory go? Consolidates a few chunks of the stress stream with a
model of the embedded model's shape (its GGUF where IICL_MODEL names it, else random bf16
weights with fixed-length generations), printing after each chunk the allocated memory (and
after gc.collect), then groups the blocks still allocated at the end by the code that
allocated them (torch.cuda.memory history, Python frames). A stress run on the H200 grew
~63 MB a chunk (benchmarks/NOTES.md, eighth session); this names the allocation site.

    python benchmarks/check_stress_memory.py [--chunks 6] [--sites [--top 12]] [--no-cudnn]
        [--checkpoint DIR --stop-after N]   (IICL_TOUCH_WORKSPACES=0: without the workspace warm-up)"""
import argparse
import collections
import gc
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from iicl_fast import Config, Memory  # noqa: E402
from iicl_fast.driver import stream  # noqa: E402
from iicl_fast.models import PromptFormat  # noqa: E402
from iicl_fast.stress import _rss_gib, build_stream  # noqa: E402


def load(tok_dir: str, device: str):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    if os.environ.get("IICL_MODEL"):
        from iicl_fast.models import load_model
        model, tok = load_model(os.environ["IICL_MODEL"], device=device)
        return model, tok, False
    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device, torch.bfloat16 if device == "cuda" else torch.float32).eval(), tok, True


def sites(top: int) -> None:
    """The blocks allocated now, grouped by their innermost frames in this project."""
    snap = torch.cuda.memory._snapshot()
    by = collections.Counter()
    count = collections.Counter()
    for seg in snap["segments"]:
        for b in seg["blocks"]:
            if b["state"] != "active_allocated":
                continue
            frames = [f for f in b.get("frames", []) if "iicl_fast" in f["filename"] or "kernels" in f["filename"]
                      or "benchmarks" in f["filename"]]
            key = " <- ".join(f"{Path(f['filename']).name}:{f['line']} {f['name']}" for f in frames[:4]) or "(no project frame)"
            by[key] += b["size"]
            count[key] += 1
    print(f"allocated blocks by site (top {top}):")
    for key, size in by.most_common(top):
        print(f"  {size / 2**20:9.1f} MiB  {count[key]:5d} blocks  {key}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=6)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--tokenizer", default=os.environ.get("IICL_TOKENIZER", ".bench/tok"))
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of this script")
    ap.add_argument("--sites", action="store_true", help="record allocations; at the end, what is allocated by site")
    ap.add_argument("--no-cudnn", action="store_true", help="attention never through cuDNN (SDPA and the prefix part)")
    ap.add_argument("--set", action="append", default=[], help="field=value of the stress preset")
    ap.add_argument("--stop-after", type=int, help="end the process after this many chunks (with --checkpoint)")
    ap.add_argument("--checkpoint", help="save after every chunk into this folder; run again to resume from it "
                    "(a resumed process's first chunk against the steady state)")
    a = ap.parse_args()
    if a.no_cudnn:
        import iicl_fast.decode as D
        D.CUDNN_PREFIX = False
        torch.backends.cuda.enable_cudnn_sdp(False)
    model, tok, random_weights = load(a.tokenizer, a.device)
    cuda = a.device == "cuda"
    over = dict(kv.split("=", 1) for kv in a.set)
    cfg = Config.preset("stress", **{"progress": False, "fixed_lengths": random_weights, **over})
    mem = Memory(model, tok, cfg)
    fmt = PromptFormat(tok, model)
    text, _ = build_stream(fmt.encode, cfg.chunk_tokens * a.chunks, 2, seed=0)
    if cuda and a.sites:
        torch.cuda.memory._record_memory_history(max_entries=200_000)
    start, stop = {}, False

    def on_chunk(j):
        if cuda:
            start[j] = torch.cuda.memory_allocated() / 2**20
    for rep in stream(mem, text, checkpoint_dir=a.checkpoint, on_chunk=on_chunk):
        if rep.skipped:
            continue
        if a.stop_after is not None and rep.chunk_index + 1 >= a.stop_after:
            stop = True
        if not cuda:
            print(f"chunk {rep.chunk_index}: " + " ".join(f"{k} {v:.2f}" for k, v in rep.seconds.items()))
            if stop:
                break
            continue
        alloc = torch.cuda.memory_allocated() / 2**20
        gc.collect()
        print(f"chunk {rep.chunk_index}: allocated at its start {start.get(rep.chunk_index, float('nan')):.1f} MiB, peak {rep.peak_gib:.3f} GiB, allocated {alloc:.1f} MiB, after gc.collect "
              f"{torch.cuda.memory_allocated() / 2**20:.1f} MiB, RSS {_rss_gib():.3f} GiB; seconds "
              + " ".join(f"{k} {v:.2f}" for k, v in rep.seconds.items())
              + "; peak GiB by phase " + " ".join(f"{k} {v:.3f}" for k, v in rep.peak_gib_phase.items()), flush=True)
        if stop:
            break
    if cuda and a.sites:
        sites(a.top)


if __name__ == "__main__":
    main()
