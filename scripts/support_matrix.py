"""The README's model-family support matrix, generated from the tests' results.

    IICL_SUPPORT_MATRIX=/tmp/matrix.json pytest -q tests/test_families.py
    python scripts/support_matrix.py /tmp/matrix.json            # rewrites the README's table

A cell is what the test of that family and feature recorded ("ok", "refused: <why>", the
loss path taken); a test that failed or did not run leaves "not tested"."""
import json
import sys
from pathlib import Path

BEGIN, END = "<!-- support-matrix:begin -->", "<!-- support-matrix:end -->"
COLUMNS = [("consolidate", "consolidate"), ("save_load", "save / load (+ plain peft)"),
           ("fused_loss", "fused loss"), ("generate", "generate = HF greedy"), ("retain", "retain (SirLLM)"),
           ("bank", "bank (consolidate_many)")]
ORDER = ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3"]


def table(results: dict) -> str:
    lines = ["| family | " + " | ".join(c for _, c in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for fam in ORDER + sorted(set(results) - set(ORDER)):
        row = results.get(fam, {})
        lines.append(f"| {fam} | " + " | ".join(row.get(k, "not tested") for k, _ in COLUMNS) + " |")
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: python scripts/support_matrix.py RESULTS.json", file=sys.stderr)
        return 2
    try:
        results = json.loads(Path(sys.argv[1]).read_text())
    except (OSError, json.JSONDecodeError) as e:
        print(f"support_matrix: cannot read {sys.argv[1]}: {e}", file=sys.stderr)
        return 2
    readme = Path(__file__).resolve().parent.parent / "README.md"
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        print(f"support_matrix: {readme} has no {BEGIN} … {END} markers", file=sys.stderr)
        return 2
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    tmp = readme.with_name(readme.name + ".tmp")
    tmp.write_text(head + BEGIN + "\n" + table(results) + "\n" + END + tail)
    tmp.replace(readme)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
