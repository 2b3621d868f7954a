#!/usr/bin/env bash
# The 2M-token stress run on the GPU machine, in device calls of < 10 minutes (issue 13).
# Source benchmarks/device_call.sh first (the GGUF joined in /tmp/g), then:
#
#   bash benchmarks/stress_2m.sh kill 270      run, SIGKILLed after 270 s (inside a chunk)
#   bash benchmarks/stress_2m.sh minutes 3.9   run (resuming), stopping cleanly after 3.9 minutes
#   bash benchmarks/stress_2m.sh rest 560      run (resuming) to the end and the evaluation
#
# The run lives in /tmp/s2m, which survives only while the machine is warm (30 s after a
# call). After every step its state (memory/, chunks.jsonl, runs.json, the stream) goes to
# $OUT/s2m_state as parts of < 16 MiB: if the machine was given back, copy them to
# .bench/s2m_state here and carry that folder in the call after the GGUF's two
# (the three calls within 30 s of each other), and the run resumes from it.
set -uo pipefail
RUN=${STRESS_RUN:-/tmp/s2m}
# STRESS_ARGS replaces the run's size and setting (a CPU smoke run of this script, say)
read -r -a SIZE <<< "${STRESS_ARGS:---device cuda --tokens 2000000 --facts 100 --preset stress}"
ARGS=(--model "$IICL_MODEL" "${SIZE[@]}" --out "$RUN")
if [ ! -d "$RUN/memory" ] && [ -d .bench/s2m_state ]; then
  mkdir -p "$RUN" && cat .bench/s2m_state/state.tar.part* | tar -x -C "$RUN" && echo "restored $(ls "$RUN")"
fi
case "$1" in
  kill) timeout -s KILL "$2" python -m iicl_fast stress "${ARGS[@]}" > /tmp/stress_run.log 2>&1 ;;
  minutes) python -m iicl_fast stress "${ARGS[@]}" --max-minutes "$2" > /tmp/stress_run.log 2>&1 ;;
  rest) timeout -s KILL "$2" python -m iicl_fast stress "${ARGS[@]}" > /tmp/stress_run.log 2>&1 ;;
  *) echo "usage: stress_2m.sh kill|minutes|rest N" >&2; exit 2 ;;
esac
echo "stress $1 $2: rc=$?"
grep -v -i "warn" /tmp/stress_run.log | tr '\r' '\n' | grep -v "^\s*$" | tail -n 3
tail -n 1 "$RUN/chunks.jsonl"; cat "$RUN/runs.json"; echo
mkdir -p "$OUT/s2m_state" "$OUT/stress_2m"
tar -c -C "$RUN" memory chunks.jsonl runs.json stream.json stream.txt 2>/dev/null | split -b 15m - "$OUT/s2m_state/state.tar.part"
for f in chunks.jsonl runs.json results.json stress_memory.png stress_recall.png; do
  [ -f "$RUN/$f" ] && cp "$RUN/$f" "$OUT/stress_2m/"
done
ls -la "$OUT/s2m_state" "$OUT/stress_2m"
