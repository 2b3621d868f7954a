"""CLI: consolidate / ask with a local model dir, and every bad input → one line, exit 2."""
import json
import subprocess
import sys

import pytest

from iicl_fast import cli
from iicl_fast.config import Config

from conftest import TINY_CONFIG


@pytest.fixture(autouse=True)
def small_defaults(monkeypatch):
    """The CLI uses Config() defaults; shrink them so the tiny model runs in seconds."""
    orig = Config.__init__.__defaults__
    fields = [f for f in Config.__dataclass_fields__]
    small = tuple(TINY_CONFIG.get(name, d) for name, d in zip(fields, orig))
    monkeypatch.setattr(Config.__init__, "__defaults__", small)


def run(capsys, *argv):
    code = cli.main(list(map(str, argv)))
    out, err = capsys.readouterr()
    if code == 2:   # one line names the problem (progress bars of the loading may precede it)
        errors = [line for line in err.replace("\r", "\n").splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and errors[0].startswith("iicl-fast: error: "), err
    return code, out, err


def test_consolidate_then_ask(tiny_dir, tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text("The harbour of Vell has nine cranes. Its pilot is Juno Maki.", encoding="utf-8")
    out = tmp_path / "mem"
    code, _, err = run(capsys, "consolidate", doc, "--out", out, "--model", tiny_dir)
    assert code == 0, err
    man = json.loads((out / "manifest.json").read_text())
    assert len(man["chunks"]) == 1
    code, _, err = run(capsys, "consolidate", doc, "--out", out, "--model", tiny_dir)
    assert code == 0 and "already consolidated" in err
    assert len(json.loads((out / "manifest.json").read_text())["chunks"]) == 1
    qs = tmp_path / "q.txt"
    qs.write_text("How many cranes?\n\nWho is the pilot?\n", encoding="utf-8")
    code, stdout, err = run(capsys, "ask", "--memory", out, "--model", tiny_dir, "--questions", qs)
    assert code == 0, err
    lines = [json.loads(line) for line in stdout.splitlines()]
    assert [x["question"] for x in lines] == ["How many cranes?", "Who is the pilot?"]
    assert all(isinstance(x["answer"], str) for x in lines)
    code, stdout, _ = run(capsys, "ask", "--model", tiny_dir, "--context", doc, "Who is the pilot?")
    assert code == 0 and len(stdout.splitlines()) >= 1


def bad_files(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("  \n\t\n")
    (tmp_path / "bin.dat").write_bytes(b"\x7fELF\x00\x01\x02")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    return {"empty.txt": "is empty", "blank.txt": "is empty", "bin.dat": "binary",
            "latin1.txt": "not UTF-8", "missing.txt": "no such file"}


def test_bad_input_files(tiny_dir, tmp_path, capsys):
    for name, msg in bad_files(tmp_path).items():
        out = tmp_path / f"out_{name}"
        code, _, err = run(capsys, "consolidate", tmp_path / name, "--out", out, "--model", tiny_dir)
        assert code == 2 and msg in err, (name, err)
        assert not out.exists()                 # nothing written
        code, _, err = run(capsys, "ask", "--context", tmp_path / name, "--model", tiny_dir, "Why?")
        assert code == 2 and msg in err


def test_unknown_model_and_bad_memories(tiny_dir, tmp_path, capsys, smol_tokenizer):
    doc = tmp_path / "doc.txt"
    doc.write_text("Some text about a mill.")
    code, _, err = run(capsys, "consolidate", doc, "--out", tmp_path / "m", "--model", tmp_path / "nope")
    assert code == 2 and "unknown model" in err and not (tmp_path / "m").exists()
    (tmp_path / "weights.bin").write_bytes(b"xx")
    code, _, err = run(capsys, "ask", "--model", tmp_path / "weights.bin", "Hi?")
    assert code == 2 and "unsupported model file" in err
    (tmp_path / "cut.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")        # the magic, then nothing
    code, _, err = run(capsys, "ask", "--model", tmp_path / "cut.gguf", "Hi?")
    assert code == 2 and "could not load model" in err and "Traceback" not in err

    # a memory made from another base model is refused, and left as it was
    code, _, err = run(capsys, "consolidate", doc, "--out", tmp_path / "m", "--model", tiny_dir)
    assert code == 0, err
    from conftest import make_tiny
    other = tmp_path / "other_model"
    make_tiny(smol_tokenizer, seed=5).save_pretrained(other)
    smol_tokenizer.save_pretrained(other)
    before = (tmp_path / "m" / "adapter_model.safetensors").read_bytes()
    code, _, err = run(capsys, "ask", "--memory", tmp_path / "m", "--model", other, "Hi?")
    assert code == 2 and "base model" in err
    code, _, err = run(capsys, "consolidate", doc, "--out", tmp_path / "m", "--model", other)
    assert code == 2 and "base model" in err
    assert (tmp_path / "m" / "adapter_model.safetensors").read_bytes() == before

    (tmp_path / "m" / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    code, _, err = run(capsys, "ask", "--memory", tmp_path / "m", "--model", tiny_dir, "Hi?")
    assert code == 2 and "corrupt adapter" in err
    code, _, err = run(capsys, "ask", "--memory", tmp_path / "nomem", "--model", tiny_dir, "Hi?")
    assert code == 2 and "no memory" in err
    code, _, err = run(capsys, "consolidate", doc, "--out", doc, "--model", tiny_dir)
    assert code == 2 and "not a memory directory" in err


def test_paths_and_flags_fail_in_one_line_before_the_model_loads(tmp_path, capsys):
    """A nonexistent --model would fail as 'unknown model' once loading starts: each of these
    must name its own problem first."""
    doc = tmp_path / "doc.txt"
    doc.write_text("Some text about a mill.")
    nope = tmp_path / "no_model"
    code, _, err = run(capsys, "ask", "--model", nope, "--set", "nope=1", "Hi?")
    assert code == 2 and "unknown Config field: nope" in err
    code, _, err = run(capsys, "ask", "--model", nope, "--set", "lr=abc", "Hi?")
    assert code == 2 and "lr" in err and "unknown model" not in err
    code, _, err = run(capsys, "ask", "--model", nope, "--questions", tmp_path, "Hi?")
    assert code == 2 and "is a directory" in err
    code, _, err = run(capsys, "consolidate", tmp_path, "--out", tmp_path / "m", "--model", nope)
    assert code == 2 and "is a directory" in err
    code, _, err = run(capsys, "consolidate", doc, "--out", doc / "sub" / "m", "--model", nope)
    assert code == 2 and f"{doc} is a file, not a directory" in err and doc.read_text() == "Some text about a mill."
    for cmd in (["eval", "--suite", "recall"], ["stress"]):    # results written hours later: refused now
        code, _, err = run(capsys, *cmd, "--out", doc / "results", "--model", nope)
        assert code == 2 and f"{doc} is a file, not a directory" in err, cmd
    # any other refusal of the file system: one line naming the path, no traceback
    code, _, err = run(capsys, "consolidate", doc, "--out", tmp_path / ("x" * 300) / "m", "--model", nope)
    assert code == 2 and "x" * 300 in err and "Traceback" not in err


def test_console_entry_point_reports_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "iicl_fast", "ask", "--model", str(tmp_path / "x"), "q?"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"iicl-fast: error: unknown model '{tmp_path / 'x'}': not a local directory or .gguf file (iicl_fast never downloads)"


def test_session_eval_passkey_and_mc(tiny_dir, tmp_path, capsys):
    code, out, _ = run(capsys, "session-eval", "--task", "passkey", "--stream-tokens", 300, "--cache", 64,
                       "--trials", 2, "--model", tiny_dir, "--quiet")
    assert code == 0
    res = json.loads(out.strip().splitlines()[-1])
    assert res["task"] == "passkey" and 0.0 <= res["accuracy"] <= 1.0 and res["peak_cache"] == 64
    assert (res["sink"], res["budget"], res["recent"]) == (4, 44, 16) and res["tokens_per_s"] > 0
    row = lambda i, stem, ch, ans, **kw: json.dumps(  # noqa: E731
        {"id": i, "question": {"stem": stem, "choices": [{"label": "ABCD"[k], "text": c} for k, c in enumerate(ch)]},
         "answerKey": ans, **kw})
    keys = tmp_path / "keys.jsonl"
    keys.write_text("\n".join([row("key_0", "I want you to buy the GROCERY: [tea].", ["OK"], "A"),
                               row("0", "Where are books?", ["library", "sea"], "A"),
                               row("answer_0", "Which GROCERY?", ["eggs", "tea"], "B")]) + "\n")
    code, out, _ = run(capsys, "session-eval", "--task", "mc", "--data", keys, "--cache", 64,
                       "--model", tiny_dir, "--quiet")
    assert code == 0
    res = json.loads(out.strip().splitlines()[-1])
    assert res["episodes"] == 1 and res["memory_accuracy"] in (0.0, 1.0) and res["distractor_accuracy"] in (0.0, 1.0)
    rps = tmp_path / "rps.jsonl"
    rps.write_text("\n".join(row(i, "Please play a game of Rock-Paper-Scissors.", ["rock", "paper", "scissors"],
                                 "B", user_choice="A") for i in range(3)))
    code, out, _ = run(capsys, "session-eval", "--task", "mc", "--data", rps, "--cache", 64, "--trials", 3,
                       "--model", tiny_dir, "--quiet")
    res = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and res["rounds"] == 3
    assert abs(res["win_rate"] + res["tie_rate"] + res["loss_rate"] - 1.0) < 1e-9


def test_session_eval_bad_input(tiny_dir, tmp_path, capsys, monkeypatch):
    """Each bad setting: one line, exit 2, before any model loads (an 8B one takes minutes)."""
    import iicl_fast

    def no_load(*a, **k):
        raise AssertionError("the model loaded before the bad setting was named")
    monkeypatch.setattr(iicl_fast, "load_model", no_load)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "key_0", "question": {"stem": "x", "choices": []}}\n{"id": 1}\n')
    for argv, msg in [
        (["--task", "passkey", "--stream-tokens", 300, "--policy", "lru"], "unknown policy 'lru'"),
        (["--task", "passkey"], "needs --stream-tokens"),
        (["--task", "mc"], "needs --data"),
        (["--task", "mc", "--data", tmp_path / "missing.jsonl"], "no such file"),
        (["--task", "mc", "--data", bad], "bad.jsonl:2: not a SirLLM row"),
        (["--task", "passkey", "--stream-tokens", 300, "--cache", 8], "cache 8 is too small"),
        (["--task", "passkey", "--stream-tokens", 0], "--stream-tokens must be >= 1"),
        (["--task", "passkey", "--stream-tokens", 300, "--decay", 2], "decay must be in (0, 1], got 2.0"),
        (["--task", "passkey", "--stream-tokens", 300, "--decay", "nan"], "decay must be in (0, 1], got nan"),
        (["--task", "passkey", "--stream-tokens", 300, "--sink", -1], "sink must be an integer >= 0, got -1"),
        (["--task", "passkey", "--stream-tokens", 300, "--recent", -3], "recent must be an integer >= 0, got -3"),
    ]:
        code, out, err = run(capsys, "session-eval", *argv, "--model", tiny_dir, "--quiet")
        assert code == 2 and msg in err and out == "", (argv, err)


def test_consolidate_separate_writes_one_memory_per_file(tiny_dir, tmp_path, capsys):
    a, b = tmp_path / "karsk.txt", tmp_path / "cats.txt"
    a.write_text("The lighthouse of Karsk was built in 1871 by Ada Lindqvist.")
    b.write_text("The keeper feeds seven grey cats every morning.")
    out = tmp_path / "mems"
    code, _, err = run(capsys, "consolidate", a, b, "--out", out, "--separate", "--model", tiny_dir)
    assert code == 0, err
    for stem, text in (("karsk", a.read_text()), ("cats", b.read_text())):
        m = json.loads((out / stem / "manifest.json").read_text())
        assert len(m["chunks"]) == 1 and (out / stem / "adapter_model.safetensors").is_file()
    before = (out / "karsk" / "adapter_model.safetensors").read_bytes()
    code, _, err = run(capsys, "consolidate", a, b, "--out", out, "--separate", "--model", tiny_dir)
    assert code == 0 and "2 already there" in err                 # resume: nothing redone
    assert (out / "karsk" / "adapter_model.safetensors").read_bytes() == before
    c = tmp_path / "sub"
    c.mkdir()
    (c / "karsk.txt").write_text("Another text.")
    code, _, err = run(capsys, "consolidate", a, c / "karsk.txt", "--out", out, "--separate", "--model", tiny_dir)
    assert code == 2 and "share the stem 'karsk'" in err
