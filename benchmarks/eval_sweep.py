"""Rows of the evaluation suite side by side on one GPU: one `eval_suite.py` process per row,
all at once. The embedded 135M model leaves an H200 idle between its small kernels (a chunk's
training is launch-bound), so eight processes take about the time of two or three; seconds per
chunk are then inflated by the sharing — compare rows of one sweep with each other, and take
costs from a row run alone.

    python benchmarks/eval_sweep.py --deadline 540 \\
        --common "--model smol.gguf --device cuda --suite sequence --set gen_batch_size=64" \\
        --row "--seeds 3 --seed 6 --stream-seeds 0 --variant default:lr=2e-3" \\
        --row "--seeds 1 --seed 6 --variant bal64:replay_policy=balanced,replay_entries=64"

Each row's log is <out>/sweep_<i>.log; its results are what eval_suite.py writes (name the rows
by --variant or --tag so their files differ). A row still running at --deadline is stopped
(SIGTERM, then SIGKILL) and said so; the others' files stand."""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--common", default="", help="arguments every row gets")
    ap.add_argument("--row", action="append", required=True, help="one row's own arguments (repeat)")
    ap.add_argument("--deadline", type=float, default=540.0, help="seconds before unfinished rows are stopped")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads per row (OMP_NUM_THREADS)")
    ap.add_argument("--out", default=str(HERE / "results"))
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    procs = []
    t0 = time.monotonic()
    for i, row in enumerate(a.row):
        argv = [sys.executable, str(HERE / "eval_suite.py"), "--out", str(out), *shlex.split(a.common), *shlex.split(row)]
        log = open(out / f"sweep_{i}.log", "w")
        procs.append((row, log, subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                                 start_new_session=True)))
    status = {}
    while len(status) < len(procs):
        for i, (row, log, p) in enumerate(procs):
            if i not in status and p.poll() is not None:
                status[i] = f"exit {p.returncode} after {time.monotonic() - t0:.0f} s"
                print(f"row {i} ({row}): {status[i]}", flush=True)
        if time.monotonic() - t0 > a.deadline:
            for i, (row, log, p) in enumerate(procs):
                if i not in status:
                    os.killpg(p.pid, signal.SIGTERM)
            time.sleep(5)
            for i, (row, log, p) in enumerate(procs):
                if i not in status:
                    if p.poll() is None:
                        os.killpg(p.pid, signal.SIGKILL)
                    status[i] = f"stopped at the deadline ({a.deadline:.0f} s)"
                    print(f"row {i} ({row}): {status[i]}", flush=True)
            break
        time.sleep(1)
    for _, log, _ in procs:
        log.close()
    return 0 if all(s.startswith("exit 0") for s in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
