"""Several processes on one chunk (torchrun, torch.distributed): data parallel training.

    torchrun --nproc-per-node N -m iicl_fast consolidate doc.txt --out mem

Every rank holds the base model and the same adapter (seeded alike). Rank 0's transfer set
is sent to every rank; the teacher and student passes run on every W-th entry and are
gathered (consolidate.sharded_hidden); rank 0's ΔPPL scores are sent to every rank, so all
select and replay the same entries; each optimizer
step's entries are dealt out over the ranks (entries i, i + N, ... to rank i), each rank
back-propagates its share weighted by the step's whole token count, and the LoRA gradients
are summed over the ranks (one all-reduce of one flat buffer a step) before clipping and
AdamW: every rank ends every step with the same adapter weights, equal to one process's up
to the order of float sums. Rank 0 writes checkpoints (the others wait at a barrier), every
rank resumes from them. Without an initialised process group (or with one process) every
function here is the identity of a single process.

The backend is gloo on the CPU (the tests run two processes here) and NCCL on GPUs, one GPU
a rank (LOCAL_RANK). NVLink multicast stays off (NCCL_NVLS_ENABLE=0 and the like are set
before the group starts): it can take a shared host's GPUs out of service.

FSDP2 (`--fsdp`, shard_base): for a base that does not fit one GPU. Each decoder layer's frozen
weights are sharded over the ranks (torch.distributed.fsdp.fully_shard, one unit a layer,
resharded after its forward); the adapter, the embeddings, the final norm and the LM head stay
whole on every rank (the loss head reads the LM head's weight outside any forward). A layer's
forward is then a collective (its all-gather), so the ranks must call every layer the same
number of times: under FSDP every rank does the chunk's whole work, in lockstep (decoding
loops agree on when all rows have stopped; rank 0's transfer set and scores are sent to all),
and the shares above are off — memory scales with the ranks, time does not."""
from __future__ import annotations

import contextlib
import importlib
import os
from datetime import timedelta

import torch
import torch.distributed as tdist

# NVLink SHARP / multicast off in this process and any it starts (see the module docstring)
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


_LOCAL = 0
_FSDP = False
_STARTED = False        # init_from_env started the process group (close ends only that one)


def several() -> bool:
    """This process is one of several in a process group (outside local())."""
    return not _LOCAL and tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def active() -> bool:
    """The ranks share the chunk's work (data parallel): several, and the base not under FSDP."""
    return several() and not _FSDP


def fsdp() -> bool:
    """The base's layers are sharded (shard_base) and this process is one of several."""
    return several() and _FSDP


@contextlib.contextmanager
def local():
    """Inside, this process works alone (every function here is one process's): for work that
    differs by rank, such as --separate's share of the documents, each rank its own memories."""
    global _LOCAL
    _LOCAL += 1
    try:
        yield
    finally:
        _LOCAL -= 1


def world() -> int:
    """Ranks sharing the work (1 under FSDP: each does all of it)."""
    return tdist.get_world_size() if active() else 1


def group_size() -> int:
    """Processes in the group (FSDP included)."""
    return tdist.get_world_size() if several() else 1


def rank() -> int:
    return tdist.get_rank() if several() else 0


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: str = "auto") -> bool:
    """Start the process group torchrun describes (WORLD_SIZE > 1 in the environment), once:
    NCCL with one GPU a rank (cuda:LOCAL_RANK made current) where the device is CUDA, else
    gloo. -> whether this process is one of several."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not tdist.is_available():
        return False
    if tdist.is_initialized():
        return active()
    for k, v in NO_MULTICAST.items():
        os.environ[k] = v
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:          # (ranks > GPUs only with IICL_DIST_BACKEND=gloo: ranks share a GPU, for tests)
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    backend = os.environ.get("IICL_DIST_BACKEND") or ("nccl" if cuda else "gloo")
    # a rank that dies leaves the others in a collective: torchrun ends them; the timeout
    # bounds a hang where nothing does
    global _STARTED
    # torch.distributed.nn.functional binds group.WORLD as default arguments when first
    # imported (transformers imports it while loading a model): imported after the group
    # starts, it holds the group past destroy_process_group, gloo's threads outlive close()
    # and can still be freeing a collective's tensors when the interpreter shuts down — the
    # abort above. Imported first, it binds None. (importlib, not `import torch.distributed.nn`:
    # that statement makes `torch` a local name of this function, unbound on the CUDA line above
    # — every torchrun on a GPU failed with UnboundLocalError, the CPU path never reads it.)
    with contextlib.suppress(ImportError):
        importlib.import_module("torch.distributed.nn")
    tdist.init_process_group(backend, timeout=timedelta(minutes=30))
    _STARTED = True
    return active()


def close() -> None:
    """End the process group init_from_env started, if any, and with it gloo's threads. Left
    to the interpreter's exit, a gloo thread could drop the last reference to a collective's
    tensor after the interpreter began to shut down; taking the GIL there ends the thread
    inside C++ and the rank aborts ("terminate called without an active exception", after its
    work was saved): 2 of 20 bare two-rank gloo runs on 2 cores, 2 of 25 of
    `consolidate --separate` with every memory already there; 0 of 40 and 0 of 60 with this."""
    global _STARTED
    if _STARTED and tdist.is_initialized():
        tdist.destroy_process_group()
    _STARTED = False


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else torch.device("cpu")


def shard(items: list) -> list:
    """This rank's share of items: items[rank::world]."""
    return items[rank()::world()] if active() else items


def gather_shards(mine: list, n: int) -> list:
    """The whole list of n items from every rank's shard(range(n)) results, in item order
    (item i is the (i // W)-th of rank i % W); one process: mine."""
    if not active():
        return mine
    parts = all_gather_objects(mine)
    W = world()
    return [parts[i % W][i // W] for i in range(n)]


def all_gather_objects(obj) -> list:
    """Every rank's obj (picklable, between our own processes), in rank order; one process: [obj]."""
    if not several():
        return [obj]
    parts = [None] * group_size()
    tdist.all_gather_object(parts, obj)
    return parts


def broadcast(obj):
    """Rank 0's obj on every rank (a picklable Python object between our own processes)."""
    if not several():
        return obj
    box = [obj if is_main() else None]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_grads(params: list[torch.Tensor]) -> None:
    """Sum the .grad of params over the ranks, in place (a missing grad counts as zeros: a
    rank dealt no entry in a step still joins the sum)."""
    if not active():
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params])
    dev = _device()
    flat = flat.to(dev)
    tdist.all_reduce(flat)
    flat = flat.to(params[0].device)
    at = 0
    for p in params:
        n = p.numel()
        g = flat[at: at + n].view_as(p).to(p.dtype)
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)
        at += n


def all_gather_rows(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's t [n_rank, ...] (n may differ by rank; the trailing shape and dtype may
    not), on every rank, on t's device, in rank order."""
    if not active():
        return [t]
    dev = _device()
    n = torch.tensor([t.shape[0]], device=dev)
    sizes = [torch.zeros_like(n) for _ in range(world())]
    tdist.all_gather(sizes, n)
    sizes = [int(x) for x in sizes]
    buf = torch.zeros((max(sizes), *t.shape[1:]), dtype=t.dtype, device=dev)
    buf[: t.shape[0]] = t.to(dev)
    parts = [torch.empty_like(buf) for _ in range(world())]
    tdist.all_gather(parts, buf)
    return [p[:k].to(t.device) for p, k in zip(parts, sizes)]


def all_reduce_sum(values: list[float]) -> list[float]:
    """Python floats summed over the ranks (float64)."""
    if not active():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_device())
    tdist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    if several():
        tdist.barrier()


def all_agree(flag: bool) -> bool:
    """Under FSDP: whether flag holds on every rank (one all-reduce), so that loops whose end
    depends on computed values (decoding until every row stops) end on the same step
    everywhere; otherwise flag."""
    if not fsdp():
        return flag
    t = torch.tensor([int(flag)], device=_device())
    tdist.all_reduce(t, op=tdist.ReduceOp.MIN)
    return bool(t.item())


def sync_params(params: list[torch.Tensor]) -> None:
    """Under FSDP: rank 0's values of the (replicated) adapter params on every rank, in place.
    Every rank computed the same steps; this keeps them bit-equal whatever the kernels did."""
    if not fsdp():
        return
    dev = _device()
    flat = torch.cat([p.detach().reshape(-1).float() for p in params]).to(dev)
    tdist.broadcast(flat, src=0)
    flat = flat.to(params[0].device)
    at = 0
    with torch.no_grad():
        for p in params:
            p.copy_(flat[at: at + p.numel()].view_as(p).to(p.dtype))
            at += p.numel()


def shard_base(layers, *, reshard_after_forward: bool = True) -> int:
    """FSDP2 over a model's decoder layers (generation.decoder(model).layers, its adapters in
    place): fully_shard on each layer, every trainable parameter (the adapters) left whole on
    every rank (ignored_params); the embeddings, final norm and LM head are not wrapped. After
    this every rank must run the same work (see the module docstring): fsdp() is on.
    -> the number of layers sharded. Needs a process group of several ranks."""
    global _FSDP
    if not several():
        raise RuntimeError("shard_base needs an initialised process group of several ranks (torchrun)")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    kind = next(layers[0].parameters()).device.type      # gloo serves CUDA tensors too (ranks sharing a GPU)
    mesh = init_device_mesh(kind, (tdist.get_world_size(),))
    for layer in layers:
        keep = {p for p in layer.parameters() if p.requires_grad}
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=keep or None)
    _FSDP = True
    return len(layers)


def held_share(layers) -> float:
    """The share of the layers' sharded (frozen) weights this rank holds (1/W under FSDP)."""
    from torch.distributed.tensor import DTensor
    mine = full = 0
    for layer in layers:
        for p in layer.parameters():
            if isinstance(p, DTensor):
                mine += p.to_local().numel()
                full += p.numel()
    return mine / max(full, 1)


def is_sharded(layers) -> bool:
    """Whether a layer of `layers` is under FSDP2 (the fast decoding and packing paths, which
    read weights outside the layers' forward, then stand aside)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return any(isinstance(m, FSDPModule) for m in layers)
