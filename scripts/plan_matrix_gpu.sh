#!/usr/bin/env bash
# Runs of the planner's validation matrix (python -m xcomp_lab.tools.plan_matrix) side by side on a GPU machine:
# one command there, after one preparation here.
#
#   mkdir -p .cache/plan-wheels && cp .whl/{transformers,tokenizers,huggingface_hub,accelerate,bitsandbytes,hf_xet}-*.whl \
#     .whl/{httpx2,httpcore2,h11,truststore,anyio,typer,annotated_doc,shellingham,filelock}-*.whl \
#     .cache/plan-wheels/              # here, after scripts/device_wheels.sh: transformers 5.24 and what its hub
#                                      # client needs beyond the GPU image (26 MB); on the image of 2026-12 the
#                                      # transformers and bitsandbytes wheels alone (17 MB) ran it (its hub 1.33,
#                                      # tokenizers 0.23.2 and accelerate 1.15.0 meet transformers 5.24's pins)
#   scripts/plan_matrix_gpu.sh 'int8: --quantizations int8 --workers 5' 'llava: --presets llava-1.5-7b --attns sdpa'
#                                      # on the GPU machine (carry .cache/plan-wheels; SITE: a folder already holding
#                                      # the course's other wheels, /tmp/site by default)
#
# Each argument is NAME: the matrix tool's arguments (--device cuda and --out are added: $WORK/NAME, with its log
# $WORK/NAME.log); every run has the DEADLINE_S deadline (seconds, 240 by default). Each build runs in a fresh
# process whatever runs beside it (the caching allocator is per process). JOBS_FILE: a file of more such jobs, one
# per line; PARALLEL: how many jobs run at once (all by default; each holds its model's weights in pinned host memory
# while it loads, so six 8B builds at once is what a 128 GiB host took). Writes $OUT/$ARCHIVE.tgz (ARCHIVE:
# plan-matrix by default), split into $OUT/$ARCHIVE.tgz.part-aa, -ab, ... of 15 MB where it is larger.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder the results go to (the device machine sets it)}"
joblist=("$@")
if [ -n "${JOBS_FILE:-}" ]; then
  while IFS= read -r line; do [ -n "$line" ] && joblist+=("$line"); done < "$JOBS_FILE"
fi
[ ${#joblist[@]} -gt 0 ] || { echo "usage: $0 'NAME: plan_matrix arguments' ... (or JOBS_FILE=file)" >&2; exit 2; }
SITE=${SITE:-/tmp/site} WORK=${WORK:-/tmp/plan-matrix} DEADLINE_S=${DEADLINE_S:-240} ARCHIVE=${ARCHIVE:-plan-matrix}
PARALLEL=${PARALLEL:-${#joblist[@]}}
python3 -m pip install -q --no-index --no-deps --target /tmp/plan-site .cache/plan-wheels/*.whl
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 PYTHONPATH=/tmp/plan-site:$SITE:$PWD
rm -rf "$WORK" && mkdir -p "$WORK"
status=0
for job in "${joblist[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$PARALLEL" ]; do wait -n || status=$?; done
  name=${job%%:*} args=${job#*:}
  # shellcheck disable=SC2086  # the job's arguments are words
  python3 -m xcomp_lab.tools.plan_matrix --device cuda --out "$WORK/$name" --deadline-s "$DEADLINE_S" $args \
    > "$WORK/$name.log" 2>&1 &
done
while [ "$(jobs -rp | wc -l)" -gt 0 ]; do wait -n || status=$?; done
tail -n 3 "$WORK"/*.log
du -sh "$WORK"/*
tar czf "$OUT/$ARCHIVE.tgz" -C "$WORK" .
if [ "$(stat -c %s "$OUT/$ARCHIVE.tgz")" -gt 15000000 ]; then
  split -b 15000000 "$OUT/$ARCHIVE.tgz" "$OUT/$ARCHIVE.tgz.part-" && rm "$OUT/$ARCHIVE.tgz"
fi
exit $status
