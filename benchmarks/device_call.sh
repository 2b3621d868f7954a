#!/usr/bin/env bash
# The GPU machine, one call at a time (benchmarks/NOTES.md: what each call measured).
#   common: wheels into /tmp/site, the tokenizer in .bench/tok
#   gguf1 / gguf2: the embedded model's GGUF in two parts over two consecutive calls, joined in /tmp
#   the 2M-token stress run: benchmarks/stress_2m.sh (its steps, and its state back in $OUT)
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 IICL_TOKENIZER=$PWD/.bench/tok
export TOKENIZERS_PARALLELISM=false
[ -d /tmp/site/gguf ] || pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -1
mkdir -p /tmp/g "$OUT"
if [ -f .bench/smol.gguf.partaa ]; then cp .bench/smol.gguf.partaa /tmp/g/; fi
if [ -f .bench/smol.gguf.partab ] && [ -f /tmp/g/smol.gguf.partaa ]; then
  cat /tmp/g/smol.gguf.partaa .bench/smol.gguf.partab > /tmp/g/smol.gguf && rm /tmp/g/smol.gguf.partaa
fi
[ -f /tmp/g/smol.gguf ] && export IICL_MODEL=/tmp/g/smol.gguf
nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv,noheader
python -c "import torch, transformers, peft, triton; print(torch.__version__, transformers.__version__, peft.__version__, triton.__version__)"
