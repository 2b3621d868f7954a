"""Several processes on one stream (torchrun, gloo on the CPU): the 2-rank memory equals the
1-rank one, a killed rank stops the job with nothing half-written, and the same command
resumes it; the dist helpers on 2 ranks."""
import contextlib
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from conftest import TINY_CONFIG

DOC = ("The lighthouse on Varn Island was built in 1874 by the engineer Tomas Reyel. Its lamp burned whale oil "
       "until 1911, when the keepers switched to kerosene. The island's only village, Ostby, has forty-two houses "
       "and one bakery that sells rye bread on Tuesdays. In 1931 a storm broke the north pier and the ferry moved "
       "to the south harbour. The keeper's cat was named Pepper and lived to be nineteen. A small museum in the old "
       "boathouse keeps the original lens, which weighs six hundred kilograms.")
SETS = {**{k: v for k, v in TINY_CONFIG.items() if k != "progress"}, "progress": "false", "source_entries": 4,
        "lr": 5e-3}
# A stream's transfer sets are sampled with θ_{i-1} in the model: weights that differ in the
# 7th digit (another order of float sums) flip a draw of the tiny random model's near-uniform
# distribution by chunk 2, and the streams part. Streams compared across rank counts take
# only the chunk's own text (source entries: no sampling); one chunk is compared sampled.
SOURCE_ONLY = {"n_queries": 0, "n_continuations": 0, "source_entries": 8, "select_ratio": 1, "replay_repeats": 1}
# replay_repeats 1 (the default is 2 since the 25th session): replaying twice doubles a chunk's
# steps at KL ~0.002, where AdamW amplifies the last digits (below). Measured on the base-teacher
# 3-chunk stream (2 cores): adapters 2 ranks vs 1 2.8e-4 with 1, 2.4e-3 with 2 — and in ONE process,
# train_tokens 16 against the default split, 1.6e-3 with 1, 6.1e-3 with 2: the ranks stay within
# the rounding of one process; the comparison keeps the conditions its bounds were measured at.
# The 5-chunk comparison runs with θ_{i-1} as the teacher: with the base as the teacher
# (teacher_base, the default since the 13th session) the tiny model's KL falls to ~0.002 by
# chunk 3 and AdamW's normalised step turns the ranks' other summation order into whole steps
# of lr 5e-3 — adapters 2 ranks vs 1: 9e-6 / 2.6e-5 / 1.2e-4 after 3 / 4 / 5 chunks with
# θ_{i-1}, 4.7e-5 / 4.4e-3 / 0.17 with the base (1 vs 2 threads in one process: bit-identical
# in both). The base-teacher path is compared over 3 chunks (test below). Anchor entries (on by
# default since then) are compared in the one sampled chunk only: at chunk 0 the student is the
# base, a step made of anchors alone has KL 0 and rounding-level gradients, and AdamW turns their
# signs (another summation order on 2 ranks) into steps of up to lr — the 5-chunk stream's losses
# parted at chunk 0's second step (0.0049 on 1 rank, 0.0028 on 2). Dealing the anchors evenly over
# the steps (epoch_order, 14th session) did not make streams with anchors comparable: the same
# 5-chunk stream with 16 anchors parted at chunk 2 (adapters 0.72 apart with θ_{i-1}, 0.58 with
# the base) — every step's loss is ~0.002 on the tiny model, so the amplified rounding is there
# with or without anchor-only steps.
STREAM = {**SOURCE_ONLY, "teacher_base": "false", "anchor_entries": 0}
# The compared stream is DOC's first four sentences (4 chunks). With transformers 5.25 / peft
# 0.21 (a fresh install on 2026-12-03) the whole DOC's 5th chunk became the point where the
# tiny model's rounding blows up, in one process too: 1 rank with train_tokens=16 (another
# micro-batch split, the same sums in another order) against the default ended 0.086 apart
# after 5 chunks, 2 ranks vs 1 0.014. After 4 chunks: 8.6e-3 for the other split in one
# process, 2.9e-4 for 2 ranks vs 1; after 3: 2.9e-4 and 9.9e-6.
# Where that point lies depends on the CPU: on a 2-core AMD EPYC (AVX2, 2026-12-05; the same
# packages) the differences grow ~5-20x a chunk from the first — 2 ranks vs 1 after 2 / 3 / 4
# chunks 2.6e-4 / 1.9e-3 / 1.9e-2 (this stream), after 1 / 2 / 3 3.3e-5 / 1.8e-4 / 3.8e-3 (the
# base-teacher stream below); another split in one process 9.7e-5 / 3.6e-4 / 1.6e-3 and
# 1.6e-5 / 7.6e-5 / 1.7e-3 at the same points — so the 3- and 4-chunk bounds failed there. The adapters are compared after 2 chunks (bound
# 1e-3: 4x the largest 2-chunk difference measured); the stream then goes on to 4 chunks
# through a second command into the same memory (the continuation path on 2 ranks), where the
# logged losses and the manifests must still agree. A missing gradient all-reduce is 0.086 apart
# after one chunk, so 2 chunks keep the comparison's power.
STREAM_DOCS = (" ".join(re.split(r"(?<=\.) ", DOC)[:2]), " ".join(re.split(r"(?<=\.) ", DOC)[2:4]))
STREAM_DOC = " ".join(STREAM_DOCS)          # the four in one stream (test_dist_cuda)


def command(doc, out, model, ranks: int, chunk_tokens: int = 40, **sets):
    head = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
            if ranks > 1 else [sys.executable])
    flags = [a for k, v in {**SETS, **sets}.items() for a in ("--set", f"{k}={v}")]
    return head + ["-m", "iicl_fast", "consolidate", str(doc), "--out", str(out), "--model", str(model),
                   "--device", "cpu", "--chunk-tokens", str(chunk_tokens)] + flags


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "IICL_TRACE_PHASES": "1"}


def adapter(d: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(d / "adapter_model.safetensors"))


def assert_same_adapter(a: dict, b: dict, tol: float):
    """||a - b|| / ||a|| over all the adapter's tensors <= tol. Two rank counts sum a step's
    gradient in another order: measured 4.5e-5 after one chunk and 8e-4 after five at lr 5e-3
    (AdamW amplifies the last digits); without the all-reduce, 0.086 and 0.59."""
    assert a.keys() == b.keys()
    assert max(float(t.abs().max()) for k, t in a.items() if "lora_B" in k) > 1e-3   # trained: B starts at zero
    diff = sum(float(((a[k] - b[k]) ** 2).sum()) for k in a) ** 0.5
    norm = sum(float((a[k] ** 2).sum()) for k in a) ** 0.5
    assert diff <= tol * norm, (diff / norm, tol)


@contextlib.contextmanager
def one_torchrun_at_a_time():
    """torchrun --standalone takes a free port for its workers by binding and releasing one: two
    launched at once by the two pytest workers can take the same (a run in CI failed, rc 1). A
    file lock keeps this file's launches one at a time."""
    with open(Path(tempfile.gettempdir()) / "iicl_test_torchrun.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def traced_losses(err: str) -> list[list[float]]:
    """Each chunk's losses per epoch at full precision, from the [iicl losses] lines that rank 0
    writes under IICL_TRACE_PHASES (env())."""
    return [[float(x) for x in line.split()[3:]] for line in err.splitlines() if line.startswith("[iicl losses]")]


def assert_same_losses(a: list[list[float]], b: list[list[float]], chunks: int):
    """The first `chunks` chunks' losses of two runs: within 1e-4 relative for chunks 0-1, 2e-5
    absolute after (where AdamW has amplified the other order of sums a chunk at a time). Until
    the 36th session they were compared as logged (4 decimals): equality there allows any
    difference up to 1e-4 but fails on one astride a rounding boundary (the H100's 2-rank stream:
    0.0027496 against 0.0027505). Measured 2 ranks vs 1: CPU ≤ 1.7e-5 relative at chunks 0-1,
    ≤ 7.2e-7 absolute after; H100 1.1e-5, then ≤ 8.2e-6 (test_dist_cuda)."""
    assert len(a) >= chunks and len(b) >= chunks, (a, b)
    for c in range(chunks):
        for x, y in zip(a[c], b[c], strict=True):
            assert (abs(x - y) <= 1e-4 * abs(x)) if c < 2 else (abs(x - y) <= 2e-5), (c, a, b)


def run(argv, timeout=300):
    with one_torchrun_at_a_time():
        p = subprocess.run(argv, capture_output=True, text=True, env=env(), timeout=timeout)
    return p.returncode, p.stderr


def test_two_ranks_make_the_memory_of_one(tiny_dir, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC)
    # one chunk, transfer set sampled (rank 0's, sent to rank 1)
    one, two = tmp_path / "one_chunk", tmp_path / "two_chunk"
    for d, ranks in ((one, 1), (two, 2)):
        rc, err = run(command(doc, d, tiny_dir, ranks, chunk_tokens=200))
        assert rc == 0, err[-2000:]
    assert len(json.loads((two / "manifest.json").read_text())["chunks"]) == 1
    assert json.loads((two / "manifest.json").read_text())["config"]["anchor_entries"] == 16   # anchors included
    assert_same_adapter(adapter(one), adapter(two), 1e-3)
    # a stream of chunks, replay included: 2 chunks compared, then 2 more into the same memories
    errs = {1: [], 2: []}
    for part, text in enumerate(STREAM_DOCS):
        doc.write_text(text)
        for ranks, d in ((1, tmp_path / "one"), (2, tmp_path / "two")):
            rc, err = run(command(doc, d, tiny_dir, ranks, **STREAM))
            assert rc == 0, err[-2000:]
            errs[ranks].append(err)
        if part == 0:
            assert_same_adapter(adapter(tmp_path / "one"), adapter(tmp_path / "two"), 1e-3)
    loss = [[line.split("loss/epoch ")[1].split(";")[0] for e in errs[r] for line in e.splitlines()
             if line.startswith("chunk ")] for r in (1, 2)]
    assert len(loss[0]) == len(loss[1]) == 4, errs[2][-1][-3000:]
    assert_same_losses(traced_losses("".join(errs[1])), traced_losses("".join(errs[2])), 4)
    m1 = json.loads((tmp_path / "one" / "manifest.json").read_text())
    m2 = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert len(m1["chunks"]) == 4 and m1["chunks"] == m2["chunks"] and len(m2["streams"]) == 2
    # both ranks ran every phase; only rank 0 spoke
    for part, err in enumerate(errs[2]):
        first = 2 * part                                    # the part's first chunk index
        assert err.count(f"[iicl phase] train {first}") == 2 and err.count(f"[iicl phase] save {first}") == 2
        assert err.count("consolidated now") == 1


def test_two_ranks_with_the_base_as_teacher(tiny_dir, tmp_path):
    """teacher_base under torchrun: elicitation and the sharded teacher pass run with the
    adapter off on every rank. A 2-chunk stream (the second chunk's teacher is the base although
    an adapter is trained): the same losses (assert_same_losses), adapters within 1e-3 (measured 4.7e-5 after 3
    chunks on one CPU, 1.8e-4 after 2 and 3.8e-3 after 3 on another; see STREAM)."""
    doc = tmp_path / "doc.txt"
    doc.write_text(". ".join(DOC.split(". ")[:2]) + ".")
    errs = []
    for d, ranks in ((tmp_path / "one", 1), (tmp_path / "two", 2)):
        rc, err = run(command(doc, d, tiny_dir, ranks, **SOURCE_ONLY, teacher_base="true", anchor_entries=0))
        assert rc == 0, err[-2000:]
        errs.append(traced_losses(err))
    assert len(errs[0]) == len(errs[1]) == 2, errs
    assert_same_losses(errs[0], errs[1], 2)
    assert json.loads((tmp_path / "two" / "manifest.json").read_text())["config"]["teacher_base"] is True
    assert_same_adapter(adapter(tmp_path / "one"), adapter(tmp_path / "two"), 1e-3)


def test_fsdp_ranks_make_the_memory_of_one(tiny_dir, tmp_path):
    """--fsdp: the base's decoder layers sharded over 2 gloo ranks (FSDP2, the adapter whole on
    each), every rank doing the whole chunk. The memory equals one process's bit for bit (the
    all-gathered weights are the weights and the sums are one process's): a 3-chunk stream with
    the defaults (sampled transfer sets, anchors, prose anchors, replay), then a second file
    appended (the memory loaded, then sharded). Rank 0 holds half of the layers' weights."""
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(" ".join(re.split(r"(?<=\.) ", DOC)[:3]))
    b.write_text(" ".join(re.split(r"(?<=\.) ", DOC)[3:5]))
    errs = {}
    for d, ranks, extra in (("one", 1, []), ("two", 2, ["--fsdp"])):
        errs[d] = ""
        for f in (a, b):
            rc, err = run(command(f, tmp_path / d, tiny_dir, ranks) + extra)
            assert rc == 0, err[-2000:]
            errs[d] += err
    err2 = errs["two"]
    assert "FSDP2: 2 decoder layers sharded over 2 ranks (rank 0 holds 50.0 %" in err2, err2[-2000:]
    assert err2.count("[iicl phase] train 0") == 2 and err2.count("consolidated now") == 2
    loss = [[line.split("loss/epoch ")[1].split(";")[0] for line in e.splitlines() if line.startswith("chunk ")]
            for e in errs.values()]
    assert len(loss[0]) >= 4 and loss[0] == loss[1], loss
    assert_same_adapter(adapter(tmp_path / "one"), adapter(tmp_path / "two"), 1e-6)
    m1, m2 = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("one", "two"))
    assert m1["chunks"] == m2["chunks"] and m2["config"]["prose_anchors"] == 16


def test_fsdp_refuses_what_it_cannot_do(tiny_dir, tmp_path):
    """--fsdp outside torchrun, or with --separate: one line naming the problem, exit 2, nothing written."""
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC)
    p = subprocess.run(command(doc, tmp_path / "m", tiny_dir, 1) + ["--fsdp"], capture_output=True, text=True, env=env())
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("iicl-fast: error: --fsdp needs several processes")
    p = subprocess.run(command(doc, tmp_path / "m", tiny_dir, 1) + ["--fsdp", "--separate"], capture_output=True,
                       text=True, env=env())
    assert p.returncode == 2 and "use one of them" in p.stderr and not (tmp_path / "m").exists()


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def test_a_killed_rank_stops_every_rank_and_the_run_resumes(tiny_dir, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC)
    ref = tmp_path / "ref"
    rc, err = run(command(doc, ref, tiny_dir, 2, **SOURCE_ONLY))
    assert rc == 0, err[-2000:]
    n = len(json.loads((ref / "manifest.json").read_text())["chunks"])

    mem = tmp_path / "mem"
    with one_torchrun_at_a_time():
        saved = killed_run(doc, mem, tiny_dir, n)
    rc, err = run(command(doc, mem, tiny_dir, 2, **SOURCE_ONLY))
    assert rc == 0, err[-2000:]
    assert f"({n - saved} consolidated now, {saved} already there)" in err
    assert json.loads((mem / "manifest.json").read_text())["chunks"] == json.loads((ref / "manifest.json").read_text())["chunks"]
    assert_same_adapter(adapter(ref), adapter(mem), 1e-6)   # same ranks: the same sums
    assert not list(tmp_path.glob(".mem.tmp-*"))


def killed_run(doc, mem, tiny_dir, n) -> int:
    """The 2-rank run, one rank SIGKILLed while chunk 1 trains: every rank stops, whole chunks
    saved. -> how many."""
    p = subprocess.Popen(command(doc, mem, tiny_dir, 2, **SOURCE_ONLY), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                         text=True, env=env())
    lines = []
    for line in p.stderr:                                  # until a rank starts training chunk 1
        lines.append(line)
        if line.startswith("[iicl phase] train 1"):
            break
    workers = _children(p.pid)
    assert len(workers) == 2, (workers, "".join(lines[-5:]))
    os.kill(workers[1], signal.SIGKILL)
    t0 = time.time()
    p.stderr.read()
    p.wait(timeout=120)
    assert p.returncode != 0 and time.time() - t0 < 120      # the other rank did not hang
    assert all(subprocess.run(["kill", "-0", str(w)], capture_output=True).returncode != 0 for w in workers)
    saved = json.loads((mem / "manifest.json").read_text())["chunks"]
    assert 1 <= len(saved) < n                               # whole chunks only, chunk 1 not among them
    return len(saved)


def _helpers(rank: int, init: str, out: str):
    from iicl_fast import dist
    tdist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        items = list(range(7))
        p = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))]
        if rank == 0:                       # rank 1 leaves p[1].grad None: it counts as zeros
            p[0].grad, p[1].grad = torch.tensor([1.0, 2.0, 3.0]), torch.ones(2, 2)
        else:
            p[0].grad = torch.tensor([10.0, 20.0, 30.0])
        dist.all_reduce_grads(p)
        res = {"shard": dist.shard(items), "g0": p[0].grad.tolist(), "g1": p[1].grad.tolist(),
               "sum": dist.all_reduce_sum([rank + 0.5, 1.0]), "bcast": dist.broadcast({"from": rank}),
               "world": dist.world(), "main": dist.is_main(),
               "rows": [t.tolist() for t in dist.all_gather_rows(torch.full((rank + 1, 2), float(rank)))]}
        Path(out, f"{rank}.json").write_text(json.dumps(res))
    finally:
        tdist.destroy_process_group()


def test_dist_helpers_on_two_ranks(tmp_path):
    from iicl_fast import dist
    assert (dist.world(), dist.rank(), dist.shard([1, 2, 3]), dist.broadcast("x")) == (1, 0, [1, 2, 3], "x")
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_helpers, args=(init, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1))
    assert r0["shard"] == [0, 2, 4, 6] and r1["shard"] == [1, 3, 5]
    assert r0["g0"] == r1["g0"] == [11.0, 22.0, 33.0] and r0["g1"] == r1["g1"] == [[1.0, 1.0], [1.0, 1.0]]
    assert r0["sum"] == r1["sum"] == [2.0, 2.0]
    assert r0["bcast"] == r1["bcast"] == {"from": 0}
    assert (r0["world"], r0["main"], r1["main"]) == (2, True, False)
    assert r0["rows"] == r1["rows"] == [[[0.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]]]     # sizes differ by rank


# one rank of test_main_ends_...: main, then what is left of the process group in this process
AFTER_MAIN = """
import json, os, sys
from pathlib import Path
import torch.distributed as tdist
from iicl_fast import cli
rc = cli.main(sys.argv[2:])
names = [Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in os.listdir("/proc/self/task")]
Path(sys.argv[1], os.environ["RANK"] + ".json").write_text(json.dumps(
    {"rc": rc, "group_left": tdist.is_initialized(), "gloo_threads": sorted(n for n in names if "gloo" in n)}))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through /proc")
def test_main_ends_the_process_group_it_started(tiny_dir, tmp_path):
    """Left to the interpreter's exit, a gloo thread could free a collective's tensor after
    shutdown began and abort a rank whose work was done and saved ("terminate called without
    an active exception": test_separate_documents_... failed so in CI, 2 of 25 runs on 2 cores).
    main ends the group, and gloo's threads with it, after a model load (transformers imports
    torch.distributed.nn, whose default arguments held the group alive) and on the error path.
    A group main did not start is left alone."""
    script = tmp_path / "after_main.py"
    script.write_text(AFTER_MAIN)
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)]
    runs = {"ask": (["ask", "Who built the lighthouse?", "--model", str(tiny_dir), "--device", "cpu",
                     "--set", "answer_max_new_tokens=2"], 0),
            # --device auto: init_from_env reads torch.cuda (the 26th session's import inside it made
            # `torch` a local name there: every GPU torchrun died of UnboundLocalError, --device cpu never
            # reached that line)
            "error": (["consolidate", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "m"),
                       "--device", "auto"], 2)}
    for name, (argv, want) in runs.items():
        out = tmp_path / name
        out.mkdir()
        rc, err = run(head + [str(out)] + argv, timeout=240)
        assert rc == 0, err[-2000:]
        for r in (0, 1):
            res = json.loads((out / f"{r}.json").read_text())
            assert res == {"rc": want, "group_left": False, "gloo_threads": []}, (name, r, res)
    from iicl_fast import dist
    dist.close()                        # no group here, none started: nothing to do
    assert not tdist.is_initialized()


def test_separate_documents_are_dealt_out_over_the_ranks(tiny_dir, tmp_path):
    """--separate under 2 ranks: each rank consolidates every other document into its own
    memories; each memory equals the one-process run's (a bank trains each adapter as alone)."""
    docs = []
    for i, part in enumerate(DOC.split(". ")[:3]):
        docs.append(tmp_path / f"doc{i}.txt")
        docs[-1].write_text(part + ".")
    for d, ranks in ((tmp_path / "one", 1), (tmp_path / "two", 2)):
        argv = command(docs[0], d, tiny_dir, ranks, chunk_tokens=200) + ["--separate"]
        argv[argv.index(str(docs[0])) + 1: argv.index(str(docs[0])) + 1] = [str(x) for x in docs[1:]]
        rc, err = run(argv)
        assert rc == 0, err[-2000:]
    assert "3 memories written" in err and "by 2 ranks" in err
    for i in range(3):
        assert_same_adapter(adapter(tmp_path / "one" / f"doc{i}"), adapter(tmp_path / "two" / f"doc{i}"), 1e-3)
    rc, err = run(argv)                                                 # again: every memory already there
    assert rc == 0 and "0 memories written" in err and "(3 already there)" in err, err[-3000:]


def test_stress_under_two_ranks_writes_each_record_once(tiny_dir, tmp_path):
    from test_stress import SETTINGS
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "iicl_fast",
            "stress", "--model", str(tiny_dir), "--device", "cpu", "--tokens", "6000", "--facts", "3",
            "--chunk-tokens", "2048", "--out", str(out)] + [x for s in SETTINGS for x in ("--set", s)]
    p = subprocess.run(argv, capture_output=True, text=True, env=env(), timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.strip().splitlines()                          # rank 0's log and summary only
    assert sum(x.startswith("{") for x in lines) == 1 and sum(x.startswith("recall") for x in lines) == 1
    res = json.loads((out / "results.json").read_text())
    recs = [json.loads(x) for x in (out / "chunks.jsonl").read_text().splitlines()]
    n = res["chunks"]
    assert res["complete"] and res["chunk_records"] == n >= 3 and res["memory_chunk_positions"] == list(range(n))
    assert sorted(r["index"] for r in recs if r["event"] == "start") == list(range(n))   # one writer
    assert sorted(r["index"] for r in recs if r["event"] == "end") == list(range(n))
    assert json.loads((out / "runs.json").read_text()) == {"runs": 1, "killed_mid_chunk": 0}


def test_stress_under_fsdp_makes_the_run_of_one_rank(tiny_dir, tmp_path):
    """stress --fsdp: the base's layers sharded over 2 gloo ranks, both doing every chunk and every
    question in lockstep. The memory equals one process's (to float-sum order: 1e-6) and so do
    the recall figures; rank 0 alone writes the run's files."""
    from test_stress import SETTINGS
    res = {}
    for name, head in (("one", [sys.executable]),
                       ("two", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"])):
        argv = head + ["-m", "iicl_fast", "stress", "--model", str(tiny_dir), "--device", "cpu", "--tokens", "4000",
                       "--facts", "2", "--chunk-tokens", "2048", "--out", str(tmp_path / name)] + \
            [x for s in SETTINGS for x in ("--set", s)] + (["--fsdp"] if name == "two" else [])
        with one_torchrun_at_a_time():
            p = subprocess.run(argv, capture_output=True, text=True, env=env(), timeout=600)
        assert p.returncode == 0, p.stderr[-2000:]
        if name == "two":
            assert "FSDP2: 2 decoder layers sharded over 2 ranks (rank 0 holds 50.0 %" in p.stdout, p.stdout[-2000:]
        res[name] = json.loads((tmp_path / name / "results.json").read_text())
        recs = [json.loads(x) for x in (tmp_path / name / "chunks.jsonl").read_text().splitlines()]
        assert sorted(r["index"] for r in recs if r["event"] == "end") == list(range(res[name]["chunks"]))
    one, two = res["one"], res["two"]
    assert one["complete"] and two["complete"] and one["chunks"] == two["chunks"] >= 2
    for k in ("recall", "baseline", "recall_by_decile", "baseline_by_decile", "full_context_by_decile",
              "memory_chunk_positions"):
        assert one[k] == two[k], k
    assert_same_adapter(adapter(tmp_path / "one" / "memory"), adapter(tmp_path / "two" / "memory"), 1e-6)
    p = subprocess.run([sys.executable, "-m", "iicl_fast", "stress", "--model", str(tiny_dir), "--device", "cpu",
                        "--out", str(tmp_path / "three"), "--fsdp"], capture_output=True, text=True, env=env())
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("iicl-fast: error: --fsdp needs several")
    assert not (tmp_path / "three").exists()


def _teacher_rows(rank: int, init: str, out: str, model_dir: str):
    from iicl_fast.consolidate import sharded_hidden
    from iicl_fast.elicit import source_entries
    from iicl_fast.models import PromptFormat, load_model
    from iicl_fast.teacher import teacher_hidden
    tdist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        model, tok = load_model(model_dir, device="cpu")
        fmt = PromptFormat(tok, model)
        entries = source_entries(fmt, DOC, 5, 12)                    # 5 entries: 3 on rank 0, 2 on rank 1
        hs = sharded_hidden(model, entries, lambda es, kn: teacher_hidden(model, fmt, DOC, es, batch_size=2))
        torch.save({"h": hs.h, "targets": hs.targets, "offsets": torch.tensor(hs.offsets)}, Path(out, f"t{rank}.pt"))
        # states held: entry 1 by rank 0, entries 0 and 3 by rank 1 (the rows each decoded)
        H = hs.h.shape[1]
        held = {0: {1}, 1: {0, 3}}[rank]
        known = [torch.full((len(e.response), H), 100.0 * (i + 1)) if i in held else None
                 for i, e in enumerate(entries)]
        ran = []

        def compute(es, kn):
            ran.append([entries.index(e) for e, k in zip(es, kn) if k is None])   # through the pass here
            return teacher_hidden(model, fmt, DOC, es, batch_size=2, known=kn)
        hs = sharded_hidden(model, entries, compute, known)
        torch.save({"h": hs.h, "ran": ran}, Path(out, f"k{rank}.pt"))
    finally:
        tdist.destroy_process_group()


def test_sharded_teacher_pass_equals_one_process(tiny_dir, tmp_path):
    """Each rank takes every other entry; the gathered rows are one process's, in entry order.
    With the decoder's states of some entries held by the ranks that wrote them (known), those
    entries are their holders' share and are not recomputed."""
    from iicl_fast.elicit import source_entries
    from iicl_fast.models import PromptFormat, load_model
    from iicl_fast.teacher import teacher_hidden
    mp.spawn(_teacher_rows, args=(f"file://{tmp_path / 'rv'}", str(tmp_path), str(tiny_dir)), nprocs=2, join=True)
    model, tok = load_model(str(tiny_dir), device="cpu")
    fmt = PromptFormat(tok, model)
    entries = source_entries(fmt, DOC, 5, 12)
    ref = teacher_hidden(model, fmt, DOC, entries, batch_size=2)
    for r in (0, 1):
        got = torch.load(tmp_path / f"t{r}.pt")
        assert got["offsets"].tolist() == ref.offsets and torch.equal(got["targets"], ref.targets)
        torch.testing.assert_close(got["h"], ref.h, rtol=1e-5, atol=1e-5)
        per_entry = [got["h"][a:b] for a, b in zip(ref.offsets[:-1], ref.offsets[1:])]
        assert not torch.allclose(per_entry[0][:1], per_entry[1][:1])     # rows differ by entry: order checked
        # with states held by the ranks that decoded them: those are the teacher's, gathered in
        # entry order on both ranks; the pass runs only over the rest, dealt out in turn
        got = torch.load(tmp_path / f"k{r}.pt")
        assert got["ran"] == [[[2]], [[4]]][r]          # one compute a rank
        for i, (a, b) in enumerate(zip(ref.offsets[:-1], ref.offsets[1:])):
            if i in (0, 1, 3):
                assert torch.equal(got["h"][a:b], torch.full_like(got["h"][a:b], 100.0 * (i + 1))), i
            else:
                torch.testing.assert_close(got["h"][a:b], ref.h[a:b], rtol=1e-5, atol=1e-5)


def _elicited(rank: int, init: str, out: str, model_dir: str):
    import iicl_fast.elicit as E
    from iicl_fast import Config
    from iicl_fast.models import PromptFormat, load_model
    tdist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        model, tok = load_model(model_dir, device="cpu")
        rows, real = [], E.generate

        def counting(m, prompts, **kw):            # the rows this rank decodes
            rows.append(kw["row_keys"])
            return real(m, prompts, **kw)
        E.generate = counting
        es, known = E.elicit(model, PromptFormat(tok, model), DOC, Config(**{**TINY_CONFIG, "source_entries": 0}),
                             chunk_index=2, keep_hidden=True)
        Path(out, f"e{rank}.json").write_text(json.dumps({"entries": [[e.kind, e.query, e.response] for e in es],
                                                          "rows": rows}))
        torch.save(known, Path(out, f"s{rank}.pt"))
    finally:
        tdist.destroy_process_group()


def test_sharded_elicitation_equals_one_process(tiny_dir, tmp_path):
    """Under 2 ranks each decodes every other row of each phase (draws keyed by row) and the
    gathered transfer set is the one a single process samples; each rank keeps the decoder's
    states of its own rows (keep_hidden), one process's states."""
    from iicl_fast import Config
    from iicl_fast.elicit import elicit
    from iicl_fast.models import PromptFormat, load_model
    mp.spawn(_elicited, args=(f"file://{tmp_path / 'rv'}", str(tmp_path), str(tiny_dir)), nprocs=2, join=True)
    model, tok = load_model(str(tiny_dir), device="cpu")
    ref, ref_states = elicit(model, PromptFormat(tok, model), DOC, Config(**{**TINY_CONFIG, "source_entries": 0}),
                             chunk_index=2, keep_hidden=True)
    r0, r1 = (json.loads((tmp_path / f"e{r}.json").read_text()) for r in (0, 1))
    s0, s1 = (torch.load(tmp_path / f"s{r}.pt") for r in (0, 1))
    assert all((a is None) != (b is None) for a, b in zip(s0, s1))     # every row's states on one rank
    assert any(a is not None for a in s0) and any(b is not None for b in s1)
    for a, b, want in zip(s0, s1, ref_states):
        torch.testing.assert_close(a if a is not None else b, want, rtol=1e-4, atol=1e-4)
    assert len(ref) >= 4 and r0["entries"] == r1["entries"] == [[e.kind, e.query, e.response] for e in ref]
    for ph in range(2):                        # questions, then answers: rows 0, 2, 4.. and 1, 3, ..
        assert r0["rows"][ph] == list(range(0, len(r0["rows"][ph]) * 2, 2))[: len(r0["rows"][ph])]
        assert r1["rows"][ph] == [k + 1 for k in r0["rows"][ph]][: len(r1["rows"][ph])]
        assert len(r0["rows"][ph]) - len(r1["rows"][ph]) in (0, 1)


def test_bench_multi_gpu_runs_on_two_cpu_ranks(tiny_dir, tmp_path):
    """benchmarks/bench_multi_gpu.py's plumbing (gloo, the tiny workload): one chunk and
    --separate on 1 and 2 ranks, efficiencies against 1, a count above the devices recorded
    as not run."""
    out = tmp_path / "mg.json"
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_multi_gpu.py"
    with one_torchrun_at_a_time():
        p = subprocess.run([sys.executable, str(bench), "--device", "cpu", "--workload", "tiny", "--tokenizer",
                            str(tiny_dir), "--gpus", "1", "2", "4096", "--docs", "3", "--out", str(out)],
                           capture_output=True, text=True, env=env(), timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = json.loads(out.read_text())
    chunk = {r["gpus"]: r for r in rows if r["mode"] == "chunk"}
    sep = {r["gpus"]: r for r in rows if r["mode"] == "separate"}
    assert set(chunk) == {1, 2, 4096} and "not_run" in chunk[4096] and set(sep) == {1, 2}
    assert chunk[1]["elicited"] == chunk[2]["elicited"] > 0 and chunk[1]["efficiency"] == 1.0
    assert set(chunk[2]["seconds"]) == {"elicit", "teacher", "select", "train"} and chunk[2]["efficiency"] > 0
    assert sep[2]["docs"] == 3 and sep[2]["docs_per_s"] > 0 and sep[2]["efficiency"] > 0
