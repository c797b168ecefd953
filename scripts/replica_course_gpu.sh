#!/usr/bin/env bash
# The course at full scale on a GPU with the course's replica: one command on the GPU machine, after one
# preparation here (scripts/device_wheels.sh makes .whl: papermill, nbconvert, the kernel, transformers 5.24 and
# bitsandbytes' CUDA 13 library; carry it). The full-size checkpoint is built there on the GPU with random FP16
# weights (seed 0, xcomp_lab.model.checkpoint.build_checkpoint), then every notebook runs at full scale under the
# 48 GB card the course emulates:
#
#   OUT=/some/folder scripts/replica_course_gpu.sh   # writes $OUT/full-h200.tgz (the edition and the run's folder)
#
# Knobs: ONLY (notebook prefixes, e.g. "00 01"; all by default), EDITION_NAME (full-h200), SEED (a folder holding
# an earlier run's executed notebooks, results.jsonl and timings.json, copied into the run's folder first: an ONLY
# run then publishes its notebooks with the earlier ones, e.g. SEED=results/full-h200/notebooks plus its files), LIMIT_S (seconds after
# which the course is interrupted as Ctrl-C would: it records where it stopped and the tar still gets made).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder the results go to (the device machine sets it)}"
EDITION_NAME=${EDITION_NAME:-full-h200}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false XCOMP_LAB_CACHE=${XCOMP_LAB_CACHE:-/tmp/xcomp-lab-cache}
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD JUPYTER_PATH=/tmp/site/share/jupyter
python3 -c "from xcomp_lab.model.checkpoint import build_checkpoint as b; print(b('full', 'float16', seed=0, device='cuda'))"
only=()
[ -n "${ONLY:-}" ] && only=(--only $ONLY)
mkdir -p "$OUT/course"
[ -n "${SEED:-}" ] && cp -r "$SEED"/. "$OUT/course/"
status=0
timeout -s INT -k 30 "${LIMIT_S:-86400}" python3 -m xcomp_lab.tools.course --scale full --device cuda --output "$OUT/course" --edition "$OUT/$EDITION_NAME" \
  "${only[@]}" || status=$?
tar czf "$OUT/$EDITION_NAME.tgz" -C "$OUT" course $([ -d "$OUT/$EDITION_NAME" ] && echo "$EDITION_NAME")
rm -rf "$OUT/course" "$OUT/$EDITION_NAME"
exit $status
