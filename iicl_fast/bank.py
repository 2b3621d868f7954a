"""A bank of LoRA adapters trained together: the segmented LoRA op and a masked AdamW.

Segments: the tokens of a batch [T] are cut into S segments by offsets [S+1] (int64), and
segment s belongs to adapter adapter_ids[s]. For every token t of segment s:
    y[t] = scale * B[a] @ (A[a] @ x[t]),   a = adapter_ids[s]
A [n, r, d_in] and B [n, d_out, r] are the bank's weights (fp32 masters); x and y are in
the compute dtype (bf16 or fp32). Tokens outside every segment get y = 0.
"""
from __future__ import annotations

import contextlib

import torch

from ._ext import available, ext
from .config import IICLError
from .graphs import capture, warm_up


def segmented_lora_loop(x, A, B, offsets, adapter_ids, scale: float):
    """Plain PyTorch reference: a Python loop over segments (differentiable by autograd)."""
    y = x.new_zeros(x.shape[0], B.shape[1])
    off = offsets.tolist()
    for s, a in enumerate(adapter_ids.tolist()):
        if off[s + 1] > off[s]:
            xs = x[off[s]: off[s + 1]]
            y[off[s]: off[s + 1]] = scale * (xs @ A[a].to(x.dtype).t()) @ B[a].to(x.dtype).t()
    return y


class SegmentedLoRA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, A, B, offsets, adapter_ids, scale, base):
        y, u = ext().segmented_lora_forward(x, A, B, offsets, adapter_ids, float(scale), base)
        ctx.save_for_backward(x, u, A, B, offsets, adapter_ids)
        ctx.scale = float(scale)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, u, A, B, offsets, adapter_ids = ctx.saved_tensors
        gx, gA, gB = ext().segmented_lora_backward(grad_y, x, u, A, B, offsets, adapter_ids, ctx.scale,
                                                    ctx.needs_input_grad[0])
        return (gx if ctx.needs_input_grad[0] else None, gA, gB, None, None, None,
                grad_y if ctx.needs_input_grad[6] else None)


def segmented_lora(x, A, B, offsets, adapter_ids, scale: float = 1.0, base=None, *, validate: bool = True):
    """x [T, d_in], A [n, r, d_in], B [n, d_out, r], offsets [S+1], adapter_ids [S] -> y [T, d_out]
    (+ base [T, d_out] when given: on CUDA the add happens in the same pass).

    Differentiable in x, A, B and base (grad_A / grad_B come back dense over the bank, fp32).
    CPU: any float dtype. CUDA (extension built with nvcc): x bf16, A / B fp32, rank a multiple
    of 16 up to 64; segments stay on the device (no host sync) except for `validate`, which
    checks the adapter ids against the bank on the host (the CPU path always does)."""
    _check_same_device(x=x, A=A, B=B, offsets=offsets, adapter_ids=adapter_ids)
    if validate and x.is_cuda and adapter_ids.numel():
        lo, hi = int(adapter_ids.min()), int(adapter_ids.max())
        if lo < 0 or hi >= A.shape[0]:
            raise IICLError(f"adapter id {hi if hi >= A.shape[0] else lo} is out of range for a bank of "
                            f"{A.shape[0]} adapters")
    return SegmentedLoRA.apply(x, A, B, offsets, adapter_ids, scale, base)


def cuda_segmented_ok(x: torch.Tensor, rank: int) -> bool:
    """Whether the extension's CUDA segmented kernels take this activation and rank."""
    return (x.is_cuda and available() and ext().with_cuda and x.dtype == torch.bfloat16
            and rank % 16 == 0 and rank <= 64)


def _check_same_device(**tensors):
    devs = {name: t.device for name, t in tensors.items()}
    first = next(iter(devs.values()))
    for name, d in devs.items():
        if d != first:
            raise IICLError(f"{name} is on {d}, but {next(iter(devs))} is on {first}: put the bank and "
                            "the batch on one device")


class MaskedAdamW:
    """AdamW over a bank's stacked tensors (each [n_adapters, ...]) that moves only the
    active adapters: each has its own step count, learning rate, weight decay, and its
    gradient clipped by its own norm over all the tensors. Inactive adapters and their
    moments stay bit-for-bit the same. Matches torch.optim.AdamW run per adapter."""

    def __init__(self, params: list[torch.Tensor], n_adapters: int, *, lr=1e-3, weight_decay=0.0,
                 betas=(0.9, 0.999), eps=1e-8, max_grad_norm: float | None = 1.0, impl: str = "auto"):
        if impl not in ("auto", "ext", "torch"):
            raise IICLError(f"impl must be 'auto', 'ext' or 'torch', got {impl!r}")
        self.impl = impl
        self.params = list(params)
        if not self.params:
            raise IICLError("MaskedAdamW: no parameters")
        for i, p in enumerate(self.params):
            if p.shape[0] != n_adapters:
                raise IICLError(f"MaskedAdamW: params[{i}] holds {p.shape[0]} adapters, expected {n_adapters}")
        self.n = n_adapters
        dev = self.params[0].device
        self.lr = torch.full((n_adapters,), float(lr), dtype=torch.float32, device=dev)
        self.weight_decay = torch.full((n_adapters,), float(weight_decay), dtype=torch.float32, device=dev)
        self.step_count = torch.zeros(n_adapters, dtype=torch.long, device=dev)
        self.exp_avg = [torch.zeros_like(p, memory_format=torch.contiguous_format) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p, memory_format=torch.contiguous_format) for p in self.params]
        self.betas, self.eps = betas, eps
        self.max_grad_norm = max_grad_norm or 0.0
        self._slots = None     # (grad pointers, device slot table) of the CUDA kernel

    def active_mask(self, active) -> torch.Tensor:
        if active is None:
            return torch.ones(self.n, dtype=torch.bool, device=self.step_count.device)
        active = torch.as_tensor(active, device=self.step_count.device)
        if active.dtype == torch.bool:      # a device mask is taken as it is: no host sync
            if active.shape != (self.n,):
                raise IICLError(f"active mask has {active.numel()} entries for {self.n} adapters")
            return active
        if active.numel() and (int(active.min()) < 0 or int(active.max()) >= self.n):
            raise IICLError(f"adapter id {int(active.max()) if int(active.max()) >= self.n else int(active.min())} "
                            f"is out of range for a bank of {self.n} adapters")
        mask = torch.zeros(self.n, dtype=torch.bool, device=self.step_count.device)
        mask[active.long()] = True
        return mask

    @torch.no_grad()
    def step(self, active=None) -> None:
        """One update of the adapters in `active` (ids or a bool mask; None: all)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        impl = self.impl
        if impl == "auto":   # the extension's kernel where this build has one for the device
            impl = "ext" if available() and (not self.params[0].is_cuda or ext().with_cuda) else "torch"
        if impl == "torch":
            return self._step_torch(grads, self.active_mask(active))
        if self.params[0].is_cuda:
            # the device table of (param, grad, moment) pointers is rebuilt only when a gradient
            # moved: then the update is three launches with no host sync and no copy, which a
            # CUDA graph can capture (GraphedBankStep)
            grads = [g.contiguous() for g in grads]
            key = tuple(g.data_ptr() for g in grads)
            if self._slots is None or self._slots[0] != key:
                self._slots = (key, ext().slot_table(self.params, grads, self.exp_avg, self.exp_avg_sq))
            ext().masked_adamw_step_table(self._slots[1], len(self.params), self.step_count,
                                          self.active_mask(active).contiguous(), self.lr, self.weight_decay,
                                          self.betas[0], self.betas[1], self.eps, float(self.max_grad_norm))
            return
        ext().masked_adamw_step(self.params, grads, self.exp_avg, self.exp_avg_sq, self.step_count,
                                self.active_mask(active), self.lr, self.weight_decay, self.betas[0], self.betas[1],
                                self.eps, float(self.max_grad_norm))

    def _step_torch(self, grads, mask) -> None:
        """The same update with torch ops on the gathered active adapters (any device)."""
        act = mask.nonzero().squeeze(1)
        if act.numel() == 0:
            return
        b1, b2 = self.betas
        self.step_count[act] += 1
        t = self.step_count[act].double()
        bc1, bc2_sqrt = 1 - b1 ** t, (1 - b2 ** t).sqrt()
        lr, wd = self.lr[act].double(), self.weight_decay[act].double()
        clip = None
        if self.max_grad_norm > 0:
            sq = sum(g[act].float().pow(2).reshape(act.numel(), -1).sum(1) for g in grads)
            clip = (self.max_grad_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        for p, g, m, v in zip(self.params, grads, self.exp_avg, self.exp_avg_sq):
            shape = (-1,) + (1,) * (p.dim() - 1)
            col = lambda x: x.view(shape).to(p.dtype)  # noqa: E731
            ga = g[act].to(p.dtype)
            if clip is not None:
                ga = ga * col(clip)
            pa = p[act] * col(1 - lr * wd)
            ma = m[act].lerp(ga, 1 - b1)
            va = v[act].mul(b2).addcmul(ga, ga, value=1 - b2)
            pa = pa - col(lr / bc1) * ma / (va.sqrt() / col(bc2_sqrt) + self.eps)
            p[act], m[act], v[act] = pa, ma, va

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None


# -- the bank on a model ---------------------------------------------------------------------
def _target_linears(model, target_modules):
    """(qualified name, nn.Linear) of the decoder's linear layers to adapt: all of them but
    the output head (peft's "all-linear"), or those whose last name part is listed."""
    from .generation import causal_lm
    lm = causal_lm(model)
    head = lm.get_output_embeddings()
    out = []
    for name, mod in lm.named_modules():
        if not isinstance(mod, torch.nn.Linear) or mod is head or ".lora_" in f".{name}":
            continue                           # peft's own LoRA layers are not adapted
        if name.endswith(".base_layer"):       # a layer peft wrapped: adapt its base, name it as peft does
            name = name[: -len(".base_layer")]
            if getattr(lm.get_output_embeddings(), "base_layer", None) is mod:
                continue
        if target_modules in (None, "all-linear") or name.split(".")[-1] in target_modules:
            out.append((name, mod))
    if not out:
        raise IICLError(f"no linear layer of {type(lm).__name__} matches target_modules={target_modules!r}")
    return out


class LoraBank:
    """n_adapters LoRA adapters over one frozen base model, trained together.

        bank = LoraBank(model, n_adapters, rank=16, alpha=32)
        with bank.route(adapter_ids):          # LongTensor [batch]: one adapter per sequence
            out = model(input_ids, attention_mask=mask)
        opt = BankAdamW(bank, lr=1e-3); loss.backward(); opt.step(active=adapter_ids)
        bank.export(i, path)                   # adapter i as a standalone memory dir

    Each adapted nn.Linear gets a forward hook that adds scale · B_a(A_a x) for each
    sequence's adapter: impl "segmented" (the C++ extension's op: on CPU, and on CUDA for bf16
    activations and ranks 16..64 in steps of 16) or "bmm" (the batch's adapters gathered, two
    batched GEMMs); "auto": segmented on CPU, bmm on CUDA (faster there inside CUDA graphs,
    benchmarks/NOTES.md). A [n, r, d_in] is
    initialised as peft does (Kaiming-uniform), B [n, d_out, r] at zero: a fresh bank
    leaves the model's outputs unchanged. Masters in fp32; compute in the activations' dtype.
    Outside `route` the hooks do nothing."""

    def __init__(self, model, n_adapters: int, rank: int = 16, alpha: float = 32, target_modules=None,
                 impl: str = "auto"):
        if impl not in ("auto", "segmented", "bmm"):
            raise IICLError(f"impl must be 'auto', 'segmented' or 'bmm', got {impl!r}")
        self.impl = impl
        if n_adapters < 1:
            raise IICLError(f"n_adapters must be >= 1, got {n_adapters}")
        if rank < 1:
            raise IICLError(f"rank must be >= 1, got {rank}")
        self.model, self.n, self.rank, self.alpha = model, n_adapters, rank, alpha
        self.scale = alpha / rank
        self.target_modules = target_modules
        self.modules = _target_linears(model, target_modules)
        dev = next(model.parameters()).device
        self.A, self.B = {}, {}
        for name, lin in self.modules:
            A = torch.empty(n_adapters, rank, lin.in_features, device=dev, dtype=torch.float32)
            bound = (1.0 / lin.in_features) ** 0.5     # kaiming_uniform_(a=sqrt(5)) on [r, d_in]
            torch.nn.init.uniform_(A, -bound, bound)
            self.A[name] = torch.nn.Parameter(A)
            self.B[name] = torch.nn.Parameter(torch.zeros(n_adapters, lin.out_features, rank, device=dev))
        self._route: torch.Tensor | None = None
        self._hooks = [lin.register_forward_hook(self._hook(name)) for name, lin in self.modules]

    def parameters(self) -> list[torch.nn.Parameter]:
        return [t for name, _ in self.modules for t in (self.A[name], self.B[name])]

    def _hook(self, name):
        def hook(module, inputs, output):
            ids = self._route
            if ids is None:
                return None
            x = inputs[0]
            b, d_in = ids.numel(), x.shape[-1]
            if x.shape[0] != b:
                raise IICLError(f"route has {b} adapter ids but the batch has {x.shape[0]} sequences")
            s = x.numel() // (b * d_in)
            impl = self.impl
            if impl == "auto":
                # CUDA: bmm, measured faster inside CUDA graphs (benchmarks/NOTES.md)
                impl = "bmm" if x.is_cuda or not available() else "segmented"
            if impl == "bmm":
                # the adapters of the batch's sequences gathered and two batched GEMMs, the second
                # adding into the layer's output with the scale (baddbmm: no separate scale and add)
                xb = x.reshape(b, s, d_in)
                A = self.A[name].index_select(0, ids).to(x.dtype)
                B = self.B[name].index_select(0, ids).to(x.dtype)
                u = torch.bmm(xb, A.transpose(1, 2))
                return torch.baddbmm(output.reshape(b, s, -1), u, B.transpose(1, 2), alpha=self.scale).view(output.shape)
            offsets = torch.arange(b + 1, device=x.device) * s
            if x.is_cuda:    # the layer's output added inside the expand kernel
                y = segmented_lora(x.reshape(b * s, d_in), self.A[name], self.B[name], offsets, ids, self.scale,
                                   base=output.reshape(b * s, -1), validate=False)
                return y.view(output.shape)
            y = segmented_lora(x.reshape(b * s, d_in), self.A[name], self.B[name], offsets, ids, self.scale,
                               validate=False)
            return output + y.view(output.shape).to(output.dtype)
        return hook

    @contextlib.contextmanager
    def route(self, adapter_ids):
        """Inside: sequence i of every batch goes through adapter adapter_ids[i]."""
        ids = torch.as_tensor(adapter_ids, dtype=torch.long, device=self.A[self.modules[0][0]].device).reshape(-1)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.n):
            bad = int(ids.max()) if int(ids.max()) >= self.n else int(ids.min())
            raise IICLError(f"adapter id {bad} is out of range for a bank of {self.n} adapters")
        prev, self._route = self._route, ids
        try:
            yield self
        finally:
            self._route = prev

    def remove(self) -> None:
        """Detach the bank from the model (its hooks)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def peft_state(self, i: int) -> dict[str, torch.Tensor]:
        """Adapter i under the key names peft saves (loadable by PeftModel.from_pretrained)."""
        if not 0 <= i < self.n:
            raise IICLError(f"adapter id {i} is out of range for a bank of {self.n} adapters")
        sd = {}
        for name, _ in self.modules:
            sd[f"base_model.model.{name}.lora_A.weight"] = self.A[name][i].detach().cpu().contiguous()
            sd[f"base_model.model.{name}.lora_B.weight"] = self.B[name][i].detach().cpu().contiguous()
        return sd

    def export(self, i: int, path, *, tokenizer=None, config=None, chunks=None) -> None:
        """Write adapter i as a standalone memory dir (as Memory.save writes it), atomically."""
        import json
        from pathlib import Path

        from peft import LoraConfig
        from safetensors.torch import save_file

        from .config import Config
        from .memory import ADAPTER, MANIFEST, FORMAT, _versions, atomic_write_dir
        from .models import fingerprint
        from .generation import causal_lm
        state = self.peft_state(i)
        base = causal_lm(self.model)
        leaves = sorted({name.split(".")[-1] for name, _ in self.modules})
        cfg = config or Config()
        cfg = Config.from_dict({**cfg.to_dict(), "lora_r": self.rank, "lora_alpha": self.alpha,
                                "target_modules": leaves, "lora_dropout": 0.0})
        lora = LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=leaves, lora_dropout=0.0,
                          task_type="CAUSAL_LM", inference_mode=True)
        manifest = {"format": FORMAT,
                    "base_model": {"id": getattr(base, "_iicl_model_id", getattr(base.config, "name_or_path", None)
                                                 or "unknown"),
                                   "file_sha256": getattr(base, "_iicl_file_sha256", None),
                                   "fingerprint": fingerprint(base)},
                    "config": cfg.to_dict(), "chunks": list(chunks or []), "versions": _versions()}

        def write(tmp: Path):
            save_file(state, str(tmp / ADAPTER), metadata={"format": "pt"})
            lora.save_pretrained(str(tmp))
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")

        atomic_write_dir(Path(path), write)


class BankAdamW(MaskedAdamW):
    """MaskedAdamW over a LoraBank's parameters: opt.step(active=adapter_ids)."""

    def __init__(self, bank: LoraBank, lr=1e-3, weight_decay=0.0, max_grad_norm: float | None = 1.0, **kw):
        super().__init__(bank.parameters(), bank.n, lr=lr, weight_decay=weight_decay,
                         max_grad_norm=max_grad_norm, **kw)


class GraphedBankStep:
    """A bank training step — forward, loss, backward, masked AdamW — captured once as a CUDA
    graph and replayed, for batches of fixed shapes (the issue's workload: 64 sequences × 128
    tokens of a 135M model). Eager, that step is bound by the host: ~30 layers × 7 hooked
    linears of small kernels, 94 ms forward + 150 ms backward for 8,192 tokens on an H100,
    where the GPU work is a fraction of that; replayed: 67 ms + 3 ms for the update (256
    adapters, benchmarks/NOTES.md). Needs CUDA and the extension's CUDA AdamW (its update has
    no host sync).

        step = GraphedBankStep(bank, opt, loss_fn, example)   # example: dict of CUDA tensors
        loss = step(adapter_ids, **batch)                    # batch: same names and shapes

    loss_fn(**batch) -> scalar loss, run with sequence i routed to adapter_ids[i]. Gradients
    live in the graph's memory (p.grad after a call holds the last step's); the adapters
    active in a step are those of adapter_ids. The returned loss is a view of the graph's output: read it before the
    next call."""

    def __init__(self, bank: LoraBank, opt: MaskedAdamW, loss_fn, example: dict, adapter_ids, warmup: int = 2):
        if not torch.cuda.is_available() or not bank.parameters()[0].is_cuda:
            raise IICLError("GraphedBankStep needs the bank on a CUDA device")
        if not (available() and ext().with_cuda) or opt.impl == "torch":
            raise IICLError("GraphedBankStep needs the extension's CUDA AdamW (iicl_fast._C built with nvcc)")
        self.bank, self.opt, self.loss_fn = bank, opt, loss_fn
        dev = bank.parameters()[0].device
        self.static = {k: v.detach().clone() for k, v in example.items()}
        self.ids = self._check_ids(adapter_ids).to(dev)
        self.mask = torch.zeros(bank.n, dtype=torch.bool, device=dev)
        self.params = bank.parameters()
        warm_up(self._grad, warmup, device=dev)   # compiles kernels, sets up cuBLAS: not allowed in capture
        # two graphs, so that benchmarks can time the gradient and the update apart. The
        # gradients are allocated inside the first (autograd hands its fresh tensors to .grad:
        # no zeroing and no accumulation pass over the bank, 5 GB at 256 adapters of a 135M
        # model) and keep their addresses on every replay; the update's slot table is built
        # from them before the second capture.
        self.graph_grad, self.graph_update = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with capture(self.graph_grad, device=dev):
            self.loss = self._grad()
        opt.step(active=torch.zeros(bank.n, dtype=torch.bool, device=dev))   # builds the slot table; moves nothing
        with capture(self.graph_update, self.graph_grad.pool(), device=dev):
            self._update()

    def _check_ids(self, adapter_ids) -> torch.Tensor:
        ids = torch.as_tensor(adapter_ids, dtype=torch.long).reshape(-1)
        if ids.is_cuda:
            ids = ids.cpu()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.bank.n):
            bad = int(ids.max()) if int(ids.max()) >= self.bank.n else int(ids.min())
            raise IICLError(f"adapter id {bad} is out of range for a bank of {self.bank.n} adapters")
        if hasattr(self, "ids") and ids.shape != self.ids.shape:
            raise IICLError(f"the graph was captured for {self.ids.numel()} sequences, got {ids.numel()}")
        return ids

    def _grad(self) -> torch.Tensor:
        for p in self.params:
            p.grad = None
        prev, self.bank._route = self.bank._route, self.ids     # validated on the host already
        try:
            loss = self.loss_fn(**self.static)
        finally:
            self.bank._route = prev
        loss.backward()
        return loss.detach()

    def _update(self) -> None:
        self.mask.zero_()
        self.mask.index_fill_(0, self.ids, True)
        self.opt.step(active=self.mask)

    def __call__(self, adapter_ids, **batch) -> torch.Tensor:
        ids = self._check_ids(adapter_ids)
        if batch.keys() != self.static.keys():
            raise IICLError(f"batch must have exactly {sorted(self.static)}, got {sorted(batch)}")
        for k, v in batch.items():
            if v.shape != self.static[k].shape:
                raise IICLError(f"{k} has shape {tuple(v.shape)}, the graph was captured for {tuple(self.static[k].shape)}")
            self.static[k].copy_(v, non_blocking=True)
        self.ids.copy_(ids, non_blocking=True)
        self.graph_grad.replay()
        self.graph_update.replay()
        return self.loss
