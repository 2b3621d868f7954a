"""Configuration of one consolidation (elicit → teacher → select → train)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


class IICLError(Exception):
    """A problem with the user's input or files; the CLI prints it as one line, exit 2."""


LOSSES = ("forward_kl", "reverse_kl", "seqkd")
LOSS_IMPLS = ("reference", "fused")


@dataclass
class Config:
    """Defaults make the embedded SmolLM2-135M consolidate a ~150-token document in a few
    minutes on 2 CPU cores (measured: ~56 entries of <=40 tokens, r=16 on all linear
    layers, lr 1e-3, 4 epochs reach full-context recall on a 6-question document)."""

    # 1. elicitation (hybrid prompting, the chunk in the window)
    n_queries: int = 40            # model-written questions, answered with the chunk in view
    n_continuations: int = 24      # open-ended: continue a passage, recall, summarise
    max_query_tokens: int = 32
    max_response_tokens: int = 40
    elicit_temperature: float = 0.7
    elicit_top_p: float = 0.9
    gen_batch_size: int = 16
    # 3. path selection by ΔPPL = log P(r | C, q) − log P(r | q)
    select_ratio: float = 0.875    # keep the top ρ·N entries ...
    select_top_k: int | None = None  # ... or exactly the top k (wins over the ratio)
    # 4. consolidation
    loss: str = "forward_kl"       # forward_kl | reverse_kl | seqkd
    loss_impl: str = "fused"       # fused (iicl_fast.ops, loss-head identity) | reference (plain PyTorch)
    kernel_impl: str = "auto"      # for fused: auto (Triton on CUDA, torch on CPU) | triton | torch
    temperature: float = 1.0
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    epochs: int = 4
    batch_size: int = 8
    token_chunk: int = 256         # response tokens per loss slice: never tokens×vocab at once
    # Replay: up to this many kept entries of earlier chunks (a uniform sample, with their
    # teacher hidden states) are trained on again with each new chunk. Without it the
    # 135M model lost the first of two documents (recall 2/2 -> 0/2) while learning the
    # second. Bounded, so memory stays constant over a stream. 0 disables.
    replay_entries: int = 32
    # 5. retain (short-term memory, SirLLM): after each consolidated chunk the top `retain`
    # fraction of its tokens by surprisal (older retained tokens' scores × retain_decay per
    # chunk) stay in the window as a prefix for `ask`. 0 keeps nothing.
    retain: float = 0.0
    retain_decay: float = 0.9
    # 6. streaming
    chunk_tokens: int = 1024
    # answering
    answer_max_new_tokens: int = 48
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise IICLError(f"unknown loss {self.loss!r}: choose one of {', '.join(LOSSES)}")
        if self.loss_impl not in LOSS_IMPLS:
            raise IICLError(f"unknown loss_impl {self.loss_impl!r}: choose one of {', '.join(LOSS_IMPLS)}")
        if self.kernel_impl not in ("auto", "triton", "torch"):
            raise IICLError(f"unknown kernel_impl {self.kernel_impl!r}: choose auto, triton or torch")
        if not 0.0 < self.select_ratio <= 1.0:
            raise IICLError(f"select_ratio must be in (0, 1], got {self.select_ratio}")
        if self.select_top_k is not None and self.select_top_k < 1:
            raise IICLError(f"select_top_k must be >= 1, got {self.select_top_k}")
        for name in ("n_queries", "n_continuations"):
            if getattr(self, name) < 0:
                raise IICLError(f"{name} must be >= 0")
        if self.n_queries + self.n_continuations == 0:
            raise IICLError("n_queries + n_continuations must be > 0")
        for name in ("max_query_tokens", "max_response_tokens", "gen_batch_size", "lora_r",
                     "epochs", "batch_size", "token_chunk", "chunk_tokens", "answer_max_new_tokens"):
            if getattr(self, name) < 1:
                raise IICLError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.replay_entries < 0:
            raise IICLError(f"replay_entries must be >= 0, got {self.replay_entries}")
        if not 0.0 <= self.retain <= 1.0:
            raise IICLError(f"retain must be in [0, 1], got {self.retain}")
        if not 0.0 < self.retain_decay <= 1.0:
            raise IICLError(f"retain_decay must be in (0, 1], got {self.retain_decay}")
        if self.temperature <= 0:
            raise IICLError(f"temperature must be > 0, got {self.temperature}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
