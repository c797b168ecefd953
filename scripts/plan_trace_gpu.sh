#!/usr/bin/env bash
# The planner's open calls of 2026-12-02 on a GPU (scripts/plan_matrix_gpu.sh: its preparation, knobs and output,
# here $OUT/plan-trace.tgz with traces/ and int8/):
#   - the caching allocator's history (--trace) of LLaVA 1.5 and Idefics3 quantized (NF4, INT8; eager, sdpa;
#     batch 1 and 4; 512 and 2048 text tokens), where the reserved peaks are still off (results/plan-matrix-h200/README.md);
#   - every preset's INT8 calls again, whose records now hold the most LLM.int8() outlier columns one input held.
set -euo pipefail
cd "$(dirname "$0")/.."
ARCHIVE=plan-trace exec scripts/plan_matrix_gpu.sh \
  "traces: --presets llava-1.5-7b idefics3-8b --quantizations nf4 int8 --attns eager sdpa --batches 1 4 --text-tokens 512 2048 --trace --workers 4" \
  "int8: --quantizations int8 --workers 6"
