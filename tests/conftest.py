import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Under pytest-xdist (`-n N`) the workers share the cores: N workers of cores/N threads each
# (the tiny-model tests are bound by Python overhead, not by GEMMs, so two single-threaded
# workers on 2 cores finish the suite sooner than one process with 2 threads).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

import pytest
import torch

if not torch.cuda.is_available():   # Triton kernels run through its interpreter on the CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The embedded model's tokenizer (IICL_TOKENIZER: a saved copy of it, for machines
    without the model package, such as the GPU machine)."""
    from transformers import AutoTokenizer
    if os.environ.get("IICL_TOKENIZER"):
        return AutoTokenizer.from_pretrained(os.environ["IICL_TOKENIZER"])
    from iicl_fast.models import default_gguf_path
    path = default_gguf_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def make_tiny(tok, seed=0):
    """A tiny random Llama (2 layers, hidden 64) with the SmolLM2 tokenizer: no download."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg).eval()
    return model


@pytest.fixture
def tiny(smol_tokenizer):
    return make_tiny(smol_tokenizer), smol_tokenizer


@pytest.fixture(scope="session")
def tiny_dir(smol_tokenizer, tmp_path_factory):
    """The tiny model saved as a local HF model directory (for the CLI's --model)."""
    d = tmp_path_factory.mktemp("tiny_model")
    make_tiny(smol_tokenizer).save_pretrained(d)
    smol_tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def smol():
    import iicl_fast
    return iicl_fast.load_model()


# replay_repeats 1: the default's second pass over a whole buffer (25th session) doubled the
# replay training of every tiny-model stream's early chunks and took CI from 1,424 to 1,734 s of
# tests (30.1 min wall); the repeats are tested where they are the subject (test_memory_io.py's
# test_replay_repeats_*) and end to end on the embedded model at the real defaults (test_embedded.py).
TINY_CONFIG = dict(n_queries=4, n_continuations=4, max_query_tokens=8, max_response_tokens=8,
                   epochs=2, batch_size=4, progress=False, lora_r=4, replay_repeats=1)

