"""iicl-fast stress (iicl_fast/stress.py): the stream of essays with planted facts, and the
command on a tiny random model over ~20,000 tokens — stopped after 3 chunks, resumed, killed
(SIGKILL) inside a chunk, resumed to the end — with its per-chunk records, bounded memory
bookkeeping, results and plots."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from iicl_fast.stress import FACT, build_stream

from conftest import make_tiny

SETTINGS = ["n_queries=2", "n_continuations=2", "max_query_tokens=8", "max_response_tokens=8", "epochs=1",
            "lora_r=4", "batch_size=4", "replay_entries=8", "progress=false"]


def test_stream_plants_confusable_facts_evenly(smol_tokenizer):
    enc = lambda t: smol_tokenizer(t, add_special_tokens=False)["input_ids"]   # noqa: E731
    text, facts = build_stream(enc, 30000, 20, seed=3)
    again, facts2 = build_stream(enc, 30000, 20, seed=3)
    other, _ = build_stream(enc, 30000, 20, seed=4)
    assert text == again and facts == facts2 and other != text
    n = len(enc(text))
    assert 30000 <= n <= 32000
    assert len({f["entity"] for f in facts}) == 20 and len({f["sentence"].split(" room")[0].split("of the ")[0]
                                                            for f in facts}) == 1      # one template
    for i, f in enumerate(facts):
        assert text.count(f["sentence"]) == 1 and f["sentence"] == FACT.format(entity=f["entity"], code=f["code"])
        assert abs(f["fraction"] - (i + 0.5) / 20) < 0.02                          # evenly spread
        # the recorded position is where the fact starts, in tokens (paragraph joins aside)
        before = len(enc(text[: text.index(f["sentence"])]))
        assert abs(before - f["position"]) <= 0.01 * n


def _run(args, env, **kw):
    return subprocess.run([sys.executable, "-m", "iicl_fast", "stress", *args], env=env, capture_output=True, text=True,
                          timeout=600, **kw)


def test_stress_command_resumes_after_a_stop_and_a_kill(smol_tokenizer, tmp_path):
    model_dir, out = tmp_path / "tiny", tmp_path / "run"
    make_tiny(smol_tokenizer).save_pretrained(model_dir)
    smol_tokenizer.save_pretrained(model_dir)
    args = ["--model", str(model_dir), "--device", "cpu", "--tokens", "20000", "--facts", "10", "--chunk-tokens", "2048",
            "--out", str(out)] + [x for s in SETTINGS for x in ("--set", s)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "IICL_TRACE_PHASES": "1"}
    first = _run(args + ["--max-chunks", "3"], env)
    assert first.returncode == 0, first.stderr[-2000:]
    assert json.loads(first.stdout.strip().splitlines()[-1]) == {"complete": False, "chunks_done": 3, "chunks": 10}

    log = out / "chunks.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "iicl_fast", "stress", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:                      # SIGKILL once chunk 5 has started (its start line written, no end)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            recs = [json.loads(x) for x in log.read_text().splitlines()]
            if any(r["event"] == "start" and r["index"] == 5 for r in recs):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before the kill"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    recs = [json.loads(x) for x in log.read_text().splitlines()]
    assert not any(r["event"] == "end" and r["index"] == 5 for r in recs)

    last = _run(args, env)
    assert last.returncode == 0, last.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert res["complete"] and res["chunks"] == 10 and res["facts"] == 10
    assert res["memory_chunks"] == 10 and res["memory_chunk_positions"] == list(range(10))   # each chunk once
    assert res["resumes"] == 2 and res["killed_mid_chunk"] == 1 and res["chunk_records"] == 10
    assert 19000 <= res["tokens"] <= 21000
    for key in ("recall_by_decile", "baseline_by_decile", "full_context_by_decile"):
        assert len(res[key]) == 10 and all(v is None or 0 <= v <= 1 for v in res[key])
    ends = [json.loads(x) for x in log.read_text().splitlines() if '"end"' in x]
    assert sorted({r["index"] for r in ends}) == list(range(10))
    assert len({r["adapter_bytes"] for r in ends}) == 1                       # the adapter does not grow
    assert max(r["replay_entries"] for r in ends) <= 8                        # the replay buffer is bounded
    assert all(r["rss_gib"] > 0 and set(r["seconds"]) >= {"elicit", "teacher", "select", "train", "save"} for r in ends)
    pytest.importorskip("matplotlib")
    assert (out / "stress_memory.png").stat().st_size > 1000 and (out / "stress_recall.png").stat().st_size > 1000
    # other arguments on the same directory are refused, in one line
    bad = _run([a if a != "20000" else "30000" for a in args], env)
    assert bad.returncode == 2 and "use another output directory" in bad.stderr
