#!/usr/bin/env bash
# The planner's open calls on a GPU, one command on the GPU machine after one preparation here:
#   - the caching allocator's history (--trace) of LLaVA 1.5 and Idefics3 quantized (NF4, INT8; eager, sdpa;
#     batch 1 and 4; 512 and 2048 text tokens), where the reserved peaks are still off (results/plan-matrix-h200/README.md);
#   - every preset's INT8 calls again, whose records now hold the most LLM.int8() outlier columns one input held.
# The two run side by side (each build in its own process: the caching allocator is per process).
#
#   mkdir -p .cache/plan-wheels && cp .whl/{transformers,tokenizers,huggingface_hub,accelerate,bitsandbytes,hf_xet}-*.whl \
#     .cache/plan-wheels/              # here, after scripts/device_wheels.sh
#   scripts/plan_trace_gpu.sh          # on the GPU machine (carry .cache/plan-wheels; SITE: a folder already holding
#                                      # the course's other wheels, /tmp/site by default, e.g. from original_course_gpu.sh)
#
# Writes $OUT/plan-trace.tgz (traces/, int8/: each a matrix folder with records.jsonl and env.json; the log), split
# into $OUT/plan-trace.tgz.part-aa, -ab, ... of 15 MB where it is larger.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder the results go to (the device machine sets it)}"
SITE=${SITE:-/tmp/site} WORK=${WORK:-/tmp/plan-trace} DEADLINE_S=${DEADLINE_S:-240}
python3 -m pip install -q --no-index --no-deps --target /tmp/plan-site .cache/plan-wheels/*.whl
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 PYTHONPATH=/tmp/plan-site:$SITE:$PWD
rm -rf "$WORK" && mkdir -p "$WORK"
python3 -m xcomp_lab.tools.plan_matrix --device cuda --out "$WORK/traces" --presets llava-1.5-7b idefics3-8b \
  --quantizations nf4 int8 --attns eager sdpa --batches 1 4 --text-tokens 512 2048 --trace --workers 4 \
  --deadline-s "$DEADLINE_S" > "$WORK/traces.log" 2>&1 &
traces=$!
python3 -m xcomp_lab.tools.plan_matrix --device cuda --out "$WORK/int8" --quantizations int8 --workers 6 \
  --deadline-s "$DEADLINE_S" > "$WORK/int8.log" 2>&1 &
int8=$!
status=0
wait $traces || status=$?
wait $int8 || status=$?
tail -n 5 "$WORK/traces.log" "$WORK/int8.log"
du -sh "$WORK"/*
tar czf "$OUT/plan-trace.tgz" -C "$WORK" .
if [ "$(stat -c %s "$OUT/plan-trace.tgz")" -gt 15000000 ]; then
  split -b 15000000 "$OUT/plan-trace.tgz" "$OUT/plan-trace.tgz.part-" && rm "$OUT/plan-trace.tgz"
fi
exit $status
