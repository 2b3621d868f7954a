"""Memory: a base model plus one LoRA adapter (long-term memory), saved atomically."""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import random
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from . import dist
from .config import Config, IICLError
from .consolidate import ConsolidationReport, concat, consolidate_chunk, subset
from .elicit import Entry
from .teacher import HiddenSet
from .generation import causal_lm, generate
from .models import DEFAULT_MODEL_ID, PromptFormat, fingerprint, load_model

FORMAT = "iicl_fast.memory/1"
MANIFEST, ADAPTER, ADAPTER_CONFIG = "manifest.json", "adapter_model.safetensors", "adapter_config.json"
REPLAY, REPLAY_ENTRIES = "replay.safetensors", "replay.json"
RETAINED = "retained.json"
_names = itertools.count()


def balanced_pick(score: list[float], chunk: list, k: int) -> list[int]:
    """The replay buffer of policy "balanced": k of len(score) entries, taken in rounds over
    the chunks (oldest first), each round one more entry of each chunk by score (ΔPPL,
    highest first; ties: the older entry). Every chunk holds ⌊k / chunks⌋ entries or one more;
    a chunk with fewer leaves its share to the others. chunk[i] is entry i's chunk (None: an
    entry of a buffer saved before chunks were recorded, one group). -> sorted indices."""
    groups: dict = {}
    for i, c in enumerate(chunk):
        groups.setdefault(c, []).append(i)
    order = sorted(groups, key=lambda c: (c is not None, c if c is not None else 0))
    queues = [sorted(groups[c], key=lambda i: -score[i]) for c in order]
    out: list[int] = []
    for r in range(max((len(q) for q in queues), default=0)):
        for q in queues:
            if len(out) == k:
                return sorted(out)
            if r < len(q):
                out.append(q[r])
    return sorted(out)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _versions() -> dict:
    import peft
    import transformers
    from . import __version__
    return {"iicl_fast": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__}


def _fsync_dir(path: Path) -> None:
    """Make the renames inside a directory durable (its entries, not only the files)."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fault_pause(where: str) -> None:
    """Test hook (fault injection): IICL_FAULT_PAUSE=<seconds> sleeps at the named moments of
    a save and says so on stderr, so that a kill can land exactly there."""
    pause = os.environ.get("IICL_FAULT_PAUSE")
    if pause:
        import sys
        import time
        print(f"[iicl fault] {where}", file=sys.stderr, flush=True)
        time.sleep(float(pause))


def _aside(path: Path) -> Path:
    """Where a save puts the previous memory between its two renames: a hidden name of its own,
    so that nothing of the user's (a backup copy called DIR.old, say) is ever taken for it."""
    return path.with_name(f".{path.name}.swap-old")


def _legacy_old(path: Path) -> Path:
    """Where earlier builds put it (until 2026-12-05; same memory format): DIR.old. Still put
    back when DIR is missing; never deleted, since it may as well be the user's own copy."""
    return path.with_name(path.name + ".old")


def recover(path: Path) -> None:
    """Finish a swap that a crash interrupted: if path is missing and the swap's aside (or an
    older version's path.old) holds a complete memory, it becomes path again; the aside beside a
    complete path is stale and goes. A path.old beside a complete path stays (it may be a copy
    the user made: deleting it lost their files)."""
    path = Path(path)
    if not path.exists():
        for old in (_aside(path), _legacy_old(path)):
            if (old / MANIFEST).is_file():
                os.replace(old, path)
                _fsync_dir(path.parent)
                return
    elif (path / MANIFEST).is_file() and _aside(path).exists():
        shutil.rmtree(_aside(path))
        _fsync_dir(path.parent)


def atomic_write_dir(path: Path, write) -> None:
    """Write a directory aside, then swap it in. At every moment one complete copy exists:
    path, or (between the two renames) its aside .NAME.swap-old, which recover() puts back. The
    aside is removed only after the new path is in place and its parent directory fsynced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    old = _aside(path)
    try:
        write(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if path.exists():
            os.replace(path, old)
            _fault_pause("between renames")
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(path.parent)


_HELD: dict[str, list] = {}      # lock path -> [fd, depth]: re-entrant within one process


def _check_target_modules(model, targets) -> None:
    """IICLError for a target_modules list that names no layer of the model (peft's own error is
    a traceback), or the output layer: the fused loss head and the decoder read its base weight,
    so a LoRA there would be silently ignored. A string other than "all-linear" is peft's regex."""
    names = [n.removesuffix(".base_layer") for n, _ in model.named_modules() if n and ".lora_" not in n]
    if isinstance(targets, str):
        if targets == "all-linear":
            return
        try:
            hit = any(re.fullmatch(targets, n.removeprefix("base_model.model.")) for n in names)   # peft's keys
        except re.error as e:
            raise IICLError(f"target_modules: {targets!r} is not a regular expression ({e})") from None
        if not hit:
            example = next((n for n in names if isinstance(model.get_submodule(n), torch.nn.Linear)), names[-1])
            raise IICLError(f"target_modules: the regular expression {targets!r} matches no module's full name "
                            f"(such as {example!r}); to name layers, give a list: [{targets!r}]")
        return
    out = causal_lm(model).get_output_embeddings()
    head = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if m is out}
    linear = sorted({n.removesuffix(".base_layer").rsplit(".", 1)[-1] for n, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear) and ".lora_" not in n} - head)
    for t in targets:
        if t in head:
            raise IICLError(f"target_modules: {t!r} is the output layer, which stays frozen (the fused loss head "
                            f"reads its base weight); choose among {', '.join(linear)}")
        if not any(n == t or n.endswith("." + t) for n in names):
            raise IICLError(f"target_modules: {t!r} names no layer of this model; its linear layers: {', '.join(linear)}")


def check_dir_path(path: str | os.PathLike) -> None:
    """IICLError unless `path` is a directory or can be made one: neither it nor the nearest
    existing path above it a file. Called before a long run that writes there at its end."""
    path = Path(path)
    for up in (path, *path.parents):
        if up.exists():
            if not up.is_dir():
                raise IICLError(f"cannot write under {path}: {up} is a file, not a directory")
            return


@contextlib.contextmanager
def open_for_write(path: str | os.PathLike):
    """The one way to write a memory directory: an exclusive lock (a second writer gets
    IICLError naming it), an interrupted swap finished (recover), this directory's stale temp
    folders of killed writers swept. Re-entrant in one process; the lock file goes at exit.
    Under torch.distributed only rank 0 writes: the other ranks pass through without the
    lock (iicl_fast.dist)."""
    import fcntl
    if dist.several() and not dist.is_main():
        yield Path(path)
        return
    if not isinstance(path, (str, os.PathLike)):
        raise IICLError(f"a memory's path must be a str or a path, got {type(path).__name__}")
    path = Path(path)
    if not path.name or path.name in (".", ".."):
        raise IICLError(f"a memory needs a directory name of its own, not {str(path)!r}")
    if path.exists() and not path.is_dir():
        raise IICLError(f"{path} is a file, not a memory directory")
    check_dir_path(path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.parent / f".{path.name}.lock"
    key = str(lock.resolve())
    if key in _HELD:
        _HELD[key][1] += 1
    else:
        while True:
            fd = os.open(str(lock), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise IICLError(f"another process is writing the memory at {path} (lock {lock})") from None
            try:
                same = os.stat(lock).st_ino == os.fstat(fd).st_ino   # not a lock file its last holder removed
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        _HELD[key] = [fd, 1]
        try:
            recover(path)
            # a save swaps the whole directory in and deletes what was there: an existing
            # directory of anything but a memory (a user's files) is refused, never replaced
            if path.is_dir() and not (path / MANIFEST).is_file() and any(path.iterdir()):
                raise IICLError(f"{path} is a directory that holds no memory (no {MANIFEST}): a memory is saved by "
                                "replacing its directory whole, so iicl_fast will not write there; give a new or "
                                "empty directory")
            for stale in path.parent.glob(f".{path.name}.tmp-*"):     # killed writers' (we hold the lock)
                shutil.rmtree(stale, ignore_errors=True)
        except BaseException:
            _release(key, lock)
            raise
    try:
        yield path
    finally:
        _HELD[key][1] -= 1
        if _HELD[key][1] == 0:
            _release(key, lock)


def _release(key: str, lock: Path) -> None:
    fd = _HELD.pop(key)[0]
    try:
        os.unlink(lock)
    except FileNotFoundError:
        pass
    os.close(fd)


def memory_dir(path: Path) -> Path:
    """The directory to read: path, or the swap's aside (an older version's path.old) when a
    save was interrupted between its renames."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    for old in (_aside(path), _legacy_old(path)) if not path.exists() else ():
        if (old / MANIFEST).is_file():
            return old
    if not path.exists():
        raise IICLError(f"no memory at {path}")
    raise IICLError(f"{path} is not a memory directory (no {MANIFEST})")


def read_manifest(path: Path) -> dict:
    d = memory_dir(path)
    try:
        m = json.loads((d / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IICLError(f"corrupt manifest {d / MANIFEST}: {e}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise IICLError(f"{d / MANIFEST} is not an iicl_fast memory manifest")
    return m


class Memory:
    """A base model plus one LoRA adapter that holds what was consolidated into it.

    Several Memory objects may share one base model: each is a named peft adapter on it,
    made active whenever that Memory runs."""

    def __init__(self, model, tokenizer, config: Config | None = None):
        from peft import LoraConfig, PeftModel, get_peft_model

        if not isinstance(model, torch.nn.Module) or not hasattr(model, "get_input_embeddings"):
            raise IICLError(f"Memory needs a causal language model (a transformers model, e.g. from "
                            f"iicl_fast.load_model), got {type(model).__name__}")
        if not callable(tokenizer) or not hasattr(tokenizer, "decode"):
            raise IICLError(f"Memory needs the model's tokenizer, got {type(tokenizer).__name__}")
        if config is not None and not isinstance(config, Config):
            raise IICLError(f"config must be an iicl_fast.Config (Config(**fields) or Config.preset(name)), "
                            f"got {type(config).__name__}")
        self.config = config or Config()
        self.tokenizer = tokenizer
        self.fmt = PromptFormat(tokenizer, model)
        self.name = f"mem{next(_names)}"
        self.chunks: list[dict] = []
        self.streams: list[dict] = []          # driver.stream: each stream's id, text and chunking
        self.replay: tuple[list[Entry], HiddenSet | None] = ([], None)   # see Config.replay_entries
        self.replay_seen = 0
        self.retained_ids: list[int] = []      # the retained window (Config.retain), in stream order
        self.retained_scores: list[float] = []
        self.retained_units: list[int] = []    # lengths of the retained units (all 1 for retain_unit "token")
        _check_target_modules(model, self.config.target_modules)
        lora = LoraConfig(r=self.config.lora_r, lora_alpha=self.config.lora_alpha,
                          lora_dropout=self.config.lora_dropout, target_modules=self.config.target_modules,
                          task_type="CAUSAL_LM")
        torch.manual_seed(self.config.seed)
        if not isinstance(model, PeftModel) and "_iicl_peft" in model.__dict__:
            model = model.__dict__["_iicl_peft"]       # this base already carries memories
        if isinstance(model, PeftModel):
            model.add_adapter(self.name, lora)
            self.model = model
            if not hasattr(model, "_iicl_fingerprint"):
                model._iicl_fingerprint = fingerprint(model.get_base_model())
        else:
            base_fp = fingerprint(model)
            with warnings.catch_warnings():   # transformers 5.2x deprecation raised inside peft
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
                self.model = get_peft_model(model, lora, adapter_name=self.name)
            self.model._iicl_fingerprint = base_fp
            model.__dict__["_iicl_peft"] = self.model     # not a submodule: no reference cycle in modules()
        from . import layers, lora
        lora.install(self.model)
        layers.install(self.model)
        if next(self.model.parameters()).is_cuda:     # decoding steps' q/k/v and gate/up: one GEMM each
            layers.fuse_projections(self.model)
        self.model.eval()
        self.params = [p for n, p in self.model.named_parameters() if f".{self.name}." in n]
        for p in self.params:
            p.requires_grad_(True)

    def shard_base(self) -> str:
        """FSDP2 over the base's decoder layers (dist.shard_base; under torchrun, several ranks),
        the adapter whole on every rank; from here every rank does the whole of every chunk.
        -> a line for the log."""
        from .generation import decoder
        layers = decoder(self.model).layers
        n = dist.shard_base(layers)
        return (f"FSDP2: {n} decoder layers sharded over {dist.group_size()} ranks (rank 0 holds "
                f"{100 * dist.held_share(layers):.1f} % of their weights); every rank does the whole chunk")

    # -- identity of the base model -------------------------------------------------------
    @property
    def base(self):
        return self.model.get_base_model()

    def base_info(self) -> dict:
        b = self.base
        return {"id": getattr(b, "_iicl_model_id", getattr(b.config, "name_or_path", None) or "unknown"),
                "file_sha256": getattr(b, "_iicl_file_sha256", None),
                "fingerprint": self.model._iicl_fingerprint}

    def _activate(self):
        self.model.set_adapter(self.name)

    def _update_replay(self, kept: list[Entry], teacher, chunk_index: int) -> None:
        """replay_policy "reservoir": every kept entry seen so far is in the buffer with equal
        chance; "ppl_gap": the buffer holds the replay_entries of highest ΔPPL seen so far
        (ties: the older entry stays); "balanced": every chunk seen so far holds an equal
        share, its entries of highest ΔPPL (balanced_pick)."""
        k = self.config.replay_entries
        if k == 0 or not kept:
            return
        old, old_hs = self.replay
        entries = old + kept
        hs = teacher if old_hs is None else concat(old_hs, teacher)
        self.replay_seen += len(kept)
        for e in kept:
            e.chunk = chunk_index
        score = [e.dppl if e.dppl is not None else -math.inf for e in entries]
        if self.config.replay_policy == "ppl_gap":
            buf = sorted(sorted(range(len(entries)), key=lambda i: -score[i])[:k])
        elif self.config.replay_policy == "balanced":
            buf = balanced_pick(score, [e.chunk for e in entries], k)
        else:
            rng = random.Random(self.config.seed * 1_000_003 + chunk_index)
            buf = list(range(len(old)))
            seen = self.replay_seen - len(kept)
            for i in range(len(old), len(entries)):
                seen += 1
                if len(buf) < k:
                    buf.append(i)
                else:
                    j = rng.randrange(seen)
                    if j < k:
                        buf[j] = i
        self.replay = ([entries[i] for i in buf], subset(hs, buf))

    # -- the API ----------------------------------------------------------------------------
    def consolidate(self, text: str, *, chunk_index: int | None = None, stream: str | None = None,
                    position: int | None = None) -> ConsolidationReport:
        """One transformation T_i: θ_{i-1} + C_i → θ_i (text consolidated as one chunk)."""
        if not isinstance(text, str):
            raise IICLError(f"text must be a string, got {type(text).__name__}")
        if not text.strip():
            raise IICLError("empty text: nothing to consolidate")
        self._activate()
        idx = len(self.chunks) if chunk_index is None else chunk_index
        rep, kept, teacher = consolidate_chunk(self.model, self.fmt, text.strip(), self.params, self.config,
                                               chunk_index=idx, replay=self.replay,
                                               base_view=self.model.disable_adapter)
        self._update_replay(kept, teacher, idx)
        if self.config.retain > 0:
            self._retain(text.strip())
        rec = {"index": idx, "tokens": rep.chunk_tokens, "sha256": sha256_text(text.strip())}
        if stream is not None:
            rec.update(stream=stream, position=position)
        self.chunks.append(rec)
        return rep

    @torch.no_grad()
    def _retain(self, text: str) -> None:
        """SirLLM on the chunk: keep the top `retain` fraction of its tokens by surprisal, with
        the older retained units competing at their scores × retain_decay.

        retain_unit "token" keeps single tokens (SirLLM); "sentence" keeps whole sentences,
        scored by their tokens' mean surprisal, filled in score order until the budget is
        reached (the last one may cross it by up to a sentence, SPAN_WORDS words at most).

        Surprisal is taken by this memory *after* consolidating the chunk, with the chunk in
        the same place as ask's prefix: the tokens it still finds surprising are the ones the
        adapter did not absorb, which is what the window is for."""
        from .elicit import sentences
        from .generation import decoder, lm_head
        from .retain import surprisal
        if self.config.retain_unit == "sentence":
            parts = [self.fmt.encode(u if i == 0 else " " + u) for i, u in enumerate(sentences(text))]
            ids, lengths = [t for p in parts for t in p], [len(p) for p in parts if p]
        else:
            ids = self.fmt.encode(text)
            lengths = [1] * len(ids)
        if not ids:
            return
        k = math.ceil(self.config.retain * len(ids))
        head = self.fmt.head
        seq = torch.tensor([head + ids], device=self.params[0].device)
        h = decoder(self.model)(input_ids=seq).last_hidden_state[0]
        weight, bias, softcap = lm_head(self.model)
        n0 = len(head)
        prev = h[n0 - 1: n0 - 1 + len(ids)] if n0 > 0 else torch.cat([h[:1], h[: len(ids) - 1]])
        sc = surprisal(prev, weight, seq[0, n0:], bias, softcap).cpu().tolist()
        if n0 == 0:
            sc[0] = 0.0                        # no prediction for the very first token
        # units as (ids, score): the kept ones (decayed) first, then the chunk's, in stream order
        units, at = [], 0
        for n in self.retained_units:
            units.append((self.retained_ids[at: at + n], self.retained_scores[at] * self.config.retain_decay))
            at += n
        at = 0
        for n in lengths:
            units.append((ids[at: at + n], sum(sc[at: at + n]) / n))
            at += n
        # newest first, stable sort by descending score: ties keep the newer unit
        kept, total = [], 0
        for i in sorted(range(len(units) - 1, -1, -1), key=lambda i: -units[i][1]):
            if total >= k:
                break
            kept.append(i)
            total += len(units[i][0])
        kept.sort()
        self.retained_ids = [t for i in kept for t in units[i][0]]
        self.retained_scores = [units[i][1] for i in kept for _ in units[i][0]]
        self.retained_units = [len(units[i][0]) for i in kept]

    def prompt_ids(self, question: str, context: str | None = None) -> list[int]:
        """[head][retained window "\n\n"][context "\n\n"][question][tail]."""
        if not self.retained_ids:
            return self.fmt.prompt(question, context=context)
        mid = self.retained_ids + self.fmt.encode("\n\n")
        if context:
            mid += self.fmt.encode(context.strip() + "\n\n")
        return self.fmt.head + mid + self.fmt.query(question)

    def ask(self, question: str, context: str | None = None, *, max_new_tokens: int | None = None) -> str:
        """Greedy answer, without the text in the window (or with `context` put there first)."""
        return self.ask_many([question], context=context, max_new_tokens=max_new_tokens)[0]

    def ask_many(self, questions: list[str], context: str | None = None, *, max_new_tokens: int | None = None) -> list[str]:
        """Greedy answers, one a question, batched (gen_batch_size rows a batch)."""
        if isinstance(questions, str):           # a string iterates as its characters: one answer each
            raise IICLError("ask_many takes a list of questions (ask(question) for one)")
        questions = list(questions)
        for i, q in enumerate(questions):
            if not isinstance(q, str):
                raise IICLError(f"question {i} must be a string, got {type(q).__name__}")
            if not q.strip():
                raise IICLError(f"question {i} is empty (each question must be a non-empty string)")
        if context is not None and not isinstance(context, str):
            raise IICLError(f"context must be a string, got {type(context).__name__}")
        if max_new_tokens is not None and (type(max_new_tokens) is not int or max_new_tokens < 1):
            raise IICLError(f"max_new_tokens must be an integer >= 1 (None: the config's answer_max_new_tokens), "
                            f"got {max_new_tokens!r}")
        self._activate()
        prompts = [self.prompt_ids(q, context=context) for q in questions]
        outs = generate(self.model, prompts, max_new_tokens=max_new_tokens or self.config.answer_max_new_tokens,
                        stop_ids=self.fmt.stop_ids, pad_id=self.fmt.pad_id, sample=False,
                        batch_size=self.config.gen_batch_size)
        return [self.tokenizer.decode(o, skip_special_tokens=True).strip() for o in outs]

    def stream(self, texts, *, chunk_tokens: int | None = None, checkpoint_dir=None, log=None):
        """Consolidate a long text (or texts in order) chunk by chunk: iicl_fast.driver.stream
        (the streaming loop lives there; this is a convenience alias)."""
        from .driver import stream
        return stream(self, texts, chunk_tokens=chunk_tokens, checkpoint_dir=checkpoint_dir, log=log)

    # -- disk -------------------------------------------------------------------------------
    def manifest(self) -> dict:
        return {"format": FORMAT, "base_model": self.base_info(), "config": self.config.to_dict(),
                "chunks": self.chunks, "streams": self.streams, "versions": _versions()}

    def save(self, path: str | os.PathLike) -> None:
        """Write the memory dir atomically: a peft adapter (adapter_config.json +
        adapter_model.safetensors, loadable by peft.PeftModel.from_pretrained) + manifest.json."""
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        state = {k: v.detach().to("cpu").contiguous()
                 for k, v in get_peft_model_state_dict(self.model, adapter_name=self.name).items()}
        lora = self.model.peft_config[self.name]
        manifest = self.manifest()

        def write(tmp: Path):
            save_file(state, str(tmp / ADAPTER), metadata={"format": "pt"})
            lora.inference_mode, was = True, lora.inference_mode
            try:
                lora.save_pretrained(str(tmp))
            finally:
                lora.inference_mode = was
            entries, hs = self.replay
            if entries:
                save_file({"h": hs.h.detach().cpu().contiguous(), "targets": hs.targets.cpu(),
                           "offsets": torch.tensor(hs.offsets)}, str(tmp / REPLAY))
                (tmp / REPLAY_ENTRIES).write_text(json.dumps(
                    {"seen": self.replay_seen, "entries": [e.__dict__ for e in entries]}), encoding="utf-8")
            if self.retained_ids:
                (tmp / RETAINED).write_text(json.dumps({"ids": self.retained_ids, "scores": self.retained_scores,
                                                        "units": self.retained_units}), encoding="utf-8")
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")

        if dist.is_main():                   # several ranks: rank 0 writes, the others wait for it
            with open_for_write(path):
                atomic_write_dir(Path(path), write)
        dist.barrier()

    def _restore(self, path) -> None:
        """Replace this memory's adapter and chunk list with the saved one at path."""
        from peft import set_peft_model_state_dict
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        m = read_manifest(path)
        d = memory_dir(path)
        theirs, ours = m.get("base_model", {}), self.base_info()
        if theirs.get("fingerprint") != ours["fingerprint"]:
            raise IICLError(f"memory {path} was made from base model {theirs.get('id')!r}, not the loaded "
                            f"{ours['id']!r} (fingerprints differ)")
        if not (d / ADAPTER).is_file():
            raise IICLError(f"memory {path} has no {ADAPTER}")
        try:
            state = load_file(str(d / ADAPTER))
        except (SafetensorError, OSError, ValueError) as e:
            raise IICLError(f"corrupt adapter file {d / ADAPTER}: {e}") from None
        expected = {k for k in get_state_keys(self)}
        if set(state) != expected:
            raise IICLError(f"adapter file {d / ADAPTER} does not fit this memory's LoRA layout "
                            f"({len(set(state) ^ expected)} tensors differ)")
        device = self.params[0].device
        set_peft_model_state_dict(self.model, {k: v.to(device) for k, v in state.items()}, adapter_name=self.name)
        self.chunks = list(m.get("chunks", []))
        self.streams = list(m.get("streams", []))
        self.replay, self.replay_seen = ([], None), 0
        if (d / REPLAY).is_file():
            try:
                t = load_file(str(d / REPLAY))
                r = json.loads((d / REPLAY_ENTRIES).read_text(encoding="utf-8"))
                entries = [Entry(**e) for e in r["entries"]]
                hs = HiddenSet(t["h"].to(device), t["targets"].to(device), t["offsets"].tolist())
            except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
                raise IICLError(f"corrupt replay buffer in {d}: {e}") from None
            if len(hs.offsets) != len(entries) + 1 or hs.offsets[-1] != hs.h.shape[0]:
                raise IICLError(f"corrupt replay buffer in {d}: sizes do not match")
            V = self.base.get_input_embeddings().weight.shape[0]
            H = self.base.get_input_embeddings().weight.shape[1]
            if hs.h.dim() != 2 or hs.h.shape[1] != H:
                raise IICLError(f"replay buffer in {d} has hidden width {tuple(hs.h.shape[1:])}, not this model's {H}")
            if hs.targets.numel() and (int(hs.targets.min()) < 0 or int(hs.targets.max()) >= V):
                raise IICLError(f"replay buffer in {d} has target ids outside this model's vocabulary of {V}")
            if any(not 0 <= t < V for e in entries for t in e.response):
                raise IICLError(f"replay buffer in {d} has response ids outside this model's vocabulary of {V}")
            self.replay, self.replay_seen = (entries, hs), int(r.get("seen", len(entries)))
        self.retained_ids, self.retained_scores, self.retained_units = [], [], []
        if (d / RETAINED).is_file():
            try:
                r = json.loads((d / RETAINED).read_text(encoding="utf-8"))
                ids, scores = [int(i) for i in r["ids"]], [float(x) for x in r["scores"]]
                units = [int(n) for n in r.get("units", [1] * len(ids))]     # older files: tokens
            except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
                raise IICLError(f"corrupt retained window {d / RETAINED}: {e}") from None
            V = self.base.get_input_embeddings().weight.shape[0]
            if len(ids) != len(scores) or any(not 0 <= i < V for i in ids):
                raise IICLError(f"corrupt retained window {d / RETAINED}: ids and scores do not fit this model")
            if any(n < 1 for n in units) or sum(units) != len(ids):
                raise IICLError(f"corrupt retained window {d / RETAINED}: unit lengths do not add up to its ids")
            self.retained_ids, self.retained_scores, self.retained_units = ids, scores, units

    @classmethod
    def load(cls, path: str | os.PathLike, model=None, tokenizer=None, *, config: Config | None = None,
             device="auto", dtype="auto") -> "Memory":
        """Load a saved memory. Without a model, the base model named in the manifest is loaded
        (on device / dtype, as load_model takes them)."""
        from peft import LoraConfig

        m = read_manifest(path)
        if model is None:
            model_id = m["base_model"].get("id")
            model, tokenizer = load_model(None if model_id == DEFAULT_MODEL_ID else model_id, device=device, dtype=dtype)
        elif tokenizer is None:
            raise IICLError("Memory.load: give the tokenizer with the model")
        cfg = config or Config.from_dict(m.get("config", {}))
        try:
            lora = LoraConfig.from_pretrained(str(memory_dir(path)))
        except Exception as e:  # noqa: BLE001 - peft raises several kinds for a bad json
            raise IICLError(f"corrupt {ADAPTER_CONFIG} in {path}: {str(e).splitlines()[0]}") from None
        cfg.lora_r, cfg.lora_alpha = lora.r, lora.lora_alpha
        tm = lora.target_modules
        cfg.target_modules = sorted(tm) if isinstance(tm, (set, list, tuple)) else tm
        mem = cls(model, tokenizer, cfg)
        mem._restore(path)
        return mem


def get_state_keys(mem: Memory) -> list[str]:
    from peft import get_peft_model_state_dict
    return list(get_peft_model_state_dict(mem.model, adapter_name=mem.name).keys())
