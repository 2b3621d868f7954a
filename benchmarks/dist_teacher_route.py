"""Do two data-parallel ranks make the memory of one process? One sampled chunk of the dist tests'
document (tests/test_dist.py) through the CLI on the tiny model: 1 rank and 2 ranks (torchrun,
gloo), each with the teacher's states from the decoder (Config.teacher_from_elicit, the default)
and from the teacher pass (teacher_from_elicit=false), and prints the adapters' relative
differences for every pair. Until the 36th session DDP ranks always took the sharded pass, so
the 2-rank memory followed the pass's route whatever the setting; now each rank keeps its own
rows' decoder states (consolidate.sharded_hidden) and both follow the setting.

    python benchmarks/dist_teacher_route.py [--device cpu|cuda] [--out FILE]

CPU (2-core AMD EPYC), before → after the change: 2 ranks vs 1 rank, teacher from the decoder
8.7e-6 → 9.8e-7; from the pass 9.9e-7 → 9.9e-7; 1 rank decoder vs pass 8.6e-6 (the routes'
own difference). Needs the tokenizer (IICL_TOKENIZER, or the embedded
model's package)."""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import make_tiny  # noqa: E402
from test_dist import DOC, adapter, command, run  # noqa: E402


def rel(a: dict, b: dict) -> float:
    """||a - b|| / ||a|| over all the adapter's tensors."""
    diff = sum(float(((a[k] - b[k]) ** 2).sum()) for k in a) ** 0.5
    return diff / sum(float((a[k] ** 2).sum()) for k in a) ** 0.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import os
    from transformers import AutoTokenizer
    if os.environ.get("IICL_TOKENIZER"):
        tok = AutoTokenizer.from_pretrained(os.environ["IICL_TOKENIZER"])
    else:
        from iicl_fast.models import default_gguf_path
        g = default_gguf_path()
        tok = AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_tiny(tok).save_pretrained(tmp / "tiny")
        tok.save_pretrained(tmp / "tiny")
        (tmp / "doc.txt").write_text(DOC)
        got = {}
        for ranks in (1, 2):
            for route, tfe in (("decoder", "true"), ("pass", "false")):
                argv = command(tmp / "doc.txt", tmp / f"{ranks}_{route}", tmp / "tiny", ranks, chunk_tokens=200,
                               teacher_from_elicit=tfe)
                if a.device == "cuda":                     # 2 ranks on the one GPU: gloo (NCCL wants a GPU a rank)
                    os.environ["IICL_DIST_BACKEND"] = "gloo"
                    argv[argv.index("--device") + 1] = "cuda"
                    argv += ["--dtype", "float32"]         # as tests/test_dist_cuda.py runs it
                rc, err = run(argv)
                if rc != 0:
                    sys.exit(f"dist_teacher_route: {ranks} rank(s), teacher from the {route} failed (exit {rc}):\n{err[-2000:]}")
                got[f"{ranks}_{route}"] = adapter(tmp / f"{ranks}_{route}")
        keys = sorted(got)
        res = {f"{x} vs {y}": rel(got[x], got[y]) for i, x in enumerate(keys) for y in keys[i + 1:]}
    for k, v in res.items():
        print(f"{k:24s} {v:.3g}")
    if a.out:
        import torch
        Path(a.out).write_text(json.dumps({"device": a.device if a.device == "cpu" else torch.cuda.get_device_name(),
                                           "relative_difference": res}, indent=1))


if __name__ == "__main__":
    main()
