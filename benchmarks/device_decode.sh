#!/usr/bin/env bash
# Issue 12's figures in one device call (~8 min; `benchmarks/device_prepare.sh` first, carry .whl
# and .bench/tok, and pass the commit: the device's checkout reports a stale HEAD):
#   run: IICL_COMMIT=<short sha> bash benchmarks/device_decode.sh [chunk|variants|hfstatic]
# bench_generate's whole table in one run (64/200/400 rows × 128/512 new, the baselines, and
# iicl_fast_skinny: the layers' GEMMs through kernels/skinny_gemm.py), the step's GEMMs at row
# counts a compaction leaves (does cuBLASLt lose at unaligned M?), the GPU tests of the decoder;
# with "chunk": the paper chunk instead of the tests (phase peaks and what each phase leaves
# allocated); with "variants" the step's untried variants only: the skinny GEMM's GPU test, its
# settings swept against cuBLAS and cuBLASLt (cold weights), the attention's launch paths with the
# pipelined merge, bench_generate at 64 and 400 rows with the skinny GEMM, the pipelined merge,
# both, and the prefix part through flash / cuDNN (~9 min); with "hfstatic"
# the 64-row baselines again with transformers' static cache compiled (hf_generate_static, ~5 min).
: "${IICL_COMMIT:?set IICL_COMMIT=<short sha>: the device checkout reports a stale HEAD}"
source benchmarks/device_call.sh
R=$OUT/res; mkdir -p "$R"
t0=$(date +%s)
if [ "${1:-}" = variants ]; then
  timeout 140 python -m pytest -q tests/test_cuda_e2e.py -k "skinny or add_norm or sampler or cascade_decode or logits16" 2>&1 | tail -4
  timeout 160 python benchmarks/tune_skinny_gemm.py --sweep --out "$R/skinny_gemm_$IICL_COMMIT.json" 2>&1 | grep -v "^M=.*Error\|OutOfResources" | tail -30 | cut -c1-300
  echo "tune $(( $(date +%s) - t0 )) s"
  timeout 50 python benchmarks/tune_decode_attention.py --rows 64 200 --out "$R/decode_attention_$IICL_COMMIT.json" 2>&1 | tail -2 | cut -c1-400
  timeout 200 python benchmarks/bench_generate.py --rows 64 400 --new 128 --gemm --merge-pipe --flash-prefix \
    --out "$R/generate_variants_$IICL_COMMIT.json" 2>&1 | grep "^{" | cut -c1-300
  echo "done $(( $(date +%s) - t0 )) s"
  exit 0
fi
if [ "${1:-}" = hfstatic ]; then
  timeout 560 python benchmarks/bench_generate.py --rows 64 --new 128 --baselines --hf-static \
    --out "$R/generate_hfstatic_$IICL_COMMIT.json" 2>&1 | grep "^{" | cut -c1-300
  echo "done $(( $(date +%s) - t0 )) s"
  exit 0
fi
timeout 270 python benchmarks/bench_generate.py --rows 64 200 400 --new 128 512 --baselines --gemm \
  --out "$R/generate_$IICL_COMMIT.json" 2>&1 | grep "^{" | cut -c1-300
echo "bench_generate $(( $(date +%s) - t0 )) s"
timeout 60 python benchmarks/tune_decode_gemms.py --rows 61 64 93 96 97 203 387 397 400 --lean \
  --out "$R/gemm_lean_$IICL_COMMIT.json" 2>&1 | tail -9 | cut -c1-200
echo "gemms $(( $(date +%s) - t0 )) s"
if [ "${1:-}" = chunk ]; then
  timeout 300 python benchmarks/bench_consolidate.py --workload 8b_paper --out "$R/consolidate_8b_paper_$IICL_COMMIT.json" 2>&1 | tail -8
else
  timeout 250 python -m pytest -q tests/test_cuda_e2e.py tests/test_bank_cuda.py \
    -k "not demo_recall and not cli_consolidate and not static_greedy_matches and not cascade_greedy" 2>&1 | tail -8
fi
echo "done $(( $(date +%s) - t0 )) s"
