"""Does the static decoder leave memory behind on CUDA? Repeated generate calls (the embedded
model's shape, random weights, a 4,000-token prefix, 32 rows) with CUDA graphs on and off,
printing allocated memory after each. Written for the next GPU session: a stress run on the
H200 grew ~63 MB a chunk (benchmarks/NOTES.md, eighth session); a decoder that leaks shows
growth here with graphs on, and none with them off.

    python benchmarks/check_decode_memory.py [--calls 4]"""
import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import iicl_fast.decode as D  # noqa: E402
from iicl_fast import layers  # noqa: E402
from iicl_fast.generation import generate  # noqa: E402


def main():
    from transformers import LlamaConfig, LlamaForCausalLM
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=4)
    a = ap.parse_args()
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192)
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval().requires_grad_(False)
    layers.install(model)
    prefix = torch.randint(10, 40000, (4000,)).tolist()
    qs = [torch.randint(10, 40000, (40,)).tolist() for _ in range(32)]
    for graphs in (True, False):
        D.GRAPHS = graphs
        for i in range(a.calls):
            generate(model, qs, prefix=prefix, max_new_tokens=48, min_new_tokens=48, pad_id=0, stop_ids=[2], sample=True,
                     temperature=0.7, top_p=0.9, batch_size=64, generator=torch.Generator("cuda").manual_seed(i))
            before = torch.cuda.memory_allocated() / 2**20
            gc.collect()
            print(f"graphs={graphs} call {i}: allocated {before:.1f} MiB, after gc.collect {torch.cuda.memory_allocated() / 2**20:.1f} MiB",
                  flush=True)


if __name__ == "__main__":
    main()
