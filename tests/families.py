"""Tiny random models of the families users bring, built from transformers' config classes
with the embedded model's tokenizer (no download). Each keeps its family's structure:

    llama    the reference shape (untied head here)
    qwen2    q/k/v biases, tied embeddings
    qwen3    q/k RMSNorm, explicit head_dim
    mistral  sliding-window attention
    gemma2   final-logit and attention softcaps, alternating sliding window, scaled embeddings
    gemma3   q/k norm, local/global RoPE bases, sliding window layers
    phi3     fused qkv_proj and gate_up_proj
"""
import os

import torch
import transformers as T

# IICL_TEST_DEVICE=cuda runs the family tests on the GPU (fp32: the CUDA paths — cascade
# attention, the Triton loss head — against the same assertions as on the CPU)
DEVICE = os.environ.get("IICL_TEST_DEVICE", "cpu")

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3")


def family_config(name: str, tok):
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=None)
    if name == "llama":
        return T.LlamaConfig(**common, tie_word_embeddings=False)
    if name == "qwen2":
        return T.Qwen2Config(**common, tie_word_embeddings=True)
    if name == "qwen3":
        return T.Qwen3Config(**common, head_dim=16, tie_word_embeddings=True)
    if name == "mistral":
        return T.MistralConfig(**common, sliding_window=24)
    if name == "gemma2":
        return T.Gemma2Config(**common, head_dim=16, sliding_window=24, final_logit_softcapping=30.0,
                              attn_logit_softcapping=50.0, query_pre_attn_scalar=16)
    if name == "gemma3":
        return T.Gemma3TextConfig(**common, head_dim=16, sliding_window=24, query_pre_attn_scalar=16)
    if name == "phi3":
        return T.Phi3Config(**common)
    raise ValueError(name)


def make_family(name: str, tok, seed: int = 0):
    cls = {"llama": T.LlamaForCausalLM, "qwen2": T.Qwen2ForCausalLM, "qwen3": T.Qwen3ForCausalLM,
           "mistral": T.MistralForCausalLM, "gemma2": T.Gemma2ForCausalLM, "gemma3": T.Gemma3ForCausalLM,
           "phi3": T.Phi3ForCausalLM}[name]
    torch.manual_seed(seed)
    model = cls(family_config(name, tok)).eval()
    with torch.no_grad():     # random weights at init scale are near-uniform: sharpen the head
        model.get_output_embeddings().weight.mul_(8.0)
    return model.to(DEVICE)
