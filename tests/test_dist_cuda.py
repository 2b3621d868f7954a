"""torchrun on the GPU machine (skipped without CUDA): two ranks sharing the one GPU through
gloo (IICL_DIST_BACKEND=gloo) make the memory of one process, the teacher pass sharded on the
cascade path; with two or more GPUs, the same over NCCL, one GPU a rank."""
import json
import os

import pytest
import torch

from test_dist import DOC, SOURCE_ONLY, adapter, assert_same_adapter, command, run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def cuda_command(*a, **kw):
    argv = command(*a, **kw)
    argv[argv.index("--device") + 1] = "cuda"
    return argv + ["--dtype", "float32"]


@pytest.mark.parametrize("backend", ["gloo", "nccl"])
def test_two_ranks_on_cuda_make_the_memory_of_one(tiny_dir, tmp_path, backend, monkeypatch):
    if backend == "nccl" and torch.cuda.device_count() < 2:
        pytest.skip("NCCL needs a GPU a rank: one GPU here")
    monkeypatch.setenv("IICL_DIST_BACKEND", backend)
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC)
    for d, ranks in ((tmp_path / "one", 1), (tmp_path / "two", 2)):
        rc, err = run(cuda_command(doc, d, tiny_dir, ranks, **SOURCE_ONLY))
        assert rc == 0, err[-2000:]
    m = [json.loads((tmp_path / d / "manifest.json").read_text())["chunks"] for d in ("one", "two")]
    assert len(m[0]) >= 3 and m[0] == m[1]
    assert_same_adapter(adapter(tmp_path / "one"), adapter(tmp_path / "two"), 5e-3)
