"""benchmarks/eval_compare.py: settings read from the files' Config, figures pooled over units,
paired differences on shared seeds, bad files refused in one line."""
import glob
import json
import os
import subprocess
import sys
from dataclasses import asdict

from iicl_fast import Config

ROOT = os.path.join(os.path.dirname(__file__), "..")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import eval_compare  # noqa: E402


def _spread(vals):
    return {"mean": sum(vals) / len(vals), "std": 0.0, "values": vals}


def _result(path, seeds, *, cfg=None, matrices=None, singles=None, streams=None, sec=None):
    """A sequence-suite file as eval_suite.py writes it: matrices [seed][step][doc], singles
    [seed][doc]; streams: [(right_after [20], at_end [20], nll, general)] for the first seeds."""
    r = {"docs": 3, "stream_seeds": len(streams or [])}
    if sec is not None:
        r["seconds_per_chunk"] = sec
    if matrices:
        r.update(matrix=matrices, single_doc=singles)
    if streams:
        r.update(recall_by_position_right_after=[_spread([s[0][c] for s in streams]) for c in range(20)],
                 recall_by_position_at_end=[_spread([s[1][c] for s in streams]) for c in range(20)],
                 early_chunks=5,
                 forgetting={"nll_rise": {"stream": _spread([s[2] for s in streams])},
                             "general_accuracy": {"stream": _spread([s[3] for s in streams])}})
    d = {"suite": "sequence", "seeds": seeds, "config": cfg or asdict(Config()), "results": r,
         "model": "/tmp/smol.gguf", "dtype": "bfloat16"}
    path.write_text(json.dumps(d))
    return str(path)


def test_pooled_figures_and_paired_difference(tmp_path):
    m1 = [[0.5], [0.5, 0.5], [0.25, 0.5, 0.75]]                 # after three: mean 0.5
    m2 = [[1.0], [1.0, 0.5], [0.5, 0.5, 0.5]]                   # right after: (1 + .5 + .5) / 3
    small = _result(tmp_path / "a.json", [1, 2], matrices=[m1, m2], singles=[[1.0, 0.5, 0.5], [0.5, 0.5, 0.5]], sec=10.0)
    cfg = asdict(Config())
    cfg.update(lr_decay_after=2, gen_batch_size=64)               # gen_batch_size is not the setting
    m3 = [[1.0], [1.0, 1.0], [1.0, 1.0, 0.25]]
    var = _result(tmp_path / "b.json", [2, 3], cfg=cfg, matrices=[m3, m3], singles=[[0.5, 0.5, 0.5]] * 2, sec=12.5)
    res = eval_compare.compare([small, var])
    rows = {r["setting"]: r for r in res["settings"]}
    assert set(rows) == {"small (defaults)", "lr_decay_after=2"}
    s = rows["small (defaults)"]["seqs"]
    # after three / alone pooled over the two sequences: (0.5 + 0.5) / (2/3 + 0.5)
    assert abs(s["after 3 / alone"]["value"] - 1.0 / (2 / 3 + 0.5)) < 1e-12
    assert abs(s["after 3 / right after"]["value"] - 1.0 / ((0.5 + 0.5 + 0.75) / 3 + 2 / 3)) < 1e-12
    lo, hi = s["after 3 / alone"]["lo"], s["after 3 / alone"]["hi"]
    assert lo <= s["after 3 / alone"]["value"] <= hi and lo < hi
    v = rows["lr_decay_after=2"]["seqs"]["after 3 / alone"]
    # paired on seed 2 only: variant (0.75 / 0.5) minus small (0.5 / 0.5)
    assert v["vs_small"]["n"] == 1 and abs(v["vs_small"]["diff"] - 0.5) < 1e-12
    assert "vs_small" not in s["after 3 / alone"]
    # cost beside quality: each file's seconds a chunk, paired like the rest
    assert s["s a chunk"]["value"] == 10.0
    assert abs(rows["lr_decay_after=2"]["seqs"]["s a chunk"]["vs_small"]["diff"] - 2.5) < 1e-12
    assert "s a chunk" in eval_compare.table(res)


def test_streams_pool_the_first_five_chunks(tmp_path):
    right = [0.5] * 20
    end_a, end_b = [0.25] * 20, [0.5] * 5 + [0.0] * 15
    f = _result(tmp_path / "s.json", [6, 7], streams=[(right, end_a, 0.01, 0.7), (right, end_b, 0.03, 0.5)])
    st = eval_compare.compare([f])["settings"][0]["streams"]
    assert st["n"] == 2 and st["seeds"] == [6, 7]
    assert abs(st["first 5 kept"]["value"] - (5 * 0.25 + 5 * 0.5) / 5.0) < 1e-12
    assert abs(st["first chunk kept"]["value"] - 0.75 / 1.0) < 1e-12
    assert abs(st["all 20 at end"]["value"] - (0.25 + 2.5 / 20) / 2) < 1e-12
    assert abs(st["NLL rise"]["value"] - 0.02) < 1e-12 and abs(st["general acc."]["value"] - 0.6) < 1e-12


def test_answer_logprob_figures_pool_the_gain_over_the_base(tmp_path):
    f = _result(tmp_path / "lp.json", [4, 5], matrices=[[[0.5], [0.5, 0.5]]] * 2, singles=[[0.5, 0.5]] * 2)
    d = json.loads(open(f).read())
    runs = [{"matrix": [[-2.0], [-3.0, -1.0]], "single_doc": [-1.0, -1.5], "base": [-5.0, -4.0]},
            {"matrix": [[-2.5], [-4.0, None]], "single_doc": [-2.0, -1.0], "base": [-6.0, -6.0]}]
    d["results"]["answer_logprob"] = {"runs": runs}
    st = {"by_position_logprob": [-3.0] * 5 + [-1.0] * 15, "right_after_logprob": [-2.0] * 20,
          "base_logprob": [-6.0] * 20, "first_chunk_logprob": [-2.0] * 20}
    d["results"].update(stream_seeds=1, recall_by_position_right_after=[_spread([0.5])] * 20,
                        recall_by_position_at_end=[_spread([0.25])] * 20, early_chunks=5,
                        forgetting={"nll_rise": {"stream": _spread([0.01])},
                                    "general_accuracy": {"stream": _spread([0.7])}},
                        answer_logprob_stream={"per_stream": [st]})
    open(f, "w").write(json.dumps(d))
    r = eval_compare.compare([f])["settings"][0]
    # sequence 4: after (−3+5) + (−1+4) = 5 over alone (−1+5) + (−1.5+4) = 6.5; sequence 5: only
    # doc 0 is complete: after 2, alone 4
    assert abs(r["seqs"]["logprob after 3 / alone"]["value"] - (5 + 2) / (6.5 + 4)) < 1e-12
    # right after: (−2+5) + (−1+4) = 6 and (−2.5+6) = 3.5
    assert abs(r["seqs"]["logprob after 3 / right after"]["value"] - (5 + 2) / (6 + 3.5)) < 1e-12
    assert abs(r["streams"]["logprob first 5 kept"]["value"] - 3 / 4) < 1e-12
    assert abs(r["streams"]["logprob first chunk kept"]["value"] - 3 / 4) < 1e-12
    assert "logprob after 3 / alone" in eval_compare.table({"settings": [r]})


def test_files_before_a_field_existed_mean_what_the_code_did_then(tmp_path):
    """A file written before prose anchors existed ran without them: not the defaults."""
    cfg = asdict(Config())
    del cfg["prose_anchors"], cfg["lr_decay_after"]                # the latter's absence meant 0 = default
    f = _result(tmp_path / "old.json", [1], cfg=cfg, matrices=[[[0.5], [0.5, 0.5], [0.5] * 3]],
                singles=[[0.5] * 3])
    assert eval_compare.compare([f])["settings"][0]["setting"] == "prose_anchors=0"


def test_every_stored_sequence_result_reads():
    paths = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results", "eval_sequence_*.json")))
    res = eval_compare.compare(paths)
    assert res["settings"]
    for r in res["settings"]:
        # a Config field added later must be in BEFORE_IT_EXISTED, or old files read as unknown
        assert "=?" not in r["setting"], r["setting"]
        for kind in ("seqs", "streams"):
            for name, fig in r.get(kind, {}).items():
                if isinstance(fig, dict) and fig["value"] is not None:
                    assert fig["value"] >= 0 and fig["lo"] <= fig["hi"], (r["setting"], name)


def test_a_file_that_is_not_a_result_is_refused_in_one_line(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"suite": "sequence", "seeds": [1], "config": {}, "results": {"matrix": [[[1.0]]]}}))
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "eval_compare.py"), str(bad)],
                       capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "not a sequence-suite result" in p.stderr
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "eval_compare.py"), str(tmp_path / "no.json")],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "no such file" in p.stderr
