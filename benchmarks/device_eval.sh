#!/usr/bin/env bash
# The evaluation suite on the GPU machine, in steps over consecutive calls (the embedded
# model's GGUF goes over in two parts: .bench/smol.gguf.partaa in one call, partab in the next).
# Here first: bash benchmarks/device_prepare.sh (the ignored .whl/ and .bench/ it carries).
#   step 1: wheels, the first half of the GGUF, the CUDA tests that need no model file
#   step 2: join the GGUF; then each later step runs the eval suites named in $SUITES
set -uo pipefail
step=${1:?step}
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 IICL_TOKENIZER=$PWD/.bench/tok IICL_MODEL=/tmp/g/smol.gguf
mkdir -p /tmp/g /tmp/site "$OUT"
if [ "$step" = 1 ]; then
  pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -1
  cp .bench/smol.gguf.partaa /tmp/g/
  nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
  timeout 300 python -m pytest -q -x tests/test_cuda_e2e.py -k "sampling or cascade or eval_suites" -p no:cacheprovider 2>&1 | tail -5
  exit 0
fi
if [ ! -f /tmp/g/smol.gguf ]; then
  cat /tmp/g/smol.gguf.partaa .bench/smol.gguf.partab > /tmp/g/smol.gguf && rm /tmp/g/smol.gguf.partaa
  ls -la /tmp/g
fi
timeout ${LIMIT:-560} python benchmarks/eval_suite.py --model /tmp/g/smol.gguf --device cuda --out "$OUT" \
  --suite "${SUITES:-recall}" ${EVAL_ARGS:-} 2>&1 | grep -v -E "FutureWarning|return forward_call|warnings.warn"
